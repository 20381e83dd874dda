"""`(try!! body... (rescue!! ...) (finally!! ...))`: three sequence children."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pyrsistent import PVector

from ablauf_lang.engine.kinds.base import Branch, Next
from ablauf_lang.engine.kinds.seq import Seq
from ablauf_lang.engine.nodes import ALL, quick_init
from ablauf_lang.errors import Span


@quick_init
@dataclass(frozen=True, slots=True)
class Try(Branch):
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
    label: ClassVar[str] = "try!!"
    roles: ClassVar[tuple[str | None, ...]] = ("body", "rescue!!", "finally!!")
    arity: ClassVar[int | None] = 3
    id: int
    children: PVector[Any]  # [body, rescue, finally], each a Seq
    inflight: int = 0
    span: Span | None = field(default=None, compare=False, repr=False)

    @property
    def body(self) -> Seq:
        body: Seq = self.children[0]
        return body

    @property
    def rescue(self) -> Seq:
        rescue: Seq = self.children[1]
        return rescue

    @property
    def final(self) -> Seq:
        final: Seq = self.children[2]
        return final

    @property
    def needs_rescue(self) -> bool:
        """The body failed and there is a rescue to run."""
        body = self.children[0]
        return bool(body.failed) and len(self.children[1].children) > 0

    @property
    def failed(self) -> bool:
        # Reported only once done: a parent must not block the finally that is still to run.
        if not self.done:
            return False
        body, rescue, final = self.children
        rescue_lost = len(rescue.children) == 0 or rescue.failed
        return bool((body.failed and rescue_lost) or final.failed)

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
        return self.phase == 2 and bool(self.children[2].done)

    def replace_child(self, index: int, child: Any) -> Try:
        kids = self.children.set(index, child)
        return Try(self.id, kids, kids[0].inflight + kids[1].inflight + kids[2].inflight, self.span)

    def summarize(self) -> Try:
        return Try(self.id, self.children, sum(c.inflight for c in self.children), self.span)

    def plan(self, dirty: Collection[int]) -> Sequence[int]:
        # Entered fresh: begin with the body; `follow` moves on through the phases.
        # Otherwise: the changed children up to the current phase (later ones never started).
        if dirty is ALL:
            return (0,)
        phase = self.phase
        return [i for i in range(phase + 1) if i in dirty]

    def follow(self, index: int) -> tuple[Try, Sequence[Next]]:
        body, rescue, _ = self.children
        if index == 0 and body.done:
            if not body.failed:
                # The body succeeded: the rescue is the branch not taken.
                return self, (Next(1, skip=True), Next(2))
            return self, (Next(1),) if len(rescue.children) else (Next(2),)
        if index == 1 and rescue.done:
            return self, (Next(2),)
        return self, ()

    def taken(self) -> Collection[int]:
        body = self.children[0]
        if body.done and not body.failed:
            return (0, 2)  # the rescue was the branch not taken
        return ALL

    def cause_children(self) -> list[Any] | None:
        # finally's failure if it failed; the rescue's if it ran (a failure it handled is
        # not a cause), else the body's.
        body, rescue, final = self.children
        kids = [final] if final.failed else []
        if body.failed:
            kids.append(rescue if len(rescue.children) else body)
        return kids
