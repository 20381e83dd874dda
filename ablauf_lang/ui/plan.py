"""A program's plan, read from its tree without running it (`ablauf plan`, the REPL's `:plan`).

    plan        :: Node, context?, fanout_limit -> Plan   leaves, width, chain, depth, ...
    Plan.to_dict                                          the same as JSON (`--json`)
    format_plan :: Plan -> str                            a few aligned lines, warnings last

What is counted:

- leaves: the leaves of the compiled tree (a `doseq!!`/`pmap!!` body once), and the leaves
  a run performs when every fan-out's size is known (`run_leaves`; None when one depends
  on the run);
- width: the most leaves that can be in flight at once (`dopar!!` children add up; a
  `do!!`, the body, rescue and finally of a `try!!` and the branches of an `if!!` take
  the widest of their parts; a `timeout!!` adds its timer), None when a `pmap!!`'s size
  is unknown;
- chain: the longest sequence of leaves one after the other (the worst case: a `try!!`
  whose body fails at its end, then its rescue, then its finally);
- depth: the nesting of nodes, a fan-out's body under it;
- fan-outs: each `doseq!!`/`pmap!!`, what it goes over, and its size: in the program (a
  literal), from the given context, or unknown until run time;
- actions: each action the program names, and whether it is idempotent (an action used
  both ways is `mixed`); waits (`sleep!!`, `await!!`, the timers) are not actions;
- bytes: an estimate of what a store keeps for one run that succeeds: the first write (the
  whole program and context, measured with the store's own codec) and, per leaf, the two
  writes that dispatch it and record its result (its state and the changed counters of
  every node above it), outputs counted as nil. A fan-out adds its copies when it expands.

Warnings: a fan-out wider than `fanout_limit` (or a `pmap!!` whose width is only known at
run time); a non-idempotent action inside a retry: a leaf that a `try!!`'s rescue runs
again (the same action and payload in the body and in the rescue, which is what
`std/retry`'s `with-retries` compiles to), since a timeout or a crash can leave it done
once already (a leaf's own `:retry` policy is not warned about: it never repeats an
attempt whose outcome is unknown, see `engine.retry`); a run whose kept history is
estimated above `HISTORY_WARNING` bytes.

The walk keeps its own stack: trees thousands of levels deep are planned like any other.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ablauf_lang.code import Expr
from ablauf_lang.codec.delta import dumps_text, node_row, node_state, run_fields
from ablauf_lang.codec.history import whole_data
from ablauf_lang.engine.job import make_job
from ablauf_lang.engine.kinds import Leaf, Node
from ablauf_lang.engine.nodes import LeafState
from ablauf_lang.errors import AblaufError
from ablauf_lang.names import WAIT_ACTIONS
from ablauf_lang.ui.render import format_value

__all__ = [
    "FANOUT_LIMIT",
    "HISTORY_WARNING",
    "ActionUse",
    "FanOut",
    "Plan",
    "format_plan",
    "plan",
]

FANOUT_LIMIT = 1000  # the widest fan-out not warned about
HISTORY_WARNING = 50 * 1024 * 1024  # a run's kept history above this is warned about
_CLOCK = 1.7e9  # a time of the kind stored in a leaf's state (for sizes only)


@dataclass(frozen=True, slots=True)
class FanOut:
    """One `doseq!!`/`pmap!!`: what it goes over and how big it is."""

    node: int
    form: str  # doseq!! or pmap!!
    var: str
    over: str  # the collection, as source text (or the literal)
    size: int | None  # None: unknown until run time
    bound: str  # "in the program", "from the given context", "unknown until run time: ..."
    body_leaves: int
    line: int | None
    within: int | None  # the fan-out whose body holds it (ids in a body are the body's own)
    item_bytes: int  # what each item adds to a run's stored bytes
    file: str | None = None  # the file it is written in, when not the program's own

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "within": self.within,
            "form": self.form,
            "var": self.var,
            "over": self.over,
            "size": self.size,
            "bound": self.bound,
            "body_leaves": self.body_leaves,
            "line": self.line,
            "file": self.file,
            "item_bytes": self.item_bytes,
        }

    @property
    def where(self) -> str:
        """`node N, line L` (in the body of node M)."""
        body = f" in the body of node {self.within}" if self.within is not None else ""
        return f"node {self.node}{body}, {_at(self.file, self.line)}"


@dataclass(frozen=True, slots=True)
class ActionUse:
    """An action the program names: how many leaves, and whether it is idempotent."""

    action: str
    leaves: int
    idempotent: str  # "yes", "no" or "mixed"
    line: int | None  # its first use

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "leaves": self.leaves,
            "idempotent": self.idempotent,
            "line": self.line,
        }


@dataclass(frozen=True, slots=True)
class Plan:
    """What a program will do, as far as its tree tells (see the module docstring)."""

    nodes: int
    leaves: int
    run_leaves: int | None
    width: int | None
    chain: int | None
    depth: int
    fanouts: tuple[FanOut, ...]
    actions: tuple[ActionUse, ...]
    waits: int
    first_write: int  # bytes
    bytes: int  # estimated bytes kept per run (unknown fan-outs counted as one item)
    fanout_limit: int
    warnings: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "leaves": self.leaves,
            "run_leaves": self.run_leaves,
            "width": self.width,
            "chain": self.chain,
            "depth": self.depth,
            "fanouts": [f.to_dict() for f in self.fanouts],
            "actions": [a.to_dict() for a in self.actions],
            "waits": self.waits,
            "bytes": {"first_write": self.first_write, "per_run": self.bytes},
            "fanout_limit": self.fanout_limit,
            "warnings": list(self.warnings),
        }


@dataclass(slots=True)
class _Shape:
    """What a subtree adds up to (None: unbounded, known only at run time)."""

    leaves: int  # static
    run: int | None  # leaves performed in a run
    width: int | None
    chain: int | None
    depth: int
    bytes: int  # estimated bytes written for it in one run (unknown sizes as 1)


def _add(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def _max(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else max(a, b)


def _mul(n: int | None, a: int | None) -> int | None:
    if n == 0:
        return 0
    return None if a is None or n is None else n * a


def _line(node: Any) -> int | None:
    span = getattr(node, "span", None)
    return span.line if span is not None else None


def _file(node: Any, home: str | None) -> str | None:
    """The file a node is written in, when it is not `home` (the program's own; None: any
    but the standard library's)."""
    span = getattr(node, "span", None)
    name = getattr(span, "filename", None)
    if name is None or name == home or (home is None and not name.startswith("std/")):
        return None
    return str(name)


def _at(file: str | None, line: int | None) -> str:
    return f"{file}:{line or '?'}" if file else f"line {line or '?'}"


def _kids(node: Any) -> list[Any]:
    return list(getattr(node, "children", ()))


def _is_expansion(node: Any) -> bool:
    return getattr(node, "template", None) is not None and not getattr(node, "expanded", True)


def _walk(root: Any) -> Iterator[Any]:
    """Every node, fan-out bodies included, in pre-order (no recursion)."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        kids = _kids(node)
        if _is_expansion(node):
            kids.append(node.template)
        stack.extend(reversed(kids))


def _size_of(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _state_bytes(node: Any) -> int:
    return _size_of(dumps_text(node_state(node)))


def _leaf_bytes(leaf: Leaf, above: int, write: int) -> int:
    """The two writes of a leaf: dispatched (pending), then done."""
    sent = replace(leaf, result=LeafState.PENDING, attempt=1, dispatched_at=_CLOCK)
    done = replace(sent, result=LeafState.SUCCESS, started_at=_CLOCK, finished_at=_CLOCK, wake=None)
    return 2 * (write + above) + _state_bytes(sent) + _state_bytes(done)


def _row_bytes(node: Any) -> int:
    row = node_row(node)
    return _size_of(row.spec) + _size_of(row.state) + _size_of(row.children or "") + 8


class _Planner:
    def __init__(
        self, context: Mapping[Any, Any] | None, limit: int, write: int, home: str | None
    ) -> None:
        self.home = home
        self.context = dict(context) if context is not None else None
        self.limit = limit
        self.write = write  # the fixed part of one write (the run's own fields)
        self.fanouts: list[FanOut] = []
        self.warnings: list[str] = []

    def size(self, node: Any) -> tuple[int | None, str, str]:
        """A fan-out's size, how it is known, and what it goes over."""
        coll = node.coll
        if not isinstance(coll, Expr):
            shown = format_value(coll)
            if isinstance(coll, list | tuple | range):
                return len(coll), "in the program", shown
            return None, "not a sequence: the run fails there", shown
        shown = coll.show
        if self.context is None:
            return None, f"unknown until run time: {shown}", shown
        try:
            value = coll.evaluate(self.context)
        except AblaufError as exc:
            if coll.free - set(coll.bindings):  # reads a variable of an enclosing fan-out
                return None, f"unknown until run time: {shown}", shown
            reason = exc.message.splitlines()[0]
            return None, f"the run fails there with this context: {reason}", shown
        if isinstance(value, str | bytes | dict) or not isinstance(value, list | tuple | range):
            return None, "not a sequence in the given context: the run fails there", shown
        return len(value), "from the given context", shown

    def shape(self, root: Any) -> _Shape:
        """The shape of `root` (post-order over an explicit stack)."""
        done: dict[int, _Shape] = {}  # id(node) -> its shape
        stack: list[tuple[Any, int, bool, int | None]] = [(root, 0, False, None)]
        while stack:
            node, above, ready, within = stack.pop()
            if isinstance(node, Leaf):
                done[id(node)] = _Shape(1, 1, 1, 1, 1, _leaf_bytes(node, above, self.write))
                continue
            below = above + _state_bytes(node)
            parts = _kids(node)
            expansion = _is_expansion(node)
            if expansion:
                parts = [node.template]
            if not ready:
                stack.append((node, above, True, within))
                inner = node.id if expansion and within is None else within
                stack.extend((p, below, False, inner) for p in reversed(parts))
                continue
            shapes = [done.pop(id(p)) for p in parts]
            done[id(node)] = (
                self.expand(node, shapes[0], within) if expansion else _combine(node, shapes)
            )
        return done[id(root)]

    def expand(self, node: Any, body: _Shape, within: int | None) -> _Shape:
        size, bound, over = self.size(node)
        form = getattr(node, "label", node.kind)
        copies = sum(_row_bytes(n) for n in _walk(node.template))
        item = body.bytes + copies
        fan = FanOut(
            node.id,
            form,
            node.var,
            over,
            size,
            bound,
            body.leaves,
            _line(node),
            within,
            item,
            _file(node, self.home),
        )
        self.fanouts.append(fan)
        where = f"{form} over {over} ({fan.where})"
        parallel = form == "pmap!!"
        if size is not None and size > self.limit:
            self.warnings.append(f"{where} is {size} wide, more than the limit of {self.limit}")
        elif size is None and parallel and bound.startswith("unknown"):
            self.warnings.append(
                f"{where}: its width is known only at run time and may pass the limit "
                f"of {self.limit}"
                + (" (give --context to check it)" if self.context is None else "")
            )
        counted = size if size is not None else 1
        return _Shape(
            body.leaves,
            _mul(size, body.run),
            _mul(size, body.width) if parallel else (body.width if size != 0 else 0),
            body.chain if parallel and size != 0 else _mul(size, body.chain),
            1 + body.depth,
            counted * item + _state_bytes(node),
        )


def _combine(node: Any, shapes: list[_Shape]) -> _Shape:
    """A branch's shape from its children's (by kind: parallel, alternative, in sequence)."""
    kind = node.kind
    leaves = sum(s.leaves for s in shapes)
    nbytes = sum(s.bytes for s in shapes)
    run: int | None = 0
    for s in shapes:
        run = _add(run, s.run)
    depth = 1 + max((s.depth for s in shapes), default=0)
    width: int | None = 0
    chain: int | None = 0
    if kind in ("par", "pmap", "deadline"):  # side by side (an expanded pmap is a dopar)
        for s in shapes:
            width, chain = _add(width, s.width), _max(chain, s.chain)
    elif kind == "if":  # one branch or the other
        run = 0
        for s in shapes:
            width, chain, run = _max(width, s.width), _max(chain, s.chain), _max(run, s.run)
    else:  # seq, doseq, try (body, rescue, finally one after the other)
        for s in shapes:
            width, chain = _max(width, s.width), _add(chain, s.chain)
    return _Shape(leaves, run, width, chain, depth, nbytes)


def _actions(root: Any) -> tuple[tuple[ActionUse, ...], int]:
    seen: dict[str, list[Any]] = {}
    waits = 0
    for node in _walk(root):
        if not isinstance(node, Leaf):
            continue
        if node.action in WAIT_ACTIONS:
            waits += 1
            continue
        seen.setdefault(str(node.action), []).append(node)
    uses = []
    for action, leaves in seen.items():
        kinds = {bool(leaf.idempotent) for leaf in leaves}
        flag = "mixed" if len(kinds) == 2 else ("yes" if kinds == {True} else "no")
        uses.append(ActionUse(action, len(leaves), flag, _line(leaves[0])))
    return tuple(uses), waits


def _same_leaf(a: Leaf, b: Leaf) -> bool:
    return a.action == b.action and a.payload == b.payload


def _leaves(node: Any) -> list[Leaf]:
    return [n for n in _walk(node) if isinstance(n, Leaf)]


def _retry_warnings(root: Any, home: str | None) -> list[str]:
    """Non-idempotent leaves that a retry may perform again (see the module docstring)."""
    out: list[str] = []
    named: set[tuple[str, str]] = set()

    def warn(leaf: Leaf, how: str) -> None:
        key = (str(leaf.action), _at(_file(leaf, home), _line(leaf)))
        if key in named:
            return
        named.add(key)
        out.append(
            f"non-idempotent :{leaf.action} ({key[1]}) {how}: after a "
            "timeout or a crash it may be performed twice (make it idempotent-action!!, "
            "or retry only what is safe to repeat)"
        )

    for node in _walk(root):
        if getattr(node, "kind", None) == "try":
            body, rescue = _leaves(node.children[0]), _leaves(node.children[1])
            for leaf in body:
                if (
                    not leaf.idempotent
                    and leaf.action not in WAIT_ACTIONS
                    and any(_same_leaf(leaf, other) for other in rescue)
                ):
                    warn(leaf, "is run again by a rescue!! (a retry such as with-retries)")
    return out


def plan(
    root: Node,
    context: Mapping[Any, Any] | None = None,
    *,
    fanout_limit: int = FANOUT_LIMIT,
    filename: str | None = None,
) -> Plan:
    """The plan of a compiled program (or of a job's tree part way through a run).
    `filename`: the program's file (places in other files name theirs)."""
    job = make_job(root, dict(context or {}))
    first = _size_of(whole_data(job))
    write = _size_of(dumps_text({"r": run_fields(job)}))
    home = filename
    planner = _Planner(context, fanout_limit, write, home)
    shape = planner.shape(root)
    actions, waits = _actions(root)
    warnings = list(planner.warnings)
    warnings.extend(_retry_warnings(root, home))
    total = first + shape.bytes
    if total > HISTORY_WARNING:
        warnings.append(
            f"a run keeps about {_human(total)} of history (more than "
            f"{_human(HISTORY_WARNING)}): prune finished runs (`ablauf runs prune`), or "
            "split the work into runs of their own"
        )
    return Plan(
        nodes=sum(1 for _ in _walk(root)),
        leaves=shape.leaves,
        run_leaves=shape.run,
        width=shape.width,
        chain=shape.chain,
        depth=shape.depth,
        fanouts=tuple(
            sorted(
                planner.fanouts,
                key=lambda f: (
                    f.node if f.within is None else f.within,
                    f.within is not None,
                    f.node,
                ),
            )
        ),
        actions=actions,
        waits=waits,
        first_write=first,
        bytes=total,
        fanout_limit=fanout_limit,
        warnings=tuple(warnings),
    )


def _human(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"  # pragma: no cover - the loop returns


def _known(n: int | None, unknown: str) -> str:
    return str(n) if n is not None else unknown


def format_plan(p: Plan) -> str:
    """The plan for people: aligned lines, fan-outs and actions listed, warnings last."""
    in_run = (
        ""
        if p.run_leaves == p.leaves
        else f", {p.run_leaves} in a run"
        if p.run_leaves is not None
        else ", in a run: as many as the fan-outs' sizes make"
    )
    lines = [
        ("leaves", f"{p.leaves} in the program{in_run}"),
        (
            "widest",
            _known(p.width, "unbounded until run time (a pmap!!'s size is unknown)")
            + " in flight at once",
        ),
        (
            "longest chain",
            _known(p.chain, "unbounded until run time (a doseq!!'s size is unknown)")
            + " leaves one after another",
        ),
        ("depth", str(p.depth)),
        ("nodes", str(p.nodes)),
        ("waits", str(p.waits)),
    ]
    stored = f"about {_human(p.bytes)} per run (first write {_human(p.first_write)})"
    extra = [
        f"+{_human(f.item_bytes)} per item of {f.form} {f.over} after the first"
        for f in p.fanouts
        if f.size is None
    ]
    if extra:
        stored += ", " + ", ".join(extra)
    lines.append(("stored", stored))
    width = max(len(k) for k, _ in lines) + 1
    out = [f"{k + ':':<{width}} {v}" for k, v in lines]
    if p.fanouts:
        out.append("fan-outs:")
        for f in p.fanouts:
            size = "?" if f.size is None else str(f.size)
            leaves = "leaf" if f.body_leaves == 1 else "leaves"
            out.append(
                f"  {f.form} [{f.var} {f.over}] ({f.where}): {size} x {f.body_leaves} "
                f"{leaves}; {f.bound}"
            )
    if p.actions:
        out.append("actions:")
        name_width = max(len(a.action) for a in p.actions) + 1
        for a in p.actions:
            out.append(
                f"  :{a.action:<{name_width}} {a.leaves} {'leaf' if a.leaves == 1 else 'leaves'}, "
                f"idempotent: {a.idempotent}"
            )
    out.extend(f"warning: {w}" for w in p.warnings)
    return "\n".join(out)
