"""Hypothesis strategies shared by the tests."""

from __future__ import annotations

import math
import re
from typing import Any

from hypothesis import strategies as st

from ablauf_lang.lang.forms import List, Map, Symbol, Vector
from ablauf_lang.values import Keyword

# =======================================================================================
# Reader forms (reader, printer and compiler tests)
# =======================================================================================

# Characters a symbol may start with, and continue with (see grammar/ablauf.lark); a few
# non-ASCII letters stand for the rest of `\w`.
_NAME_START = "abcxyzABCXYZ_*+!-?<>=/.$&%éλЖ"
_NAME_REST = _NAME_START + "0123456789':#"


def _reads_as_symbol(name: str) -> bool:
    # A symbol cannot start like a number (`-1`, `+.5`); nil/true/false are constants.
    return not re.match(r"[+-]?\.?[0-9]", name) and name not in ("nil", "true", "false")


symbol_names: st.SearchStrategy[str] = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from(_NAME_START),
    st.text(alphabet=_NAME_REST, max_size=8),
).filter(_reads_as_symbol)

keyword_names: st.SearchStrategy[str] = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from(_NAME_START + "0123456789'#"),
    st.text(alphabet=_NAME_REST, max_size=8),
)

symbols: st.SearchStrategy[Symbol] = symbol_names.map(Symbol)
keywords: st.SearchStrategy[Keyword] = keyword_names.map(Keyword)

# Strings: any text (control characters, quotes, backslashes, non-BMP), plus lone
# surrogates, which only a \uXXXX escape can spell.
strings: st.SearchStrategy[str] = st.one_of(
    st.text(),
    st.text(alphabet='"\\\n\t\r ab\x00\x7fé😀'),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=2),
)

scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    strings,
    keywords,
    symbols,
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    items = st.lists(children, max_size=5).map(tuple)
    return st.one_of(
        items.map(List),
        items.map(Vector),
        st.lists(st.tuples(children, children), max_size=4).map(lambda ps: Map(tuple(ps))),
    )


forms: st.SearchStrategy[Any] = st.recursive(scalars, _containers, max_leaves=30)


def same_form(a: Any, b: Any) -> bool:
    """Compare forms strictly: a Keyword is no str, a bool no int, an int no float."""
    if type(a) is not type(b):
        return False
    if isinstance(a, List | Vector):
        return len(a.items) == len(b.items) and all(map(same_form, a.items, b.items))
    if isinstance(a, Map):
        return len(a.pairs) == len(b.pairs) and all(
            same_form(ka, kb) and same_form(va, vb)
            for (ka, va), (kb, vb) in zip(a.pairs, b.pairs, strict=True)
        )
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return bool(a == b)


# =======================================================================================
# Workflow source text (compiler tests)
# =======================================================================================

_leaf_sources: st.SearchStrategy[str] = st.one_of(
    st.integers(0, 99).map(lambda i: f"(log!! {i})"),
    st.sampled_from(["(fail!!)", '(fail!! "boom")']),
    st.integers(0, 99).map(lambda i: f"(action!! :test/act {{:n {i}}})"),
    st.integers(0, 99).map(lambda i: f"(idempotent-action!! :test/act [{i}])"),
    st.integers(0, 99).map(lambda i: f"(with-augment [:out [:ctx :k{i}]] (log!! {{:out {i}}}))"),
)


def _branch_sources(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    many = st.lists(children, max_size=4).map(" ".join)
    return st.one_of(
        many.map(lambda body: f"(do!! {body})"),
        many.map(lambda body: f"(dopar!! {body})"),
        st.tuples(many, st.none() | many, st.none() | many).map(
            lambda parts: "(try!! {}{}{})".format(
                parts[0],
                "" if parts[1] is None else f" (rescue!! {parts[1]})",
                "" if parts[2] is None else f" (finally!! {parts[2]})",
            )
        ),
    )


workflow_sources: st.SearchStrategy[str] = st.recursive(
    _leaf_sources, _branch_sources, max_leaves=25
)
