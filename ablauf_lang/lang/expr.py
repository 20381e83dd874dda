"""Expressions: a small evaluator over forms, at compile time and at run time.

At compile time `Evaluator` evaluates the language's expressions (`let`, `if`, `fn`,
`for`, builtins, user functions...) in an `Env` chain. It is a *partial* evaluator: a
value it cannot know yet, because it depends on the run's context (`(ctx :k)`) or on a
`doseq!!`/`pmap!!` variable, becomes residual `Code`, with everything known folded in:

    (str "deploy " (ctx :service) " to " (count hosts))  ; hosts known: [a b]
    ==> Call("str", ("deploy ", Call("ctx", ("service",)), " to ", 2))

User functions are inlined, so they take run-time arguments like any other; only a
branch on a run-time value cannot pick between *workflows* (that is what `if!!` is for).

At run time `Expr`, the `Deferred` the engine stores in a node, evaluates its `Code`
against the context when the node is reached (and `bind` gives it the element of a
`doseq!!`/`pmap!!` copy). `Expr.to_data` is plain JSON, so jobs holding expressions are
stored like any other. Workflow forms (`do!!`, `log!!`...) are the compiler's: it hands
the evaluator a `Host` that builds them, so this module needs neither Lark nor the compiler.

Recursion here is bounded by the nesting the program itself spells out: past
`MAX_DEPTH` levels of nested expressions and function calls, or `MAX_CODE_DEPTH` levels
of run-time expression, a clear error is raised instead of a RecursionError.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from ablauf_lang import values
from ablauf_lang.engine.nodes import BranchView, Deferred, Leaf
from ablauf_lang.errors import AblaufCompileError, AblaufError, JobError, Span
from ablauf_lang.lang.forms import (
    Form,
    Keyword,
    List,
    Map,
    NotData,
    Symbol,
    Vector,
    span_of,
    to_data,
)
from ablauf_lang.stdlib.builtins import (
    BUILTINS,
    Builtin,
    BuiltinError,
    is_truthy,
    show_value,
    type_name,
)
from ablauf_lang.values import Meter, TooLarge, freeze

__all__ = [
    "MAX_CODE_DEPTH",
    "MAX_CODE_SIZE",
    "MAX_DEPTH",
    "MAX_STEPS",
    "SPECIAL_FORMS",
    "AndCode",
    "Call",
    "Closure",
    "Code",
    "Env",
    "Evaluator",
    "Expr",
    "Host",
    "IfCode",
    "MapCode",
    "OrCode",
    "Var",
    "Vec",
    "decode_data",
    "describe",
    "did_you_mean",
    "encode_data",
    "first_non_data",
    "is_workflow",
    "run",
]

# Nested expressions and function calls, at compile time.
MAX_DEPTH = 100
# Nested run-time expressions (what is left for run time after folding).
MAX_CODE_DEPTH = 100
# Parts of one run-time expression, counted as if nothing were shared: `(let [b (str a a)
# c (str b b) ...])` on a run-time `a` doubles at each step.
MAX_CODE_SIZE = 10_000
# Evaluation steps per compile: a runaway recursive function stops with an error.
MAX_STEPS = 1_000_000

# ---------------------------------------------------------------------------------------
# Environments


class Env(dict[str, Any]):
    """A compile-time scope: names bound to values, with a link to the enclosing scope."""

    def __init__(self, bindings: dict[str, Any] | None = None, outer: Env | None = None) -> None:
        super().__init__(bindings or {})
        self.outer = outer

    def find(self, name: str) -> Env | None:
        """Return the innermost scope that binds `name`, or None."""
        env: Env | None = self
        while env is not None:
            if name in env:
                return env
            env = env.outer
        return None

    def names(self) -> list[str]:
        """Every name this scope and its enclosing scopes define, sorted (no builtins)."""
        seen: set[str] = set()
        env: Env | None = self
        while env is not None:
            seen.update(env)
            env = env.outer
        return sorted(seen)


def did_you_mean(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    """Return "; did you mean x or y?" for the candidates close to `name`, or ""."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    if not close:
        return ""
    text = " or ".join(prefix + c for c in close)
    return f"; did you mean {text}" + ("" if text.endswith("?") else "?")


# ---------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True, eq=False)
class Closure:
    """A user function: `(defn name [a b & more] body...)` or `(fn [a] body...)`."""

    type_name: ClassVar[str] = "function"
    name: str | None
    params: tuple[str, ...]
    rest: str | None
    body: tuple[tuple[Form, Span | None], ...]
    env: Env
    span: Span | None = None

    @property
    def show(self) -> str:
        return f"<fn {self.name}>" if self.name else "<fn>"

    def arity_text(self) -> str:
        """`2 arguments`, `at least 1 argument`."""
        n = len(self.params)
        word = "argument" if n == 1 else "arguments"
        return f"at least {n} {word}" if self.rest else f"{n} {word}"


def is_workflow(value: Any) -> bool:
    """True for a workflow value: a node tree built by a workflow form."""
    return isinstance(value, Leaf | BranchView)


_KIND_FORMS = {
    "seq": "do!!",
    "par": "dopar!!",
    "try": "try!!",
    "if": "if!!",
    "doseq": "doseq!!",
    "pmap": "pmap!!",
}


def describe(value: Any, limit: int = 40) -> str:
    """Name a value for a message: `integer 3`, `a workflow (do!!)`, `the function f`."""
    if is_workflow(value):
        if isinstance(value, Leaf):
            return f"a workflow (the action {value.action})"
        return f"a workflow ({_KIND_FORMS.get(value.kind, value.kind)})"
    if isinstance(value, Closure):
        return f"the function {value.name}" if value.name else "a function"
    if isinstance(value, Builtin):
        return f"the builtin function {value.name}"
    if isinstance(value, Code):
        return f"the run-time expression {show_code(value)}"
    if value is None:
        return "nil"
    return f"{type_name(value)} {show_value(value, limit)}"


_NOT_DATA: Any = object()


def _inspect(value: Any) -> tuple[Any, str | None]:
    """`Evaluator.inspect` without the memory: one walk, no recursion."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if v is None or isinstance(v, bool | float | str):
            continue
        if isinstance(v, int):
            if values.int_too_large(v):
                return _NOT_DATA, f"holds an integer of more than {values.MAX_INT_DIGITS:,} digits"
        elif isinstance(v, list | tuple | dict):
            if depth >= values.MAX_DEPTH:
                return _NOT_DATA, (
                    f"is nested too deeply (more than {values.MAX_DEPTH} levels of vectors "
                    "and maps)"
                )
            if isinstance(v, dict):
                stack.extend((k, depth + 1) for k in v)
                stack.extend((x, depth + 1) for x in v.values())
            else:
                stack.extend((x, depth + 1) for x in v)
        else:
            return v, None
    return _NOT_DATA, None


def first_non_data(value: Any) -> Any:
    """Return the first part of `value` that is not plain data (or `_NOT_DATA` if none)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if v is None or isinstance(v, bool | int | float | str):
            continue
        if isinstance(v, list | tuple):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        else:
            return v
    return _NOT_DATA


# ---------------------------------------------------------------------------------------
# Run-time code: what is left of an expression once everything known is folded in.
# Operands are Code or constants (plain data).


class Code:
    """A run-time expression (residual code); `depth` is its nesting, `size` its parts
    (counted as if nothing were shared)."""

    __slots__ = ()
    depth: int
    size: int


@dataclass(frozen=True, slots=True)
class Var(Code):
    """A `doseq!!`/`pmap!!` variable, bound per copy by `Expr.bind`."""

    name: str
    span: Span | None = field(default=None, compare=False)
    depth: int = field(default=1, compare=False)
    size: int = field(default=1, compare=False)


@dataclass(frozen=True, slots=True)
class Call(Code):
    """A call of the builtin `fn` (user functions are inlined before run time)."""

    fn: str
    args: tuple[Any, ...]
    span: Span | None = field(default=None, compare=False)
    depth: int = field(default=1, compare=False)
    size: int = field(default=1, compare=False)


@dataclass(frozen=True, slots=True)
class Vec(Code):
    """`[a b ...]` with a run-time item."""

    items: tuple[Any, ...]
    depth: int = field(default=1, compare=False)
    size: int = field(default=1, compare=False)


@dataclass(frozen=True, slots=True)
class MapCode(Code):
    """`{k v ...}` with a run-time key or value."""

    pairs: tuple[tuple[Any, Any], ...]
    depth: int = field(default=1, compare=False)
    size: int = field(default=1, compare=False)


@dataclass(frozen=True, slots=True)
class IfCode(Code):
    """`(if test then else)` with a run-time test."""

    test: Any
    then: Any
    other: Any
    span: Span | None = field(default=None, compare=False)
    depth: int = field(default=1, compare=False)
    size: int = field(default=1, compare=False)


@dataclass(frozen=True, slots=True)
class AndCode(Code):
    """`(and x ...)` from its first run-time operand on."""

    items: tuple[Any, ...]
    depth: int = field(default=1, compare=False)
    size: int = field(default=1, compare=False)


@dataclass(frozen=True, slots=True)
class OrCode(Code):
    """`(or x ...)` from its first run-time operand on."""

    items: tuple[Any, ...]
    depth: int = field(default=1, compare=False)
    size: int = field(default=1, compare=False)


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
# JSON for stored expressions


def encode_data(value: Any) -> Any:
    """Return plain data as JSON-able data (maps with odd keys and tuples tagged), iteratively."""
    return values.encode(value, "a value in a run-time expression")


def decode_data(data: Any) -> Any:
    """Invert `encode_data`, iteratively."""
    return values.decode(data)


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
        return ["quote", encode_data(code)]
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


def _depth(parts: Iterable[Any]) -> int:
    return 1 + max((p.depth for p in parts if isinstance(p, Code)), default=0)


def _size(parts: Iterable[Any]) -> int:
    return 1 + sum(p.size if isinstance(p, Code) else 1 for p in parts)


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
            return decode_data(data[1])
        if op == "kw":
            return Keyword(data[1])
        if op == "var":
            return Var(data[1], _span_from(data[2], filename))
        if op == "call":
            args = tuple(code_from_data(a, filename, d) for a in data[2])
            return Call(data[1], args, _span_from(data[3], filename), _depth(args), _size(args))
        if op == "vec":
            items = tuple(code_from_data(a, filename, d) for a in data[1])
            return Vec(items, _depth(items), _size(items))
        if op == "map":
            pairs = tuple(
                (code_from_data(k, filename, d), code_from_data(v, filename, d)) for k, v in data[1]
            )
            flat = [p for kv in pairs for p in kv]
            return MapCode(pairs, _depth(flat), _size(flat))
        if op == "if":
            test, then, other = (code_from_data(p, filename, d) for p in data[1:4])
            return IfCode(
                test,
                then,
                other,
                _span_from(data[4], filename),
                _depth((test, then, other)),
                _size((test, then, other)),
            )
        if op in ("and", "or"):
            items = tuple(code_from_data(a, filename, d) for a in data[1])
            return (AndCode if op == "and" else OrCode)(items, _depth(items), _size(items))
    except (IndexError, TypeError, ValueError):
        pass
    raise JobError(f"stored run-time expression is damaged: {str(data)[:80]}")


# ---------------------------------------------------------------------------------------
# The run-time expression the engine stores


class Expr(Deferred):
    """A run-time expression in a node: evaluated against the context when reached.

    `code` is what is left of the source expression once every compile-time part is
    folded; `bindings` holds the `doseq!!`/`pmap!!` variables it reads (set by `bind`);
    `filename` places errors whose position names no file of its own.
    """

    tag = "expr"
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
            data["bind"] = encode_data(self.bindings)
        return data

    @classmethod
    def from_data(cls, data: Any) -> Expr:
        """Invert `to_data`."""
        if not isinstance(data, dict) or "code" not in data:
            raise JobError(f"stored run-time expression is damaged: {str(data)[:80]}")
        filename = data.get("file")
        code = code_from_data(data["code"], filename)
        return cls(code, filename, decode_data(data.get("bind") or {}))

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


# ---------------------------------------------------------------------------------------
# The compile-time evaluator


class Host(Protocol):
    """What the evaluator needs from the compiler: workflow forms, errors, printing."""

    filename: str | None

    def workflow_form(self, name: str) -> bool:
        """True when `name` heads a workflow form (`do!!`, `log!!`...)."""
        ...

    def form_names(self) -> Iterable[str]:
        """The names of the workflow forms (for "did you mean")."""
        ...

    def workflow(self, form: List, env: Env) -> Any:
        """Build the workflow value of a workflow form."""
        ...

    def top_level_form(self, name: str) -> bool:
        """True when `name` heads a top-level declaration (`def`, `import`...)."""
        ...

    def error(self, message: str, span: Span | None) -> AblaufCompileError:
        """A compile error located at `span`."""
        ...

    def show(self, form: Form) -> str:
        """A short printed form for messages."""
        ...


# A special form: (evaluator, form, env) -> value.
Special = Callable[["Evaluator", List, Env], Any]
_SPECIALS: dict[str, Special] = {}


def special(name: str) -> Callable[[Special], Special]:
    """Register the decorated method as the special form `name`."""

    def register(fn: Special) -> Special:
        _SPECIALS[name] = fn
        return fn

    return register


_TOO_DEEP = (
    f"expressions and function calls nested too deeply (more than {MAX_DEPTH} levels; "
    "a recursive function must stop on a value known at compile time)"
)

RUNTIME_HINT = "it depends on the run's context (ctx) or on a doseq!!/pmap!! variable"


class Evaluator:
    """Evaluate forms at compile time; leave what depends on run time as `Code`."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.depth = 0
        self.steps = 0
        # What evaluation builds is measured against a budget (values.Meter).
        self.meter = Meter()
        # Containers `inspect` found to be plain data: id -> the container.
        self.inspected: dict[int, Any] = {}

    # -------------------------------------------------- helpers

    def error(self, message: str, span: Span | None) -> AblaufCompileError:
        return self.host.error(message, span)

    def arity(self, form: List, low: int, high: int | None, usage: str) -> None:
        """Require `low` to `high` arguments after the head (None: no upper bound)."""
        got = len(form.items) - 1
        if got < low or (high is not None and got > high):
            raise self.error(
                f"{form.items[0]} takes {_wanted(low, high)}, got {got}: usage {usage}", form.span
            )

    def symbol(self, form: List, index: int, what: str) -> str:
        """The name of the symbol at `index` of `form` (a name being bound)."""
        item = form.items[index] if index < len(form.items) else None
        return self.name_of(item, form.span_of(index), what)

    def name_of(self, item: Any, span: Span | None, what: str) -> str:
        """Check `item` is a symbol that may be bound, and return its name."""
        if not isinstance(item, Symbol) or item.name == "&":
            raise self.error(f"{what} must be a symbol, got {self.host.show(item)}", span)
        name = item.name
        if name in _SPECIALS or self.host.workflow_form(name) or self.host.top_level_form(name):
            raise self.error(f"cannot bind {name}: it names a built-in form", span)
        return name

    # -------------------------------------------------- evaluation

    def evaluate(self, form: Form, env: Env, span: Span | None = None) -> Any:
        """Evaluate `form` in `env`: a value, a workflow, a function, or run-time `Code`."""
        if self.depth:
            return self.ev(form, env, span)
        try:
            return self.ev(form, env, span)
        except RecursionError:
            # A backstop: MAX_DEPTH keeps well below Python's limit, unless the caller's
            # own stack is already deep.
            raise self.error(_TOO_DEEP, span_of(form) or span) from None

    def ev(self, form: Form, env: Env, span: Span | None = None) -> Any:
        """Evaluate `form` (see `evaluate`; this one is called from within an evaluation)."""
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise self.error(
                f"compile-time evaluation takes too long (more than {MAX_STEPS} steps): "
                "is a recursive function running away?",
                span_of(form) or span,
            )
        if isinstance(form, Symbol):
            return self.lookup(form, env)
        if not isinstance(form, List | Vector | Map):
            return form  # nil, booleans, numbers, strings, keywords
        if not isinstance(form, List):
            try:
                return to_data(form, strict=True)  # literal data: no need to evaluate parts
            except NotData:
                pass
            except TypeError as exc:
                raise self.error(str(exc), form.span or span) from None
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise self.error(_TOO_DEEP, form.span or span)
            if isinstance(form, List):
                return self.ev_list(form, env, span)
            if isinstance(form, Vector):
                items = [self.ev(x, env, form.span_of(i)) for i, x in enumerate(form.items)]
                if any(isinstance(v, Code) for v in items):
                    return self.residual(lambda d, n: Vec(tuple(items), d, n), items, form.span)
                return self.built(items, form.span)
            return self.ev_map(form, env)
        finally:
            self.depth -= 1

    def built(self, value: Any, span: Span | None) -> Any:
        """Measure a value evaluation just built against the budget; return it."""
        try:
            self.meter.built(value)
        except TooLarge as exc:
            raise self.error(f"this expression {exc.message}", span) from None
        return value

    def ev_body(self, form: List, start: int, env: Env) -> Any:
        """Evaluate the forms of `form` from `start` on; the value is the last one's."""
        value = None
        for i in range(start, len(form.items)):
            value = self.ev(form.items[i], env, form.span_of(i))
        return value

    def ev_map(self, form: Map, env: Env) -> Any:
        pairs = [
            (self.ev(k, env, form.span_of(2 * i)), self.ev(v, env, form.span_of(2 * i + 1)))
            for i, (k, v) in enumerate(form.pairs)
        ]
        if any(isinstance(p, Code) for kv in pairs for p in kv):
            flat = [p for kv in pairs for p in kv]
            return self.residual(lambda d, n: MapCode(tuple(pairs), d, n), flat, form.span)
        out: dict[Any, Any] = {}
        for i, (k, v) in enumerate(pairs):
            try:
                out[freeze(k)] = v
            except TypeError:
                raise self.error("a map cannot be a map key", form.span_of(2 * i)) from None
        return self.built(out, form.span)

    def lookup(self, symbol: Symbol, env: Env) -> Any:
        """The value a symbol names: a local or definition, else a builtin."""
        name = symbol.name
        scope = env.find(name)
        if scope is not None:
            return scope[name]
        found = BUILTINS.get(name)
        if found is not None:
            return found
        if name in _SPECIALS or self.host.workflow_form(name) or self.host.top_level_form(name):
            raise self.error(f"{name} is a form, not a value: use it as ({name} ...)", symbol.span)
        hint = did_you_mean(name, [*env.names(), *BUILTINS])
        raise self.error(f"unbound symbol {name}{hint}", symbol.span)

    def ev_list(self, form: List, env: Env, span: Span | None) -> Any:
        items = form.items
        if not items:
            return []
        head = items[0]
        if isinstance(head, Symbol):
            name = head.name
            handler = _SPECIALS.get(name)
            if handler is not None:
                return handler(self, form, env)
            if self.host.workflow_form(name):
                return self.host.workflow(form, env)
            if self.host.top_level_form(name):
                raise self.error(f"{name} is only allowed at the top level of a program", form.span)
            scope = env.find(name)
            if scope is not None:
                fn = scope[name]
            elif name in BUILTINS:
                fn = BUILTINS[name]
            else:
                forms: Iterable[str] = getattr(self.host, "form_names", tuple)()
                if name.endswith("!!"):
                    # Workflow forms end in !!: look among them (and the user's names) first.
                    hint = did_you_mean(name, [*forms, *env.names()])
                    raise self.error(f"unknown form {name}{hint}", head.span)
                hint = did_you_mean(name, [*env.names(), *BUILTINS, *_SPECIALS, *forms])
                raise self.error(f"unknown function {name}{hint}", head.span)
        else:
            fn = self.ev(head, env, form.span_of(0))
        args = [self.ev(items[i], env, form.span_of(i)) for i in range(1, len(items))]
        return self.apply(fn, args, form)

    def apply(self, fn: Any, args: list[Any], form: List) -> Any:
        """Call a function value with evaluated arguments."""
        if isinstance(fn, Builtin):
            return self.call_builtin(fn, args, form)
        if isinstance(fn, Closure):
            return self.call_closure(fn, args, form)
        if isinstance(fn, Keyword):
            # (:k m) and (:k m default) look the keyword up, as in Clojure.
            if not 1 <= len(args) <= 2:
                raise self.error(
                    f"a keyword called as a function takes 1 to 2 arguments, got {len(args)}: "
                    "usage (:k m) or (:k m default)",
                    form.span,
                )
            return self.call_builtin(BUILTINS["get"], [args[0], fn, *args[1:]], form)
        head = self.host.show(form.items[0])
        if isinstance(fn, Code):
            raise self.error(
                f"cannot call {head}: it is only known at run time ({RUNTIME_HINT}); "
                "functions must be known at compile time",
                form.span_of(0),
            )
        raise self.error(f"cannot call {head}: it is {describe(fn)}, not a function", form.span)

    def call_builtin(self, fn: Builtin, args: list[Any], form: List) -> Any:
        n = len(args)
        if n < fn.min_args or (fn.max_args is not None and n > fn.max_args):
            raise self.error(
                f"{fn.name} takes {_wanted(fn.min_args, fn.max_args)}, got {n}", form.span
            )
        if fn.needs_context or any(isinstance(a, Code) for a in args):
            return self.residual(
                lambda d, n: Call(fn.name, tuple(args), form.span, d, n), args, form.span
            )
        try:
            result = fn.fn(*args)
        except BuiltinError as exc:
            raise self.error(exc.message, form.span) from None
        except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
            raise self.error(f"{fn.name}: {exc}", form.span) from None
        return self.built(result, form.span)

    def call_closure(self, fn: Closure, args: list[Any], form: List) -> Any:
        n, want = len(args), len(fn.params)
        if n < want or (fn.rest is None and n > want):
            name = fn.name or "this function"
            raise self.error(f"{name} takes {fn.arity_text()}, got {n}", form.span)
        scope = Env(dict(zip(fn.params, args, strict=False)), fn.env)
        if fn.rest is not None:
            more = args[want:]
            if any(isinstance(a, Code) for a in more):
                scope[fn.rest] = self.residual(lambda d, n: Vec(tuple(more), d, n), more, form.span)
            else:
                scope[fn.rest] = self.built(more, form.span)
        # The call's own form counted as a level of nesting: so does each recursive call.
        value = None
        for body_form, body_span in fn.body:
            value = self.ev(body_form, scope, body_span)
        return value

    # -------------------------------------------------- residual code

    def residual(
        self, make: Callable[[int, int], Code], parts: Iterable[Any], span: Span | None
    ) -> Code:
        """Build run-time code from operands, checking constants are data, depth and size."""
        depth = size = 1
        for p in parts:
            if isinstance(p, Code):
                depth = max(depth, p.depth + 1)
                size += p.size
                continue
            size += 1
            bad, problem = self.inspect(p)
            if bad is not _NOT_DATA:
                raise self.error(
                    f"{describe(bad)} cannot be part of a run-time expression "
                    f"(this expression is only known at run time: {RUNTIME_HINT})",
                    span,
                )
            if problem is not None:
                raise self.error(f"a value in this run-time expression {problem}", span)
        if depth > MAX_CODE_DEPTH:
            raise self.error(
                f"run-time expression nested too deeply (more than {MAX_CODE_DEPTH} levels)", span
            )
        if size > MAX_CODE_SIZE:
            raise self.error(
                f"run-time expression too large (more than {MAX_CODE_SIZE:,} parts once its "
                "names are replaced by what they stand for)",
                span,
            )
        return make(depth, size)

    def inspect(self, value: Any) -> tuple[Any, str | None]:
        """(the first part of `value` that is not data, or `_NOT_DATA`; what else is wrong
        with it as a value a node keeps, or None). Containers found fine are remembered."""
        if not isinstance(value, list | tuple | dict):
            return first_non_data(value), None
        if id(value) in self.inspected:
            return _NOT_DATA, None
        bad, problem = _inspect(value)
        if bad is _NOT_DATA and problem is None:
            self.inspected[id(value)] = value  # kept alive, so the id stays its own
        return bad, problem

    def data(self, form: Form, env: Env, span: Span | None, what: str) -> Any:
        """Evaluate a form a node keeps (payload, test, collection): data or an `Expr`."""
        if not isinstance(form, Symbol | List):
            try:
                value = to_data(form, strict=True)  # literal data: no need to evaluate it
            except (NotData, TypeError):
                pass  # evaluated below, which reports a bad map key where it is
            else:
                return self.runtime_value(value, span, what)
        return self.runtime_value(self.evaluate(form, env, span), span, what)

    def runtime_value(self, value: Any, span: Span | None, what: str) -> Any:
        """Check a value a node keeps (payload, test, collection): data or an `Expr`."""
        if isinstance(value, Code):
            return Expr(value, self.host.filename)
        bad, problem = self.inspect(value)
        if bad is not _NOT_DATA:
            raise self.error(f"{what} must be data, got {describe(bad)}", span)
        if problem is not None:
            raise self.error(f"{what} {problem}", span)
        return value

    # -------------------------------------------------- functions

    def make_fn(
        self,
        env: Env,
        name: str | None,
        params: Any,
        params_span: Span | None,
        form: List,
        body: int,
    ) -> Closure:
        """A closure over `env`: a parameter vector, and the forms of `form` from `body` on."""
        if not isinstance(params, Vector):
            raise self.error(
                f"expected a parameter vector like [a b & more], got {self.host.show(params)}",
                params_span,
            )
        names: list[str] = []
        rest: str | None = None
        items = params.items
        i = 0
        while i < len(items):
            item, where = items[i], params.span_of(i)
            if isinstance(item, Symbol) and item.name == "&":
                if i != len(items) - 2:
                    raise self.error("& must be followed by exactly one parameter name", where)
                rest = self.name_of(items[i + 1], params.span_of(i + 1), "a parameter")
                if rest in names:
                    raise self.error(f"parameter {rest} appears twice", params.span_of(i + 1))
                break
            pname = self.name_of(item, where, "a parameter")
            if pname in names:
                raise self.error(f"parameter {pname} appears twice", where)
            names.append(pname)
            i += 1
        return Closure(
            name,
            tuple(names),
            rest,
            tuple((form.items[j], form.span_of(j)) for j in range(body, len(form.items))),
            env,
            form.span,
        )


def _wanted(low: int, high: int | None) -> str:
    if high == low:
        text = f"{low}"
    elif high is None:
        text = f"at least {low}"
    else:
        text = f"{low} to {high}"
    return f"{text} argument{'' if text in ('1', 'at least 1') else 's'}"


# ---------------------------------------------------------------------------------------
# Special forms


# (quote x)
@special("quote")
def _quote(ev: Evaluator, form: List, env: Env) -> Any:
    ev.arity(form, 1, 1, "(quote x)")
    try:
        return to_data(form.items[1])
    except TypeError as exc:
        raise ev.error(str(exc), form.span_of(1)) from None


# (do x ... y)
@special("do")
def _do(ev: Evaluator, form: List, env: Env) -> Any:
    return ev.ev_body(form, 1, env)


def _branch_value(ev: Evaluator, value: Any, form: List, name: str) -> Any:
    """A branch of an if/when whose test is only known at run time must be data."""
    bad = first_non_data(value)
    if bad is not _NOT_DATA and not isinstance(value, Code) and is_workflow(bad):
        raise ev.error(
            f"this {name}'s test is only known at run time ({RUNTIME_HINT}), so it cannot "
            f"choose between workflows: use {name}!! to choose at run time",
            form.span,
        )
    return value


# (if test then else?)
@special("if")
def _if(ev: Evaluator, form: List, env: Env) -> Any:
    ev.arity(form, 2, 3, "(if test then else?)")
    test = ev.ev(form.items[1], env, form.span_of(1))
    if isinstance(test, Code):
        then = _branch_value(ev, ev.ev(form.items[2], env, form.span_of(2)), form, "if")
        other = None
        if len(form.items) > 3:
            other = _branch_value(ev, ev.ev(form.items[3], env, form.span_of(3)), form, "if")
        return ev.residual(
            lambda d, n: IfCode(test, then, other, form.span, d, n), (test, then, other), form.span
        )
    if is_truthy(test):
        return ev.ev(form.items[2], env, form.span_of(2))
    return ev.ev(form.items[3], env, form.span_of(3)) if len(form.items) > 3 else None


# (when test body...)
@special("when")
def _when(ev: Evaluator, form: List, env: Env) -> Any:
    ev.arity(form, 1, None, "(when test body...)")
    test = ev.ev(form.items[1], env, form.span_of(1))
    if isinstance(test, Code):
        then = _branch_value(ev, ev.ev_body(form, 2, env), form, "when")
        return ev.residual(
            lambda d, n: IfCode(test, then, None, form.span, d, n), (test, then), form.span
        )
    return ev.ev_body(form, 2, env) if is_truthy(test) else None


def _bindings(ev: Evaluator, form: List, what: str) -> Vector:
    """The binding vector `[name value ...]` of a let or for."""
    vec = form.items[1] if len(form.items) > 1 else None
    if not isinstance(vec, Vector):
        raise ev.error(
            f"{what} needs a binding vector like [name value ...], got {ev.host.show(vec)}",
            form.span_of(1),
        )
    if len(vec.items) % 2:
        raise ev.error(
            f"{what} bindings come in pairs: this name has no value",
            vec.span_of(len(vec.items) - 1),
        )
    return vec


# (let [name value ...] body...)
@special("let")
def _let(ev: Evaluator, form: List, env: Env) -> Any:
    ev.arity(form, 1, None, "(let [name value ...] body...)")
    vec = _bindings(ev, form, "let")
    scope = Env({}, env)
    for i in range(0, len(vec.items), 2):
        name = ev.name_of(vec.items[i], vec.span_of(i), "a let name")
        scope[name] = ev.ev(vec.items[i + 1], scope, vec.span_of(i + 1))
    return ev.ev_body(form, 2, scope)


def _logic(ev: Evaluator, form: List, env: Env, is_and: bool) -> Any:
    # Known operands before the first run-time one decide or drop out; the rest is kept.
    value: Any = True if is_and else None
    kept: list[Any] = []
    for i in range(1, len(form.items)):
        v = ev.ev(form.items[i], env, form.span_of(i))
        if kept or isinstance(v, Code):
            kept.append(v)
            if not isinstance(v, Code) and is_truthy(v) != is_and:
                break  # a known operand that decides: later ones are never reached
            continue
        value = v
        if is_truthy(v) != is_and:
            return v
    if not kept:
        return value
    cls = AndCode if is_and else OrCode
    return ev.residual(lambda d, n: cls(tuple(kept), d, n), kept, form.span)


# (and x ...)
@special("and")
def _and(ev: Evaluator, form: List, env: Env) -> Any:
    return _logic(ev, form, env, True)


# (or x ...)
@special("or")
def _or(ev: Evaluator, form: List, env: Env) -> Any:
    return _logic(ev, form, env, False)


# (fn [params] body...)
@special("fn")
def _fn(ev: Evaluator, form: List, env: Env) -> Any:
    ev.arity(form, 1, None, "(fn [params] body...)")
    return ev.make_fn(env, None, form.items[1], form.span_of(1), form, 2)


# (for [x coll y coll2 :when test :let [a 1]] body...)
@special("for")
def _for(ev: Evaluator, form: List, env: Env) -> Any:
    ev.arity(form, 1, None, "(for [x coll] body...)")
    vec = _bindings(ev, form, "for")
    if not vec.items:
        raise ev.error("for needs at least one binding, like [x coll]", vec.span)
    clauses: list[tuple[str, Any, Any, Span | None]] = []
    for i in range(0, len(vec.items), 2):
        key, value, where = vec.items[i], vec.items[i + 1], vec.span_of(i + 1)
        if isinstance(key, Keyword):
            if key not in ("when", "let"):
                raise ev.error(f"unknown for option :{key} (known: :when, :let)", vec.span_of(i))
            if key == "let" and not (isinstance(value, Vector) and len(value.items) % 2 == 0):
                raise ev.error("for :let needs a binding vector like [name value ...]", where)
            clauses.append((str(key), None, value, where))
        else:
            clauses.append(("bind", ev.name_of(key, vec.span_of(i), "a for name"), value, where))
    if clauses[0][0] != "bind":
        raise ev.error("for must start with a binding like [x coll]", vec.span_of(0))
    results: list[Any] = []
    # Depth-first over the clauses without recursion: (clause index, scope) frames.
    stack: list[tuple[int, Env]] = [(0, env)]
    while stack:
        index, scope = stack.pop()
        if index == len(clauses):
            results.append(ev.ev_body(form, 2, scope))
            continue
        kind, name, value_form, where = clauses[index]
        if kind == "bind":
            coll = ev.ev(value_form, scope, where)
            items = _for_items(ev, coll, where)
            stack.extend((index + 1, Env({name: x}, scope)) for x in reversed(items))
        elif kind == "when":
            test = ev.ev(value_form, scope, where)
            if isinstance(test, Code):
                raise ev.error(
                    f"for :when must be known at compile time, but {RUNTIME_HINT}", where
                )
            if is_truthy(test):
                stack.append((index + 1, scope))
        else:
            inner = Env({}, scope)
            for j in range(0, len(value_form.items), 2):
                n = ev.name_of(value_form.items[j], value_form.span_of(j), "a let name")
                inner[n] = ev.ev(value_form.items[j + 1], inner, value_form.span_of(j + 1))
            stack.append((index + 1, inner))
    if any(isinstance(r, Code) for r in results):
        return ev.residual(lambda d, n: Vec(tuple(results), d, n), results, form.span)
    return ev.built(results, form.span)


def _for_items(ev: Evaluator, coll: Any, span: Span | None) -> list[Any]:
    if coll is None:
        return []
    if isinstance(coll, dict):
        return [[k, v] for k, v in coll.items()]
    if isinstance(coll, list | tuple):
        return list(coll)
    if isinstance(coll, Code):
        raise ev.error(
            f"for needs a collection known at compile time, but {RUNTIME_HINT}: "
            "go over it at run time with doseq!! or pmap!!",
            span,
        )
    raise ev.error(f"for needs a vector or a map to go over, got {describe(coll)}", span)


SPECIAL_FORMS: tuple[str, ...] = tuple(_SPECIALS)
