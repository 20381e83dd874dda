"""`(timeout!! d body...)`: a deadline for a subtree.

Two children: the body, and a timer leaf (a `sleep!!` of the deadline's duration) that
starts with it. Whichever ends first decides: the body done first cancels the timer (it
is marked skipped: its late wake-up is ignored); the timer first cuts the body: its leaves
in flight become `timeout`, the ones that never started are skipped, nothing new starts
inside, and the node fails (a surrounding `try!!` may rescue it).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from pyrsistent import PVector, pvector

from ablauf_lang.engine.kinds.base import STATE, T_BOOL, Branch, Next, Stored, rebuild
from ablauf_lang.engine.kinds.leaf import Leaf
from ablauf_lang.engine.nodes import ALL, LeafState, quick_init
from ablauf_lang.errors import Span

# The error of a leaf a deadline cut (in flight: `timeout`; never started: skipped).
EXPIRED = "timeout: deadline passed"


def expired_error(timer: Leaf) -> str:
    """The error a deadline's cut records: which deadline passed."""
    seconds = timer.sent.get("seconds") if isinstance(timer.sent, dict) else None
    if isinstance(seconds, int | float) and not isinstance(seconds, bool):
        return f"timeout: deadline of {seconds:g}s passed"
    return EXPIRED


@quick_init
@dataclass(frozen=True, slots=True)
class Deadline(Branch):
    """`(timeout!! d body...)`: [body, timer]; fails with `timeout` when the timer wins.

    done: the body is done, or the deadline passed.  failed: the body failed, or the
    deadline passed (or could not be computed) before the body was done.
    """

    kind: ClassVar[str] = "deadline"
    label: ClassVar[str] = "timeout!!"
    roles: ClassVar[tuple[str | None, ...]] = ("body", "timer")
    arity: ClassVar[int | None] = 2
    stored: ClassVar[tuple[Stored, ...]] = (Stored("expired", STATE, T_BOOL),)
    id: int
    children: PVector[Any]  # [body, timer leaf]
    inflight: int = 0
    expired: bool = False  # the timer ended first: the body was cut
    span: Span | None = field(default=None, compare=False, repr=False)

    @property
    def body(self) -> Any:
        return self.children[0]

    @property
    def timer(self) -> Leaf:
        timer: Leaf = self.children[1]
        return timer

    @property
    def done(self) -> bool:
        return self.expired or bool(self.children[0].done)

    @property
    def failed(self) -> bool:
        return self.expired or bool(self.children[0].failed)

    def replace_child(self, index: int, child: Any) -> Deadline:
        kids = self.children.set(index, child)
        return Deadline(self.id, kids, kids[0].inflight + kids[1].inflight, self.expired, self.span)

    def summarize(self) -> Deadline:
        kids = self.children
        return Deadline(self.id, kids, kids[0].inflight + kids[1].inflight, self.expired, self.span)

    def plan(self, dirty: Collection[int]) -> Sequence[int]:
        if dirty is ALL:
            return (0, 1)  # the body and its timer start together
        if self.expired:
            return ()
        return [i for i in (0, 1) if i in dirty]

    def follow(self, index: int) -> tuple[Deadline, Sequence[Next]]:
        body, timer = self.children
        if self.expired:
            return self, ()
        if index == 0 and body.done:
            if timer.result in (None, LeafState.PENDING):
                return self, (Next(1, skip=True, cut=LeafState.SKIPPED),)
            return self, ()
        if index == 1 and timer.done and timer.result is not LeafState.SKIPPED and not body.done:
            error = expired_error(timer) if timer.result is LeafState.SUCCESS else timer.error
            cut = replace(self, expired=True)
            return cut, (Next(0, skip=True, cut=LeafState.TIMEOUT, error=error),)
        return self, ()

    def cause_children(self) -> list[Any] | None:
        if self.expired:
            return None  # the deadline itself: a retry runs the whole subtree again
        return [self.children[0]]

    def reset(self) -> Deadline:
        """Before the deadline passed: the body's cut leaves unset, the timer unset."""
        body = _uncut(self.children[0])
        timer = self.timer.reset()
        kids = pvector([body, timer])
        return Deadline(self.id, kids, 0, False, self.span)


def _uncut(root: Any) -> Any:
    """The subtree with the leaves a deadline cut (and failed ones) unset again."""

    def unset(leaf: Leaf) -> Leaf:
        cut = leaf.result is LeafState.SKIPPED and leaf.error is not None
        return leaf.reset() if leaf.failed or cut else leaf

    return rebuild(root, unset)
