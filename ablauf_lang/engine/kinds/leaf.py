"""`(action!! :ns/name payload)`, `(log!! x)`, `(fail!! r)`: one action to perform.

A leaf is started by `engine.job` (which owns dispatches, the context and the clock); this
module says what a leaf is, how it is stored and how a retry resets it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from pyrsistent import PVector

from ablauf_lang.engine.kinds.base import (
    NO_CHILDREN,
    SPEC,
    STATE,
    T_AUGMENT,
    T_BOOL,
    T_EXPR,
    T_INT,
    T_RESULT,
    T_STR,
    T_TIME,
    T_VALUE,
    Kind,
    Stored,
)
from ablauf_lang.engine.nodes import DONE_STATES, FAILED_STATES, LeafState, quick_init
from ablauf_lang.errors import Span
from ablauf_lang.values import assoc_in


@quick_init
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


@quick_init
@dataclass(frozen=True, slots=True)
class Leaf(Kind):
    """One action to perform: `(action!! :ns/name payload)`, `(log!! x)`, `(fail!! r)`."""

    kind: ClassVar[str] = "leaf"
    label: ClassVar[str] = "action!!"
    stored: ClassVar[tuple[Stored, ...]] = (
        Stored("action", SPEC, T_STR),
        Stored("payload", SPEC, T_EXPR),
        Stored("idempotent", SPEC, T_BOOL),
        Stored("augment", SPEC, T_AUGMENT),
        Stored("result", STATE, T_RESULT, required=True),
        Stored("output", STATE, T_VALUE),
        Stored("error", STATE, T_VALUE),
        Stored("attempt", STATE, T_INT, required=True),
        Stored("dispatched_at", STATE, T_TIME),
        Stored("finished_at", STATE, T_TIME),
        Stored("started_at", STATE, T_TIME),
        Stored("sent", STATE, T_VALUE),
        Stored("retry", SPEC, T_VALUE),
        Stored("timeout", SPEC, T_TIME),
        Stored("heartbeat", SPEC, T_TIME),
        Stored("wake", STATE, T_TIME),
        Stored("attempts", STATE, T_VALUE),
    )
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
    retry: dict[str, Any] | None = None  # the retry policy (see `engine.retry`), or none
    timeout: float | None = None  # the limit of one attempt, in seconds
    heartbeat: float | None = None  # the longest silence between an action's heartbeats
    wake: float | None = None  # when the runner acts on this attempt: start, wake-up, deadline
    attempts: tuple[dict[str, Any], ...] = ()  # the earlier attempts (a retry's record)

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
        return NO_CHILDREN

    def summarize(self) -> Leaf:
        return self

    def cause_children(self) -> list[Any] | None:
        return None  # a failed leaf is a cause itself

    def with_state(
        self,
        result: LeafState | None,
        output: Any,
        error: Any,
        attempt: int,
        dispatched_at: float | None,
        finished_at: float | None,
        started_at: float | None,
        sent: Any,
        wake: float | None = None,
        attempts: tuple[dict[str, Any], ...] | None = None,
    ) -> Leaf:
        """The same action in another state: the restart's one way to move a leaf
        (positional, as the hot path wants; `dataclasses.replace` costs three times more)."""
        return Leaf(
            self.id,
            self.action,
            self.payload,
            self.idempotent,
            self.augment,
            result,
            output,
            error,
            attempt,
            dispatched_at,
            finished_at,
            self.span,
            started_at,
            sent,
            self.retry,
            self.timeout,
            self.heartbeat,
            wake,
            self.attempts if attempts is None else attempts,
        )

    def reset(self, *, keep_wake: bool = False) -> Leaf:
        """Unset again: the next restart dispatches it as a new attempt.

        `keep_wake`: an attempt handed back before it started (a resume) keeps its recorded
        time, so a sleep or a retry's wait goes on where it was instead of starting over.
        """
        return replace(
            self,
            result=None,
            output=None,
            error=None,
            finished_at=None,
            started_at=None,
            wake=self.wake if keep_wake else None,
        )

    def skipped(self) -> Leaf:
        """Marked skipped when it never ran (a leaf that ran keeps its result)."""
        return replace(self, result=LeafState.SKIPPED) if self.result is None else self
