"""The compile-time evaluator: a small partial evaluator over forms, in an `Env` chain.

`Evaluator` evaluates the language's expressions (`let`, `if`, `fn`, `for`, builtins,
user functions...) at compile time. A value it cannot know yet, because it depends on the
run's context (`(ctx :k)`) or on a `doseq!!`/`pmap!!` variable, becomes residual `Code`
(`ablauf_lang.code`), with everything known folded in; a node keeps it as a `code.Expr`.

User functions are inlined, so they take run-time arguments like any other; only a
branch on a run-time value cannot pick between *workflows* (that is what `if!!` is for).
Workflow forms (`do!!`, `log!!`...) are the compiler's: it hands the evaluator a `Host`
that builds them, so this module needs neither Lark nor the compiler. Special forms
register with `@special(name)`, one function per form.

Recursion here is bounded by the nesting the program itself spells out: past
`MAX_DEPTH` levels of nested expressions and function calls (or `code.MAX_CODE_DEPTH`
levels of run-time expression) a clear error is raised instead of a RecursionError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from ablauf_lang import values
from ablauf_lang.code import (
    MAX_CODE_DEPTH,
    MAX_CODE_SIZE,
    AndCode,
    Call,
    Code,
    Expr,
    IfCode,
    MapCode,
    OrCode,
    Vec,
    show_code,
)
from ablauf_lang.engine.kinds import Kind, Leaf
from ablauf_lang.errors import AblaufCompileError, Span
from ablauf_lang.lang.forms import (
    Form,
    List,
    Map,
    NotData,
    Symbol,
    Vector,
    span_of,
    to_data,
)
from ablauf_lang.names import did_you_mean
from ablauf_lang.stdlib.builtins import (
    BUILTINS,
    Builtin,
    BuiltinError,
    show_value,
    type_name,
)
from ablauf_lang.values import Keyword, Meter, TooLarge, freeze, is_truthy

__all__ = [
    "MAX_DEPTH",
    "MAX_STEPS",
    "RUNTIME_HINT",
    "SPECIAL_FORMS",
    "Closure",
    "Env",
    "Evaluator",
    "Host",
    "describe",
    "first_non_data",
    "is_data",
    "is_workflow",
    "special",
]

# Nested expressions and function calls, at compile time.
MAX_DEPTH = 100
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
    return isinstance(value, Kind)


def describe(value: Any, limit: int = 40) -> str:
    """Name a value for a message: `integer 3`, `a workflow (do!!)`, `the function f`."""
    if is_workflow(value):
        if isinstance(value, Leaf):
            return f"a workflow (the action {value.action})"
        return f"a workflow ({value.label or value.kind})"
    if isinstance(value, Closure):
        return f"the function {value.name}" if value.name else "a function"
    if isinstance(value, Builtin):
        return f"the builtin function {value.name}"
    if isinstance(value, Code):
        return f"the run-time expression {show_code(value)}"
    if value is None:
        return "nil"
    return f"{type_name(value)} {show_value(value, limit)}"


# What `first_non_data` finds in plain data.
_NOT_DATA: Any = values.ALL_DATA


def first_non_data(value: Any) -> Any:
    """Return the first part of `value` that is not plain data (or `_NOT_DATA` if none)."""
    return values.scan(value)[0]


def is_data(value: Any) -> bool:
    """True for plain data (what a payload may hold): no function, workflow or code."""
    return values.scan(value)[0] is _NOT_DATA


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
                    return self.residual(
                        lambda d, n: Vec(tuple(items), depth=d, size=n), items, form.span
                    )
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
            return self.residual(
                lambda d, n: MapCode(tuple(pairs), depth=d, size=n), flat, form.span
            )
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
                forms = self.host.form_names()
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
                lambda d, n: Call(fn.name, tuple(args), form.span, depth=d, size=n), args, form.span
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
                scope[fn.rest] = self.residual(
                    lambda d, n: Vec(tuple(more), depth=d, size=n), more, form.span
                )
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
            return values.scan(value)
        if id(value) in self.inspected:
            return _NOT_DATA, None
        bad, problem = values.scan(value)
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
            lambda d, n: IfCode(test, then, other, form.span, depth=d, size=n),
            (test, then, other),
            form.span,
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
            lambda d, n: IfCode(test, then, None, form.span, depth=d, size=n),
            (test, then),
            form.span,
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
    return ev.residual(lambda d, n: cls(tuple(kept), depth=d, size=n), kept, form.span)


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
        return ev.residual(lambda d, n: Vec(tuple(results), depth=d, size=n), results, form.span)
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
