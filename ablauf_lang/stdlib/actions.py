"""The standard library's actions: `action/log`, `action/fail`, `action/sleep`; and the
names of the waits (`sleep!!`, `await!!`) that runners perform themselves."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any

from ablauf_lang.names import AWAIT, SLEEP, WAIT_ACTIONS

__all__ = ["AWAIT", "SLEEP", "STDLIB_ACTIONS", "WAIT_ACTIONS", "ActionFailed"]

log = logging.getLogger("ablauf.action")


class ActionFailed(Exception):
    """Raised by an action to fail its leaf with `error` exactly (any data, not a message)."""

    def __init__(self, error: Any) -> None:
        self.error = error
        super().__init__(error)


def action_log(payload: Any, context: Any) -> Any:
    """`(log!! x)`: log the payload; the output is the payload."""
    log.info("%s", payload)
    return payload


def action_fail(payload: Any, context: Any) -> Any:
    """`(fail!! reason)`: always fail, with the reason as the error."""
    raise ActionFailed("fail!!" if payload is None else payload)


# The longest in-process wait `action/sleep` performs. It holds a runner in memory: for
# longer waits a durable timer (which survives restarts) is the tool.
MAX_SLEEP_SECONDS = 24 * 60 * 60


def sleep_seconds(payload: Any) -> float:
    """The seconds `action/sleep` waits for `payload` (a number, or `{:seconds n}`).

    Raises ActionFailed naming the problem for anything but a finite number from 0 to
    MAX_SLEEP_SECONDS (nil and a missing :seconds mean 0).
    """
    seconds = payload.get("seconds", 0) if isinstance(payload, dict) else payload
    if seconds is None:
        return 0.0
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ActionFailed(
            f"action/sleep: the duration must be a number of seconds, got {seconds!r:.60}"
        )
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_SLEEP_SECONDS:
        if isinstance(seconds, float):
            shown = f"{seconds:g}"
        else:
            shown = f"{seconds}" if seconds.bit_length() < 64 else "a huge integer"
        raise ActionFailed(
            f"action/sleep: the duration must be from 0 to {MAX_SLEEP_SECONDS} seconds "
            f"(24 hours), got {shown}"
        )
    return float(seconds)


async def action_sleep(payload: Any, context: Any) -> Any:
    """`(action!! :action/sleep seconds)`: wait, then succeed with the payload."""
    await asyncio.sleep(sleep_seconds(payload))
    return payload


STDLIB_ACTIONS: dict[str, Callable[..., Any]] = {
    "action/log": action_log,
    "action/fail": action_fail,
    "action/sleep": action_sleep,
}
