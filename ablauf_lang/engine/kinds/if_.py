"""`(if!! test then else?)`, `(when!! test body...)`: the test decides when it is reached."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from pyrsistent import PVector

from ablauf_lang.engine.kinds.base import (
    SPEC,
    STATE,
    T_CHOICE,
    T_EXPR,
    T_VALUE,
    Branch,
    Restart,
    Stored,
)
from ablauf_lang.engine.nodes import ALL, quick_init
from ablauf_lang.errors import Span
from ablauf_lang.values import is_truthy


@quick_init
@dataclass(frozen=True, slots=True)
class If(Branch):
    """`(if!! test then else?)`, `(when!! test body...)`: two sequence children.

    The test is evaluated when the node is reached; the branch not taken is marked skipped.
    A test that cannot be evaluated fails the node (`error`), so a rescue can handle it.
    done: the chosen branch is done (or the test failed). failed: the test or the branch failed.
    """

    kind: ClassVar[str] = "if"
    label: ClassVar[str] = "if!!"
    roles: ClassVar[tuple[str | None, ...]] = ("then", "else")
    arity: ClassVar[int | None] = 2
    stored: ClassVar[tuple[Stored, ...]] = (
        Stored("test", SPEC, T_EXPR),
        Stored("chosen", STATE, T_CHOICE, required=True),
        Stored("error", STATE, T_VALUE),
    )
    id: int
    test: Any  # a value, or a code.Expr evaluated when reached
    children: PVector[Any]  # [then, else], each a Seq
    chosen: int | None = None  # 0 then, 1 else; None until reached
    error: Any = None
    inflight: int = 0
    span: Span | None = field(default=None, compare=False, repr=False)

    @property
    def done(self) -> bool:
        if self.error is not None:
            return True
        return self.chosen is not None and bool(self.children[self.chosen].done)

    @property
    def failed(self) -> bool:
        if self.error is not None:
            return True
        return self.chosen is not None and bool(self.children[self.chosen].failed)

    def _with(self, kids: PVector[Any], chosen: int | None, error: Any) -> If:
        inflight = kids[0].inflight + kids[1].inflight
        return If(self.id, self.test, kids, chosen, error, inflight, self.span)

    def replace_child(self, index: int, child: Any) -> If:
        return self._with(self.children.set(index, child), self.chosen, self.error)

    def summarize(self) -> If:
        return self._with(self.children, self.chosen, self.error)

    def plan(self, dirty: Collection[int]) -> Sequence[int]:
        # Only the branch taken runs; it is chosen when the node is entered.
        if self.chosen is None or self.error is not None or self.chosen not in dirty:
            return ()
        return (self.chosen,)

    def enter(self, restart: Restart) -> If:
        # Evaluate the test now; the other branch is skipped.
        if self.chosen is not None or self.error is not None:
            return self
        ok, value = restart.evaluate(self.test)
        if not ok:
            restart.fail(self.id, value)
            return If(self.id, self.test, self.children, None, value, self.inflight, self.span)
        chosen = 0 if is_truthy(value) else 1
        kids = self.children.set(1 - chosen, restart.skip(self.children[1 - chosen]))
        restart.touch(self.id)
        return If(self.id, self.test, kids, chosen, None, self.inflight, self.span)

    def taken(self) -> Collection[int]:
        return ALL if self.chosen is None else (self.chosen,)

    def cause_children(self) -> list[Any] | None:
        return None if self.error is not None else list(self.children)

    def reset(self) -> If:
        """The test unevaluated again."""
        return replace(self, error=None, chosen=None).summarize()
