"""Server-sent events: the store looked at every `interval` seconds, an event pushed
only when what the page shows has changed.

    /api/events              the runs list: its page and count changed
    /api/runs/{id}/events    one run: updated, restarts or state changed; `end` once done

A stream lasts at most `lifetime` seconds (the browser's EventSource opens it again), and
sends a comment now and then so that proxies keep it open.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio.to_thread

from ablauf_lang import api
from ablauf_lang.errors import AblaufError

INTERVAL = 0.5  # seconds between two looks at the store
LIFETIME = 300.0  # seconds a stream stays open before the browser reconnects
KEEPALIVE = 15.0  # seconds between two comments when nothing changes
RECONNECT_MS = 1000  # what the browser waits before it opens a closed stream again


def event(name: str, data: Any) -> str:
    """One event in the text/event-stream format (data as one JSON line)."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


def run_snapshot(url: str, run_id: str) -> dict[str, Any]:
    """What the run page needs to know to redraw: the run's status, state, updated time
    and restarts (the store's summary, the tree not loaded)."""
    with api.opened(url) as backend:
        info = backend.info(run_id)
    return {
        "run_id": run_id,
        "status": str(info.status),
        "state": info.state,
        "updated": info.updated,
        "restarts": info.restarts,
        "done": info.status is not api.Status.PENDING,
    }


async def stream(
    look: Callable[[], dict[str, Any]],
    disconnected: Callable[[], Any],
    *,
    key: Callable[[dict[str, Any]], Any],
    interval: float = INTERVAL,
    lifetime: float = LIFETIME,
    name: str = "change",
) -> AsyncIterator[str]:
    """The events of one stream: the state at once, then each change of `key(state)`;
    after a state with `done` true an `end` event, and the stream closes. A store error
    is sent as an `error` event (the stream goes on looking)."""
    yield f"retry: {RECONNECT_MS}\n\n"
    ends = time.monotonic() + lifetime
    quiet_since = time.monotonic()
    last: Any = object()
    while True:
        try:
            state = await anyio.to_thread.run_sync(look)
        except AblaufError as exc:
            state = {"error": exc.message}
        if "error" in state:
            if last != ("error", state["error"]):
                yield event("error", state)
                last = ("error", state["error"])
                quiet_since = time.monotonic()
        elif key(state) != last:
            last = key(state)
            yield event(name, state)
            quiet_since = time.monotonic()
            if state.get("done"):
                yield event("end", state)
                return
        now = time.monotonic()
        if now >= ends:
            return
        if now - quiet_since >= KEEPALIVE:
            yield ": keepalive\n\n"
            quiet_since = now
        await anyio.sleep(min(interval, max(0.0, ends - now)))
        if await disconnected():
            return
