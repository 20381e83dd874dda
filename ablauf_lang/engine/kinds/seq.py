"""`(do!! a b ...)`: children one after the other."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ablauf_lang.engine.kinds.base import (
    STATE,
    T_CURSOR,
    Counting,
    Next,
    Stored,
    counted,
    counts,
    next_in_sequence,
    seq_cursor,
)
from ablauf_lang.engine.nodes import quick_init
from ablauf_lang.errors import Span


@quick_init
@dataclass(frozen=True, slots=True)
class Seq(Counting):
    """`(do!! n ...)`: children one after the other.

    failed: a child failed.  done: all children done, or failed with nothing in flight.
    cursor: the child that runs now (or next).
    """

    kind: ClassVar[str] = "seq"
    label: ClassVar[str] = "do!!"
    stored: ClassVar[tuple[Stored, ...]] = (Stored("cursor", STATE, T_CURSOR, required=True),)
    cursor: int = 0
    span: Span | None = field(default=None, compare=False, repr=False)

    def replace_child(self, index: int, child: Any) -> Seq:
        kids, n_done, n_failed, inflight = counted(self, index, child)
        return Seq(self.id, kids, n_done, n_failed, inflight, self.cursor, self.span)

    def summarize(self) -> Seq:
        done, failed, inflight = counts(self.children)
        # Never move the cursor forward here: only `follow` does, so that a child which is
        # done without having run (an empty try, say) is still entered and settles its
        # skipped parts.
        cursor = min(self.cursor, seq_cursor(self.children))
        return Seq(self.id, self.children, done, failed, inflight, cursor, self.span)

    def plan(self, dirty: Collection[int]) -> Sequence[int]:
        # Only the child at the cursor can be running or about to start.
        if self.n_failed or self.cursor >= len(self.children) or self.cursor not in dirty:
            return ()
        return (self.cursor,)

    def follow(self, index: int) -> tuple[Seq, Sequence[Next]]:
        # The cursor child succeeded: move on to the next child.
        cursor = next_in_sequence(self, index)
        if cursor is None:
            return self, ()
        moved = Seq(
            self.id, self.children, self.n_done, self.n_failed, self.inflight, cursor, self.span
        )
        return moved, (Next(cursor),) if cursor < len(self.children) else ()
