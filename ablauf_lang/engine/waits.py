"""What a run waits for: its sleeps, the signals it awaits, its retries' waits.

    waits      :: Job -> [Wait]         O(leaves in flight x depth)
    wait_of    :: Leaf -> Wait | None
    parked     :: Job -> bool           every leaf in flight is a wait (nothing runs)
    detachable :: Job -> bool           parked, and safe to hand over as it is

Read from the job alone (the leaves in flight and the times they recorded), so stores,
listings and runners agree on it without any state of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ablauf_lang.engine.job import Job
from ablauf_lang.engine.kinds import Leaf
from ablauf_lang.engine.nodes import LeafState
from ablauf_lang.engine.replay import inflight_leaves
from ablauf_lang.stdlib.actions import AWAIT, SLEEP, WAIT_ACTIONS
from ablauf_lang.stdlib.durations import format_instant

SLEEPING = "sleep"
SIGNAL = "signal"
RETRY = "retry"


@dataclass(frozen=True, slots=True)
class Wait:
    """One wait: a leaf in flight that waits for a time (or a signal) before anything runs."""

    node: int
    kind: str  # "sleep", "signal" or "retry"
    name: str | None  # the signal awaited, or the action a retry will run again
    until: float | None  # the wake-up, the deadline, or the next attempt's start
    attempt: int = 0

    def describe(self) -> str:
        """`sleeping until ...`, `waiting: approval (until ...)`, `retrying ... at ...`."""
        when = format_instant(self.until) if self.until is not None else None
        if self.kind == SLEEPING:
            return f"sleeping until {when}"
        if self.kind == SIGNAL:
            return f"waiting: {self.name}" + (f" (until {when})" if when else "")
        return f"retrying {self.name} (attempt {self.attempt} at {when})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "kind": self.kind,
            "name": self.name,
            "until": self.until,
            "attempt": self.attempt,
        }


def wait_of(leaf: Any, now: float | None = None) -> Wait | None:
    """The wait a leaf in flight is, or None (not in flight, or running an action).

    A retry's next attempt is a wait until its start time (when `now` is given, only
    while that time is still to come).
    """
    if not isinstance(leaf, Leaf) or leaf.result is not LeafState.PENDING:
        return None
    if leaf.action == SLEEP:
        return Wait(leaf.id, SLEEPING, None, leaf.wake, leaf.attempt)
    if leaf.action == AWAIT:
        sent = leaf.sent if isinstance(leaf.sent, dict) else {}
        name = sent.get("signal")
        return Wait(leaf.id, SIGNAL, None if name is None else str(name), leaf.wake, leaf.attempt)
    if leaf.attempts and leaf.wake is not None and (now is None or leaf.wake > now):
        return Wait(leaf.id, RETRY, leaf.action, leaf.wake, leaf.attempt)
    return None


def waits(job: Job, now: float | None = None) -> list[Wait]:
    """The job's waits, in tree order."""
    out = []
    for leaf in inflight_leaves(job.root):
        wait = wait_of(leaf, now)
        if wait is not None:
            out.append(wait)
    return out


def parked(job: Job, now: float | None = None) -> bool:
    """True when the run is not done and every leaf in flight is a wait: nothing runs, so
    nothing needs a process until the next wake-up or signal."""
    if job.done:
        return False
    leaves = inflight_leaves(job.root)
    return bool(leaves) and all(wait_of(leaf, now) is not None for leaf in leaves)


def detachable(job: Job, now: float | None = None) -> bool:
    """True when the run is parked and a process may hand it over as it is: its waits are
    sleeps and awaits, or retries of idempotent actions. A retry of an action that is not
    idempotent stays with the process that scheduled it: whoever took it over later could
    not tell an attempt that never began from one that began before a crash, so it would
    have to fail it as interrupted."""
    if not parked(job, now):
        return False
    return all(leaf.idempotent or leaf.action in WAIT_ACTIONS for leaf in inflight_leaves(job.root))


def next_wake(found: list[Wait]) -> float | None:
    """The earliest time among waits (None: only signals without a deadline)."""
    times = [w.until for w in found if w.until is not None]
    return min(times) if times else None


def describe_waits(found: list[Wait]) -> str | None:
    """One line for listings: the first wait, and how many more (None: no wait)."""
    if not found:
        return None
    more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
    return found[0].describe() + more
