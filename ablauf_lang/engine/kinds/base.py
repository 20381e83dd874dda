"""What every node kind declares, and the default answers of a branch.

A node kind is a frozen dataclass deriving `Kind` (a leaf) or `Branch` (a node with
children). Its module answers every question about the kind, one method per question (as
`node.clj` of the original library has one multimethod per question, one method per kind):

- stored form (read by `codec`, which holds no per-kind code): `kind`, the stored name;
  `stored`, the dataclass fields a record holds, each with its part (`SPEC`: what the node
  is, written once; `STATE`: what running it changed) and its codec type (`T_*` below);
  `arity`, a fixed number of children;
- display (read by `ui`, the language's error messages): `label`, the form's name in the
  language; `roles`, what its fixed children are called;
- restart (read by `engine.job`): `replace_child`, `summarize`, `plan`, `follow`, `enter`;
- replay (read by `engine.replay`): `cause_children`, `reset`; display: `taken`.

The id, the span and (for a branch) the child list and the summary fields (`n_done`,
`n_failed`, `inflight`: cached from the children, recomputed when decoding) are common to
every kind and never listed in `stored`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

from pyrsistent import PVector, pvector

from ablauf_lang.engine.nodes import ALL, LeafState, quick_init
from ablauf_lang.errors import JobError

if TYPE_CHECKING:
    from ablauf_lang.errors import Span

SPEC = "spec"  # what the node is: never changed by running it
STATE = "state"  # what happened to it

# Codec types of stored fields (`codec.job` encodes and checks each type in one place).
T_STR = "str"  # a string, required
T_BOOL = "bool"  # a boolean (absent: the field's default)
T_INT = "int"  # an integer (absent: the field's default)
T_CURSOR = "cursor"  # an index into the children, 0..len
T_CHOICE = "choice"  # null, 0 or 1: the branch an `if!!` took
T_TIME = "time"  # a number of seconds, or null
T_VALUE = "value"  # any value (the value codec)
T_EXPR = "expr"  # a value, or a run-time expression bound in a copied template
T_RESULT = "result"  # a LeafState or null
T_AUGMENT = "augment"  # an Augment or null
T_TREE = "tree"  # a node tree of its own (a template: ids local to it)


class Stored(NamedTuple):
    """One stored field of a kind: its name, its part (SPEC or STATE) and codec type."""

    name: str
    part: str
    type: str
    required: bool = False  # every version of the codec wrote it (absent: damage)


class Next(NamedTuple):
    """A follow-up instruction: visit child `child` fresh, or mark its subtree skipped.

    With `skip`, `cut` (a LeafState) also ends the subtree's leaves in flight: they get
    that state and `error` (a deadline's `timeout`; skipped for a cancelled timer), and
    their late results are ignored.
    """

    child: int
    skip: bool = False
    cut: LeafState | None = None
    error: Any = None


class Restart(Protocol):
    """What a restart offers a node that is entered (`enter`)."""

    def evaluate(self, value: Any) -> tuple[bool, Any]:
        """(True, value) of a value or run-time expression, or (False, error text)."""

    def skip(self, node: Any) -> Any:
        """The node with its unset leaves marked skipped."""

    def fail(self, node_id: int, error: Any) -> None:
        """Record that the node failed before it could run."""

    def touch(self, node_id: int) -> None:
        """Record that the node's own fields changed (stores write it)."""

    def instantiate(self, node: Any, elements: list[Any]) -> PVector[Any]:
        """One copy of `node.template` per element, with fresh ids."""


NO_CHILDREN: PVector[Any] = pvector()


class Kind:
    """Base of every node class: the declarations a kind makes."""

    __slots__ = ()
    kind: ClassVar[str] = ""
    label: ClassVar[str] = ""
    stored: ClassVar[tuple[Stored, ...]] = ()
    roles: ClassVar[tuple[str | None, ...]] = ()
    arity: ClassVar[int | None] = None
    type_name: ClassVar[str] = "workflow"  # what the language calls the value of a node

    if TYPE_CHECKING:

        @property
        def id(self) -> int: ...

        @property
        def span(self) -> Span | None: ...

        @property
        def children(self) -> PVector[Any]: ...

        @property
        def done(self) -> bool: ...

        @property
        def failed(self) -> bool: ...

        @property
        def inflight(self) -> int: ...


class Branch(Kind):
    """Base of the kinds with children: leaf attributes answered with None (so
    `job.nodes()` reads uniformly) and the default answers of the restart questions."""

    __slots__ = ()
    action = None
    payload = None
    output = None
    error: Any = None
    idempotent = False
    augment = None
    attempt = 0
    sent = None
    started_at = None

    @property
    def result(self) -> LeafState | None:
        """success or failure once done, pending while something inside runs, else None."""
        if self.done:
            return LeafState.FAILURE if self.failed else LeafState.SUCCESS
        return LeafState.PENDING if self.inflight else None

    def replace_child(self, index: int, child: Any) -> Any:
        """The node with child `index` replaced, its summary updated in O(1)."""
        raise NotImplementedError

    def summarize(self) -> Any:
        """The node with its summary recomputed from all its children (after a rewrite)."""
        raise NotImplementedError

    def plan(self, dirty: Collection[int]) -> Sequence[int]:
        """The children to visit in this restart, in order, given the changed ones (`ALL`
        when the node is entered fresh)."""
        raise NotImplementedError

    def follow(self, index: int) -> tuple[Any, Sequence[Next]]:
        """After visiting child `index`: the node (a sequence moves its cursor) and the
        children to visit fresh or to mark skipped."""
        return self, ()

    def enter(self, restart: Restart) -> Any:
        """The node as it is when first reached (run-time kinds decide or expand here)."""
        return self

    def taken(self) -> Collection[int]:
        """The children that were (or will be) taken: all but a branch not taken."""
        return ALL

    def cause_children(self) -> list[Any] | None:
        """Where a failure of this node comes from: the children to look in, or None when
        the node itself is the cause (`engine.replay.failure_causes`)."""
        return list(self.children)

    def reset(self) -> Any:
        """The node as it was before it failed, so that a retry runs it again."""
        raise JobError(f"cannot reset a {self.kind} node")


@quick_init
@dataclass(frozen=True, slots=True)
class Counting(Branch):
    """A branch that counts its children done and failed (do!!, dopar!!).

    failed: a child failed.  done: every child done, or failed with nothing in flight.
    """

    id: int
    children: PVector[Any]
    n_done: int = 0
    n_failed: int = 0
    inflight: int = 0

    @property
    def failed(self) -> bool:
        return self.n_failed > 0

    @property
    def done(self) -> bool:
        return all_done(self)


def counts(children: Sequence[Any]) -> tuple[int, int, int]:
    """(done, failed, in flight) over `children`."""
    done = failed = inflight = 0
    for c in children:
        done += c.done
        failed += c.failed
        inflight += c.inflight
    return done, failed, inflight


def counted(node: Any, index: int, child: Any) -> tuple[Any, int, int, int]:
    """(children, done, failed, in flight) of a counting node after replacing one child."""
    old = node.children[index]
    return (
        node.children.set(index, child),
        node.n_done + child.done - old.done,
        node.n_failed + child.failed - old.failed,
        node.inflight + child.inflight - old.inflight,
    )


def seq_cursor(children: Sequence[Any]) -> int:
    """The first child that has not succeeded (len when all have)."""
    for i, c in enumerate(children):
        if not c.done or c.failed:
            return i
    return len(children)


def all_done(node: Any) -> bool:
    """A counting node is done: every child done, or failed with nothing in flight."""
    done: bool = node.n_done == len(node.children) or (node.n_failed > 0 and node.inflight == 0)
    return done


def next_in_sequence(node: Any, index: int) -> int | None:
    """The cursor after child `index` of a sequence was visited: moved on when the child
    at the cursor succeeded, else None."""
    child = node.children[index]
    if index != node.cursor or not child.done or child.failed:
        return None
    return index + 1


def rebuild(root: Any, leaf_fn: Any, branch_fn: Any = None) -> Any:
    """Rebuild the tree bottom-up with `leaf_fn` applied to leaves, summaries recomputed.

    Iterative, so deep trees never hit the recursion limit; untouched subtrees are shared.
    """
    out: list[Any] = []
    stack: list[list[Any]] = [[root, 0, 0]]  # node, next child, len(out) at entry
    while stack:
        frame = stack[-1]
        node = frame[0]
        if not isinstance(node, Branch):
            stack.pop()
            out.append(leaf_fn(node))
            continue
        kids = node.children
        if frame[1] == 0:
            frame[2] = len(out)
        if frame[1] < len(kids):
            frame[1] += 1
            stack.append([kids[frame[1] - 1], 0, 0])
            continue
        stack.pop()
        new_kids = out[frame[2] :]
        del out[frame[2] :]
        if any(a is not b for a, b in zip(new_kids, kids, strict=True)):
            changed: Any = node  # a dataclass: every kind is one
            node = replace(changed, children=pvector(new_kids)).summarize()
        else:
            node = node.summarize() if branch_fn is None else node
        if branch_fn is not None:
            node = branch_fn(node)
        out.append(node)
    return out[0]
