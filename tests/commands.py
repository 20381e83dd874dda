"""What tests use to drive ablauf from outside: the `ablauf` command in a subprocess (this
checkout's code, whatever is installed) and an in-process REPL on a virtual clock."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import DummyInput
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from ablauf_lang.repl.app import Repl
from ablauf_lang.runners.clock import VirtualClock

ROOT = Path(__file__).resolve().parent.parent
START = 1_800_000_000.0  # the REPL clock's start: 2027-01-15T08:00:00Z


def ablauf(
    *args: str,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """`ablauf ARGS...` as a subprocess of this checkout's code, printing whole lines (no
    $COLUMNS: piped output is never cut at a width)."""
    base = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return subprocess.run(
        [sys.executable, "-m", "ablauf_lang", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=timeout,
        check=False,
        env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def make_repl(
    actions: dict[str, Any] | None = None, context: dict[str, Any] | None = None
) -> tuple[Repl, io.StringIO]:
    """A REPL printing whole lines into a string, its clock standing still at START."""
    out = io.StringIO()
    repl = Repl(
        actions or {},
        context=context,
        console=Console(file=out, width=200, color_system=None),
        history=InMemoryHistory(),
        input=DummyInput(),
        output=DummyOutput(),
        clock=VirtualClock(START, frozen=True),
    )
    return repl, out


def said(repl: Repl, out: io.StringIO, *lines: str) -> str:
    """What the REPL printed for these inputs."""
    mark = len(out.getvalue())
    for line in lines:
        repl.handle(line)
    return out.getvalue()[mark:]
