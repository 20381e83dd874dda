"""The standard library's actions: `action/log`, `action/fail`, `action/sleep`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

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


async def action_sleep(payload: Any, context: Any) -> Any:
    """`(action!! :action/sleep seconds)`: wait, then succeed with the payload."""
    seconds = payload.get("seconds", 0) if isinstance(payload, dict) else payload
    await asyncio.sleep(float(seconds or 0))
    return payload


STDLIB_ACTIONS: dict[str, Callable[..., Any]] = {
    "action/log": action_log,
    "action/fail": action_fail,
    "action/sleep": action_sleep,
}
