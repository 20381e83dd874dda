"""Compiler: reader forms -> the lowered workflow tree (Leaf, Seq, Par, Try).

Each workflow form has one rule, registered by head symbol with `@rule("do!!")` (Hy's
`builds_model`). A rule checks its form and returns a `Plan`: the node's kind, how to
build it, and its children, still as forms. `Compiler.lower` walks plans with an explicit
stack, numbering nodes in pre-order, so 1,000 levels of `do!!` need no recursion.
Other modules add node kinds by registering more rules.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pyrsistent import pvector

from ablauf_lang.errors import AblaufCompileError, Span
from ablauf_lang.forms import Form, Keyword, List, Map, Symbol, Vector, span_of, to_data
from ablauf_lang.nodes import Augment, Leaf, Node, Par, Seq, Try
from ablauf_lang.printer import print_form
from ablauf_lang.reader import gc_paused, read

__all__ = [
    "RULES",
    "TOP_LEVEL_RULES",
    "Child",
    "Compiler",
    "Env",
    "Plan",
    "compile_forms",
    "compile_source",
    "rule",
    "top_level_rule",
]

WORKFLOW_HINT = "a workflow (do!!, dopar!!, try!!, an action...)"

# Options a leaf accepts in `(action!! :ns/name payload {...})`.
LEAF_OPTIONS: tuple[str, ...] = ("idempotent?",)

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
    """A node about to be built: its kind (as in `Node.kind`), builder and children."""

    kind: str
    build: Builder
    span: Span | None
    children: Sequence[Child | Plan] = ()


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
    """Compile forms from one source text; errors point into that text."""

    source: str | None = None
    filename: str | None = None
    env: Env = field(default_factory=Env)

    # -- errors --

    def error(self, message: str, span: Span | None) -> AblaufCompileError:
        """Return a compile error located at `span`."""
        if span is None:
            return AblaufCompileError(message, filename=self.filename, source=self.source)
        return AblaufCompileError(
            message,
            filename=self.filename or span.filename,
            line=span.line,
            column=span.column,
            source=self.source,
        )

    def arity(self, form: List, low: int, high: int | None, usage: str) -> None:
        """Require `low` to `high` arguments after the head (None: no upper bound)."""
        got = len(form.items) - 1
        if got < low or (high is not None and got > high):
            if high == low:
                wanted = f"{low}"
            elif high is None:
                wanted = f"at least {low}"
            else:
                wanted = f"{low} to {high}"
            plural = "" if wanted == "1" else "s"
            raise self.error(
                f"{head_name(form)} takes {wanted} argument{plural}, got {got}: usage {usage}",
                form.span,
            )

    # -- forms to plans --

    def expand(self, form: Form, span: Span | None, env: Env) -> Plan | None:
        """Return the plan of the workflow `form` (None for `nil`, which is dropped)."""
        if form is None:
            return None
        name = head_name(form)
        if name is None:
            raise self.error(f"expected {WORKFLOW_HINT}, got {show(form)}", span)
        found = RULES.get(name)
        if found is None:
            raise self.error(self.unknown(name), span_of(form.items[0]) or span)
        return found(self, form, env)

    def unknown(self, name: str) -> str:
        """Return the message for an unknown form, suggesting close names."""
        if name in TOP_LEVEL_RULES:
            return f"{name} is only allowed at the top level of a program"
        return f"unknown form {name}{did_you_mean(name, RULES)}"

    def children(self, form: List, start: int, env: Env) -> list[Child]:
        """Return the items of `form` from index `start` on, as children to compile."""
        return [Child(form.items[i], form.span_of(i), env) for i in range(start, len(form.items))]

    def leaf(self, form: List, action: str, payload: Any, idempotent: bool = False) -> Plan:
        """Return the plan of a leaf performing `action`."""
        span = form.span

        def build(node_id: int, _: list[Node]) -> Node:
            return Leaf(node_id, action, payload, idempotent, span=span)

        return Plan("leaf", build, span)

    # -- plans to nodes --

    def lower(self, root: Plan) -> Node:
        """Build the node tree of `root`, numbering nodes in pre-order, without recursion."""
        next_id = 1
        stack = [_Frame(root, 0)]
        while True:
            top = stack[-1]
            if top.next < len(top.plan.children):
                child = top.plan.children[top.next]
                top.next += 1
                plan = child if isinstance(child, Plan) else self.expand(*child)
                if plan is not None:  # nil children are dropped
                    stack.append(_Frame(plan, next_id))
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
            if name is None or name in TOP_LEVEL_RULES:
                if last:
                    message = f"the program's last form must be {WORKFLOW_HINT}"
                else:
                    message = f"a top-level form must be {WORKFLOW_HINT}"
                raise self.error(f"{message}, got {show(form)}", span)
            plan = self.expand(form, span, self.env)
            assert plan is not None  # only nil expands to None, and nil has no head
            # Earlier workflows are checked and dropped; each is numbered from 0.
            result = self.lower(plan)
        assert result is not None
        return result


@dataclass(slots=True)
class _Frame:
    """A plan being built by `Compiler.lower`: its id and its children built so far."""

    plan: Plan
    id: int
    next: int = 0
    built: list[Node] = field(default_factory=list)


def head_name(form: Form) -> str | None:
    """Return the name of the symbol heading a list form, or None."""
    if isinstance(form, List) and form.items and isinstance(form.items[0], Symbol):
        return form.items[0].name
    return None


def did_you_mean(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    """Return "; did you mean x or y?" for the candidates close to `name`, or ""."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    if not close:
        return ""
    text = " or ".join(prefix + c for c in close)
    return f"; did you mean {text}" + ("" if text.endswith("?") else "?")


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
    return c.leaf(form, "action/log", to_data(form.items[1]))


# (fail!!) / (fail!! reason)
@rule("fail!!")
def _fail(c: Compiler, form: List, env: Env) -> Plan:
    c.arity(form, 0, 1, "(fail!!) or (fail!! reason)")
    reason = to_data(form.items[1]) if len(form.items) > 1 else None
    return c.leaf(form, "action/fail", reason)


# (action!! :ns/name payload) / (action!! :ns/name payload {:idempotent? true})
@rule("action!!")
def _action(c: Compiler, form: List, env: Env) -> Plan:
    c.arity(form, 2, 3, "(action!! :ns/name payload) or (action!! :ns/name payload {...})")
    name = action_name(c, form)
    idempotent = leaf_options(c, form, 3).get("idempotent?", False)
    return c.leaf(form, name, to_data(form.items[2]), bool(idempotent))


# (idempotent-action!! :ns/name payload)
@rule("idempotent-action!!")
def _idempotent_action(c: Compiler, form: List, env: Env) -> Plan:
    c.arity(form, 2, 2, "(idempotent-action!! :ns/name payload)")
    return c.leaf(form, action_name(c, form), to_data(form.items[2]), True)


def action_name(c: Compiler, form: List) -> str:
    """Return the action an action form names with its first argument, a keyword."""
    name = form.items[1]
    if not isinstance(name, Keyword):
        raise c.error(
            f"{head_name(form)} needs a keyword naming the action, like :ns/name, got {show(name)}",
            form.span_of(1),
        )
    return str(name)


def leaf_options(c: Compiler, form: List, index: int) -> dict[str, Any]:
    """Return the checked options map at `index` of a leaf form ({} when absent)."""
    if index >= len(form.items):
        return {}
    options = form.items[index]
    if not isinstance(options, Map):
        raise c.error(
            f"{head_name(form)} options must be a map like {{:idempotent? true}}, "
            f"got {show(options)}",
            form.span_of(index),
        )
    out: dict[str, Any] = {}
    for i, (key, value) in enumerate(options.pairs):
        where = options.span_of(2 * i)
        if not isinstance(key, Keyword) or key not in LEAF_OPTIONS:
            known = ", ".join(f":{o}" for o in LEAF_OPTIONS)
            hint = did_you_mean(str(key), LEAF_OPTIONS, prefix=":")
            raise c.error(f"unknown option {show(key)} (known: {known}){hint}", where)
        if key == "idempotent?" and not isinstance(value, bool | None):
            raise c.error(
                f":idempotent? must be true or false, got {show(value)}",
                options.span_of(2 * i + 1),
            )
        out[str(key)] = value
    return out


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


def branch(kind: type[Seq] | type[Par], span: Span | None, children: Sequence[Child]) -> Plan:
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
    inner = c.expand(inner_form, inner_span, env)
    if inner is None or inner.kind != "leaf":
        raise c.error(
            f"with-augment wraps an action leaf (action!!, log!!, fail!!...), "
            f"got {show(inner_form)}",
            inner_span,
        )
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
# Entry points


def compile_forms(
    forms: Sequence[Form], *, source: str | None = None, filename: str | None = None
) -> Node:
    """Compile a program's top-level forms to the lowered tree of its (last) workflow."""
    with gc_paused():
        return Compiler(source, filename).program(forms)


def compile_source(source: str, filename: str | None = None) -> Node:
    """Read and compile `source`; raise AblaufSyntaxError or AblaufCompileError."""
    return compile_forms(read(source, filename), source=source, filename=filename)
