"""`(dopar!! a b ...)`: children at the same time."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ablauf_lang.engine.kinds.base import Counting, counted, counts
from ablauf_lang.engine.nodes import ALL, quick_init
from ablauf_lang.errors import Span


@quick_init
@dataclass(frozen=True, slots=True)
class Par(Counting):
    """`(dopar!! n ...)`: children at the same time.

    failed: a child failed.  done: every child done, or failed with nothing in flight.
    """

    kind: ClassVar[str] = "par"
    label: ClassVar[str] = "dopar!!"
    span: Span | None = field(default=None, compare=False, repr=False)

    def replace_child(self, index: int, child: Any) -> Par:
        kids, n_done, n_failed, inflight = counted(self, index, child)
        return Par(self.id, kids, n_done, n_failed, inflight, self.span)

    def summarize(self) -> Par:
        done, failed, inflight = counts(self.children)
        return Par(self.id, self.children, done, failed, inflight, self.span)

    def plan(self, dirty: Collection[int]) -> Sequence[int]:
        # All children start together; once failed, nothing new starts inside.
        if self.n_failed:
            return ()
        if dirty is ALL:
            return range(len(self.children))
        return sorted(dirty)
