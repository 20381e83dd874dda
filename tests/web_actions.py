"""Actions for the dashboard's browser tests: a gate that holds a step until a file exists,
and a step that fails until a file exists (so a retry from the page can succeed)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ablauf_lang import action


def _flag(name: str) -> Path:
    return Path(os.environ["ABLAUF_WEB_FLAGS"]) / name


@action("web/gate")
def gate(payload: Any, context: Any) -> Any:
    """Wait (at most 60 s) until the flag file named by the payload exists."""
    ends = time.monotonic() + 60
    while not _flag(str(payload)).exists():
        if time.monotonic() > ends:
            raise TimeoutError(f"gate {payload} never opened")
        time.sleep(0.05)
    return {"opened": payload}


@action("web/flaky")
def flaky(payload: Any, context: Any) -> Any:
    """Fail until the flag file named by the payload exists."""
    if not _flag(str(payload)).exists():
        raise RuntimeError(f"not yet: {payload}")
    return {"fixed": payload}


@action("web/echo")
def echo(payload: Any, context: Any) -> Any:
    return payload
