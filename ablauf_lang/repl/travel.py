"""The REPL's time travel, breakpoints, recording and plan: `:history`, `:goto`,
`:attach`, `:fork`, `:record`, `:break`, `:breaks`, `:unbreak`, `:continue`, `:plan`.

A recorded run is opened with `:attach RUN_ID` (at its latest restart; `:goto N` opens any
earlier one) and stepped here by hand: nothing is written to the run, and the session
starts in manual mode, since performing its actions here would do their work again
(`:auto` performs them for real, when the person asks). `:fork` records what is on screen
as a new run (of the attached run: its child at this restart). `:record FILE` saves the
current job's session as a test file (`ablauf test FILE` replays it) and keeps it up to
date after every step until `:record off`.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text

from ablauf_lang.errors import AblaufError
from ablauf_lang.repl.commands import command, find_command, print_report
from ablauf_lang.repl.stepper import Origin, ReplError, Snapshot, StepReport
from ablauf_lang.ui.render import status_text

if TYPE_CHECKING:
    from ablauf_lang.repl.app import Repl

__all__ = ["BREAK_SIGNAL", "recording_of", "save_recording"]

BREAK_SIGNAL = "ablauf/break"  # what a run parked by `--break` waits for


# ---------------------------------------------------------------- history and goto


def _summary(snap: Snapshot) -> str:
    report = snap.step
    if report is None:
        origin = snap.origin
        if origin is not None:
            return f"attached run {origin.run_id} ({origin.store})"
        return f"entered {snap.name}" if snap.name == "<repl>" else f"loaded {snap.name}"
    return _step_summary(report)


def _step_summary(report: StepReport) -> str:
    parts = []
    applied = [*report.fed, *(r for _, r in report.performed), *(r for _, r in report.woke)]
    if applied:
        parts.append("applied " + ", ".join(f"#{r.id} {r.state}" for r in applied))
    if report.dispatched:
        parts.append("dispatched " + ", ".join(f"#{d.id} {d.action}" for d in report.dispatched))
    if report.before.context != report.after.context:
        keys = [
            str(k)
            for k in {*report.before.context, *report.after.context}
            if report.before.context.get(k) != report.after.context.get(k)
        ]
        parts.append("context " + ", ".join(sorted(keys)))
    if report.after.done:
        parts.append(f"finished {report.after.status}")
    return "; ".join(parts) or "nothing changed"


@command(":history", "", "the current job's restarts: what each applied and dispatched")
def _history(repl: Repl, arg: str) -> None:
    stepper = repl.stepper
    stepper.require_job()
    for index, snap in stepper.segment():
        if snap.job is None:
            continue
        here = index == stepper.position
        ahead = index > stepper.position
        line = Text("→ " if here else "  ", style="bold cyan")
        line.append(f"{snap.job.restarts:>4}  ", style="bold" if here else "")
        line.append(_summary(snap), style="dim" if ahead else "")
        if ahead:
            line.append("  (ahead)", style="dim")
        repl.console.print(line)
    origin = stepper.current.origin
    if origin is not None:
        repl.console.print(
            Text(
                f"the run has restarts 0 to {origin.latest}: :goto N opens any of them",
                style="dim",
            )
        )


@command(":goto", "N", "go to the job as it was after restart N (back or forward)")
def _goto(repl: Repl, arg: str) -> None:
    text = arg.strip().lstrip("#")
    try:
        restart = int(text)
    except ValueError:
        raise ReplError("usage: :goto N (a restart number, as :history lists)") from None
    stepper = repl.stepper
    stepper.require_job()
    origin = stepper.current.origin
    try:
        snap = stepper.goto(restart)
    except ReplError:
        if origin is None:
            raise
        if not 0 <= restart <= origin.latest:
            raise ReplError(
                f"restart {restart} is out of range: run {origin.run_id} has restarts "
                f"0 to {origin.latest}"
            ) from None
        _open_run(repl, origin.run_id, origin.store, restart)  # earlier: from the store
        return
    assert snap.job is not None
    repl.console.print(Text(f"at restart {snap.job.restarts}", style="dim"))
    repl.console.print(repl.tree(snap.job))


# ---------------------------------------------------------------- attach and fork


@command(":attach", "RUN_ID [--store URL]", "open a recorded run here, without touching it")
def _attach(repl: Repl, arg: str) -> None:
    words = _split(arg)
    store = None
    if "--store" in words:
        at = words.index("--store")
        if at + 1 >= len(words):
            raise ReplError("usage: :attach RUN_ID [--store URL]")
        store = words[at + 1]
        del words[at : at + 2]
    if len(words) != 1:
        raise ReplError("usage: :attach RUN_ID [--store URL]")
    _open_run(repl, words[0], store, None)


def _split(arg: str) -> list[str]:
    try:
        return shlex.split(arg)
    except ValueError as exc:
        raise ReplError(f"cannot read the arguments: {exc}") from None


def _open_run(repl: Repl, prefix: str, store: str | None, restart: int | None) -> None:
    from ablauf_lang import api

    url = store or api.default_url()
    try:
        with api.opened(url) as backend:
            run_id = backend.resolve_run_id(prefix)
            stored = backend.load(run_id)
            history = backend.history(run_id)
            latest = history.restarts[1]
            job = history.job_at(latest if restart is None else restart)
    except AblaufError as exc:
        raise ReplError(exc.message) from None
    origin = Origin(run_id, url, latest, stored.info.filename)
    repl.stepper.start(job, f"run {run_id}", source=stored.source, origin=origin)
    repl.stepper.manual = True
    repl.console.print(
        Text(
            f"attached run {run_id} at restart {job.restarts} of {latest} ({job.status}); "
            "the run itself is not changed. Manual mode: :ok / :fail give results "
            "(:auto performs actions for real)",
            style="dim",
        )
    )
    repl.console.print(repl.tree(job))
    if job.done:
        repl.console.print(Text("job finished: ") + status_text(job.status))


@command(
    ":fork", "[--store URL]", "record the job on screen as a new run (a fork of an attached run)"
)
def _fork(repl: Repl, arg: str) -> None:
    from ablauf_lang import api

    words = _split(arg)
    if words and (words[0] != "--store" or len(words) != 2):
        raise ReplError("usage: :fork [--store URL]")
    stepper = repl.stepper
    job = stepper.require_job()
    snap = stepper.current
    origin = snap.origin
    url = words[1] if words else (origin.store if origin is not None else api.default_url())
    filename = origin.filename if origin is not None else snap.name
    # The run's own restart it was taken at: the steps taken here since are not the run's.
    first = stepper.segment()[0][1].job
    taken = first.restarts if first is not None else job.restarts
    try:
        run_id = api.record_run(
            job,
            source=snap.source,
            filename=None if filename == "<repl>" else filename,
            parent=origin.run_id if origin is not None else None,
            parent_step=taken if origin is not None else None,
            store=url,
        )
    except AblaufError as exc:
        raise ReplError(exc.message) from None
    lineage = ""
    if origin is not None:
        here = job.restarts - taken
        stepped = f", with {here} restart{'' if here == 1 else 's'} stepped here" if here else ""
        lineage = f" (forked from {origin.run_id} at restart {taken}{stepped})"
    repl.console.print(
        Text(
            f"recorded run {run_id}{lineage} in {url}: `ablauf runs resume {run_id}` drives it",
            style="green",
        )
    )


# ---------------------------------------------------------------- recording


def recording_of(repl: Repl) -> tuple[dict[str, Any], int]:
    """The current job's session as a test file's data, and the number of steps in it:
    from where the job was entered or loaded to the snapshot on screen."""
    from ablauf_lang.testing.session import Recording

    stepper = repl.stepper
    stepper.require_job()
    entries = [(i, s) for i, s in stepper.segment() if i <= stepper.position]
    first = entries[0][1]
    assert first.job is not None
    if first.job.restarts != 0 or first.origin is not None:
        raise ReplError(
            "a test starts from the program: this job was attached or loaded at restart "
            f"{first.job.restarts}; :goto 0 opens its start, then step and :record"
        )
    if first.source is None:
        raise ReplError(
            "this job was loaded from a job snapshot: a test needs its program (load the .abl)"
        )
    name = None if first.name in (None, "<repl>") else first.name
    recording = Recording(first.source, name, dict(first.job.context))
    for _, snap in entries[1:]:
        r = snap.step
        assert r is not None
        recording.add_step(r.fed, r.performed, r.dispatched, r.after, woke=r.woke, now=r.now)
    return recording.to_dict(), len(entries) - 1


def save_recording(repl: Repl) -> None:
    """Write the recording (after a step): the current job's session, up to now."""
    from ablauf_lang.testing.session import write_test

    path = repl.recording
    if path is None or repl.stepper.job is None:
        return
    try:
        data, _ = recording_of(repl)
    except ReplError:
        return  # another job is on screen: the file keeps what it had
    repl.recording = write_test(path, data)


@command(
    ":record", "FILE|off", "save this job's session as a test (`ablauf test FILE`), kept up to date"
)
def _record(repl: Repl, arg: str) -> None:
    text = arg.strip()
    if not text:
        where = repl.recording
        note = f"recording to {where}" if where is not None else "not recording"
        repl.console.print(Text(f"{note}; usage: :record FILE | :record off", style="dim"))
        return
    if text == "off":
        if repl.recording is None:
            raise ReplError("not recording")
        repl.console.print(Text(f"stopped recording; {repl.recording} is kept", style="dim"))
        repl.recording = None
        return
    from ablauf_lang.testing.session import write_test

    data, steps = recording_of(repl)
    try:
        path = write_test(Path(text).expanduser(), data)
    except OSError as exc:
        raise ReplError(f"cannot write {text}: {exc.strerror}") from None
    repl.recording = path
    repl.console.print(
        Text(
            f"recording to {path} ({steps} restart{'' if steps == 1 else 's'} so far; each "
            f"step is added): `ablauf test {path}` replays it",
            style="dim",
        )
    )


# ---------------------------------------------------------------- breakpoints


@command(":break", "ACTION|ID|(when EXPR)", "stop :run before performing a matching leaf")
def _break(repl: Repl, arg: str) -> None:
    text = arg.strip()
    if not text:
        _breaks(repl, "")
        return
    action: str | None = None
    node: int | None = None
    condition = None
    head, _, rest = text.partition(" ")
    if head.startswith("("):
        head, rest = "", text
    if head:
        if head.lstrip("#").isdigit():
            node = int(head.lstrip("#"))
        else:
            action = head.lstrip(":")
    rest = rest.strip()
    if rest:
        if not rest.startswith("(when "):
            raise ReplError(
                "usage: :break ACTION, :break ID, :break (when EXPR), or ACTION/ID "
                "followed by (when EXPR)"
            )
        inner = rest[len("(when ") :]
        # The closing bracket of `(when`; without it the reader says what is missing.
        condition = repl.expression(inner[:-1] if inner.endswith(")") else inner)
    made = repl.stepper.add_break(text, action=action, node=node, when=condition)
    note = ""
    if action is not None and action not in repl.stepper.actions:
        job = repl.stepper.job
        from ablauf_lang.api import used_actions

        if job is None or action not in used_actions(job.root):
            note = f" (note: the current job has no action :{action})"
    repl.console.print(Text(f"breakpoint {made.number}: {text}{note}", style="yellow"))


@command(":breaks", "", "the breakpoints")
def _breaks(repl: Repl, arg: str) -> None:
    if not repl.stepper.breaks:
        repl.console.print(Text("no breakpoints: :break ACTION|ID|(when EXPR)", style="dim"))
    for b in repl.stepper.breaks:
        repl.console.print(Text(f"  {b.number}  {b.text}"))


@command(":unbreak", "N|all", "remove a breakpoint (all: every one)")
def _unbreak(repl: Repl, arg: str) -> None:
    text = arg.strip()
    if text == "all":
        gone = repl.stepper.remove_break(None)
    else:
        try:
            number = int(text)
        except ValueError:
            raise ReplError("usage: :unbreak N (as :breaks lists) or :unbreak all") from None
        gone = repl.stepper.remove_break(number)
    repl.console.print(
        Text(f"removed {', '.join(str(b.number) for b in gone) or 'nothing'}", style="dim")
    )


@command(":continue", "", "go on after a breakpoint (or a run parked by --break)")
def _continue(repl: Repl, arg: str) -> None:
    stepper = repl.stepper
    job = stepper.require_job()
    if job.done:
        raise ReplError(f"the job is done ({job.status}): nothing to continue")
    stepper.let_go()
    if BREAK_SIGNAL in stepper.awaited():
        sent, reports = stepper.signal(BREAK_SIGNAL)
        repl.console.print(Text(f"signal {sent.name} sent: the run goes on", style="dim"))
        for report in reports:
            print_report(repl, report, tree=False, finished=False)
    find_command(":run").fn(repl, "")


# ---------------------------------------------------------------- the plan


@command(":plan", "", "the current job's static plan: leaves, width, chain, fan-outs, warnings")
def _plan(repl: Repl, arg: str) -> None:
    from ablauf_lang.ui.plan import format_plan, plan

    job = repl.stepper.require_job()
    name = repl.stepper.current.name
    repl.console.print(Text(format_plan(plan(job.root, dict(job.context), filename=name))))
