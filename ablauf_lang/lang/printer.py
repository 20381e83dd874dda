"""Printer: forms -> canonical source text, the inverse of the reader.

`read_one(print_form(f)) == f` for every form the reader can produce: keywords print
as `:name`, strings with escapes, floats so they read back as floats. Containers print
on one line with single spaces; deep nesting is printed without recursion.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from ablauf_lang.lang.forms import Form, List, Map, Symbol, Vector
from ablauf_lang.values import Keyword

__all__ = ["print_form", "print_forms"]

# What the reader accepts as a symbol or keyword name (see grammar/ablauf.lark).
_SYMBOL = re.compile(r"(?![+-]?\.?[0-9])[\w*+!\-?<>=/.$&%][\w*+!\-?<>=/.$&%':#]*")
_KEYWORD = re.compile(r"[\w*+!\-?<>=/.$&%'#][\w*+!\-?<>=/.$&%':#]*")
_CONSTANTS = frozenset({"nil", "true", "false"})

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
# Characters printed as an escape: the named ones, other control characters, and lone
# surrogates (which no encoder accepts raw).
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f\ud800-\udfff]')


def print_form(form: Form) -> str:
    """Return the canonical text of `form`, which reads back as an equal form."""
    out: list[str] = []
    # Work stack: forms still to print, and literal text (closing brackets, spaces)
    # wrapped in `_Text` so it cannot be mistaken for a string form.
    todo: list[Form | _Text] = [form]
    while todo:
        item = todo.pop()
        if isinstance(item, _Text):
            out.append(item.text)
        elif isinstance(item, List | Vector | Map):
            opener, closer = _BRACKETS[type(item)]
            out.append(opener)
            todo.append(_Text(closer))
            todo.extend(_spaced(reversed(_elements(item))))
        else:
            out.append(_atom(item))
    return "".join(out)


def print_forms(forms: Iterable[Form]) -> str:
    """Return the canonical text of a program: one top-level form per line."""
    return "".join(print_form(form) + "\n" for form in forms)


_BRACKETS: dict[type, tuple[str, str]] = {List: ("(", ")"), Vector: ("[", "]"), Map: ("{", "}")}


def _elements(form: List | Vector | Map) -> list[Form]:
    """Return a container's elements in order (a map's keys and values alternate)."""
    if isinstance(form, Map):
        return [x for pair in form.pairs for x in pair]
    return list(form.items)


class _Text:
    """Literal output text on the printer's work stack."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


_SPACE = _Text(" ")


def _spaced(items: Iterable[Form]) -> list[Form | _Text]:
    """Interleave single spaces between `items`."""
    out: list[Form | _Text] = []
    for item in items:
        if out:
            out.append(_SPACE)
        out.append(item)
    return out


def _atom(form: Form) -> str:
    """Return the text of a scalar form; raise ValueError for one the reader cannot read."""
    if form is None:
        return "nil"
    if form is True:
        return "true"
    if form is False:
        return "false"
    if isinstance(form, Keyword):
        if not _KEYWORD.fullmatch(form):
            raise ValueError(f"cannot print keyword {str(form)!r}: not a valid keyword name")
        return ":" + form
    if isinstance(form, str):
        return '"' + _NEEDS_ESCAPE.sub(_escape, form) + '"'
    if isinstance(form, Symbol):
        if not _SYMBOL.fullmatch(form.name) or form.name in _CONSTANTS:
            raise ValueError(f"cannot print symbol {form.name!r}: it would not read back")
        return form.name
    if isinstance(form, int):
        return str(form)
    if isinstance(form, float):
        if not math.isfinite(form):
            raise ValueError(f"cannot print {form!r}: ablauf has no literal for it")
        return repr(form)  # shortest text that reads back as the same float, e.g. 1e+16
    raise ValueError(f"cannot print {form!r}: not an ablauf form")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _ESCAPES.get(char) or f"\\u{ord(char):04x}"
