"""AST nodes (the lowered workflow tree), leaf states, dispatches and results.

The same immutable nodes form the compiled AST and the job tree: a job is the AST with
results filled in. Branch nodes cache a summary of their subtree (leaves in flight,
children done and failed, the sequence cursor) so a restart never rescans the tree;
`semantics` computes those summaries, one registration per node kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, ClassVar

from pyrsistent import PVector, pvector

from ablauf_lang.errors import Span


class Status(StrEnum):
    """Status of a run (or a job): pending until the root is done."""

    PENDING = "pending"
    SUCCESS = "success"
    FAILURE = "failure"


class LeafState(StrEnum):
    """A leaf's result; a leaf that never started has result `None` (unset, eligible)."""

    PENDING = "pending"  # dispatched, no result yet
    SUCCESS = "success"
    FAILURE = "failure"
    TIMEOUT = "timeout"  # a failure kind
    SKIPPED = "skipped"  # never ran: its branch was not taken


FAILED_STATES = frozenset({LeafState.FAILURE, LeafState.TIMEOUT})
DONE_STATES = frozenset(
    {LeafState.SUCCESS, LeafState.FAILURE, LeafState.TIMEOUT, LeafState.SKIPPED}
)


class Deferred:
    """A value computed when its node is reached: a run-time expression such as `(ctx :k)`.

    Subclasses (the language's expressions) register under a tag so stored jobs can hold
    them: `to_data()` gives JSON-able data, `Deferred.registry[tag].from_data(data)` builds
    one back.
    """

    __slots__ = ()
    tag: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Deferred]]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.tag:
            Deferred.registry[cls.tag] = cls

    def evaluate(self, context: dict[str, Any]) -> Any:
        """Return the value against `context`; raise AblaufError (with position) on failure."""
        raise NotImplementedError

    def bind(self, bindings: dict[str, Any]) -> Deferred:
        """Return a copy with run-time locals bound (a `doseq!!`/`pmap!!` element)."""
        raise NotImplementedError

    def to_data(self) -> Any:
        """JSON-able data for a stored job."""
        raise NotImplementedError

    @classmethod
    def from_data(cls, data: Any) -> Deferred:
        """Invert `to_data`."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Augment:
    """`with-augment [source dest]`: on success copy `get-in output source` to `dest`."""

    source: tuple[Any, ...]  # a get-in path into the output; () is `identity`
    dest: tuple[Any, ...]  # a non-empty path into the context

    def apply(self, context: dict[str, Any], output: Any) -> dict[str, Any]:
        """Return a new context with the selected part of `output` stored at `dest`."""
        value = output
        for key in self.source:
            value = value.get(key) if isinstance(value, dict) else None
        return assoc_in(context, self.dest, value)


def assoc_in(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """Return a copy of `data` with `value` at `path`, creating nested dicts (copy-on-write)."""
    head, rest = path[0], path[1:]
    out = dict(data)
    if rest:
        inner = out.get(head)
        out[head] = assoc_in(inner if isinstance(inner, dict) else {}, rest, value)
    else:
        out[head] = value
    return out


@dataclass(frozen=True, slots=True)
class Leaf:
    """One action to perform: `(action!! :ns/name payload)`, `(log!! x)`, `(fail!! r)`."""

    kind: ClassVar[str] = "leaf"
    id: int
    action: str
    payload: Any = None
    idempotent: bool = False
    augment: Augment | None = None
    result: LeafState | None = None
    output: Any = None
    error: Any = None
    attempt: int = 0
    dispatched_at: float | None = None  # when the engine dispatched it
    finished_at: float | None = None
    span: Span | None = field(default=None, compare=False, repr=False)
    started_at: float | None = None  # when the runner began it (time queued excluded)
    sent: Any = None  # the payload sent, when `payload` is an expression evaluated at run time

    @property
    def done(self) -> bool:
        """Success, failure, timeout or skipped."""
        return self.result in DONE_STATES

    @property
    def failed(self) -> bool:
        """Failure or timeout."""
        return self.result in FAILED_STATES

    @property
    def inflight(self) -> int:
        """1 while dispatched and waiting for its result."""
        return 1 if self.result is LeafState.PENDING else 0

    @property
    def children(self) -> PVector[Any]:
        return _NO_CHILDREN


_NO_CHILDREN: PVector[Any] = pvector()


class BranchView:
    """Leaf attributes a branch answers too (None), so `job.nodes()` reads uniformly."""

    __slots__ = ()
    action = None
    payload = None
    output = None
    error = None
    idempotent = False
    augment = None
    attempt = 0
    sent = None
    started_at = None

    @property
    def result(self) -> LeafState | None:
        """success or failure once done, pending while something inside runs, else None."""
        if self.done:  # type: ignore[attr-defined]
            return LeafState.FAILURE if self.failed else LeafState.SUCCESS  # type: ignore[attr-defined]
        return LeafState.PENDING if self.inflight else None  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Seq(BranchView):
    """`(do!! n ...)`: children one after the other.

    failed: a child failed.  done: all children done, or failed with nothing in flight.
    cursor: the child that runs now (or next).
    """

    kind: ClassVar[str] = "seq"
    id: int
    children: PVector[Any]
    n_done: int = 0
    n_failed: int = 0
    inflight: int = 0
    cursor: int = 0
    span: Span | None = field(default=None, compare=False, repr=False)

    @property
    def failed(self) -> bool:
        return self.n_failed > 0

    @property
    def done(self) -> bool:
        return self.n_done == len(self.children) or (self.n_failed > 0 and self.inflight == 0)


@dataclass(frozen=True, slots=True)
class Par(BranchView):
    """`(dopar!! n ...)`: children at the same time.

    failed: a child failed.  done: every child done, or failed with nothing in flight.
    """

    kind: ClassVar[str] = "par"
    id: int
    children: PVector[Any]
    n_done: int = 0
    n_failed: int = 0
    inflight: int = 0
    span: Span | None = field(default=None, compare=False, repr=False)

    @property
    def failed(self) -> bool:
        return self.n_failed > 0

    @property
    def done(self) -> bool:
        return self.n_done == len(self.children) or (self.n_failed > 0 and self.inflight == 0)


@dataclass(frozen=True, slots=True)
class Try(BranchView):
    """`(try!! body... (rescue!! ...) (finally!! ...))`: three sequence children.

    | body    | rescue           | finally | try failed |
    |---------|------------------|---------|------------|
    | ok      | (skipped)        | ok      | no         |
    | failed  | empty            | ok      | yes        |
    | failed  | ok               | ok      | no         |
    | failed  | failed           | ok      | yes        |
    | any     | any              | failed  | yes        |

    done: the body is done, the rescue (when it had to run) is done, and finally is done.
    A try reports failure only once it is done, so that its finally always gets to run.
    """

    kind: ClassVar[str] = "try"
    id: int
    children: PVector[Any]  # [body, rescue, finally], each a Seq
    inflight: int = 0
    span: Span | None = field(default=None, compare=False, repr=False)

    @property
    def body(self) -> Seq:
        return self.children[0]  # type: ignore[no-any-return]

    @property
    def rescue(self) -> Seq:
        return self.children[1]  # type: ignore[no-any-return]

    @property
    def final(self) -> Seq:
        return self.children[2]  # type: ignore[no-any-return]

    @property
    def needs_rescue(self) -> bool:
        """The body failed and there is a rescue to run."""
        body = self.children[0]
        return body.failed and len(self.children[1].children) > 0

    @property
    def failed(self) -> bool:
        # Reported only once done: a parent must not block the finally that is still to run.
        if not self.done:
            return False
        body, rescue, final = self.children
        rescue_lost = len(rescue.children) == 0 or rescue.failed
        return (body.failed and rescue_lost) or final.failed

    @property
    def phase(self) -> int:
        """The child that runs now: 0 body, 1 rescue, 2 finally."""
        body, rescue, _ = self.children
        if not body.done:
            return 0
        if body.failed and len(rescue.children) > 0 and not rescue.done:
            return 1
        return 2

    @property
    def done(self) -> bool:
        return self.phase == 2 and self.children[2].done


@dataclass(frozen=True, slots=True)
class If(BranchView):
    """`(if!! test then else?)`, `(when!! test body...)`: two sequence children.

    The test is evaluated when the node is reached; the branch not taken is marked skipped.
    A test that cannot be evaluated fails the node (`error`), so a rescue can handle it.
    done: the chosen branch is done (or the test failed). failed: the test or the branch failed.
    """

    kind: ClassVar[str] = "if"
    id: int
    test: Any  # a value, or a Deferred evaluated when reached
    children: PVector[Any]  # [then, else], each a Seq
    chosen: int | None = None  # 0 then, 1 else; None until reached
    error: Any = None
    inflight: int = 0
    span: Span | None = field(default=None, compare=False, repr=False)

    @property
    def done(self) -> bool:
        if self.error is not None:
            return True
        return self.chosen is not None and self.children[self.chosen].done

    @property
    def failed(self) -> bool:
        if self.error is not None:
            return True
        return self.chosen is not None and self.children[self.chosen].failed


@dataclass(frozen=True, slots=True)
class Expansion(BranchView):
    """A node that becomes one copy of `template` per element of `coll` when reached.

    `var` is bound to the element in each copy. Until expanded it has no children; once
    expanded it runs them like `do!!` (Doseq) or `dopar!!` (Pmap). A `coll` that cannot be
    evaluated, or is not a sequence, fails the node.
    """

    kind: ClassVar[str] = "expansion"
    id: int
    var: str
    coll: Any  # a value, or a Deferred evaluated when reached
    template: Any  # the body: a node tree (ids local to the template)
    children: PVector[Any] = field(default_factory=lambda: _NO_CHILDREN)
    expanded: bool = False
    error: Any = None
    n_done: int = 0
    n_failed: int = 0
    inflight: int = 0
    cursor: int = 0
    span: Span | None = field(default=None, compare=False, repr=False)

    @property
    def failed(self) -> bool:
        return self.error is not None or self.n_failed > 0

    @property
    def done(self) -> bool:
        if self.error is not None:
            return True
        if not self.expanded:
            return False
        return self.n_done == len(self.children) or (self.n_failed > 0 and self.inflight == 0)


@dataclass(frozen=True, slots=True)
class Doseq(Expansion):
    """`(doseq!! [x coll] body)`: one body per element, in sequence."""

    kind: ClassVar[str] = "doseq"


@dataclass(frozen=True, slots=True)
class Pmap(Expansion):
    """`(pmap!! [x coll] body)`: one body per element, in parallel."""

    kind: ClassVar[str] = "pmap"


Node = Leaf | Seq | Par | Try | If | Doseq | Pmap


def is_branch(node: Any) -> bool:
    """True for nodes with children (every kind but a leaf)."""
    return not isinstance(node, Leaf)


def renumber(
    root: Node, first_id: int, each: Callable[[Node], Node] | None = None
) -> tuple[Node, list[tuple[int, ...]]]:
    """Copy a tree with fresh pre-order ids from `first_id`, without recursion.

    `each` (when given) rewrites every copied node, children first. Returns the copy and
    the path of each new node relative to the root, in id order (so the next free id is
    `first_id + len(paths)`).
    """
    next_id = first_id
    out: list[Node] = []
    paths: list[tuple[int, ...]] = []
    # frame: node, next child, assigned id, len(out) at entry, path
    stack: list[list[Any]] = [[root, 0, None, 0, ()]]
    while stack:
        frame = stack[-1]
        node = frame[0]
        if frame[2] is None:
            frame[2], frame[3] = next_id, len(out)
            next_id += 1
            paths.append(frame[4])
        if is_branch(node) and frame[1] < len(node.children):
            i = frame[1]
            frame[1] += 1
            stack.append([node.children[i], 0, None, 0, (*frame[4], i)])
            continue
        stack.pop()
        if is_branch(node):
            kids = out[frame[3] :]
            del out[frame[3] :]
            new = replace(node, id=frame[2], children=pvector(kids))
        else:
            new = replace(node, id=frame[2])
        out.append(new if each is None else each(new))
    return out[0], paths


@dataclass(frozen=True, slots=True)
class Dispatch:
    """An action to perform: what a restart asks a runner to do."""

    id: int
    action: str
    payload: Any
    idempotent: bool
    attempt: int
    context: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one dispatch, fed back to `restart_job`."""

    id: int
    attempt: int | None  # None: whatever attempt is pending (hand-fed results)
    state: LeafState  # SUCCESS, FAILURE or TIMEOUT
    output: Any = None
    error: Any = None
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def ok(self) -> bool:
        return self.state is LeafState.SUCCESS


def _target(dispatch: Dispatch | int, attempt: int | None) -> tuple[int, int | None]:
    if isinstance(dispatch, Dispatch):
        return dispatch.id, dispatch.attempt if attempt is None else attempt
    return int(dispatch), attempt


def success(
    dispatch: Dispatch | int,
    output: Any = None,
    *,
    attempt: int | None = None,
    started_at: float | None = None,
    finished_at: float | None = None,
) -> Result:
    """Result of a dispatch that succeeded with `output`."""
    node_id, att = _target(dispatch, attempt)
    return Result(node_id, att, LeafState.SUCCESS, output, None, started_at, finished_at)


def failure(
    dispatch: Dispatch | int,
    error: Any = None,
    *,
    attempt: int | None = None,
    started_at: float | None = None,
    finished_at: float | None = None,
) -> Result:
    """Result of a dispatch that failed with `error`."""
    node_id, att = _target(dispatch, attempt)
    return Result(node_id, att, LeafState.FAILURE, None, error, started_at, finished_at)


def timeout(
    dispatch: Dispatch | int,
    error: Any = "timeout",
    *,
    attempt: int | None = None,
    started_at: float | None = None,
    finished_at: float | None = None,
) -> Result:
    """Result of a dispatch that ran out of time (a failure kind)."""
    node_id, att = _target(dispatch, attempt)
    return Result(node_id, att, LeafState.TIMEOUT, None, error, started_at, finished_at)
