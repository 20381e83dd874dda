"""Retry policies: whether a failed attempt is tried again, and after how long.

A policy is the plain map a leaf stores (`Leaf.retry`): `max` (attempts in all, the first
included), `delay` (seconds before the second attempt), `backoff` (each wait is that many
times the one before), `max-delay` (no wait longer), `jitter` (spread the waits), `on`
(the errors that are retried; none: every error). Pure: the jitter is drawn from the
leaf's id and the attempt's number, so a replay computes the same waits.
"""

from __future__ import annotations

import zlib
from typing import Any

from ablauf_lang.engine.nodes import LeafState
from ablauf_lang.stdlib.durations import MAX_DURATION

# Names a timed-out attempt matches in `:on`.
TIMEOUT_NAMES = frozenset({"timeout", "TimeoutError"})


def matches(on: Any, state: LeafState, error: Any) -> bool:
    """True when an attempt's error is one `on` lists (every error when `on` is None).

    A name matches an error that is that name, or starts with it and a colon (the
    `Type: message` an exception becomes); a timeout matches `timeout` and `TimeoutError`.
    """
    if on is None:
        return True
    for name in on:
        if state is LeafState.TIMEOUT and name in TIMEOUT_NAMES:
            return True
        if isinstance(error, str) and (error == name or error.startswith(f"{name}:")):
            return True
    return False


def should_retry(leaf: Any, state: LeafState, error: Any) -> bool:
    """True when the leaf's policy asks for another attempt after this failed one.

    A timed-out attempt of an action that is not idempotent is not retried: its outcome
    is unknown (it may have done its work), so running it again could do it twice.
    """
    policy = leaf.retry
    if not policy or leaf.attempt >= int(policy.get("max", 1)):
        return False
    if state is LeafState.TIMEOUT and not leaf.idempotent:
        return False
    return matches(policy.get("on"), state, error)


def delay(policy: dict[str, Any], attempt: int, node_id: int) -> float:
    """Seconds to wait after attempt number `attempt` failed, before the next one."""
    base = float(policy.get("delay", 1.0))
    factor = float(policy.get("backoff", 2.0))
    cap = policy.get("max-delay")
    limit = MAX_DURATION if cap is None else min(float(cap), MAX_DURATION)
    try:
        wait = min(base * factor ** max(attempt - 1, 0), limit)
    except OverflowError:  # a huge backoff: the wait is as long as allowed
        wait = limit
    if policy.get("jitter"):
        frac = zlib.crc32(f"{node_id}:{attempt}".encode()) / 2**32
        wait *= 0.5 + 0.5 * frac  # "equal jitter": from half the wait to all of it
    return wait


def record(leaf: Any, state: LeafState, error: Any, started: Any, finished: Any) -> dict[str, Any]:
    """What the leaf keeps of an attempt that a retry superseded."""
    return {
        "attempt": leaf.attempt,
        "state": str(state),
        "error": error,
        "started_at": started,
        "finished_at": finished,
    }
