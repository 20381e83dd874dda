"""The clocks a runner reads: the system's, and a virtual one for tests that skips ahead.

The engine never reads a clock (time comes into `restart_job` as `now`); a runner reads
one of these. `VirtualClock` runs with real time while something runs, and jumps to the
next timer when nothing can happen before it (Temporal's time-skipping test environment
is the model): a workflow that sleeps for thirty days finishes in milliseconds.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import Any, Protocol

from ablauf_lang.errors import AblaufError


class Clock(Protocol):
    """What a runner asks of a clock."""

    virtual: bool

    def now(self) -> float:
        """Seconds since the epoch."""

    def advance(self, seconds: float) -> None:
        """Move the clock forward (a virtual clock only)."""


class SystemClock:
    """The system's wall clock (`time.time`)."""

    virtual = False

    def now(self) -> float:
        return time.time()

    def advance(self, seconds: float) -> None:
        raise AblaufError("the system clock cannot be moved: use VirtualClock in tests")

    def __repr__(self) -> str:
        return "SystemClock()"


class VirtualClock:
    """Real time plus the time skipped: `advance(s)` (or a runner with nothing to do
    before its next timer) moves it forward, never back.

    `start`: the time it shows now (default: the system's); `frozen=True`: it moves only
    when advanced (a REPL's clock, or a test that wants exact times).
    """

    virtual = True

    def __init__(self, start: float | None = None, *, frozen: bool = False) -> None:
        self.frozen = frozen
        self._origin = time.monotonic()
        self._start = time.time() if start is None else float(start)
        self._skipped = 0.0

    def now(self) -> float:
        elapsed = 0.0 if self.frozen else time.monotonic() - self._origin
        return self._start + elapsed + self._skipped

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise AblaufError(f"a clock moves forward only, not by {seconds:g}s")
        self._skipped += seconds

    def advance_to(self, when: float) -> None:
        """Move forward to `when` (nothing when it has passed)."""
        gap = when - self.now()
        if gap > 0:
            self._skipped += gap

    def __repr__(self) -> str:
        return f"VirtualClock(now={self.now():.3f})"


SYSTEM = SystemClock()

# The heartbeat of the action running in this context (set by the runner that performs
# it; see `heartbeat`).
HEARTBEAT: ContextVar[Any] = ContextVar("ablauf_heartbeat", default=None)


def heartbeat(details: Any = None) -> None:
    """Report that the action running here is alive (and optionally how far it got).

    Called by an action with `:heartbeat` set: a runner that hears nothing for that long
    ends the attempt as a timeout. Outside an action (or without `:heartbeat`) it does
    nothing.
    """
    beat = HEARTBEAT.get()
    if beat is not None:
        beat(details)
