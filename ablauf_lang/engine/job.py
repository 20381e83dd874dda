"""The job: a workflow tree with its results, and the pure reducer that drives it.

    make_job    :: Node -> Job
    restart_job :: Job -> [Result] -> (Job, [Dispatch])

`restart_job` applies results, then starts what became startable, and returns the new job
with the actions to perform. It performs nothing, reads no clock (time comes in as `now`)
and never mutates its input. Its cost is O(results x depth + dispatches): each result is
reached through the id -> child-index path table and applied through the zipper, whose
way up keeps the branch summaries current; then only the children that changed (`dirty`)
are visited, never the whole tree.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from pyrsistent import PVector, pvector

from ablauf_lang.code import Expr
from ablauf_lang.engine import retry, zipper
from ablauf_lang.engine.kinds import Leaf, Node, is_branch, renumber
from ablauf_lang.engine.kinds.base import T_EXPR, T_TREE, rebuild
from ablauf_lang.engine.nodes import ALL, NOTHING, Dispatch, LeafState, Result, Status
from ablauf_lang.errors import AblaufError, InvariantError, JobError
from ablauf_lang.stdlib.actions import AWAIT, SLEEP, WAIT_ACTIONS
from ablauf_lang.stdlib.durations import parse_duration, parse_instant
from ablauf_lang.values import assoc_in

LAST_ERROR = "exec/last-error"
INTERRUPTED = "interrupted: "  # error prefix of a non-idempotent action whose outcome is unknown
ROOT = -1  # the root's virtual parent, in `todo`
REDO = -2  # in `todo`: ids of leaves in flight that the next restart dispatches again

OPS = zipper.Ops(is_branch, lambda n: n.children, lambda n, i, c: n.replace_child(i, c))


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class Job:
    """A workflow tree, its context, and what the next restart must look at.

    Its repr is a summary, O(1): the dataclass's would print the whole tree, and asyncio
    asks for it where nobody reads it (a finished task's result, reprised when signal
    handlers are swapped: 11 us a step of a 5,000-step run)."""

    root: Node
    context: dict[str, Any]
    paths: PathTable  # node id -> tuple of child indices from the root
    todo: dict[int, Collection[int]] = field(default_factory=dict)  # dirty for next restart
    restarts: int = 0
    touched: frozenset[int] = frozenset()  # ids the last operation changed (for stores)
    aborted: str | None = None  # set by abort: nothing new starts, status is failure

    def __repr__(self) -> str:
        aborted = "" if self.aborted is None else f", aborted={self.aborted!r}"
        return (
            f"<Job {self.status} restarts={self.restarts} nodes={len(self.paths)}"
            f" root={self.root.kind}#{self.root.id}{aborted}>"
        )

    # ------------------------------------------------------------ status

    @property
    def done(self) -> bool:
        """True when the run can no longer change: the root is done, or it was aborted.

        A leaf that a resume handed back to be dispatched again keeps the run going.
        """
        if REDO in self.todo:
            return False
        if self.aborted is not None:
            return self.root.inflight == 0
        return self.root.done

    @property
    def status(self) -> Status:
        """success or failure once done, else pending."""
        if not self.done:
            return Status.PENDING
        if self.aborted is not None or self.root.failed:
            return Status.FAILURE
        return Status.SUCCESS

    @property
    def inflight(self) -> int:
        """How many leaves are dispatched and waiting for a result."""
        return self.root.inflight

    # ------------------------------------------------------------ access

    def node(self, node_id: int) -> Node:
        """Return the node with id `node_id`."""
        if not 0 <= node_id < len(self.paths):
            raise JobError(f"unknown node id {node_id}")
        node: Node = self.root
        for i in self.paths[node_id]:
            node = node.children[i]
        return node

    def nodes(self) -> Iterator[Node]:
        """Yield every node in pre-order."""
        return preorder(self.root)

    def leaves(self) -> Iterator[Leaf]:
        """Yield every leaf in pre-order."""
        for node in self.nodes():
            if isinstance(node, Leaf):
                yield node

    def pending(self) -> list[Leaf]:
        """The leaves dispatched and waiting for a result (a walk: for inspection only)."""
        return [leaf for leaf in self.leaves() if leaf.result is LeafState.PENDING]

    def path(self, node_id: int) -> tuple[int, ...]:
        """The child indices from the root to node `node_id`."""
        self.node(node_id)
        return self.paths[node_id]

    def parent_ids(self, node_id: int) -> list[int]:
        """The ids of the ancestors of `node_id`, root first."""
        out: list[int] = []
        node: Node = self.root
        for i in self.path(node_id):
            out.append(node.id)
            node = node.children[i]
        return out

    # ------------------------------------------------------------ json

    def to_json(self) -> str:
        """Serialise to versioned JSON (the format is `codec.job`'s)."""
        return _codec().dumps(self)

    @staticmethod
    def from_json(text: str | bytes) -> Job:
        """Load a job written by `to_json`."""
        return _codec().loads(text)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Job):
            return NotImplemented
        return (
            self.restarts == other.restarts
            and self.aborted == other.aborted
            and len(self.paths) == len(other.paths)
            and _same_todo(self.todo, other.todo)
            and _same_value(self.context, other.context)
            and _same_tree(self.root, other.root)
        )

    __hash__ = None  # type: ignore[assignment]


# ---------------------------------------------------------------- building


class PathTable:
    """node id -> the child indices from the root, kept as (parent id, child index) links.

    O(N) memory however deep the tree (a table of whole paths is O(N x depth): 50 million
    entries for a 10,000-deep `do!!`); a look-up walks the links up, O(depth), as the
    zipper's walk down does anyway. Persistent: `extend` returns a new table.
    """

    __slots__ = ("parent", "pos")

    def __init__(self, parent: PVector[int], pos: PVector[int]) -> None:
        self.parent = parent
        self.pos = pos

    def __len__(self) -> int:
        return len(self.parent)

    def __getitem__(self, node_id: int) -> tuple[int, ...]:
        parent, pos = self.parent, self.pos
        out: list[int] = []
        while node_id != ROOT:
            out.append(pos[node_id])
            node_id = parent[node_id]
        out.pop()  # the root's own entry
        out.reverse()
        return tuple(out)

    def extend(self, links: Iterable[tuple[int, int]]) -> PathTable:
        """The table with nodes len(self).. appended, each given as (parent id, index)."""
        pairs = list(links)
        return PathTable(
            self.parent.extend(p for p, _ in pairs), self.pos.extend(i for _, i in pairs)
        )


def index_paths(root: Node) -> PathTable:
    """Return the id -> path table, checking ids are unique and dense (0..N-1)."""
    found: dict[int, tuple[int, int]] = {}
    stack: list[tuple[Node, int, int]] = [(root, ROOT, 0)]
    while stack:
        node, parent, pos = stack.pop()
        if node.id in found:
            raise JobError(f"node id {node.id} appears twice in the tree")
        found[node.id] = (parent, pos)
        if is_branch(node):
            kids = node.children
            for i in range(len(kids) - 1, -1, -1):
                stack.append((kids[i], node.id, i))
    n = len(found)
    if any(i not in found for i in range(n)):
        raise JobError("node ids must be 0..N-1 (number the tree in pre-order)")
    return PathTable(pvector(found[i][0] for i in range(n)), pvector(found[i][1] for i in range(n)))


def copy_numbered(root: Node, first_id: int, fn: Any) -> tuple[Node, list[tuple[int, ...]]]:
    """Copy a tree with fresh pre-order ids from `first_id`, applying `fn` to every node.

    Returns the copy and the path of each new node (in id order) relative to its root.
    """

    def each(node: Node) -> Node:
        new: Node = fn(node)
        return new.summarize() if is_branch(new) else new

    return renumber(root, first_id, each)


def bind_node(node: Any, bindings: dict[str, Any]) -> Any:
    """Bind run-time locals in a node's own expressions (and in a nested template)."""
    expr_fields, tree_fields = _bindable(type(node))
    changes: dict[str, Any] = {}
    for name in expr_fields:
        value = getattr(node, name)
        if isinstance(value, Expr):
            changes[name] = value.bind(bindings)
    for name in tree_fields:
        changes[name] = rebuild(
            getattr(node, name),
            lambda leaf: bind_node(leaf, bindings),
            lambda n: bind_node(n, bindings),
        )
    return replace(node, **changes) if changes else node


_BINDABLE: dict[type, tuple[tuple[str, ...], tuple[str, ...]]] = {}


def _bindable(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(expression fields, template fields) a kind declares."""
    found = _BINDABLE.get(cls)
    if found is None:
        stored = getattr(cls, "stored", ())
        found = _BINDABLE[cls] = (
            tuple(f.name for f in stored if f.type == T_EXPR),
            tuple(f.name for f in stored if f.type == T_TREE),
        )
    return found


def error_text(exc: AblaufError) -> str:
    """An error for a leaf or node: the expression's position, then the message."""
    return f"{exc.location}: {exc.message}" if exc.line is not None else exc.message


def preorder(root: Node) -> Iterator[Node]:
    """Yield every node of a tree in pre-order (a job's, or a compiled program's)."""
    stack: list[Node] = [root]
    while stack:
        node = stack.pop()
        yield node
        if is_branch(node):
            stack.extend(reversed(node.children))


def make_job(ast: Node, context: dict[str, Any] | None = None) -> Job:
    """Create a job from a compiled workflow: nothing started yet."""
    root = rebuild(ast, lambda leaf: leaf)
    return Job(root, dict(context or {}), index_paths(root), {ROOT: ALL})


# ---------------------------------------------------------------- restart


class Step:
    """The working state of one restart; local to `restart_job`, so the reducer stays pure."""

    def __init__(self, job: Job, now: float | None) -> None:
        self.root: Node = job.root
        self.context = job.context
        self.paths = job.paths
        self.now = now
        self.blocked = job.aborted is not None
        self.dirty: dict[int, Any] = {k: (v if v is ALL else set(v)) for k, v in job.todo.items()}
        self.redo: set[int] = self.dirty.pop(REDO, set())
        self.dispatches: list[Dispatch] = []
        self.touched: set[int] = set()

    # -------------------------------------------------- applying results

    def apply(self, result: Result) -> None:
        """Record one result on its leaf; ignore it unless that leaf waits for it."""
        check_result(result, len(self.paths))
        node_id = result.id
        leaf, above, path = self.locate(node_id)
        if not isinstance(leaf, Leaf):
            raise JobError(f"result for node {node_id}, which is a {leaf.kind}, not an action")
        if leaf.result is not LeafState.PENDING or (
            result.attempt is not None and result.attempt != leaf.attempt
        ):
            return  # a duplicate delivery or a stale attempt: never applied twice
        ok = result.state is LeafState.SUCCESS
        if (
            not ok
            and leaf.retry
            and retry.should_retry(leaf, result.state, result.error)
            and not (isinstance(result.error, str) and result.error.startswith(INTERRUPTED))
        ):  # an interrupted attempt's outcome is unknown: never retried by the policy
            self.retry(above, path, leaf, result)
            return
        new = leaf.with_state(
            result.state,
            result.output if ok else None,
            None if ok else result.error,
            leaf.attempt,
            leaf.dispatched_at,
            result.finished_at if result.finished_at is not None else self.now,
            result.started_at,
            leaf.sent,
            leaf.wake,
        )
        if ok:
            if leaf.augment is not None:
                self.context = leaf.augment.apply(self.context, result.output)
        else:
            self.context = assoc_in(self.context, (LAST_ERROR,), result.error)
        self.put(above, path, new)
        self.touched.add(node_id)
        self.mark_dirty(above, path)

    def retry(self, above: list[Any], path: tuple[int, ...], leaf: Leaf, result: Result) -> None:
        """Another attempt of a leaf whose policy retries this failure, after its delay.

        The leaf stays in flight (its parents see no change); the failed attempt joins its
        record; the new one is dispatched with `due` set (a durable wait: it is recorded).
        """
        assert leaf.retry is not None
        now = self.now if self.now is not None else (result.finished_at or 0.0)
        finished = result.finished_at if result.finished_at is not None else self.now
        wake = now + retry.delay(leaf.retry, leaf.attempt, leaf.id)
        attempts = (
            *leaf.attempts,
            retry.record(leaf, result.state, result.error, result.started_at, finished),
        )
        attempt = leaf.attempt + 1
        new = leaf.with_state(
            LeafState.PENDING, None, None, attempt, now, None, None, leaf.sent, wake, attempts
        )
        payload = leaf.sent if isinstance(leaf.payload, Expr) else leaf.payload
        self.dispatch(leaf, payload, attempt, wake)
        self.put(above, path, new)
        self.touched.add(leaf.id)

    def locate(self, node_id: int) -> tuple[Node, list[Any], tuple[int, ...]]:
        """Node `node_id`, its ancestors from the root down, and its path (child indices)."""
        path = self.paths[node_id]
        node = self.root
        above: list[Any] = []  # branches
        for i in path:
            above.append(node)
            node = node.children[i]
        return node, above, path

    def put(self, above: list[Any], path: tuple[int, ...], node: Node) -> None:
        """Make `node` the one at `path` (under the ancestors `above`, as `locate` gave
        them), each ancestor rebuilt with its summary updated."""
        for parent, i in zip(reversed(above), reversed(path), strict=True):
            node = parent.replace_child(i, node)
        self.root = node

    def mark_dirty(self, above: list[Any], path: tuple[int, ...]) -> None:
        """Make the next walk visit the path down to a changed node."""
        dirty = self.dirty
        for parent, i in zip(above, path, strict=True):
            entry = dirty.get(parent.id)
            if entry is None:
                dirty[parent.id] = {i}
            elif entry is not ALL:
                entry.add(i)

    def redispatch(self) -> None:
        """Dispatch again, as a new attempt, the leaves in flight that a replay handed back."""
        for node_id in sorted(self.redo):
            leaf, above, path = self.locate(node_id)
            if not isinstance(leaf, Leaf) or leaf.result is not None:
                continue  # it ran in the meantime (its result arrived, or an abort failed it)
            self.put(above, path, self.start_leaf(leaf))
            self.mark_dirty(above, path)

    def hand_back(self, leaf: Leaf, *, same_attempt: bool = False) -> None:
        """Make a leaf in flight unset again, for the next restart to dispatch it anew: as a
        new attempt, or (`same_attempt`: an attempt that never began, a wait) as the same
        one, so a hand-over does not use up a retry policy's attempts."""
        _, above, path = self.locate(leaf.id)
        new = leaf.reset(keep_wake=True)
        if same_attempt and new.attempt > 0:
            new = replace(new, attempt=new.attempt - 1)  # the next start numbers it again
        self.put(above, path, new)
        self.touched.add(leaf.id)
        self.redo.add(leaf.id)

    def evaluate(self, value: Any) -> tuple[bool, Any]:
        """Evaluate a run-time expression against the context: (True, value) or (False, error)."""
        if not isinstance(value, Expr):
            return True, value
        try:
            return True, value.evaluate(self.context)
        except AblaufError as exc:
            return False, error_text(exc)

    def fail(self, node_id: int, error: Any) -> None:
        """Record that node `node_id` failed before it could run (the rescue sees why)."""
        self.context = assoc_in(self.context, (LAST_ERROR,), error)
        self.touched.add(node_id)

    def touch(self, node_id: int) -> None:
        """Record that node `node_id` changed (stores write it)."""
        self.touched.add(node_id)

    def skip(self, node: Node) -> Node:
        """Mark every leaf that never ran under `node` as skipped."""
        touched = self.touched

        def mark(leaf: Leaf) -> Leaf:
            if leaf.result is None:
                touched.add(leaf.id)
                return leaf.skipped()
            return leaf

        skipped: Node = rebuild(node, mark)
        return skipped

    def cut(self, node: Node, state: LeafState, error: Any) -> Node:
        """End a subtree: its leaves in flight get `state` and `error` (late results are
        ignored), the ones that never ran are skipped (`error` marks them: a retry of the
        deadline that cut them runs them again)."""
        touched = self.touched
        now = self.now
        failed = False

        def mark(leaf: Leaf) -> Leaf:
            nonlocal failed
            if leaf.result is None:
                touched.add(leaf.id)
                return leaf.with_state(
                    LeafState.SKIPPED, None, error, leaf.attempt, None, None, None, None
                )
            if leaf.result is LeafState.PENDING:
                touched.add(leaf.id)
                failed = failed or state is not LeafState.SKIPPED
                return leaf.with_state(
                    state,
                    None,
                    error,
                    leaf.attempt,
                    leaf.dispatched_at,
                    now,
                    None,
                    leaf.sent,
                    leaf.wake,
                )
            return leaf

        out: Node = rebuild(node, mark)
        if failed:
            self.context = assoc_in(self.context, (LAST_ERROR,), error)
        return out

    def instantiate(self, node: Any, elements: list[Any]) -> PVector[Any]:
        """One copy of `node.template` per element, `node.var` bound, with fresh ids."""
        kids = []
        links: list[tuple[int, int]] = []
        for i, element in enumerate(elements):
            bindings = {node.var: element}
            first = len(self.paths) + len(links)
            copy, sub_paths = copy_numbered(
                node.template, first, lambda n, b=bindings: bind_node(n, b)
            )
            kids.append(copy)
            ids = {sub: first + k for k, sub in enumerate(sub_paths)}  # a template is small
            links.extend((ids[sub[:-1]], sub[-1]) if sub else (node.id, i) for sub in sub_paths)
            self.touched.update(range(copy.id, copy.id + len(sub_paths)))
        self.paths = self.paths.extend(links)
        return pvector(kids)

    def start_leaf(self, leaf: Leaf) -> Leaf:
        """Dispatch an unset leaf (or fail it when its payload cannot be evaluated)."""
        attempt = leaf.attempt + 1
        ok, payload = self.evaluate(leaf.payload)
        wake = leaf.wake  # kept when a resume handed back an attempt that had not started
        due = wake
        if ok and leaf.action in WAIT_ACTIONS:
            ok, payload, wake = self.wait(leaf, payload)
            due = wake if leaf.action == SLEEP else None
        if not ok:
            self.fail(leaf.id, payload)
            return leaf.with_state(
                LeafState.FAILURE, None, payload, attempt, self.now, self.now, None, None
            )
        # A payload computed at run time is kept as the value sent, beside its expression.
        sent = payload if isinstance(leaf.payload, Expr) or leaf.action in WAIT_ACTIONS else None
        self.dispatch(leaf, payload, attempt, due)
        self.touched.add(leaf.id)
        return leaf.with_state(
            LeafState.PENDING, None, None, attempt, self.now, None, None, sent, wake
        )

    def dispatch(self, leaf: Leaf, payload: Any, attempt: int, due: float | None) -> None:
        """Ask the runner to perform attempt `attempt` of `leaf` (not before `due`)."""
        self.dispatches.append(
            Dispatch(
                leaf.id,
                leaf.action,
                payload,
                leaf.idempotent,
                attempt,
                self.context,
                due,
                leaf.timeout,
                leaf.heartbeat,
            )
        )

    def wait(self, leaf: Leaf, payload: Any) -> tuple[bool, Any, float | None]:
        """The payload a wait is dispatched with, and its time: (ok, payload or error, time).

        `sleep!!`: `{"until": wake-up}` (now + the duration, or the instant given);
        `await!!`: `{"signal": name, "until": deadline or None}`. A wait handed back by a
        resume keeps the time it recorded: it never starts over.
        """
        if not isinstance(payload, dict):
            return False, f"{leaf.action}: bad payload {payload!r:.60}", None
        now = self.now if self.now is not None else 0.0
        fields: dict[str, Any] = {}
        for key, value in payload.items():
            ok, fields[key] = self.evaluate(value)
            if not ok:
                return False, fields[key], None
        try:
            if leaf.action == AWAIT:
                limit = fields.get("timeout")
                until = leaf.wake
                if until is None and limit is not None:
                    until = now + parse_duration(limit)
                return True, {"signal": str(fields.get("signal")), "until": until}, until
            wake = leaf.wake
            if wake is None:
                if "until" in fields:
                    wake = parse_instant(fields["until"])
                else:
                    wake = now + parse_duration(fields.get("seconds", 0))
            out = {"until": wake}
            if "seconds" in fields:
                out["seconds"] = parse_duration(fields["seconds"])
            return True, out, wake
        except AblaufError as exc:
            return False, f"{'sleep!!' if leaf.action == SLEEP else 'await!!'}: {exc.message}", None

    def enter(self, loc: zipper.Loc, fresh: bool) -> tuple[zipper.Loc, list[Any] | None]:
        """Visit a node: start it if it is a leaf, else return the children to visit."""
        node = loc.node
        if isinstance(node, Leaf):
            if node.result is None:
                loc = zipper.replace(loc, self.start_leaf(node))
            return loc, None
        dirty = ALL if fresh else self.dirty.get(node.id, NOTHING)
        if fresh:
            entered = node.enter(self)
            if entered is not node:
                loc = zipper.replace(loc, entered)
                node = entered
        fresh_kids = dirty is ALL
        todo = [(i, fresh_kids, False) for i in node.plan(dirty)]
        todo.reverse()
        return loc, todo

    def leave(self, loc: zipper.Loc, stack: list[list[Any]]) -> zipper.Loc:
        """Go up to the parent and let it react to the child just visited."""
        assert loc.path is not None
        index = loc.path.pos
        loc = zipper.up(loc)  # type: ignore[assignment]
        node, nexts = loc.node.follow(index)
        if node is not loc.node:
            loc = zipper.replace(loc, node)
            self.touched.add(node.id)  # its own fields changed (a cursor moved): stores write it
        if nexts:
            queue = stack[-1]
            for nxt in reversed(nexts):
                queue.append((nxt.child, True, nxt if nxt.cut is not None else nxt.skip))
        return loc

    def advance(self) -> None:
        """Walk down the changed branches, starting every node that became startable."""
        if self.redo:
            self.redispatch()
        if self.blocked:
            return
        loc, todo = self.enter(zipper.zipper(self.root, OPS), self.dirty.get(ROOT) is ALL)
        if todo is None:
            self.root = loc.node
            return
        stack = [todo]
        while stack:
            queue = stack[-1]
            if not queue:
                stack.pop()
                if stack:
                    loc = self.leave(loc, stack)
                continue
            index, fresh, skip = queue.pop()
            child = zipper.down(loc, index)
            assert child is not None
            if skip:
                node = self.skip(child.node) if skip is True else self.cut(child.node, *skip[2:])
                loc = zipper.up(zipper.replace(child, node))  # type: ignore[assignment]
                continue
            child, todo = self.enter(child, fresh)
            if todo is None:
                loc = self.leave(child, stack)
            else:
                loc = child
                stack.append(todo)
        self.root = loc.node


def restart_job(
    job: Job, results: Iterable[Result] = (), now: float | None = None
) -> tuple[Job, list[Dispatch]]:
    """Apply `results`, then return the updated job and the actions to perform next."""
    rs = Step(job, now)
    for result in results:
        rs.apply(result)
    rs.advance()
    new = Job(
        rs.root, rs.context, rs.paths, {}, job.restarts + 1, frozenset(rs.touched), job.aborted
    )
    if not new.done and new.inflight == 0:
        raise InvariantError(
            "internal error: this restart would leave the run stuck (not done, nothing in "
            "flight); the run was left as it was - please report this with the run's JSON"
        )
    return new, rs.dispatches


_RESULT_STATES = frozenset({LeafState.SUCCESS, LeafState.FAILURE, LeafState.TIMEOUT})


def check_result(result: Any, n_nodes: int) -> None:
    """Refuse what is not a result a runner can send: a bad state, id or attempt."""
    if not isinstance(result, Result):
        raise JobError(f"not a result: {result!r:.80}")
    node_id = result.id
    if type(node_id) is not int or not 0 <= node_id < n_nodes:
        raise JobError(f"result for unknown node id {node_id!r:.40}")
    if not isinstance(result.state, LeafState) or result.state not in _RESULT_STATES:
        raise JobError(
            f"result for node {node_id} has state {result.state!r:.40}: "
            "a result is success, failure or timeout"
        )
    attempt = result.attempt
    if attempt is not None and (type(attempt) is not int or attempt < 1):
        raise JobError(f"result for node {node_id} has a bad attempt {attempt!r:.40}")


# ---------------------------------------------------------------- equality


def _same_todo(a: dict[int, Collection[int]], b: dict[int, Collection[int]]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(
        (x is ALL) == (y is ALL) and (x is ALL or set(x) == set(y))
        for x, y in ((a[k], b[k]) for k in a)
    )


def _same_value(a: Any, b: Any) -> bool:
    """Plain-data equality that never raises (a value that is not JSON compares by ==)."""
    try:
        return bool(a == b)
    except RecursionError:
        return False


def _same_tree(a: Node, b: Node) -> bool:
    """Compare two trees node by node, without recursion (deep trees, any values).

    Compares what each kind stores (`stored`) and the id; the child list through the
    children, and the summaries (cached from the children) not at all.
    """
    stack: list[tuple[Any, Any]] = [(a, b)]
    while stack:
        x, y = stack.pop()
        if x is y:
            continue
        if type(x) is not type(y) or x.id != y.id or len(x.children) != len(y.children):
            return False
        for f in x.stored:
            u, v = getattr(x, f.name), getattr(y, f.name)
            if f.type == T_TREE:  # a doseq!!/pmap!! body: a tree of its own
                stack.append((u, v))
            elif not _same_value(u, v):
                return False
        stack.extend(zip(x.children, y.children, strict=True))
    return True


# ---------------------------------------------------------------- the stored format
# The codec sits above the engine (it knows every kind); it installs itself here when
# imported (`ablauf_lang` always imports it), so `Job.to_json`/`Job.from_json` work
# without the engine importing the codec.


class JobCodec(Protocol):
    """What `Job.to_json` and `Job.from_json` call."""

    def dumps(self, job: Job) -> str: ...

    def loads(self, text: str | bytes) -> Job: ...


_CODEC: list[JobCodec] = []


def install_codec(codec: JobCodec) -> None:
    """Make `codec` the one `Job.to_json`/`Job.from_json` use (called by `codec.job`)."""
    _CODEC[:] = [codec]


def _codec() -> JobCodec:
    if not _CODEC:
        raise JobError("no job codec installed: import ablauf_lang.codec.job first")
    return _CODEC[0]
