"""Execution semantics: one function per question, one registration per node kind.

The questions a restart asks of a branch node:

- `replace_child(node, i, child)`: the node with child `i` replaced, its cached summary
  (children done and failed, leaves in flight) updated in O(1) from the old and new child;
- `summarize(node)`: the same summary computed from all children (after a rewrite);
- `plan(node, dirty)`: which children to visit in this restart, given the children that
  changed (`dirty`), or `ALL` when the node is entered fresh;
- `follow(node, i)`: after visiting child `i`, what happens next: the node (a sequence
  moves its cursor) and the children to visit fresh or to mark skipped.

A failed sequence or parallel node plans nothing: nothing new starts inside it, while
results of actions already in flight are still applied (they arrive through `dirty`).
Leaves are started by `job`, which owns dispatches, the context and the clock.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import replace
from functools import singledispatch
from typing import Any, NamedTuple

from pyrsistent import PVector

from ablauf_lang.engine.nodes import (
    Doseq,
    Expansion,
    If,
    Leaf,
    LeafState,
    Node,
    Par,
    Pmap,
    Seq,
    Try,
)


class _All(Collection[int]):
    """Every child: the `dirty` set of a node entered fresh."""

    def __contains__(self, item: object) -> bool:
        return True

    def __iter__(self) -> Iterator[int]:
        raise TypeError("ALL is not iterable: plan over range(len(children))")

    def __len__(self) -> int:
        return 1 << 30

    def __repr__(self) -> str:
        return "ALL"


ALL: Collection[int] = _All()
NOTHING: frozenset[int] = frozenset()


class Next(NamedTuple):
    """A follow-up instruction: visit child `child` fresh, or mark its subtree skipped."""

    child: int
    skip: bool = False


# ---------------------------------------------------------------- replace_child


@singledispatch
def replace_child(node: Any, index: int, child: Any) -> Any:
    """Return `node` with child `index` replaced, its summary updated incrementally."""
    raise TypeError(f"{type(node).__name__} has no children")


def _counted(node: Seq | Par, index: int, child: Node) -> tuple[Any, int, int, int]:
    old = node.children[index]
    return (
        node.children.set(index, child),
        node.n_done + child.done - old.done,
        node.n_failed + child.failed - old.failed,
        node.inflight + child.inflight - old.inflight,
    )


@replace_child.register
def _(node: Seq, index: int, child: Node) -> Seq:
    # (do!! ...)
    kids, n_done, n_failed, inflight = _counted(node, index, child)
    return Seq(node.id, kids, n_done, n_failed, inflight, node.cursor, node.span)


@replace_child.register
def _(node: Par, index: int, child: Node) -> Par:
    # (dopar!! ...)
    kids, n_done, n_failed, inflight = _counted(node, index, child)
    return Par(node.id, kids, n_done, n_failed, inflight, node.span)


@replace_child.register
def _(node: Try, index: int, child: Node) -> Try:
    # (try!! ... (rescue!! ...) (finally!! ...))
    kids = node.children.set(index, child)
    return Try(node.id, kids, kids[0].inflight + kids[1].inflight + kids[2].inflight, node.span)


@replace_child.register
def _(node: If, index: int, child: Node) -> If:
    # (if!! test then else)
    return _summarize_if(node, node.children.set(index, child))


def _expansion(
    node: Expansion,
    kids: Any,
    n_done: int,
    n_failed: int,
    inflight: int,
    cursor: int,
    *,
    expanded: bool | None = None,
    error: Any = None,
) -> Expansion:
    return type(node)(
        node.id,
        node.var,
        node.coll,
        node.template,
        kids,
        node.expanded if expanded is None else expanded,
        node.error if error is None else error,
        n_done,
        n_failed,
        inflight,
        cursor,
        node.span,
    )


@replace_child.register
def _(node: Expansion, index: int, child: Node) -> Expansion:
    # (doseq!! [x coll] body) / (pmap!! [x coll] body), once expanded
    kids, n_done, n_failed, inflight = _counted(node, index, child)  # type: ignore[arg-type]
    return _expansion(node, kids, n_done, n_failed, inflight, node.cursor)


# ---------------------------------------------------------------- summarize


@singledispatch
def summarize(node: Any) -> Any:
    """Return `node` with its summary recomputed from its children."""
    raise TypeError(f"unknown node kind {type(node).__name__}")


@summarize.register
def _(node: Leaf) -> Leaf:
    return node


def _counts(children: Sequence[Node]) -> tuple[int, int, int]:
    done = failed = inflight = 0
    for c in children:
        done += c.done
        failed += c.failed
        inflight += c.inflight
    return done, failed, inflight


def seq_cursor(children: Sequence[Node]) -> int:
    """The first child that has not succeeded (len when all have)."""
    for i, c in enumerate(children):
        if not c.done or c.failed:
            return i
    return len(children)


@summarize.register
def _(node: Seq) -> Seq:
    done, failed, inflight = _counts(node.children)
    # Never move the cursor forward here: only `follow` does, so that a child which is done
    # without having run (an empty try, say) is still entered and settles its skipped parts.
    cursor = min(node.cursor, seq_cursor(node.children))
    return Seq(node.id, node.children, done, failed, inflight, cursor, node.span)


@summarize.register
def _(node: Par) -> Par:
    done, failed, inflight = _counts(node.children)
    return Par(node.id, node.children, done, failed, inflight, node.span)


@summarize.register
def _(node: Try) -> Try:
    return Try(node.id, node.children, sum(c.inflight for c in node.children), node.span)


@summarize.register
def _(node: If) -> If:
    return _summarize_if(node, node.children)


def _summarize_if(node: If, kids: PVector[Any]) -> If:
    return If(
        node.id,
        node.test,
        kids,
        node.chosen,
        node.error,
        kids[0].inflight + kids[1].inflight,
        node.span,
    )


@summarize.register
def _(node: Expansion) -> Expansion:
    done, failed, inflight = _counts(node.children)
    cursor = min(node.cursor, seq_cursor(node.children))
    return _expansion(node, node.children, done, failed, inflight, cursor)


# ---------------------------------------------------------------- plan


@singledispatch
def plan(node: Any, dirty: Collection[int]) -> Sequence[int]:
    """Return the children to visit in this restart, in order."""
    raise TypeError(f"unknown node kind {type(node).__name__}")


@plan.register
def _(node: Seq, dirty: Collection[int]) -> Sequence[int]:
    # Only the child at the cursor can be running or about to start.
    if node.n_failed or node.cursor >= len(node.children) or node.cursor not in dirty:
        return ()
    return (node.cursor,)


@plan.register
def _(node: Par, dirty: Collection[int]) -> Sequence[int]:
    # All children start together; once failed, nothing new starts inside.
    if node.n_failed:
        return ()
    if dirty is ALL:
        return range(len(node.children))
    return sorted(dirty)


@plan.register
def _(node: Try, dirty: Collection[int]) -> Sequence[int]:
    # Entered fresh: begin with the body; `follow` moves on through the phases.
    # Otherwise: the changed children up to the current phase (later ones never started).
    if dirty is ALL:
        return (0,)
    phase = node.phase
    return [i for i in range(phase + 1) if i in dirty]


@plan.register
def _(node: If, dirty: Collection[int]) -> Sequence[int]:
    # Only the branch taken runs; it is chosen when the node is entered.
    if node.chosen is None or node.error is not None or node.chosen not in dirty:
        return ()
    return (node.chosen,)


@plan.register
def _(node: Doseq, dirty: Collection[int]) -> Sequence[int]:
    # Once expanded, a doseq!! is a do!! over its copies.
    if not node.expanded or node.failed or node.cursor >= len(node.children):
        return ()
    return (node.cursor,) if node.cursor in dirty else ()


@plan.register
def _(node: Pmap, dirty: Collection[int]) -> Sequence[int]:
    # Once expanded, a pmap!! is a dopar!! over its copies.
    if not node.expanded or node.failed:
        return ()
    return range(len(node.children)) if dirty is ALL else sorted(dirty)


# ---------------------------------------------------------------- follow


@singledispatch
def follow(node: Any, index: int) -> tuple[Any, Sequence[Next]]:
    """After visiting child `index`, return the node and what to do next."""
    return node, ()


@follow.register
def _(node: Seq, index: int) -> tuple[Seq, Sequence[Next]]:
    # The cursor child succeeded: move on to the next child.
    child = node.children[index]
    if index != node.cursor or not child.done or child.failed:
        return node, ()
    cursor = index + 1
    moved = Seq(
        node.id, node.children, node.n_done, node.n_failed, node.inflight, cursor, node.span
    )
    return moved, (Next(cursor),) if cursor < len(node.children) else ()


@follow.register
def _(node: Try, index: int) -> tuple[Try, Sequence[Next]]:
    body, rescue, _ = node.children
    if index == 0 and body.done:
        if not body.failed:
            # The body succeeded: the rescue is the branch not taken.
            return node, (Next(1, skip=True), Next(2))
        return node, (Next(1),) if len(rescue.children) else (Next(2),)
    if index == 1 and rescue.done:
        return node, (Next(2),)
    return node, ()


@follow.register
def _(node: Doseq, index: int) -> tuple[Doseq, Sequence[Next]]:
    # The copy at the cursor succeeded: move on to the next copy.
    child = node.children[index]
    if index != node.cursor or not child.done or child.failed:
        return node, ()
    cursor = index + 1
    moved = _expansion(node, node.children, node.n_done, node.n_failed, node.inflight, cursor)
    return moved, (Next(cursor),) if cursor < len(node.children) else ()  # type: ignore[return-value]


# ---------------------------------------------------------------- enter
#
# `restart` offers: evaluate(value) -> (ok, value or error text), skip(node) -> node with its
# unset leaves skipped, fail(node_id, error) recording the error in the context, and
# instantiate(expansion, elements) -> the copies with fresh ids.


@singledispatch
def enter(node: Any, restart: Any) -> Any:
    """Return the node as it is when first reached (run-time kinds decide or expand here)."""
    return node


def is_truthy(value: Any) -> bool:
    """Clojure's truth: only nil and false are false (0 and "" are true)."""
    return value is not None and value is not False


@enter.register
def _(node: If, restart: Any) -> If:
    # (if!! test then else): evaluate the test now; the other branch is skipped.
    if node.chosen is not None or node.error is not None:
        return node
    ok, value = restart.evaluate(node.test)
    if not ok:
        restart.fail(node.id, value)
        return If(node.id, node.test, node.children, None, value, node.inflight, node.span)
    chosen = 0 if is_truthy(value) else 1
    kids = node.children.set(1 - chosen, restart.skip(node.children[1 - chosen]))
    restart.touch(node.id)
    return If(node.id, node.test, kids, chosen, None, node.inflight, node.span)


@enter.register
def _(node: Expansion, restart: Any) -> Expansion:
    # (doseq!! [x coll] body): evaluate coll now and make one copy of the body per element.
    if node.expanded or node.error is not None:
        return node
    ok, value = restart.evaluate(node.coll)
    if ok and (isinstance(value, str | bytes | dict) or not _is_sequence(value)):
        ok, value = (
            False,
            (
                f"{node.kind}!! needs a sequence to go over, got "
                f"{type(value).__name__}: {value!r:.60}"
            ),
        )
    if not ok:
        restart.fail(node.id, value)
        return _expansion(node, node.children, 0, 0, 0, 0, error=value)
    kids = restart.instantiate(node, list(value))
    restart.touch(node.id)
    return summarize(_expansion(node, kids, 0, 0, 0, 0, expanded=True))  # type: ignore[no-any-return]


def _is_sequence(value: Any) -> bool:
    return isinstance(value, list | tuple | range)


# ---------------------------------------------------------------- display


def state_of(node: Node) -> str:
    """One word for a node's state: unset, pending, success, failure, timeout, skipped."""
    if isinstance(node, Leaf):
        return "unset" if node.result is None else str(node.result)
    if node.done:
        return "failure" if node.failed else "success"
    if node.inflight:
        return "pending"
    return "unset"


def states(root: Node) -> dict[int, str]:
    """`state_of` for every node, with branches that never ran shown `skipped`.

    A branch is skipped when it is done without having run anything: all its leaves were
    skipped, or it is the branch not taken (a try's rescue after its body succeeded, an
    if's other branch), empty ones included. One pass, without recursion.
    """
    out: dict[int, str] = {}
    ran: dict[int, bool] = {}  # something below ran (a leaf neither unset nor skipped)
    skipped: dict[int, bool] = {}  # every leaf below was skipped (and there is one)
    stack: list[tuple[Node, bool, bool]] = [(root, False, False)]
    while stack:
        node, not_taken, expanded = stack.pop()
        if isinstance(node, Leaf):
            out[node.id] = state_of(node)
            ran[node.id] = node.result not in (None, LeafState.SKIPPED)
            skipped[node.id] = node.result is LeafState.SKIPPED
            continue
        kids = node.children
        if not expanded:
            stack.append((node, not_taken, True))
            taken = _taken(node)
            stack.extend((kid, i not in taken, False) for i, kid in enumerate(kids))
            continue
        ran[node.id] = any(ran[k.id] for k in kids)
        skipped[node.id] = bool(kids) and all(skipped[k.id] for k in kids)
        state = state_of(node)
        if state == "success" and not ran[node.id] and (not_taken or skipped[node.id]):
            state = "skipped"
        out[node.id] = state
    return out


def _taken(node: Node) -> Collection[int]:
    """The children of a branch that were (or will be) taken: all but a branch not taken."""
    if isinstance(node, Try) and node.children[0].done and not node.children[0].failed:
        return (0, 2)
    if isinstance(node, If) and node.chosen is not None:
        return (node.chosen,)
    return ALL


def skip_leaf(leaf: Leaf) -> Leaf:
    """Mark a leaf that never ran as skipped (a leaf that ran keeps its result)."""
    return replace(leaf, result=LeafState.SKIPPED) if leaf.result is None else leaf
