"""The REPL's commands (`:step`, `:run`, `:tree` ...): one function each, in a table.

Each command takes the REPL and the text after its name, prints through the REPL's
console, and raises `AblaufError` for anything the user should fix (the loop prints it).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.text import Text

from ablauf_lang.errors import AblaufError
from ablauf_lang.repl.stepper import ReplError, ReplInterrupted, StepReport, wait_text
from ablauf_lang.stdlib.durations import format_duration, format_instant, parse_duration
from ablauf_lang.ui.render import (
    changed_ids,
    dispatch_text,
    format_value,
    status_text,
)

if TYPE_CHECKING:
    from ablauf_lang.repl.app import Repl

__all__ = [
    "COMMANDS",
    "Command",
    "QuitRepl",
    "find_command",
    "parse_signal_value",
    "parse_value",
]


class QuitRepl(Exception):
    """Raised by `:quit` to leave the loop."""


@dataclass(frozen=True, slots=True)
class Command:
    """A REPL command: its name, argument synopsis, one-line help and function."""

    name: str
    args: str
    help: str
    fn: Callable[[Repl, str], None]


COMMANDS: dict[str, Command] = {}


def command(
    name: str, args: str, help_text: str
) -> Callable[[Callable[[Repl, str], None]], Callable[[Repl, str], None]]:
    """Register the decorated function as the command `name`."""

    def register(fn: Callable[[Repl, str], None]) -> Callable[[Repl, str], None]:
        COMMANDS[name] = Command(name, args, help_text, fn)
        return fn

    return register


def find_command(name: str) -> Command:
    """The command called `name`; ReplError naming close ones when there is none."""
    found = COMMANDS.get(name)
    if found is not None:
        return found
    close = difflib.get_close_matches(name, list(COMMANDS), n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; :help lists them"
    raise ReplError(f"unknown command {name}{hint}")


# ---------------------------------------------------------------- printing


def _result_line(result: Any, action: str | None, how: str, limit: int = 70) -> Text:
    ok = result.ok
    text = Text("  ")
    text.append(f"{result.state:<9}", style="green" if ok else "bold red")
    text.append(f"#{result.id} ", style="bold")
    if action:
        text.append(action, style="bold")
    value = result.output if ok else result.error
    text.append(" → " + format_value(value, limit), style="green" if ok else "red")
    if how:
        text.append(f"  ({how})", style="dim")
    return text


def print_report(
    repl: Repl, report: StepReport, *, tree: bool = True, finished: bool = True
) -> None:
    """Print what a step performed, its results, what it dispatched, and the tree."""
    out = repl.console
    before = report.before
    limit = 0 if repl.full else 70
    for result in report.fed:
        out.print(_result_line(result, _action_of(before, result.id), "by hand", limit))
    for dispatch, result in report.performed:
        out.print(_result_line(result, dispatch.action, "", limit))
    for dispatch, result in report.woke:
        out.print(_woke_line(dispatch, result, limit))
    for dispatch in report.dispatched:
        line = Text("  ")
        line.append(f"{'dispatch':<9}", style="yellow")
        line.append_text(dispatch_text(dispatch, limit))
        out.print(line)
    if not (report.fed or report.performed or report.dispatched or report.woke):
        out.print(Text("  nothing changed", style="dim"))
    if tree:
        out.print(repl.tree(report.after, changed_ids(before, report.after)))
    if finished:
        _print_finished(repl, report)


def _woke_line(dispatch: Any, result: Any, limit: int) -> Text:
    """A wait that ended: `woke #1 sleep!!`, `signal #2 await!! :approval → {...}`."""
    payload = dispatch.payload if isinstance(dispatch.payload, dict) else {}
    text = Text("  ")
    if dispatch.action == "ablauf/sleep":
        text.append(f"{'woke':<9}", style="green")
        text.append(f"#{result.id} ", style="bold")
        text.append("sleep!!", style="bold")
        until = payload.get("until")
        if isinstance(until, int | float):
            text.append(f"  (slept until {format_instant(until)})", style="dim")
        return text
    ok = result.ok
    text.append(f"{'signal' if ok else str(result.state):<9}", style="green" if ok else "bold red")
    text.append(f"#{result.id} ", style="bold")
    text.append(f"await!! :{payload.get('signal')}", style="bold")
    value = result.output if ok else result.error
    text.append(" → " + format_value(value, limit), style="green" if ok else "red")
    return text


def _print_finished(repl: Repl, report: StepReport) -> None:
    after = report.after
    if after.done:
        repl.console.print(Text("job finished: ") + status_text(after.status))
    elif repl.stepper.manual and report.dispatched:
        ids = " ".join(f"#{d.id}" for d in report.dispatched)
        repl.console.print(
            Text(
                f"manual mode: feed results for {ids} with :ok ID VALUE "
                "or :fail ID ERROR, then :step",
                style="dim",
            )
        )


def _action_of(job: Any, node_id: int) -> str | None:
    try:
        return str(job.node(node_id).action)
    except AblaufError:
        return None


def parse_value(text: str, default: Any) -> Any:
    """A value typed after `:ok ID` / `:fail ID`: one ablauf form as data, else the text."""
    from ablauf_lang.lang.forms import to_data
    from ablauf_lang.lang.reader import read

    text = text.strip()
    if not text:
        return default
    try:
        forms = read(text, "<value>")
    except AblaufError:
        return text
    return to_data(forms[0]) if len(forms) == 1 else text


def parse_signal_value(text: str) -> Any:
    """A signal's value: JSON (`{"ok": true}`), else one ablauf form as data, else the
    text; nothing is nil."""
    text = text.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return parse_value(text, None)


def _node_id(text: str, usage: str) -> tuple[int, str]:
    head, _, rest = text.strip().partition(" ")
    head = head.lstrip("#")
    if not head:
        raise ReplError(f"usage: {usage}")
    try:
        return int(head), rest
    except ValueError:
        raise ReplError(
            f"{head!r} is not a node id (a number, as in :tree); usage: {usage}"
        ) from None


# ---------------------------------------------------------------- commands


@command(":step", "", "one restart: perform the dispatches, apply results, show what changed")
def _step(repl: Repl, arg: str) -> None:
    print_report(repl, repl.stepper.step())


@command(":run", "", "restart until the job is done (in manual mode: until it waits for you)")
def _run(repl: Repl, arg: str) -> None:
    start = repl.stepper.require_job()
    try:
        reports = repl.stepper.run(lambda r: print_report(repl, r, tree=False, finished=False))
    except ReplInterrupted:
        after = repl.stepper.require_job()
        repl.console.print(repl.tree(after, changed_ids(start, after)))
        raise
    after = repl.stepper.require_job()
    repl.console.print(repl.tree(after, changed_ids(start, after)))
    if repl.stepper.hits:
        _print_hits(repl, len(reports))
        return
    held = repl.stepper.held()
    if held and not after.done:
        ids = " ".join(f"#{i}" for i in held)
        repl.console.print(
            Text(
                f"stopped after {len(reports)} steps: {ids} "
                f"{'was' if len(held) == 1 else 'were'} interrupted (outcome "
                "unknown): :ok / :fail them, or :retry to perform them again",
                style="yellow",
            )
        )
        return
    if after.done:
        repl.console.print(
            Text(f"job finished after {len(reports)} steps: ") + status_text(after.status)
        )
    elif repl.stepper.waits():
        repl.console.print(
            Text(f"stopped after {len(reports)} steps: {repl.stepper.blocked()}", style="yellow")
        )
    else:
        waiting = " ".join(f"#{leaf.id}" for leaf in repl.stepper.waiting())
        repl.console.print(
            Text(
                f"stopped after {len(reports)} steps: waiting for results of "
                f"{waiting} (manual mode: :ok / :fail them)",
                style="dim",
            )
        )


def _print_hits(repl: Repl, steps: int) -> None:
    one = len(repl.stepper.hits) == 1
    for hit in repl.stepper.hits:
        d = hit.dispatch
        line = Text(f"break {hit.breakpoint.number} ({hit.breakpoint.text}): ", style="yellow")
        line.append(f"#{d.id} {d.action} ", style="bold")
        line.append(format_value(d.payload, 0 if repl.full else 70))
        if hit.note:
            line.append(f"  ({hit.note})", style="red")
        repl.console.print(line)
    repl.console.print(
        Text(
            f"stopped after {steps} step{'' if steps == 1 else 's'}, before performing "
            + ("it" if one else "them")
            + ": :continue goes on, :ok / :fail give "
            + ("its result" if one else "their results")
            + " by hand, :ctx and :tree look",
            style="yellow",
        )
    )


@command(":tree", "", "the job tree with ids and each node's status")
def _tree(repl: Repl, arg: str) -> None:
    repl.console.print(repl.tree(repl.stepper.require_job()))
    now = repl.stepper.now()
    found = repl.stepper.waits()
    for wait in found:
        repl.console.print(Text(wait_text(wait, now, repl.stepper.live), style="yellow"))
    waited = {w.node for w in found}
    waiting = [leaf for leaf in repl.stepper.waiting() if leaf.id not in waited]
    if waiting:
        ids = " ".join(f"#{leaf.id}" for leaf in waiting)
        repl.console.print(Text(f"waiting for results of {ids}", style="dim"))
    held = repl.stepper.held()
    if held:
        ids = " ".join(f"#{i}" for i in held)
        repl.console.print(
            Text(f"interrupted (held until :retry, :ok or :fail): {ids}", style="yellow")
        )


@command(":clock", "", "the REPL clock's time and what the job waits for (the next wake-up)")
def _clock(repl: Repl, arg: str) -> None:
    stepper = repl.stepper
    now = stepper.now()
    how = "live: the system's" if stepper.live else "stands still between steps: :advance moves it"
    repl.console.print(Text(f"clock {format_instant(now)}  ({how})"))
    found = stepper.waits()
    if not found:
        repl.console.print(Text("nothing waits for a time or a signal", style="dim"))
    for wait in found:
        repl.console.print(Text("  " + wait_text(wait, now, stepper.live), style="yellow"))
    wake = stepper.next_wake()
    if wake is not None:
        gap = max(0.0, wake - now)
        repl.console.print(
            Text(f"next wake-up {format_instant(wake)} (in {format_duration(gap)})", style="dim")
        )
    _print_mailbox(repl)


def _print_mailbox(repl: Repl) -> None:
    for sig in repl.stepper.mailbox():
        repl.console.print(
            Text(
                f"mailbox: signal {sig.name} #{sig.seq} → {format_value(sig.value)} "
                "(the next await!! of that name takes it)",
                style="dim",
            )
        )


@command(":advance", "[DURATION]", "move the clock (10m, 1h30m, 2d; none: to the next wake-up)")
def _advance(repl: Repl, arg: str) -> None:
    stepper = repl.stepper
    text = arg.strip()
    if text:
        try:
            seconds = parse_duration(text)
        except AblaufError as exc:
            raise ReplError(f"{exc.message}; usage: :advance DURATION (10m, 1h30m, 2d)") from None
        reports = stepper.advance(seconds)
    else:
        seconds, reports = stepper.advance_to_next()
    repl.console.print(
        Text(f"clock → {format_instant(stepper.now())} (+{format_duration(seconds)})", style="dim")
    )
    _print_deliveries(repl, reports)
    if not reports:
        job = stepper.job
        note = (
            "nothing was due"
            if job is None or job.done
            else f"nothing was due: {stepper.blocked()}"
        )
        repl.console.print(Text(note, style="dim"))


def _print_deliveries(repl: Repl, reports: list[StepReport]) -> None:
    if not reports:
        return
    start = reports[0].before
    for report in reports:
        print_report(repl, report, tree=False, finished=False)
    after = reports[-1].after
    repl.console.print(repl.tree(after, changed_ids(start, after)))
    if after.done:
        repl.console.print(Text("job finished: ") + status_text(after.status))


@command(":signal", "NAME [VALUE]", "send a signal to the job (VALUE: ablauf data or JSON)")
def _signal(repl: Repl, arg: str) -> None:
    name, _, rest = arg.strip().partition(" ")
    if not name:
        if not repl.stepper.mailbox():
            repl.console.print(
                Text("usage: :signal NAME [VALUE]; the mailbox is empty", style="dim")
            )
        _print_mailbox(repl)
        return
    sent, reports = repl.stepper.signal(name, parse_signal_value(rest))
    if reports:
        repl.console.print(Text(f"signal {sent.name} #{sent.seq} sent", style="dim"))
        _print_deliveries(repl, reports)
    else:
        repl.console.print(
            Text(
                f"signal {sent.name} #{sent.seq} → {format_value(sent.value)} kept in the "
                f"mailbox: the next await!! :{sent.name} takes it",
                style="dim",
            )
        )


@command(":ctx", "", "the context")
def _ctx(repl: Repl, arg: str) -> None:
    context = repl.stepper.require_job().context
    if not context:
        repl.console.print(Text("{}  (empty context)", style="dim"))
        return
    for key, value in context.items():
        line = Text(format_value({key: value}, 0)[1:-1])
        repl.console.print(line)


@command(":ok", "ID [VALUE]", "feed a success (output VALUE, default nil) for a pending action")
def _ok(repl: Repl, arg: str) -> None:
    _feed(repl, arg, ok=True)


@command(":fail", "ID [ERROR]", "feed a failure (error ERROR) for a pending action")
def _fail(repl: Repl, arg: str) -> None:
    _feed(repl, arg, ok=False)


def _feed(repl: Repl, arg: str, *, ok: bool) -> None:
    """`:ok` / `:fail`: queue a result given by hand for the next `:step`."""
    usage = ":ok ID [VALUE]" if ok else ":fail ID [ERROR]"
    node_id, rest = _node_id(arg, usage)
    result = repl.stepper.feed(node_id, ok, parse_value(rest, None if ok else "failed by hand"))
    what, value = ("success", result.output) if ok else ("failure", result.error)
    repl.console.print(
        Text(
            f"queued {what} for #{node_id} → {format_value(value)}; :step applies it",
            style="green" if ok else "red",
        )
    )


@command(":retry", "[ID]", "perform an action a Ctrl-C interrupted again (all when no ID)")
def _retry(repl: Repl, arg: str) -> None:
    node_id = _node_id(arg, ":retry [ID]")[0] if arg.strip() else None
    ids = repl.stepper.retry(node_id)
    shown = " ".join(f"#{i}" for i in ids)
    repl.console.print(Text(f"{shown}: the next :step performs it again", style="yellow"))


@command(":manual", "", "manual mode: :step only dispatches; results come from :ok / :fail")
def _manual(repl: Repl, arg: str) -> None:
    repl.stepper.manual = True
    repl.console.print("manual mode: :step applies the results you feed with :ok / :fail")


@command(":auto", "", "auto mode: :step performs the dispatched actions")
def _auto(repl: Repl, arg: str) -> None:
    repl.stepper.manual = False
    repl.console.print("auto mode: :step performs the dispatched actions")


@command(":back", "", "undo the last restart (or load)")
def _back(repl: Repl, arg: str) -> None:
    snap = repl.stepper.back()
    if snap.job is None:
        repl.console.print(Text("back to the start: no job", style="dim"))
        return
    note = ""
    if snap.queued:
        note = "; queued again: " + " ".join(f"#{r.id} {r.state}" for r in snap.queued)
    repl.console.print(Text(f"back to restart {snap.job.restarts}{note}", style="dim"))
    repl.console.print(repl.tree(snap.job))


@command(":load", "FILE", "load a program (.abl) or a job snapshot (saved by :save)")
def _load(repl: Repl, arg: str) -> None:
    path = os.path.expanduser(arg.strip())
    if not path:
        raise ReplError("usage: :load FILE")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ReplError(f"cannot read {path}: {reason}") from None
    snapshot = _as_snapshot(text)
    if snapshot is not None:
        from ablauf_lang.api import Job

        job = Job.from_json(text)
        repl.stepper.start(job, path)
        repl.console.print(
            Text(f"loaded job snapshot {path} (restart {job.restarts})", style="dim")
        )
    else:
        compiled = repl.compile(text, path)
        if compiled is None:
            return
        job = compiled
        repl.stepper.start(job, path, source=repl.program_text(text))
        repl.console.print(Text(f"loaded {path}", style="dim"))
    repl.console.print(repl.tree(job))
    repl.warn_unknown_actions(job)


def _as_snapshot(text: str) -> dict[str, Any] | None:
    if not text.lstrip().startswith("{"):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and "nodes" in data else None


@command(":save", "FILE", "save the current job as a JSON snapshot (:load reads it back)")
def _save(repl: Repl, arg: str) -> None:
    path = os.path.expanduser(arg.strip())
    if not path:
        raise ReplError("usage: :save FILE")
    text = repl.stepper.require_job().to_json()
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise ReplError(f"cannot write {path}: {exc.strerror}") from None
    repl.console.print(Text(f"saved job to {path}", style="dim"))


@command(":graph", "FILE", "draw the job with its states as FILE.svg (.png: needs cairosvg)")
def _graph(repl: Repl, arg: str) -> None:
    from ablauf_lang.ui.graph import run_svg, write_picture

    path = os.path.expanduser(arg.strip())
    if not path:
        raise ReplError("usage: :graph FILE.svg")
    job = repl.stepper.require_job()
    title = f"{repl.stepper.current.name or 'job'} · {job.status} · restarts {job.restarts}"
    try:
        write_picture(run_svg(job, title=title), path)
    except AblaufError as exc:
        raise ReplError(exc.message) from None
    repl.console.print(Text(f"wrote {path}", style="dim"))


@command(":actions", "", "the registered actions")
def _actions(repl: Repl, arg: str) -> None:
    for name in sorted(repl.stepper.actions):
        repl.console.print(":" + name)


@command(":help", "[COMMAND]", "this help")
def _help(repl: Repl, arg: str) -> None:
    wanted = arg.strip()
    if wanted:
        cmd = find_command(wanted if wanted.startswith(":") else ":" + wanted)
        repl.console.print(
            Text(f"{cmd.name} {cmd.args}".strip(), style="bold") + Text(f"  {cmd.help}")
        )
        return
    repl.console.print(
        "Enter a workflow form to make it the current job, e.g. "
        '(dopar!! (log!! "a") (log!! "b")). Commands:'
    )
    for cmd in sorted(COMMANDS.values(), key=_help_order):
        line = Text(f"  {(cmd.name + ' ' + cmd.args).strip():<18}", style="bold")
        line.append(cmd.help)
        repl.console.print(line)
    repl.console.print(
        Text(
            "Keys: F5 = :step, Tab completes, Ctrl-C clears the line (or stops a :step or "
            ":run), Ctrl-D or :quit leaves.",
            style="dim",
        )
    )


def _help_order(cmd: Command) -> int:
    from ablauf_lang.names import REPL_COMMANDS

    return REPL_COMMANDS.index(cmd.name) if cmd.name in REPL_COMMANDS else len(REPL_COMMANDS)


@command(":quit", "", "leave the REPL")
def _quit(repl: Repl, arg: str) -> None:
    raise QuitRepl
