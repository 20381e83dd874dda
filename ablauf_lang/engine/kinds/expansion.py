"""`(doseq!! [x coll] body)` and `(pmap!! [x coll] body)`: one copy of the body per element.

Both kinds expand when reached; once expanded a doseq!! runs its copies like a do!!, a
pmap!! like a dopar!!.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from pyrsistent import PVector

from ablauf_lang.engine.kinds.base import (
    NO_CHILDREN,
    SPEC,
    STATE,
    T_BOOL,
    T_CURSOR,
    T_EXPR,
    T_STR,
    T_TREE,
    T_VALUE,
    Branch,
    Next,
    Restart,
    Stored,
    all_done,
    counted,
    counts,
    next_in_sequence,
    seq_cursor,
)
from ablauf_lang.engine.nodes import ALL, quick_init
from ablauf_lang.errors import Span


@quick_init
@dataclass(frozen=True, slots=True)
class Expansion(Branch):
    """A node that becomes one copy of `template` per element of `coll` when reached.

    `var` is bound to the element in each copy. Until expanded it has no children; once
    expanded it runs them like `do!!` (Doseq) or `dopar!!` (Pmap). A `coll` that cannot be
    evaluated, or is not a sequence, fails the node.
    """

    kind: ClassVar[str] = "expansion"
    stored: ClassVar[tuple[Stored, ...]] = (
        Stored("var", SPEC, T_STR),
        Stored("coll", SPEC, T_EXPR),
        Stored("template", SPEC, T_TREE),
        Stored("expanded", STATE, T_BOOL, required=True),
        Stored("error", STATE, T_VALUE),
        Stored("cursor", STATE, T_CURSOR, required=True),
    )
    id: int
    var: str
    coll: Any  # a value, or a code.Expr evaluated when reached
    template: Any  # the body: a node tree (ids local to the template)
    children: PVector[Any] = field(default_factory=lambda: NO_CHILDREN)
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
        return all_done(self)

    def _with(
        self,
        kids: Any,
        n_done: int,
        n_failed: int,
        inflight: int,
        cursor: int,
        *,
        expanded: bool | None = None,
        error: Any = None,
    ) -> Any:
        return type(self)(
            self.id,
            self.var,
            self.coll,
            self.template,
            kids,
            self.expanded if expanded is None else expanded,
            self.error if error is None else error,
            n_done,
            n_failed,
            inflight,
            cursor,
            self.span,
        )

    def replace_child(self, index: int, child: Any) -> Any:
        kids, n_done, n_failed, inflight = counted(self, index, child)
        return self._with(kids, n_done, n_failed, inflight, self.cursor)

    def summarize(self) -> Any:
        done, failed, inflight = counts(self.children)
        cursor = min(self.cursor, seq_cursor(self.children))
        return self._with(self.children, done, failed, inflight, cursor)

    def enter(self, restart: Restart) -> Any:
        # Evaluate coll now and make one copy of the body per element.
        if self.expanded or self.error is not None:
            return self
        ok, value = restart.evaluate(self.coll)
        if ok and (
            isinstance(value, str | bytes | dict) or not isinstance(value, list | tuple | range)
        ):
            ok, value = (
                False,
                (
                    f"{self.label} needs a sequence to go over, got "
                    f"{type(value).__name__}: {value!r:.60}"
                ),
            )
        if not ok:
            restart.fail(self.id, value)
            return self._with(self.children, 0, 0, 0, 0, error=value)
        kids = restart.instantiate(self, list(value))
        restart.touch(self.id)
        return self._with(kids, 0, 0, 0, 0, expanded=True).summarize()

    def cause_children(self) -> list[Any] | None:
        return None if self.error is not None else list(self.children)

    def reset(self) -> Any:
        """The collection unevaluated again."""
        return replace(self, error=None).summarize()


@quick_init
@dataclass(frozen=True, slots=True)
class Doseq(Expansion):
    """`(doseq!! [x coll] body)`: one body per element, in sequence."""

    kind: ClassVar[str] = "doseq"
    label: ClassVar[str] = "doseq!!"

    def plan(self, dirty: Collection[int]) -> Sequence[int]:
        # Once expanded, a doseq!! is a do!! over its copies.
        if not self.expanded or self.failed or self.cursor >= len(self.children):
            return ()
        return (self.cursor,) if self.cursor in dirty else ()

    def follow(self, index: int) -> tuple[Doseq, Sequence[Next]]:
        # The copy at the cursor succeeded: move on to the next copy.
        cursor = next_in_sequence(self, index)
        if cursor is None:
            return self, ()
        moved = self._with(self.children, self.n_done, self.n_failed, self.inflight, cursor)
        return moved, (Next(cursor),) if cursor < len(self.children) else ()


@quick_init
@dataclass(frozen=True, slots=True)
class Pmap(Expansion):
    """`(pmap!! [x coll] body)`: one body per element, in parallel."""

    kind: ClassVar[str] = "pmap"
    label: ClassVar[str] = "pmap!!"

    def plan(self, dirty: Collection[int]) -> Sequence[int]:
        # Once expanded, a pmap!! is a dopar!! over its copies.
        if not self.expanded or self.failed:
            return ()
        return range(len(self.children)) if dirty is ALL else sorted(dirty)
