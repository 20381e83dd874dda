"""Driving a run in this process: `log!!` lines, live progress, Ctrl-C and SIGTERM.

Used by `ablauf run` and by `ablauf runs resume` / `runs retry` (without --queue).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, NoReturn

import click

from ablauf_lang.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    echo_json,
    finish,
    leave,
    stderr_console,
    stdout_to_stderr,
)
from ablauf_lang.names import LOG_ACTION

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from ablauf_lang.api import Dispatch, Job, Result, Run

# `make(on_restart, on_start)`: the coroutine that drives the run, given the two hooks.
MakeRun = Callable[[Any, Any], Coroutine[Any, Any, "Run"]]


def _signal_name(signum: int) -> str:
    return "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"


def _run_recorded(url: str, run_id: str) -> bool:
    from ablauf_lang import api

    try:
        return api.run_exists(run_id, url)
    except Exception:  # the store is unreachable now: say what to try anyway
        return True


def resume_hint(run_id: str, url: str, store_given: bool) -> str:
    """The command that goes on with an interrupted run."""
    store = f" --store {url}" if store_given else ""
    return f"ablauf runs resume {run_id}{store}"


def drive_and_finish(
    make: MakeRun,
    *,
    run_id: str,
    url: str,
    store_given: bool,
    as_json: bool,
    progress: LiveProgress | None = None,
    started: float | None = None,
) -> NoReturn:
    """`drive` the run, then print its outcome (with the time since `started`) and exit
    with its code."""
    run = drive(
        make,
        run_id=run_id,
        url=url,
        store_given=store_given,
        as_json=as_json,
        progress=progress,
    )
    if str(run.status) == "pending":  # --detach: parked, for a worker to wake
        parked(run, url, store_given, as_json)
    finish(run, as_json, None if started is None else time.monotonic() - started)


def parked(run: Run, url: str, store_given: bool, as_json: bool) -> NoReturn:
    """A detached run left waiting: say what it waits for and who wakes it; exit 0."""
    from ablauf_lang.engine.waits import describe_waits, waits

    found = waits(run.job)
    what = describe_waits(found) or "waiting"
    if as_json:
        echo_json({**run.to_dict(), "waiting": [w.to_dict() for w in found]})
    else:
        store = f" --store {url}" if store_given else ""
        click.echo(
            f"run {run.run_id} is parked ({what}); `ablauf worker{store}` wakes it, "
            f"`ablauf runs show {run.run_id}{store}` shows it"
        )
    leave(EXIT_OK)


def drive(
    make: MakeRun,
    *,
    run_id: str,
    url: str,
    store_given: bool,
    as_json: bool,
    progress: LiveProgress | None,
) -> Run:
    """Drive a run in this process until it ends; Ctrl-C or SIGTERM ends it early.

    `make(on_restart, on_start)` gives the coroutine that drives the run. On an interrupt
    the run stays as recorded (its in-flight steps pending), actions in threads are
    abandoned, a hint saying how to resume goes to stderr, and the process exits 130. A
    second signal while that happens leaves at once.
    """
    from ablauf_lang.api import Interrupted, interruptible, run_coroutine
    from ablauf_lang.ui.render import format_value

    hint = resume_hint(run_id, url, store_given)

    def second(signum: int) -> None:
        try:
            sys.stderr.write(f"ablauf: interrupted again; go on with `{hint}`\n")
            sys.stderr.flush()
        finally:
            os._exit(EXIT_INTERRUPTED)

    shown = progress.on_restart if progress is not None else None
    logs = progress.console if progress is not None else stderr_console()

    def on_restart(job: Job, dispatches: list[Dispatch], results: list[Result]) -> None:
        # What `log!!` says is shown where the person running it sees it (stderr, so that
        # stdout stays the outcome, or the JSON document).
        for d in dispatches:
            if d.action == LOG_ACTION:
                logs.print(f"log #{d.id}: {format_value(d.payload, 0)}", highlight=False)
        if shown is not None:
            shown(job, dispatches, results)

    on_start = progress.on_start if progress is not None else None
    signum: int = signal.SIGINT
    try:
        with interruptible(on_second=second):
            try:
                with stdout_to_stderr() if as_json else nullcontext():
                    if progress is None:
                        return run_coroutine(make(on_restart, on_start))
                    from rich.live import Live

                    with Live(
                        console=progress.console,
                        get_renderable=progress.__rich__,
                        refresh_per_second=8,
                        transient=False,
                        redirect_stdout=False,
                        redirect_stderr=False,
                    ):
                        return run_coroutine(make(on_restart, on_start))
            except Interrupted as exc:
                signum = exc.signum
            except KeyboardInterrupt:
                pass
            # Still guarded: a second signal while we look at the store leaves at once.
            recorded = not url.startswith("memory:") and _run_recorded(url, run_id)
    except KeyboardInterrupt:  # between the guard's end and here: treat it the same
        recorded = not url.startswith("memory:")
    name = _signal_name(signum)
    if recorded:
        message = f"ablauf: interrupted ({name}); run {run_id} is recorded: go on with `{hint}`"
        if as_json:
            echo_json({"run_id": run_id, "status": "pending", "interrupted": True})
    elif url.startswith("memory:"):
        message = f"ablauf: interrupted ({name}); the memory: store keeps nothing"
    else:
        message = f"ablauf: interrupted ({name}) before run {run_id} started; nothing recorded"
    click.echo(message, err=True)
    leave(EXIT_INTERRUPTED)


class LiveProgress:
    """The job tree with each node's state, and the elapsed time; redrawn by rich Live.

    The header counts the actions running (started) apart from those queued (dispatched,
    waiting for one of the `--concurrency` slots); an action's duration counts from when
    it started, so time spent queued is left out.
    """

    def __init__(self, title: str, console: Console, max_nodes: int | None = None) -> None:
        self.title = title
        self.console = console
        self.started = time.monotonic()
        self.job: Job | None = None
        self.dispatched = 0
        self.finished = 0
        self.failed = 0
        self.began: dict[int, float] = {}  # action id -> when it really started
        self.running: set[int] = set()  # started, no result yet
        # Keep the tree within the terminal; bigger jobs show counts instead.
        self.max_nodes = max_nodes if max_nodes is not None else max(console.height - 4, 5)

    def on_start(self, dispatch: Dispatch, began: float) -> None:
        """The runner's hook: an action began (called from action threads: cheap)."""
        self.began[dispatch.id] = began
        self.running.add(dispatch.id)

    def on_restart(self, job: Job, dispatches: list[Dispatch], results: list[Result]) -> None:
        """The runner's hook: called after every restart (cheap: counts only)."""
        self.job = job
        self.dispatched += len(dispatches)
        for r in results:
            self.finished += 1
            self.failed += not r.ok
            self.running.discard(r.id)
            if r.started_at is not None:
                self.began[r.id] = r.started_at

    def __rich__(self) -> RenderableType:
        from rich.text import Text

        from ablauf_lang.engine.waits import describe_waits, waits
        from ablauf_lang.ui.render import job_tree, status_text

        job = self.job
        head = Text(f"{self.title}  ", style="bold")
        if job is None:
            head.append("starting…", style="dim")
            return head
        running = min(len(self.running), job.inflight)
        queued = job.inflight - running
        head.append_text(status_text(job.status))
        head.append(
            f"  {time.monotonic() - self.started:.1f}s  restarts {job.restarts}  "
            f"running {running}  queued {queued}  finished {self.finished}",
            style="dim",
        )
        if self.failed:
            head.append(f"  failed {self.failed}", style="red")
        found = waits(job, time.time()) if job.inflight else []
        if found:
            head.append(f"  {describe_waits(found)}", style="cyan")
        if len(job.paths) > self.max_nodes:
            head.append(f"  ({len(job.paths)} nodes)", style="dim")
            return head
        return job_tree(
            job, label=head, width=max(16, self.console.width // 3), timing=dict(self.began)
        )
