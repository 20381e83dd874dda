"""The run-time expression language: what is left of an expression for run time, as data.

The compile-time evaluator (`lang.evaluator`) folds everything it knows; a value that
depends on the run's context (`(ctx :k)`) or on a `doseq!!`/`pmap!!` variable stays
residual `Code`, with every known part folded in:

    (str "deploy " (ctx :service) " to " (count hosts))  ; hosts known: [a b]
    ==> Call("str", ("deploy ", Call("ctx", ("service",)), " to ", 2))

`Expr` is what the engine stores in a node (a leaf's payload, an `if!!` test, a
`doseq!!`/`pmap!!` collection): it evaluates its `Code` against the context when the
node is reached, and `bind` gives it the element of a `doseq!!`/`pmap!!` copy. Its data
form (`Expr.to_data`, `Expr.from_data`) is plain JSON; this module teaches it to the one
value codec (`values.register`), so a stored job holds `{"$deferred": ["expr", data]}`.

Only errors, names, values and the builtins sit below this module: no forms, no nodes.
Recursion here is bounded by `MAX_CODE_DEPTH` levels of run-time expression.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ablauf_lang import values
from ablauf_lang.errors import AblaufError, JobError, Span
from ablauf_lang.stdlib.builtins import BUILTINS, BuiltinError, show_value
from ablauf_lang.values import Keyword, Meter, TooLarge, freeze, is_truthy

__all__ = [
    "MAX_CODE_DEPTH",
    "MAX_CODE_SIZE",
    "AndCode",
    "Call",
    "Code",
    "Expr",
    "IfCode",
    "MapCode",
    "OrCode",
    "Var",
    "Vec",
    "code_from_data",
    "code_to_data",
    "free_vars",
    "run",
    "show_code",
]

# Nested run-time expressions (what is left for run time after folding).
MAX_CODE_DEPTH = 100
# Parts of one run-time expression, counted as if nothing were shared: `(let [b (str a a)
# c (str b b) ...])` on a run-time `a` doubles at each step.
MAX_CODE_SIZE = 10_000

# ---------------------------------------------------------------------------------------
# Run-time code: what is left of an expression once everything known is folded in.
# Operands are Code or constants (plain data).


@dataclass(frozen=True, slots=True)
class Code:
    """A run-time expression (residual code); `depth` is its nesting, `size` its parts
    (counted as if nothing were shared). Each kind of code below adds its operands."""

    depth: int = field(default=1, compare=False, kw_only=True)
    size: int = field(default=1, compare=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class Var(Code):
    """A `doseq!!`/`pmap!!` variable, bound per copy by `Expr.bind`."""

    name: str
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Call(Code):
    """A call of the builtin `fn` (user functions are inlined before run time)."""

    fn: str
    args: tuple[Any, ...]
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Vec(Code):
    """`[a b ...]` with a run-time item."""

    items: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class MapCode(Code):
    """`{k v ...}` with a run-time key or value."""

    pairs: tuple[tuple[Any, Any], ...]


@dataclass(frozen=True, slots=True)
class IfCode(Code):
    """`(if test then else)` with a run-time test."""

    test: Any
    then: Any
    other: Any
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class AndCode(Code):
    """`(and x ...)` from its first run-time operand on."""

    items: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class OrCode(Code):
    """`(or x ...)` from its first run-time operand on."""

    items: tuple[Any, ...]


def _parts(code: Code) -> Iterator[Any]:
    """The operands of a piece of code."""
    if isinstance(code, Call | Vec | AndCode | OrCode):
        yield from code.args if isinstance(code, Call) else code.items
    elif isinstance(code, MapCode):
        for k, v in code.pairs:
            yield k
            yield v
    elif isinstance(code, IfCode):
        yield code.test
        yield code.then
        yield code.other


def free_vars(code: Any) -> frozenset[str]:
    """The `doseq!!`/`pmap!!` variables a piece of code reads."""
    found: set[str] = set()
    stack = [code]
    while stack:
        c = stack.pop()
        if isinstance(c, Var):
            found.add(c.name)
        elif isinstance(c, Code):
            stack.extend(_parts(c))
    return frozenset(found)


def show_code(code: Any, depth: int = 0) -> str:
    """The source text of a piece of code: `(str "v" (ctx :version))`."""
    if not isinstance(code, Code):
        return show_value(code)
    if depth > MAX_CODE_DEPTH:
        return "..."
    d = depth + 1
    if isinstance(code, Var):
        return code.name
    if isinstance(code, Call):
        return "(" + " ".join([code.fn, *(show_code(a, d) for a in code.args)]) + ")"
    if isinstance(code, Vec):
        return "[" + " ".join(show_code(a, d) for a in code.items) + "]"
    if isinstance(code, MapCode):
        return "{" + " ".join(f"{show_code(k, d)} {show_code(v, d)}" for k, v in code.pairs) + "}"
    if isinstance(code, IfCode):
        parts = [show_code(code.test, d), show_code(code.then, d), show_code(code.other, d)]
        return "(if " + " ".join(parts) + ")"
    head = "and" if isinstance(code, AndCode) else "or"
    return "(" + " ".join([head, *(show_code(a, d) for a in _parts(code))]) + ")"


# ---------------------------------------------------------------------------------------
# Running code


def _runtime_error(message: str, span: Span | None, filename: str | None) -> AblaufError:
    if span is None:
        return AblaufError(message, filename=filename)
    return AblaufError(
        message, filename=span.filename or filename, line=span.line, column=span.column
    )


def run(
    code: Any,
    context: dict[str, Any],
    bindings: dict[str, Any],
    filename: str | None = None,
    meter: Meter | None = None,
) -> Any:
    """Evaluate code against the context; raise AblaufError naming its source position.

    What the builtins build is measured against the same budget as at compile time.
    """
    if not isinstance(code, Code):
        return code
    if code.depth > MAX_CODE_DEPTH or code.size > MAX_CODE_SIZE:
        raise _runtime_error("run-time expression nested too deeply or too large", None, filename)
    return _run(code, context, bindings, filename, Meter() if meter is None else meter)


def _run(
    code: Any, context: dict[str, Any], bindings: dict[str, Any], filename: str | None, meter: Meter
) -> Any:
    if not isinstance(code, Code):
        return code
    if isinstance(code, Var):
        if code.name not in bindings:
            raise _runtime_error(
                f"{code.name} is not bound here (a doseq!!/pmap!! variable used outside its body)",
                code.span,
                filename,
            )
        return bindings[code.name]
    if isinstance(code, Call):
        args = [_run(a, context, bindings, filename, meter) for a in code.args]
        fn = BUILTINS.get(code.fn)
        if fn is None:
            raise _runtime_error(f"unknown builtin function {code.fn}", code.span, filename)
        try:
            result = fn.fn(context, *args) if fn.needs_context else fn.fn(*args)
            meter.built(result)
        except BuiltinError as exc:
            raise _runtime_error(exc.message, code.span, filename) from None
        except TooLarge as exc:
            raise _runtime_error(f"this expression {exc.message}", code.span, filename) from None
        except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
            raise _runtime_error(f"{code.fn}: {exc}", code.span, filename) from None
        return result
    if isinstance(code, Vec):
        return _built(
            [_run(a, context, bindings, filename, meter) for a in code.items], meter, filename
        )
    if isinstance(code, MapCode):
        out = {}
        for k, v in code.pairs:
            key = _run(k, context, bindings, filename, meter)
            try:
                key = freeze(key)
            except TypeError:
                raise _runtime_error(
                    f"a map cannot be a map key: {show_value(key, 60)}", None, filename
                ) from None
            out[key] = _run(v, context, bindings, filename, meter)
        return _built(out, meter, filename)
    if isinstance(code, IfCode):
        test = _run(code.test, context, bindings, filename, meter)
        chosen = code.then if is_truthy(test) else code.other
        return _run(chosen, context, bindings, filename, meter)
    # and / or: stop at the first value that decides
    is_and = isinstance(code, AndCode)
    value: Any = True if is_and else None
    for item in _parts(code):
        value = _run(item, context, bindings, filename, meter)
        if is_truthy(value) != is_and:
            return value
    return value


def _built(value: Any, meter: Meter, filename: str | None) -> Any:
    try:
        meter.built(value)
    except TooLarge as exc:
        raise _runtime_error(f"a run-time expression {exc.message}", None, filename) from None
    return value


# ---------------------------------------------------------------------------------------
# The data form of code: constants through the one value codec (`values.encode`)

_WHAT = "a value in a run-time expression"


def _span_data(span: Span | None, filename: str | None) -> list[Any] | None:
    if span is None:
        return None
    if span.filename is not None and span.filename != filename:
        return [span.line, span.column, span.filename]
    return [span.line, span.column]


def _span_from(data: Any, filename: str | None) -> Span | None:
    if not data:
        return None
    return Span(data[0], data[1], filename=data[2] if len(data) > 2 else filename)


def code_to_data(code: Any, filename: str | None, depth: int = 0) -> Any:
    """JSON-able data for code: `["call", "str", [...], [line, col]]`, constants quoted."""
    if not isinstance(code, Code):
        if isinstance(code, Keyword):
            return ["kw", str(code)]  # kept a keyword, so it prints as one
        if code is None or isinstance(code, bool | int | float | str):
            return str(code) if isinstance(code, str) else code
        return ["quote", values.encode(code, _WHAT)]
    if depth > MAX_CODE_DEPTH:
        raise JobError("run-time expression nested too deeply to store")
    d = depth + 1
    if isinstance(code, Var):
        return ["var", code.name, _span_data(code.span, filename)]
    if isinstance(code, Call):
        args = [code_to_data(a, filename, d) for a in code.args]
        return ["call", code.fn, args, _span_data(code.span, filename)]
    if isinstance(code, Vec):
        return ["vec", [code_to_data(a, filename, d) for a in code.items]]
    if isinstance(code, MapCode):
        return [
            "map",
            [[code_to_data(k, filename, d), code_to_data(v, filename, d)] for k, v in code.pairs],
        ]
    if isinstance(code, IfCode):
        parts = [code_to_data(p, filename, d) for p in _parts(code)]
        return ["if", *parts, _span_data(code.span, filename)]
    head = "and" if isinstance(code, AndCode) else "or"
    return [head, [code_to_data(a, filename, d) for a in _parts(code)]]


def _measure(parts: tuple[Any, ...] | list[Any]) -> dict[str, int]:
    """The `depth` and `size` of code over `parts` (what the evaluator computes as it
    builds code, recomputed for code read back from storage)."""
    depth = 1 + max((p.depth for p in parts if isinstance(p, Code)), default=0)
    size = 1 + sum(p.size if isinstance(p, Code) else 1 for p in parts)
    return {"depth": depth, "size": size}


def code_from_data(data: Any, filename: str | None, depth: int = 0) -> Any:
    """Invert `code_to_data`."""
    if not isinstance(data, list):
        return data
    if depth > MAX_CODE_DEPTH:
        raise JobError("stored run-time expression is nested too deeply")
    d = depth + 1
    try:
        op = data[0]
        if op == "quote":
            return values.decode(data[1])
        if op == "kw":
            return Keyword(data[1])
        if op == "var":
            return Var(data[1], _span_from(data[2], filename))
        if op == "call":
            args = tuple(code_from_data(a, filename, d) for a in data[2])
            return Call(data[1], args, _span_from(data[3], filename), **_measure(args))
        if op == "vec":
            items = tuple(code_from_data(a, filename, d) for a in data[1])
            return Vec(items, **_measure(items))
        if op == "map":
            pairs = tuple(
                (code_from_data(k, filename, d), code_from_data(v, filename, d)) for k, v in data[1]
            )
            flat = [p for kv in pairs for p in kv]
            return MapCode(pairs, **_measure(flat))
        if op == "if":
            test, then, other = (code_from_data(p, filename, d) for p in data[1:4])
            return IfCode(
                test,
                then,
                other,
                _span_from(data[4], filename),
                **_measure((test, then, other)),
            )
        if op in ("and", "or"):
            items = tuple(code_from_data(a, filename, d) for a in data[1])
            return (AndCode if op == "and" else OrCode)(items, **_measure(items))
    except (IndexError, TypeError, ValueError):
        pass
    raise JobError(f"stored run-time expression is damaged: {str(data)[:80]}")


# ---------------------------------------------------------------------------------------
# The run-time expression the engine stores


class Expr:
    """A run-time expression in a node: evaluated against the context when reached.

    `code` is what is left of the source expression once every compile-time part is
    folded; `bindings` holds the `doseq!!`/`pmap!!` variables it reads (set by `bind`);
    `filename` places errors whose position names no file of its own.
    """

    # Its tag in the stored form `{"$deferred": [tag, data]}`.
    tag: ClassVar[str] = "expr"
    __slots__ = ("bindings", "code", "filename", "free")

    def __init__(
        self,
        code: Any,
        filename: str | None = None,
        bindings: dict[str, Any] | None = None,
        free: frozenset[str] | None = None,
    ) -> None:
        self.code = code
        self.filename = filename
        self.bindings = dict(bindings or {})
        self.free = free_vars(code) if free is None else free

    def evaluate(self, context: dict[str, Any]) -> Any:
        """The expression's value against `context`; AblaufError (with position) on failure."""
        return run(self.code, context, self.bindings, self.filename)

    def bind(self, bindings: dict[str, Any]) -> Expr:
        """A copy with the variables it reads among `bindings` bound (inner ones win)."""
        relevant = {k: v for k, v in bindings.items() if k in self.free}
        if not relevant:
            return self
        return Expr(self.code, self.filename, {**self.bindings, **relevant}, self.free)

    def to_data(self) -> Any:
        """`{"code": ..., "file": ..., "bind": {...}}`: plain JSON."""
        data: dict[str, Any] = {"code": code_to_data(self.code, self.filename)}
        if self.filename is not None:
            data["file"] = self.filename
        if self.bindings:
            data["bind"] = values.encode(self.bindings, _WHAT)
        return data

    @classmethod
    def from_data(cls, data: Any) -> Expr:
        """Invert `to_data`. The code (and its free variables) of equal stored code is
        decoded once and shared: the copies of a `pmap!!` template differ only in their
        bindings, and a wide run holds one of each per leaf (`_shared_code`)."""
        if not isinstance(data, dict) or "code" not in data:
            raise JobError(f"stored run-time expression is damaged: {str(data)[:80]}")
        filename = data.get("file")
        code, free = _shared_code(data["code"], filename)
        return cls(code, filename, values.decode(data.get("bind") or {}), free)

    @property
    def show(self) -> str:
        """The expression as source text, with its bound variables as a `let`."""
        text = show_code(self.code)
        if not self.bindings:
            return text
        pairs = " ".join(f"{k} {show_value(v)}" for k, v in sorted(self.bindings.items()))
        return f"(let [{pairs}] {text})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Expr):
            return NotImplemented
        return self.code == other.code and self.bindings == other.bindings

    def __hash__(self) -> int:
        return hash(show_code(self.code))

    def __repr__(self) -> str:
        return self.show


SHARED_CODE = 4096  # decoded run-time codes kept for sharing (the least recently used go)
SHARED_TEXT = 4096  # characters: longer stored code is decoded each time, not kept


def _shared_code(data: Any, filename: str | None) -> tuple[Any, frozenset[str]]:
    """`code_from_data` and `free_vars` of stored code, once for equal code (immutable
    values: safe to share), keyed by its JSON text."""
    try:
        text = json.dumps(data, separators=(",", ":"))
    except (RecursionError, TypeError, ValueError):
        text = None  # not what the codec writes: `code_from_data` says what is wrong
    if text is None or len(text) > SHARED_TEXT:
        code = code_from_data(data, filename)
        return code, free_vars(code)
    return _code_of(text, filename)


@functools.lru_cache(maxsize=SHARED_CODE)
def _code_of(text: str, filename: str | None) -> tuple[Any, frozenset[str]]:
    code = code_from_data(json.loads(text), filename)
    return code, free_vars(code)


# ---------------------------------------------------------------------------------------
# Teaching the value codec: `{"$deferred": ["expr", data]}` stored, `{"$expr": source}` shown


def _store(value: Expr) -> list[Any]:
    return [Expr.tag, value.to_data()]


def _load(data: Any) -> Expr:
    if not isinstance(data, list) or len(data) != 2 or not isinstance(data[0], str):
        raise JobError(f"stored run-time expression is damaged: {str(data)[:80]}")
    tag, inner = data
    if tag != Expr.tag:
        raise JobError(f"stored job holds a run-time expression of unknown kind {tag!r}")
    return Expr.from_data(inner)


def _shown(value: Expr) -> dict[str, str]:
    return {"$expr": value.show}


values.register("deferred", Expr, _store, _load, plain=_shown)
