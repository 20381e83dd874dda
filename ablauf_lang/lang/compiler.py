"""Compiler: reader forms -> the lowered workflow tree (Leaf, Seq, Par, Try, If, Doseq...).

Each workflow form has one rule, registered by head symbol with `@rule("do!!")` (Hy's
`builds_model`). A rule checks its form and returns a `Plan`: the node's kind, how to
build it, and its children, still as forms. `Compiler.lower` walks plans with an explicit
stack, numbering nodes in pre-order, so 1,000 levels of `do!!` need no recursion.
Other modules add node kinds by registering more rules.

Everything else is an expression for `expr.Evaluator`, which hands workflow forms back
to the compiler (the `Host` protocol): so `(def step (log!! 1))` binds a workflow value,
a function may return one, and `(for [h hosts] (log!! h))` is a list of them, spliced
into its parent. Values are copied with fresh ids wherever they are used, so one value
used twice gives two sets of nodes. Payloads, `if!!` tests and `doseq!!` collections that
depend on the run (`ctx`, a `doseq!!` variable) are kept as `expr.Expr`.

A program is a sequence of top-level forms: declarations (`def`, `defn`, `import`, see
`TOP_LEVEL_RULES`) and workflows; its workflow is the last form.

Time (`sleep!!`, `await!!`, `timeout!!`, leaf options): durations and instants written in
the program are checked here and stored as seconds; one that uses `ctx` stays an `Expr`
for the engine. `with-defaults` hands its options down lexically, in a `DefaultsEnv`.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pyrsistent import pvector

from ablauf_lang.code import Code, Expr, MapCode, Var
from ablauf_lang.engine.kinds import (
    Augment,
    Deadline,
    Doseq,
    If,
    Leaf,
    Node,
    Par,
    Pmap,
    Seq,
    Try,
    renumber,
)
from ablauf_lang.errors import AblaufCompileError, AblaufError, Span
from ablauf_lang.lang.evaluator import (
    SPECIAL_FORMS,
    Closure,
    Env,
    Evaluator,
    describe,
    is_workflow,
)
from ablauf_lang.lang.forms import Form, List, Map, Symbol, Vector, span_of
from ablauf_lang.lang.loader import ImportRefused, Loader
from ablauf_lang.lang.printer import print_form
from ablauf_lang.lang.reader import gc_paused, read, strip_bom
from ablauf_lang.names import DEFAULT_OPTIONS, LEAF_OPTIONS, RETRY_OPTIONS, did_you_mean
from ablauf_lang.stdlib.actions import AWAIT, SLEEP
from ablauf_lang.stdlib.builtins import BUILTINS, show_value
from ablauf_lang.stdlib.durations import DURATION_UNITS, parse_duration, parse_instant
from ablauf_lang.values import Keyword

__all__ = [
    "LEAF_OPTIONS",
    "RETRY_DEFAULTS",
    "RULES",
    "TOP_LEVEL_RULES",
    "Child",
    "Compiler",
    "DefaultsEnv",
    "Plan",
    "compile_forms",
    "compile_source",
    "head_name",
    "leaf_defaults",
    "rule",
    "top_level_rule",
    "with_deadline",
]

WORKFLOW_HINT = "a workflow (do!!, dopar!!, try!!, an action...)"

# Options a leaf accepts in `(action!! :ns/name payload {...})`: `names.LEAF_OPTIONS`
# (imported above, so `compiler.LEAF_OPTIONS` stays where it was).

# A `:retry` policy's values where the map leaves them out (`:retry true`: all of them).
RETRY_DEFAULTS: dict[str, Any] = {
    "max": 3,
    "delay": 1.0,
    "backoff": 2.0,
    "max-delay": None,
    "jitter": False,
    "on": None,
}

# ---------------------------------------------------------------------------------------
# Plans: a node before it has an id


class Child(NamedTuple):
    """A child still to compile: its form, where it is, and the scope to compile it in."""

    form: Form
    span: Span | None
    env: Env


# Build a node from its pre-order id and its children's nodes.
Builder = Callable[[int, list[Node]], Node]


@dataclass(slots=True)
class Plan:
    """A node about to be built: its kind (as in `Node.kind`), builder and children.

    `node`: a workflow value already built (a `def`, a function's result); lowering
    copies it with fresh ids instead of calling `build`.
    """

    kind: str
    build: Builder
    span: Span | None
    children: Sequence[Child | Plan] = ()
    node: Node | None = None


# ---------------------------------------------------------------------------------------
# Rule registries

# A rule compiles one list form headed by its symbol into a plan.
Rule = Callable[["Compiler", List, Env], Plan]
RULES: dict[str, Rule] = {}

# A top-level rule handles a declaration (`def`, `defn`, `import`: added by a later
# issue) by binding names in the program's scope; it builds no node.
TopLevelRule = Callable[["Compiler", List, Env], None]
TOP_LEVEL_RULES: dict[str, TopLevelRule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register the decorated function as the rule for forms headed by `names`."""

    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return register


def top_level_rule(*names: str) -> Callable[[TopLevelRule], TopLevelRule]:
    """Register the decorated function as the rule for top-level declarations `names`."""

    def register(fn: TopLevelRule) -> TopLevelRule:
        for name in names:
            TOP_LEVEL_RULES[name] = fn
        return fn

    return register


# ---------------------------------------------------------------------------------------
# The compiler


@dataclass
class Compiler:
    """Compile forms from one source text; errors point into that text.

    `env` is the program's scope: `def`, `defn` and `import` bind names there (the REPL
    passes one env for a whole session). `loader` is shared with the compilers of the
    modules this one imports.
    """

    source: str | None = None
    filename: str | None = None
    env: Env = field(default_factory=Env)
    loader: Loader = field(default_factory=Loader)
    defined: list[str] = field(default_factory=list)  # names this file's def/defn bound

    def __post_init__(self) -> None:
        self.evaluator = Evaluator(self)
        self.loader.start(self.source, self.filename)

    # -- errors --

    def error(self, message: str, span: Span | None) -> AblaufCompileError:
        """Return a compile error located at `span` (in whichever file it is)."""
        if span is None:
            return AblaufCompileError(message, filename=self.filename, source=self.source)
        source = self.source
        if span.filename is not None and span.filename != self.filename:
            source = self.loader.sources.get(span.filename, source)
        return AblaufCompileError(
            message,
            filename=span.filename or self.filename,
            line=span.line,
            column=span.column,
            source=source,
        )

    def arity(self, form: List, low: int, high: int | None, usage: str) -> None:
        """Require `low` to `high` arguments after the head (None: no upper bound)."""
        self.evaluator.arity(form, low, high, usage)

    # -- the evaluator's host --

    def workflow_form(self, name: str) -> bool:
        """True when `name` heads a workflow form."""
        return name in RULES

    def form_names(self) -> list[str]:
        """The names of the workflow forms (for "did you mean")."""
        return list(RULES)

    def top_level_form(self, name: str) -> bool:
        """True when `name` heads a top-level declaration."""
        return name in TOP_LEVEL_RULES

    def workflow(self, form: List, env: Env) -> Node:
        """The workflow value of a workflow form (ids local: copies are renumbered)."""
        name = head_name(form)
        assert name is not None
        return self.lower(RULES[name](self, form, env))

    def show(self, form: Form) -> str:
        """A short printed form for messages."""
        return show(form)

    def evaluate(self, form: Form, span: Span | None, env: Env) -> Any:
        """Evaluate an expression at compile time (run-time parts are left as `Code`)."""
        return self.evaluator.evaluate(form, env, span)

    def runtime(self, form: List | Vector, index: int, env: Env, what: str) -> Any:
        """Evaluate item `index` of `form` into data, or an `Expr` evaluated at run time."""
        return self.evaluator.data(form.items[index], env, form.span_of(index), what)

    # -- forms to plans --

    def expand(self, form: Form, span: Span | None, env: Env) -> Plan | None:
        """Return the plan of the workflow `form` (None for `nil`, which is dropped)."""
        plans = self.expand_child(Child(form, span, env))
        if len(plans) > 1:
            raise self.error(
                f"expected {WORKFLOW_HINT}, got a list of {len(plans)} workflows", span
            )
        return plans[0] if plans else None

    def expand_child(self, child: Child, expected: str = f"expected {WORKFLOW_HINT}") -> list[Plan]:
        """The plans of a child: one for a workflow, none for nil, several for a list."""
        form, span, env = child
        if form is None:
            return []
        name = head_name(form)
        if name is not None:
            found = RULES.get(name)
            if found is not None:
                return [found(self, form, env)]
            if name in TOP_LEVEL_RULES or (
                name not in SPECIAL_FORMS and name not in BUILTINS and env.find(name) is None
            ):
                raise self.error(self.unknown(name, env), span_of(form.items[0]) or span)
        elif isinstance(form, List) and form.items and _is_scalar(form.items[0]):
            # ("log!!" 1), (42): a literal cannot be called, so this is no workflow.
            raise self.error(f"{expected}, got {show(form)}", span)
        value = self.evaluate(form, span, env)
        return self.plans_of(value, form, span, expected)

    def plans_of(self, value: Any, form: Form, span: Span | None, expected: str) -> list[Plan]:
        """The plans of a workflow value, nil, or a (nested) list of them."""
        if is_workflow(value):
            return [embed(value)]
        if isinstance(value, list):
            plans: list[Plan] = []  # an empty list stands for no workflow at all
            for item in _flatten(value):
                if is_workflow(item):
                    plans.append(embed(item))
                elif item is not None:
                    raise self.error(
                        f"{expected}, got {describe(item)} in the list {show(form)}", span
                    )
            return plans
        if value is None:
            return []  # nil, (when false ...): nothing to run
        if isinstance(value, Code):
            raise self.error(
                f"{expected}, got {show(form)}, which is only known at run time (it uses ctx "
                "or a doseq!!/pmap!! variable): choose workflows at run time with if!!, "
                "when!!, doseq!! or pmap!!",
                span,
            )
        suffix = f", which is {describe(value)}" if isinstance(form, Symbol | List) else ""
        raise self.error(f"{expected}, got {show(form)}{suffix}", span)

    def unknown(self, name: str, env: Env | None = None) -> str:
        """Return the message for an unknown form, suggesting close names."""
        if name in TOP_LEVEL_RULES:
            return f"{name} is only allowed at the top level of a program"
        candidates = [*RULES, *SPECIAL_FORMS, *(env.names() if env is not None else ())]
        return f"unknown form {name}{did_you_mean(name, candidates)}"

    def children(self, form: List, start: int, env: Env) -> list[Child]:
        """Return the items of `form` from index `start` on, as children to compile."""
        return [Child(form.items[i], form.span_of(i), env) for i in range(start, len(form.items))]

    def leaf(
        self,
        form: List,
        action: str,
        payload: Any,
        idempotent: bool = False,
        options: dict[str, Any] | None = None,
    ) -> Plan:
        """Return the plan of a leaf performing `action`.

        `options`: checked leaf options (`leaf_options`); `retry`, `timeout` and
        `heartbeat` go on the leaf.
        """
        span = form.span
        options = options or {}
        retry = options.get("retry")
        timeout = options.get("timeout")
        heartbeat = options.get("heartbeat")

        def build(node_id: int, _: list[Node]) -> Node:
            policy = None if retry is None else _copy_policy(retry)
            return Leaf(
                node_id,
                action,
                payload,
                idempotent,
                span=span,
                retry=policy,
                timeout=timeout,
                heartbeat=heartbeat,
            )

        return Plan("leaf", build, span)

    # -- plans to nodes --

    def lower(self, root: Plan) -> Node:
        """Build the node tree of `root`, numbering nodes in pre-order, without recursion."""
        if root.node is not None:
            return number(root.node, 0)[0]
        next_id = 1
        stack = [_Frame(root, 0, list(reversed(root.children)))]
        while True:
            top = stack[-1]
            if top.todo:
                item = top.todo.pop()
                if isinstance(item, Child):
                    # A child may stand for no node (nil), one, or several (a spliced list).
                    top.todo.extend(reversed(self.expand_child(item)))
                elif item.node is not None:
                    node, next_id = number(item.node, next_id)
                    top.built.append(node)
                else:
                    stack.append(_Frame(item, next_id, list(reversed(item.children))))
                    next_id += 1
                continue
            stack.pop()
            node = top.plan.build(top.id, top.built)
            if not stack:
                return node
            stack[-1].built.append(node)

    # -- programs --

    def program(self, forms: Sequence[Form]) -> Node:
        """Compile a program: declarations, then workflows; the last form is the result."""
        if not forms:
            raise self.error(f"the program is empty: expected {WORKFLOW_HINT}", Span(1, 1))
        spans = getattr(forms, "spans", ())
        result: Node | None = None
        for index, form in enumerate(forms):
            span = spans[index] if index < len(spans) else span_of(form)
            last = index == len(forms) - 1
            name = head_name(form)
            if name in TOP_LEVEL_RULES and not last:
                TOP_LEVEL_RULES[name](self, form, self.env)
                continue
            if last:
                expected = f"the program's last form must be {WORKFLOW_HINT}"
            else:
                expected = (
                    f"a top-level form must be {WORKFLOW_HINT} or a definition (def, defn, import)"
                )
            if name in TOP_LEVEL_RULES:
                raise self.error(f"{expected}, got {show(form)}", span)
            plans = self.expand_child(Child(form, span, self.env), expected)
            if len(plans) != 1:
                got = show(form) if not plans else f"a list of {len(plans)} workflows"
                hint = "" if not plans else ": wrap them in (do!! ...) or (dopar!! ...)"
                raise self.error(f"{expected}, got {got}{hint}", span)
            # Earlier workflows are checked and dropped; each is numbered from 0.
            result = self.lower(plans[0])
        assert result is not None
        return result

    def module(self, forms: Sequence[Form]) -> None:
        """Run an imported module's declarations (it holds definitions only)."""
        spans = getattr(forms, "spans", ())
        for index, form in enumerate(forms):
            name = head_name(form)
            if name not in TOP_LEVEL_RULES:
                span = spans[index] if index < len(spans) else span_of(form)
                raise self.error(
                    "an imported module holds definitions only (def, defn, import), "
                    f"got {show(form)}",
                    span,
                )
            TOP_LEVEL_RULES[name](self, form, self.env)

    # -- imports --

    def load(self, path: str, span: Span | None) -> dict[str, Any]:
        """The definitions of the module `path` names (read and compiled once per compile)."""
        loader = self.loader
        try:
            module = loader.find(path, self.filename)
        except ImportRefused as exc:
            raise self.error(exc.message, span) from None
        if module.key in loader.modules:
            return loader.modules[module.key]
        chain = loader.cycle(module)
        if chain is not None:
            raise self.error(f"import cycle: {chain}", span)
        try:
            text, forms = loader.read(module)
        except ImportRefused as exc:
            raise self.error(exc.message, span) from None
        loader.loading.append((module.key, module.shown))
        try:
            sub = Compiler(text, module.shown, Env(), loader)
            sub.module(forms)
        finally:
            loader.loading.pop()
        exports = {name: sub.env[name] for name in sub.defined}
        loader.modules[module.key] = exports
        return exports


@dataclass(slots=True)
class _Frame:
    """A plan being built by `Compiler.lower`: its id, what is left, and what is built."""

    plan: Plan
    id: int
    todo: list[Child | Plan]  # children still to lower, last one first
    built: list[Node] = field(default_factory=list)


def embed(node: Node) -> Plan:
    """The plan of a workflow value: lowering copies it with fresh ids."""

    def build(node_id: int, _: list[Node]) -> Node:
        return number(node, node_id)[0]

    return Plan(node.kind, build, node.span, (), node)


def number(root: Node, first_id: int) -> tuple[Node, int]:
    """Copy a tree with pre-order ids from `first_id`; return it and the next free id.

    The template of a `doseq!!`/`pmap!!` keeps its own local ids.
    """
    node, paths = renumber(root, first_id)
    return node, first_id + len(paths)


def _flatten(items: list[Any]) -> Iterator[Any]:
    """The items of a list, with nested lists spliced in, without recursion."""
    stack: list[Iterator[Any]] = [iter(items)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            yield item
        else:
            stack.pop()


def _is_scalar(form: Form) -> bool:
    return not isinstance(form, List | Vector | Map | Symbol | Keyword)


def head_name(form: Form) -> str | None:
    """Return the name of the symbol heading a list form, or None."""
    if isinstance(form, List) and form.items and isinstance(form.items[0], Symbol):
        return form.items[0].name
    return None


def show(form: Form, limit: int = 40) -> str:
    """Return a short printed form for messages."""
    try:
        text = print_form(form)
    except ValueError:
        text = repr(form)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------
# Leaves


# (log!! x)
@rule("log!!")
def _log(c: Compiler, form: List, env: Env) -> Plan:
    c.arity(form, 1, 1, "(log!! x)")
    return c.leaf(form, "action/log", c.runtime(form, 1, env, "a payload"))


# (fail!!) / (fail!! reason)
@rule("fail!!")
def _fail(c: Compiler, form: List, env: Env) -> Plan:
    c.arity(form, 0, 1, "(fail!!) or (fail!! reason)")
    reason = c.runtime(form, 1, env, "a fail!! reason") if len(form.items) > 1 else None
    return c.leaf(form, "action/fail", reason)


# (action!! :ns/name payload) / (action!! :ns/name payload {:idempotent? true :retry {...}})
@rule("action!!")
def _action(c: Compiler, form: List, env: Env) -> Plan:
    c.arity(form, 2, 3, "(action!! :ns/name payload) or (action!! :ns/name payload {...})")
    name = action_name(c, form)
    options = with_leaf_defaults(leaf_options(c, form, 3, env), env)
    idempotent = bool(options.get("idempotent?", False))
    return c.leaf(form, name, c.runtime(form, 2, env, "a payload"), idempotent, options)


# (idempotent-action!! :ns/name payload) / (idempotent-action!! :ns/name payload {...})
@rule("idempotent-action!!")
def _idempotent_action(c: Compiler, form: List, env: Env) -> Plan:
    c.arity(
        form,
        2,
        3,
        "(idempotent-action!! :ns/name payload) or (idempotent-action!! :ns/name payload {...})",
    )
    name = action_name(c, form)
    options = with_leaf_defaults(leaf_options(c, form, 3, env), env)
    if options.get("idempotent?", True) is not True:
        where = form.span_of(3)
        raise c.error("idempotent-action!! is idempotent: drop :idempotent? false", where)
    return c.leaf(form, name, c.runtime(form, 2, env, "a payload"), True, options)


def action_name(c: Compiler, form: List) -> str:
    """Return the action an action form names with its first argument, a keyword."""
    name = form.items[1]
    if not isinstance(name, Keyword):
        raise c.error(
            f"{head_name(form)} needs a keyword naming the action, like :ns/name, got {show(name)}",
            form.span_of(1),
        )
    return str(name)


def leaf_options(c: Compiler, form: List, index: int, env: Env) -> dict[str, Any]:
    """Return the checked options map at `index` of a leaf form ({} when absent).

    `:idempotent?` is true or false; `:retry` a policy (`retry_policy`); `:timeout` and
    `:heartbeat` durations in seconds, more than 0 (nil: none). Values are known when
    the program is compiled (a `def` may name them; `ctx` may not).
    """
    if index >= len(form.items):
        return {}
    options = form.items[index]
    if not isinstance(options, Map):
        raise c.error(
            f"{head_name(form)} options must be a map like {{:idempotent? true}} or "
            f"{{:retry {{:max 5}} :timeout 30}}, got {show(options)}",
            form.span_of(index),
        )
    return option_map(c, options, LEAF_OPTIONS, env, "option")


def option_map(
    c: Compiler, options: Map, allowed: Sequence[str], env: Env, what: str
) -> dict[str, Any]:
    """The checked options of a leaf or of `with-defaults`: each key among `allowed`."""
    out: dict[str, Any] = {}
    for i, (key, value) in enumerate(options.pairs):
        where, at = options.span_of(2 * i), options.span_of(2 * i + 1)
        if not isinstance(key, Keyword) or key not in allowed:
            known = ", ".join(f":{o}" for o in allowed)
            hint = did_you_mean(str(key), allowed, prefix=":")
            raise c.error(f"unknown {what} {show(key)} (known: {known}){hint}", where)
        name = str(key)
        if name in out:
            raise c.error(f"the option :{name} is given twice", where)
        if name == "idempotent?":
            if not isinstance(value, bool | None):
                raise c.error(f":idempotent? must be true or false, got {show(value)}", at)
            out[name] = value
        elif name == "retry":
            out[name] = retry_policy(c, value, at, env)
        else:
            out[name] = option_duration(c, value, at, env, f":{name}")
    return out


def option_duration(c: Compiler, form: Form, span: Span | None, env: Env, what: str) -> Any:
    """A `:timeout` or `:heartbeat`: seconds more than 0, or None for nil (none)."""
    if isinstance(form, Map):
        duration_parts(c, form, what)
    value = known(c, form, span, env, what)
    if value is None:
        return None
    return duration_of(c, value, span, what, positive=True)


def retry_policy(c: Compiler, form: Form, span: Span | None, env: Env) -> dict[str, Any] | None:
    """The `:retry` policy a leaf stores, with every key (`RETRY_DEFAULTS` for the rest).

    `true` is the default policy; `false` and nil are no retries (they undo a default of
    `with-defaults`). A map's keys: `:max` (attempts in all, a whole number >= 1),
    `:delay` and `:max-delay` (durations), `:backoff` (a number >= 1), `:jitter`
    (true or false), `:on` (a vector of error names, nil for every error).
    """
    entries: list[tuple[Any, Any, Span | None, Span | None]]
    if isinstance(form, Map):
        entries = []
        for i, (key, value) in enumerate(form.pairs):
            at = form.span_of(2 * i + 1)
            if key in ("delay", "max-delay") and isinstance(value, Map):
                duration_parts(c, value, f":retry :{key}")
            entries.append((key, known(c, value, at, env, ":retry"), form.span_of(2 * i), at))
    else:
        value = known(c, form, span, env, ":retry")
        if value is None or value is False:
            return None
        if value is True:
            return _copy_policy(RETRY_DEFAULTS)
        if not isinstance(value, dict):
            raise c.error(
                ":retry must be true, false or a map like {:max 5 :delay 1 :backoff 2}, "
                f"got {describe(value)}",
                span,
            )
        entries = [(k, v, span, span) for k, v in value.items()]
    policy = _copy_policy(RETRY_DEFAULTS)
    seen: set[str] = set()
    for key, value, where, at in entries:
        if not isinstance(key, str) or key not in RETRY_OPTIONS:
            known_keys = ", ".join(f":{o}" for o in RETRY_OPTIONS)
            hint = did_you_mean(str(key), RETRY_OPTIONS, prefix=":")
            shown = show(key) if not isinstance(key, str) or isinstance(key, Keyword) else key
            raise c.error(f"unknown :retry key {shown} (known: {known_keys}){hint}", where)
        name = str(key)
        if name in seen:
            raise c.error(f"the :retry key :{name} is given twice", where)
        seen.add(name)
        policy[name] = retry_value(c, name, value, at)
    return policy


def retry_value(c: Compiler, name: str, value: Any, span: Span | None) -> Any:
    """One checked value of a `:retry` map."""
    shown = _shown(value)
    if name == "max":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise c.error(
                f":retry :max is the number of attempts in all (a whole number >= 1), got {shown}",
                span,
            )
        return value
    if name in ("delay", "max-delay"):
        if value is None and name == "max-delay":
            return None
        return duration_of(c, value, span, f":retry :{name}")
    if name == "backoff":
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not 1 <= value <= sys.float_info.max:
            raise c.error(f":retry :backoff multiplies each wait, a number >= 1, got {shown}", span)
        return float(value)
    if name == "jitter":
        if not isinstance(value, bool):
            raise c.error(f":retry :jitter must be true or false, got {shown}", span)
        return value
    # :on
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
        raise c.error(
            ':retry :on must be a vector of error names like ["TimeoutError" "http/503"], '
            f"got {shown}",
            span,
        )
    return [str(x) for x in value]


def _copy_policy(policy: dict[str, Any]) -> dict[str, Any]:
    """A fresh copy of a retry policy (each leaf owns its own)."""
    out = dict(policy)
    if out.get("on") is not None:
        out["on"] = list(out["on"])
    return out


def known(c: Compiler, form: Form, span: Span | None, env: Env, what: str) -> Any:
    """The value of an option, known when the program is compiled (run-time code refused)."""
    value = c.evaluate(form, span, env)
    if isinstance(value, Code):
        raise c.error(
            f"{what} must be known when the program is compiled, got {show(form)}, which is "
            "only known at run time (it uses ctx or a doseq!!/pmap!! variable)",
            span,
        )
    return value


def _shown(value: Any) -> str:
    """A compile-time value for a message."""
    if is_workflow(value) or isinstance(value, Closure):
        return describe(value)
    return show_value(value, 40)


# ---------------------------------------------------------------------------------------
# Time: durations, waits, deadlines and defaults


def duration_arg(
    c: Compiler, form: Form, span: Span | None, env: Env, what: str, *, positive: bool = False
) -> float | Code:
    """A duration argument: seconds, checked now, or run-time code (checked when reached).

    A literal map's keys and values are checked where they are written.
    """
    if isinstance(form, Map):
        duration_parts(c, form, what)
    value = c.evaluate(form, span, env)
    if isinstance(value, Code):
        return value
    return duration_of(c, value, span, what, positive=positive)


def duration_parts(c: Compiler, form: Map, what: str) -> None:
    """Check the keys (and literal values) of a duration map such as `{:minutes 10}`."""
    for i, (key, value) in enumerate(form.pairs):
        if not isinstance(key, Keyword) or key not in DURATION_UNITS:
            units = ", ".join(f":{u}" for u in DURATION_UNITS)
            hint = did_you_mean(str(key), DURATION_UNITS, prefix=":")
            raise c.error(
                f"{what}: unknown duration key {show(key)} (known: {units}){hint}",
                form.span_of(2 * i),
            )
        if not isinstance(value, Symbol | List | Vector | Map):
            try:
                parse_duration({key: value})
            except AblaufError as exc:
                raise c.error(f"{what}: {exc.message}", form.span_of(2 * i + 1)) from None


def duration_of(
    c: Compiler, value: Any, span: Span | None, what: str, *, positive: bool = False
) -> float:
    """The seconds of a duration value known now; a located error otherwise."""
    if is_workflow(value) or isinstance(value, Closure):
        raise c.error(
            f"{what} must be a duration (seconds, or a map like {{:minutes 10}}), "
            f"got {describe(value)}",
            span,
        )
    try:
        seconds = parse_duration(value)
    except AblaufError as exc:
        raise c.error(f"{what}: {exc.message}", span) from None
    if positive and seconds <= 0:
        raise c.error(f"{what} must be more than 0 seconds, got {_shown(value)}", span)
    return seconds


def instant_arg(c: Compiler, form: Form, span: Span | None, env: Env, what: str) -> float | Code:
    """An instant argument: epoch seconds, checked now, or run-time code."""
    value = c.evaluate(form, span, env)
    if isinstance(value, Code):
        return value
    if is_workflow(value) or isinstance(value, Closure):
        raise c.error(
            f'{what} must be an instant like "2026-12-24T09:00:00Z", got {describe(value)}', span
        )
    try:
        return parse_instant(value)
    except AblaufError as exc:
        raise c.error(f"{what}: {exc.message}", span) from None


def wait_payload(c: Compiler, pairs: list[tuple[str, Any]], span: Span | None) -> Any:
    """A wait's payload map: data, or an `Expr` when a part is only known at run time."""
    if not any(isinstance(value, Code) for _, value in pairs):
        return dict(pairs)
    flat = [part for pair in pairs for part in pair]
    code = c.evaluator.residual(
        lambda depth, size: MapCode(tuple(pairs), depth=depth, size=size), flat, span
    )
    return c.evaluator.runtime_value(code, span, "the duration")


# (sleep!! d): d seconds, {:minutes 10}, "1h30m", or a run-time expression
@rule("sleep!!")
def _sleep(c: Compiler, form: List, env: Env) -> Plan:
    c.arity(form, 1, 1, "(sleep!! seconds) or (sleep!! {:minutes 10})")
    seconds = duration_arg(c, form.items[1], form.span_of(1), env, "sleep!!")
    return c.leaf(form, SLEEP, wait_payload(c, [("seconds", seconds)], form.span_of(1)), True)


# (sleep-until!! "2026-12-24T09:00:00Z")
@rule("sleep-until!!")
def _sleep_until(c: Compiler, form: List, env: Env) -> Plan:
    c.arity(form, 1, 1, '(sleep-until!! "2026-12-24T09:00:00Z")')
    until = instant_arg(c, form.items[1], form.span_of(1), env, "sleep-until!!")
    return c.leaf(form, SLEEP, wait_payload(c, [("until", until)], form.span_of(1)), True)


# (await!! :name) / (await!! :name {:timeout d})
@rule("await!!")
def _await(c: Compiler, form: List, env: Env) -> Plan:
    c.arity(form, 1, 2, "(await!! :name) or (await!! :name {:timeout {:hours 24}})")
    name = form.items[1]
    if not isinstance(name, Keyword):
        raise c.error(
            f"await!! needs a keyword naming the signal, like :approval, got {show(name)}",
            form.span_of(1),
        )
    timeout: float | Code | None = None
    if len(form.items) > 2:
        options = form.items[2]
        if not isinstance(options, Map):
            raise c.error(
                f"await!! options must be a map like {{:timeout {{:hours 24}}}}, "
                f"got {show(options)}",
                form.span_of(2),
            )
        for i, (key, value) in enumerate(options.pairs):
            if not isinstance(key, Keyword) or key != "timeout":
                hint = did_you_mean(str(key), ["timeout"], prefix=":")
                raise c.error(
                    f"unknown await!! option {show(key)} (known: :timeout){hint}",
                    options.span_of(2 * i),
                )
            if value is not None:
                at = options.span_of(2 * i + 1)
                timeout = duration_arg(c, value, at, env, "the :timeout of await!!")
    payload = wait_payload(c, [("signal", str(name)), ("timeout", timeout)], form.span)
    return c.leaf(form, AWAIT, payload, True)


# (timeout!! d body...): [body, timer]; the body fails with `timeout` when d passes first
@rule("timeout!!")
def _timeout(c: Compiler, form: List, env: Env) -> Plan:
    usage = "(timeout!! seconds node...)"
    c.arity(form, 2, None, usage)
    seconds = duration_arg(
        c, form.items[1], form.span_of(1), env, "the deadline of timeout!!", positive=True
    )
    plans = [p for child in c.children(form, 2, env) for p in c.expand_child(child)]
    if not plans:
        raise c.error(f"timeout!! needs a workflow to limit: usage {usage}", form.span)
    body = plans[0] if len(plans) == 1 else branch(Seq, form.span, plans)
    timer = c.leaf(form, SLEEP, wait_payload(c, [("seconds", seconds)], form.span_of(1)), True)
    span = form.span

    def build(node_id: int, nodes: list[Node]) -> Node:
        return Deadline(node_id, pvector(nodes), span=span)

    return Plan(Deadline.kind, build, span, [body, timer])


class DefaultsEnv(Env):
    """The scope of a `with-defaults`: it binds no names, it carries leaf options."""

    def __init__(self, defaults: dict[str, Any], outer: Env) -> None:
        super().__init__(None, outer)
        self.defaults = defaults


def leaf_defaults(env: Env | None) -> dict[str, Any]:
    """The options the innermost `with-defaults` around `env` sets ({} outside any)."""
    while env is not None:
        if isinstance(env, DefaultsEnv):
            return env.defaults
        env = env.outer
    return {}


def with_leaf_defaults(options: dict[str, Any], env: Env) -> dict[str, Any]:
    """A leaf's options with the defaults of its scope for those it does not set."""
    defaults = leaf_defaults(env)
    if not defaults:
        return options
    return {**defaults, **options}


# (with-defaults {:retry {...} :timeout 30 :heartbeat 10} node...)
@rule("with-defaults")
def _with_defaults(c: Compiler, form: List, env: Env) -> Plan:
    usage = "(with-defaults {:retry {:max 5} :timeout 30} node...)"
    c.arity(form, 2, None, usage)
    options = form.items[1]
    if not isinstance(options, Map):
        raise c.error(
            f"with-defaults needs a map of options like {{:retry {{:max 5}} :timeout 30}}, "
            f"got {show(options)}: usage {usage}",
            form.span_of(1),
        )
    given = option_map(c, options, DEFAULT_OPTIONS, env, "with-defaults option")
    inner = DefaultsEnv({**leaf_defaults(env), **given}, env)
    plans = [p for child in c.children(form, 2, inner) for p in c.expand_child(child)]
    if not plans:
        raise c.error(f"with-defaults needs a workflow to apply to: usage {usage}", form.span)
    return plans[0] if len(plans) == 1 else branch(Seq, form.span, plans)


def with_deadline(root: Node, seconds: Any) -> Node:
    """`root` under a deadline of `seconds` (a duration): a whole run's limit.

    For `eval(..., timeout=)` and `ablauf run --timeout`. The copy is numbered afresh:
    the deadline is 0, the program's nodes follow, the timer is last. Raises AblaufError
    for a duration that is bad or not more than 0.
    """
    try:
        limit = parse_duration(seconds)
    except AblaufError as exc:
        raise AblaufError(f"the run's timeout: {exc.message}") from None
    if limit <= 0:
        raise AblaufError(f"the run's timeout must be more than 0 seconds, got {seconds!r}")
    body, paths = renumber(root, 1)
    timer = Leaf(1 + len(paths), SLEEP, {"seconds": limit}, True)
    return Deadline(0, pvector([body, timer]))


BREAK_SIGNAL = "ablauf/break"  # what a breakpoint of `with_breaks` awaits


def with_breaks(root: Node, actions: Sequence[str]) -> Node:
    """`root` with a breakpoint before every leaf whose action is one of `actions`
    (`ablauf run --break ACTION`): the leaf becomes `(do!! (await!! :ablauf/break) leaf)`,
    so the run parks there, waiting as for any signal (`runs list` says
    `waiting: ablauf/break`), until it is sent `ablauf/break` (`ablauf runs continue`):
    one signal lets one parked leaf go on. Templates of `doseq!!`/`pmap!!` get them too.
    The copy is numbered afresh."""
    wanted = {str(a).removeprefix(":") for a in actions}
    if not wanted:
        return root
    found = False

    def gate(node: Any) -> Any:
        nonlocal found
        if isinstance(node, Leaf):
            if node.action not in wanted:
                return node
            found = True
            wait = Leaf(0, AWAIT, {"signal": BREAK_SIGNAL, "timeout": None}, True, span=node.span)
            return Seq(0, pvector([wait, node]), span=node.span)
        changes: dict[str, Any] = {}
        template = getattr(node, "template", None)
        if template is not None:
            changes["template"] = renumber(gate(template), 0)[0]
        kids = getattr(node, "children", ())
        if kids:
            changes["children"] = pvector(gate(c) for c in kids)
        return dataclasses.replace(node, **changes) if changes else node

    gated = gate(root)
    if not found:
        raise AblaufError(
            f"--break {', '.join(sorted(wanted))}: the program has no such action "
            "(a breakpoint would never stop)"
        )
    return renumber(gated, 0)[0]


# ---------------------------------------------------------------------------------------
# Branches


# (do!! n ...)
@rule("do!!")
def _do(c: Compiler, form: List, env: Env) -> Plan:
    return branch(Seq, form.span, c.children(form, 1, env))


# (dopar!! n ...)
@rule("dopar!!")
def _dopar(c: Compiler, form: List, env: Env) -> Plan:
    return branch(Par, form.span, c.children(form, 1, env))


def branch(
    kind: type[Seq] | type[Par], span: Span | None, children: Sequence[Child | Plan]
) -> Plan:
    """Return the plan of a sequence or parallel node over `children` (nils dropped)."""

    def build(node_id: int, nodes: list[Node]) -> Node:
        return kind(node_id, pvector(nodes), span=span)

    return Plan(kind.kind, build, span, children)


# (try!! n ... (rescue!! n ...) (finally!! n ...))
@rule("try!!")
def _try(c: Compiler, form: List, env: Env) -> Plan:
    body: list[Child] = []
    rescue: List | None = None
    final: List | None = None
    for i in range(1, len(form.items)):
        item, span = form.items[i], form.span_of(i)
        name = head_name(item)
        if name == "rescue!!":
            if rescue is not None:
                raise c.error("try!! has more than one rescue!!", span)
            if final is not None:
                raise c.error("rescue!! must come before finally!!", span)
            rescue = item
        elif name == "finally!!":
            if final is not None:
                raise c.error("try!! has more than one finally!!", span)
            final = item
        elif rescue is not None or final is not None:
            # A body form after rescue!!/finally!!: point at the section out of place.
            section = final if final is not None and rescue is None else rescue
            assert section is not None
            raise c.error(
                f"{head_name(section)} must be at the end of try!!, but {show(item)} follows it",
                section.span,
            )
        else:
            body.append(Child(item, span, env))
    sections = [
        branch(Seq, form.span, body),
        branch(
            Seq, rescue.span if rescue else form.span, c.children(rescue, 1, env) if rescue else []
        ),
        branch(Seq, final.span if final else form.span, c.children(final, 1, env) if final else []),
    ]
    span = form.span

    def build(node_id: int, nodes: list[Node]) -> Node:
        return Try(node_id, pvector(nodes), span=span)

    return Plan("try", build, span, sections)


# (rescue!! n ...) and (finally!! n ...) anywhere but at the end of a try!!
@rule("rescue!!", "finally!!")
def _misplaced(c: Compiler, form: List, env: Env) -> Plan:
    name = head_name(form)
    raise c.error(f"{name} is only allowed at the end of a try!!", form.span)


# ---------------------------------------------------------------------------------------
# Run-time choices and expansions


# (if!! test then else?)
@rule("if!!")
def _if_bang(c: Compiler, form: List, env: Env) -> Plan:
    c.arity(form, 2, 3, "(if!! test then else?)")
    test = c.runtime(form, 1, env, "the test of if!!")
    other = c.children(form, 3, env)
    sections = [
        branch(Seq, form.span_of(2), c.children(form, 2, env)[:1]),
        branch(Seq, form.span_of(3) if other else form.span, other),
    ]
    return _if_plan(form.span, test, sections)


# (when!! test body...)
@rule("when!!")
def _when_bang(c: Compiler, form: List, env: Env) -> Plan:
    c.arity(form, 1, None, "(when!! test body...)")
    test = c.runtime(form, 1, env, "the test of when!!")
    sections = [branch(Seq, form.span, c.children(form, 2, env)), branch(Seq, form.span, [])]
    return _if_plan(form.span, test, sections)


def _if_plan(span: Span | None, test: Any, sections: list[Plan]) -> Plan:
    def build(node_id: int, nodes: list[Node]) -> Node:
        return If(node_id, test, pvector(nodes), span=span)

    return Plan("if", build, span, sections)


# (doseq!! [x coll] body...) and (pmap!! [x coll] body...)
@rule("doseq!!", "pmap!!")
def _expansion(c: Compiler, form: List, env: Env) -> Plan:
    name = head_name(form)
    usage = f"({name} [x coll] body...)"
    c.arity(form, 2, None, usage)
    binding = form.items[1]
    if not isinstance(binding, Vector) or len(binding.items) != 2:
        raise c.error(
            f"{name} needs a binding vector [x coll], got {show(binding)}: usage {usage}",
            form.span_of(1),
        )
    var = c.evaluator.name_of(binding.items[0], binding.span_of(0), f"the {name} variable")
    coll = c.runtime(binding, 1, env, f"the collection of {name}")
    if not isinstance(coll, Expr | list):
        raise c.error(
            f"{name} needs a sequence (a vector) to go over, got {describe(coll)}",
            binding.span_of(1),
        )
    # The body: one node, or several in a sequence; `var` is only known at run time.
    inner = Env({var: Var(var, binding.span_of(0))}, env)
    body = c.children(form, 2, inner)
    plans = [p for child in body for p in c.expand_child(child)]
    template = c.lower(plans[0] if len(plans) == 1 else branch(Seq, form.span, plans))
    kind = Doseq if name == "doseq!!" else Pmap
    span = form.span

    def build(node_id: int, _: list[Node]) -> Node:
        return kind(node_id, var, coll, template, span=span)

    return Plan(kind.kind, build, span)


# ---------------------------------------------------------------------------------------
# Augment


# (with-augment [source dest] node)
@rule("with-augment")
def _with_augment(c: Compiler, form: List, env: Env) -> Plan:
    usage = "(with-augment [source dest] node)"
    c.arity(form, 2, 2, usage)
    pair = form.items[1]
    if not isinstance(pair, Vector) or len(pair.items) != 2:
        raise c.error(
            f"with-augment needs a vector [source dest], got {show(pair)}: usage {usage}",
            form.span_of(1),
        )
    source = augment_source(c, pair.items[0], pair.span_of(0))
    dest = augment_dest(c, pair.items[1], pair.span_of(1))
    inner_form, inner_span = form.items[2], form.span_of(2)
    if head_name(inner_form) == "with-augment":
        raise c.error("with-augment cannot wrap another with-augment", inner_span)
    plans = c.expand_child(Child(inner_form, inner_span, env))
    inner = plans[0] if len(plans) == 1 else None
    if inner is None or inner.kind != "leaf":
        raise c.error(
            f"with-augment wraps an action leaf (action!!, log!!, fail!!...), "
            f"got {show(inner_form)}",
            inner_span,
        )
    if isinstance(inner.node, Leaf) and inner.node.augment is not None:
        raise c.error("with-augment cannot wrap another with-augment", inner_span)
    augment = Augment(source, dest)
    build_leaf = inner.build

    def build(node_id: int, nodes: list[Node]) -> Node:
        leaf = build_leaf(node_id, nodes)
        assert isinstance(leaf, Leaf)  # the plan's kind is "leaf"
        return dataclasses.replace(leaf, augment=augment)

    return Plan("leaf", build, inner.span, inner.children)


def augment_source(c: Compiler, form: Form, span: Span | None) -> tuple[Any, ...]:
    """Return the get-in path a with-augment source names: keyword, vector or identity."""
    if isinstance(form, Keyword):
        return (str(form),)
    if isinstance(form, Symbol) and form.name == "identity":
        return ()
    if isinstance(form, Vector):
        return augment_path(c, form, "source", (Keyword, str, int))
    raise c.error(
        f"with-augment source must be a keyword, a vector of keys or identity, got {show(form)}",
        span,
    )


def augment_dest(c: Compiler, form: Form, span: Span | None) -> tuple[Any, ...]:
    """Return the context path a with-augment dest names: a keyword or a non-empty vector."""
    if isinstance(form, Keyword):
        return (str(form),)
    if isinstance(form, Vector) and form.items:
        return augment_path(c, form, "dest", (Keyword, str))
    raise c.error(
        f"with-augment dest must be a keyword or a non-empty vector of keys, got {show(form)}",
        span,
    )


def augment_path(
    c: Compiler, form: Vector, role: str, allowed: tuple[type, ...]
) -> tuple[Any, ...]:
    """Return the keys of a path vector, each a keyword or string (or an index)."""
    path: list[Any] = []
    for i, key in enumerate(form.items):
        if not isinstance(key, allowed) or isinstance(key, bool):
            kinds = "keywords, strings or integers" if int in allowed else "keywords or strings"
            raise c.error(
                f"with-augment {role} path keys must be {kinds}, got {show(key)}",
                form.span_of(i),
            )
        path.append(str(key) if isinstance(key, str) else key)
    return tuple(path)


# ---------------------------------------------------------------------------------------
# Top-level declarations


# (def name value)
@top_level_rule("def")
def _def(c: Compiler, form: List, env: Env) -> None:
    c.arity(form, 2, 2, "(def name value)")
    name = c.evaluator.symbol(form, 1, "the name in def")
    env[name] = c.evaluate(form.items[2], form.span_of(2), env)
    c.defined.append(name)


# (defn name "doc"? [params] body...)
@top_level_rule("defn")
def _defn(c: Compiler, form: List, env: Env) -> None:
    c.arity(form, 2, None, "(defn name [params] body...)")
    name = c.evaluator.symbol(form, 1, "the name in defn")
    start = 2
    if isinstance(form.items[2], str) and not isinstance(form.items[2], Keyword):
        start = 3  # a docstring
        if len(form.items) < 4:
            raise c.error(f"defn {name} needs a parameter vector after its docstring", form.span)
    env[name] = c.evaluator.make_fn(
        env, name, form.items[start], form.span_of(start), form, start + 1
    )
    c.defined.append(name)


# (import "file.abl"), (import "std/retry" :as r), (import "lib.abl" :only [a b])
@top_level_rule("import")
def _import(c: Compiler, form: List, env: Env) -> None:
    usage = '(import "file.abl") or (import "std/retry" :as r :only [name ...])'
    c.arity(form, 1, 5, usage)
    path = form.items[1]
    if not isinstance(path, str) or isinstance(path, Keyword) or not path:
        raise c.error(
            f'import needs a path in a string, like "lib.abl" or "std/retry", got {show(path)}',
            form.span_of(1),
        )
    alias: str | None = None
    only: list[tuple[str, Span | None]] | None = None
    i = 2
    while i < len(form.items):
        option, where = form.items[i], form.span_of(i)
        if i + 1 >= len(form.items):
            raise c.error(f"import option {show(option)} needs a value: usage {usage}", where)
        value, value_span = form.items[i + 1], form.span_of(i + 1)
        if option == "as" and isinstance(option, Keyword):
            alias = c.evaluator.name_of(value, value_span, "the name after :as")
        elif option == "only" and isinstance(option, Keyword) and isinstance(value, Vector):
            only = [
                (c.evaluator.name_of(x, value.span_of(j), "a name in :only"), value.span_of(j))
                for j, x in enumerate(value.items)
            ]
        elif option == "only" and isinstance(option, Keyword):
            raise c.error(f"import :only needs a vector of names, got {show(value)}", value_span)
        else:
            raise c.error(f"unknown import option {show(option)} (known: :as, :only)", where)
        i += 2
    exports = c.load(path, form.span_of(1))
    names = list(exports)
    if only is not None:
        for name, where in only:
            if name not in exports:
                hint = did_you_mean(name, exports)
                raise c.error(f'"{path}" defines no {name}{hint}', where)
        names = [name for name, _ in only]
    for name in names:
        env[f"{alias}/{name}" if alias else name] = exports[name]


# ---------------------------------------------------------------------------------------
# Entry points


def compile_forms(
    forms: Sequence[Form],
    *,
    source: str | None = None,
    filename: str | None = None,
    file_imports: bool | None = None,
    loader: Loader | None = None,
) -> Node:
    """Compile a program's top-level forms to the lowered tree of its (last) workflow.

    `file_imports`: False lets `import` read the standard library only; None follows
    the module default `FILE_IMPORTS`. `loader`: the one to use (it then tells which
    files were imported, `Loader.files`); a new one by default.
    """
    with gc_paused():
        try:
            if loader is None:
                loader = Loader(file_imports=file_imports)
            return Compiler(source, filename, loader=loader).program(forms)
        except RecursionError:
            # A backstop: nesting is bounded by MAX_DEPTH, but Python's stack may be smaller.
            raise AblaufCompileError(
                "the program is nested too deeply to compile", filename=filename, source=source
            ) from None


def compile_source(
    source: str,
    filename: str | None = None,
    *,
    file_imports: bool | None = None,
    loader: Loader | None = None,
) -> Node:
    """Read and compile `source`; raise AblaufSyntaxError or AblaufCompileError.

    `file_imports`: False lets `import` read the standard library only (see compile_forms).
    """
    source = strip_bom(source)
    return compile_forms(
        read(source, filename),
        source=source,
        filename=filename,
        file_imports=file_imports,
        loader=loader,
    )
