"""`ablauf runs ...`: list, show, resume, retry, abort, delete and prune recorded runs;
`ablauf signal`: send a signal to a run."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn

import click

from ablauf_lang.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    AblaufGroup,
    F,
    UserError,
    actions_option,
    echo_json,
    exit_for,
    json_option,
    kafka_options,
    kafka_settings,
    leave,
    parse_age,
    parse_signal_value,
    parse_since,
    seconds_option,
    stderr_console,
    stdout_console,
    store_option,
    store_url,
)
from ablauf_lang.cli.drive import drive_and_finish
from ablauf_lang.cli.history import runs_continue, runs_fork, runs_history
from ablauf_lang.errors import AblaufError

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.text import Text

    from ablauf_lang.api import JobStore, Run, RunInfo, StoredRun

RUN_STATES = ("pending", "running", "abandoned", "success", "failure", "aborted", "damaged")
_STATE_STYLE = {
    "pending": "yellow",
    "running": "bold yellow",
    "abandoned": "magenta",
    "success": "green",
    "failure": "red",
    "aborted": "red",
    "damaged": "bold red",
}
DEFAULT_LIMIT = 50


@click.group(cls=AblaufGroup)
def runs() -> None:
    """List, inspect, resume, retry, abort and delete recorded runs.

    An ID may be given by any unambiguous prefix (`ablauf runs show 3f0c`).
    """


def _resolved(run_id: str, url: str) -> str:
    """The full id of the run `run_id` names (a whole id or an unambiguous prefix)."""
    from ablauf_lang import api

    return api.resolve_run_id(run_id, url)


def _state_text(info: RunInfo) -> Text:
    from rich.text import Text

    return Text(info.label(), style=_STATE_STYLE.get(info.state, "bold"))


def _note(info: RunInfo, width: int = 80) -> str:
    """What a listing says beside a run: its damage, abort reason or error, else what it
    waits for, on one line."""
    text = info.damage or (f"aborted: {info.aborted}" if info.aborted is not None else None)
    text = text or info.error or info.waiting or ""
    if info.parent is not None:
        fork = f"fork of {info.parent} at {info.parent_step}"
        text = f"{fork}; {text}" if text else fork
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _when(stamp: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(stamp).isoformat(sep=" ", timespec="seconds")


# ---------------------------------------------------------------- list, show


@runs.command("list")
@store_option
@json_option
@click.option(
    "--status",
    "state",
    type=click.Choice(RUN_STATES),
    default=None,
    help="Only runs in this state: pending (unfinished: running or abandoned too), "
    "running (a live process drives it), abandoned (unfinished, nobody drives it), "
    "success, failure (aborted too), aborted, damaged.",
)
@click.option(
    "--file", "filename", metavar="FILE", default=None, help="Only runs of this program file."
)
@click.option(
    "--since",
    metavar="WHEN",
    default=None,
    help="Only runs created since: a duration back from now (90m, 2h, 3d) or an ISO date "
    "or time (2026-11-30, 2026-11-30T08:00).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=DEFAULT_LIMIT,
    show_default=True,
    help="At most N runs (newest first).",
)
@click.option(
    "--offset",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Skip the newest N runs (the next page: --offset 50).",
)
@click.option(
    "--waiting",
    is_flag=True,
    help="Only runs that wait for something: a sleep, a signal, a retry's next attempt.",
)
@click.option(
    "--forks-of",
    "forks_of",
    metavar="ID",
    default=None,
    help="Only the runs forked from run ID (`runs fork`).",
)
def runs_list(
    store: str | None,
    as_json: bool,
    state: str | None,
    filename: str | None,
    since: str | None,
    limit: int,
    offset: int,
    waiting: bool,
    forks_of: str | None,
) -> None:
    """List runs, newest first (a page of --limit runs; a note says when there are more).

    The note says what a run waits for (`waiting: approval`, `sleeping until ...`)."""
    from rich.table import Table

    from ablauf_lang import api

    when = None if since is None else parse_since(since)
    url = store_url(store)
    if forks_of is not None:
        forks_of = _resolved(forks_of, url)
    infos, total = api.find_runs(
        url,
        state=state,
        filename=filename,
        since=when,
        limit=limit,
        offset=offset,
        waiting=waiting,
        forks_of=forks_of,
    )
    more = total - offset - len(infos)
    note = (
        f"{len(infos)} of {total} runs shown; the next ones: --offset {offset + len(infos)}"
        if more > 0
        else None
    )
    if as_json:
        echo_json([info.to_dict() for info in infos])
        if note is not None:
            click.echo(f"ablauf: {note}", err=True)
        return
    console = stdout_console()
    if not infos:
        console.print("no runs" if not total else f"no runs past the first {total}", style="dim")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("run", "state", "created", "updated", "restarts", "file", "note"):
        table.add_column(col, no_wrap=col not in ("file", "note"))
    for info in infos:
        table.add_row(
            info.run_id,
            _state_text(info),
            _when(info.created),
            _when(info.updated),
            str(info.restarts),
            info.filename or "",
            _note(info),
        )
    console.print(table)
    if note is not None:
        console.print(note, style="dim")


@runs.command("show")
@click.argument("run_id", metavar="ID")
@store_option
@json_option
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Redraw as the run goes on, until it ends; then exit 0 on success, 1 otherwise.",
)
@seconds_option("--interval", 0.5, 0.05, "How often --follow reads the store.")
@click.option(
    "--at",
    "at",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="The run as it was after restart N (`runs history` lists them).",
)
def runs_show(
    run_id: str, store: str | None, as_json: bool, follow: bool, interval: float, at: int | None
) -> None:
    """Show a run: its state, its job tree with each node's state, its context."""
    from ablauf_lang import api

    if at is not None and follow:
        raise UserError("ablauf: error: --at shows a past state: it cannot --follow")
    with api.opened(store_url(store)) as backend:
        run_id = api.resolve_run_id(run_id, backend)
        if at is not None:
            try:
                stored = api.run_at(run_id, at, backend)
            except AblaufError as exc:
                raise UserError(exc) from None
            if as_json:
                echo_json({**api.show_run(stored), "at": at})
            else:
                console = stdout_console()
                console.print(_show(stored, console, at=at), soft_wrap=True)
            return
        stored = api.load_run(run_id, backend)
        drawn = False  # the live view's last frame already shows the end
        if follow:
            stored, drawn = _follow(backend, run_id, stored, interval, quiet=as_json)
    if as_json:
        echo_json(api.show_run(stored))
    elif not drawn:
        stdout_console().print(_show(stored, stdout_console()), soft_wrap=True)
    if follow:
        exit_for(stored.job.status)


def _show(stored: StoredRun, console: Console, at: int | None = None) -> RenderableType:
    """A run as text: a head line (state, times, file), its abort reason or error, the
    job tree and the context (`at`: as it was after that restart)."""
    from rich.console import Group
    from rich.text import Text

    from ablauf_lang.ui.render import format_value, job_tree, waits_lines

    info = stored.info
    head = Text(f"run {info.run_id}  ", style="bold")
    head.append_text(_state_text(info))
    head.append(
        f"  created {_when(info.created)}  updated {_when(info.updated)}  "
        f"restarts {stored.job.restarts}",
        style="dim",
    )
    if info.filename:
        head.append(f"  {info.filename}", style="dim")
    if info.parent is not None:
        head.append(f"  forked from {info.parent} at restart {info.parent_step}", style="dim")
    if at is not None:
        head.append(f"  as after restart {at}", style="bold cyan")
    parts: list[Any] = [job_tree(stored.job, label=head, width=max(16, console.width // 3))]
    if info.aborted is not None:
        parts.append(Text("aborted: ", style="bold red") + Text(str(info.aborted)))
    elif info.error and info.state == "failure":
        parts.append(Text("error: ", style="red") + Text(info.error))
    if info.state == "abandoned" and at is None:
        parts.append(
            Text(
                f"nobody is driving it: go on with `ablauf runs resume {info.run_id}`",
                style="magenta",
            )
        )
    parts.extend(waits_lines(stored.job))
    parts.append(Text("context ", style="dim") + Text(format_value(stored.job.context, 0)))
    return Group(*parts)


def _follow(
    backend: JobStore, run_id: str, stored: StoredRun, interval: float, *, quiet: bool
) -> tuple[StoredRun, bool]:
    """Read the run again every `interval` seconds until it is no longer pending; on a
    terminal the tree is redrawn in place (then True: the end is on the screen), else a
    line is printed when its state changes."""
    from rich.live import Live

    from ablauf_lang import api

    console = stderr_console() if quiet else stdout_console()
    live_view = console.is_terminal and not quiet

    def done(run: StoredRun) -> bool:
        return run.info.state not in ("pending", "running")

    def line(run: StoredRun) -> str:
        leaves = list(run.job.leaves())
        finished = sum(1 for leaf in leaves if leaf.result is not None and leaf.result != "pending")
        return f"run {run_id}: {run.info.label()}, {finished} of {len(leaves)} steps finished"

    try:
        if live_view:
            with Live(_show(stored, console), console=console, auto_refresh=False) as live:
                while not done(stored):
                    time.sleep(interval)
                    stored = api.load_run(run_id, backend)
                    live.update(_show(stored, console), refresh=True)
            return stored, True
        last = ""
        while not done(stored):
            text = line(stored)
            if text != last and not quiet:
                click.echo(text)
                last = text
            time.sleep(interval)
            stored = api.load_run(run_id, backend)
        return stored, False
    except KeyboardInterrupt:
        leave(EXIT_INTERRUPTED)


# ---------------------------------------------------------------- resume, retry, abort


def _again_options(command: F) -> F:
    """The arguments and options `runs resume` and `runs retry` share."""
    for decorate in reversed(
        (
            click.argument("run_id", metavar="ID"),
            actions_option,
            store_option,
            json_option,
            click.option(
                "--queue",
                is_flag=True,
                help="Hand the run back to the workers of its PostgreSQL store instead of "
                "running it here; prints the run id.",
            ),
            click.option(
                "--force",
                is_flag=True,
                help="Take the run over even if another live process drives it (that "
                "process's next write is then refused).",
            ),
            kafka_options,
        )
    ):
        command = decorate(command)
    return command


def _run_again(
    run_id: str,
    actions: str | None,
    store: str | None,
    as_json: bool,
    queue: bool,
    retry: bool,
    force: bool,
    kafka: Any = None,
) -> NoReturn:
    from ablauf_lang import api

    url = store_url(store)
    run_id = _resolved(run_id, url)
    if kafka is not None:
        if actions is not None or queue:
            raise UserError(
                "ablauf: error: --actions and --queue are not used with --kafka: the Kafka "
                "workers perform the run"
            )
        api.wake_kafka(run_id, url, kafka, retry=retry)
        if as_json:
            echo_json({"run_id": run_id, "status": "pending"})
        else:
            click.echo(run_id)
        sys.exit(EXIT_OK)
    if queue:
        if actions is not None:
            raise UserError(
                "ablauf: error: --actions is not used with --queue: the workers have their own"
            )
        api.requeue(run_id, url, retry=retry)
        if as_json:
            echo_json({"run_id": run_id, "status": "pending"})
        else:
            click.echo(run_id)
        sys.exit(EXIT_OK)
    registry = api.load_actions(actions)
    again: Callable[..., Coroutine[Any, Any, Run]] = api.retry_async if retry else api.resume_async

    def make(on_restart: Any, on_start: Any) -> Coroutine[Any, Any, Run]:
        return again(run_id, url, registry, force=force)

    drive_and_finish(make, run_id=run_id, url=url, store_given=store is not None, as_json=as_json)


def _again_command(name: str, retry: bool, doc: str) -> None:
    """`runs resume` (`retry=False`) or `runs retry`: the same command but for the rule."""

    @runs.command(name, help=doc)
    @_again_options
    def command(
        run_id: str,
        actions: str | None,
        store: str | None,
        as_json: bool,
        queue: bool,
        force: bool,
        kafka: str | None,
        kafka_prefix: str | None,
        kafka_option: tuple[str, ...],
    ) -> None:
        settings = kafka_settings(kafka, kafka_prefix, kafka_option)
        _run_again(run_id, actions, store, as_json, queue, retry=retry, force=force, kafka=settings)


_REFUSED = """

    Refused while another process drives it (`runs list` says running); --force takes
    it over.
    """
_again_command(
    "resume", False, "Go on with an unfinished run (after a crash or an interrupt)." + _REFUSED
)
_again_command("retry", True, "Run a failed run's failed steps again and go on." + _REFUSED)


runs.add_command(runs_history)
runs.add_command(runs_fork)
runs.add_command(runs_continue)


@runs.command("abort")
@click.argument("run_id", metavar="ID")
@store_option
@json_option
@click.option(
    "--reason",
    default="aborted",
    show_default=True,
    help="The error recorded on the steps that were in flight.",
)
def runs_abort(run_id: str, store: str | None, as_json: bool, reason: str) -> None:
    """Abort a run: its pending steps fail with REASON and nothing new starts."""
    from ablauf_lang import api

    url = store_url(store)
    run_id = _resolved(run_id, url)
    result = api.abort_run(run_id, store=url, reason=reason)
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(f"aborted run {run_id} ({result.status}): {reason}")


# ---------------------------------------------------------------- delete, prune


@runs.command("delete")
@click.argument("run_ids", nargs=-1, required=True, metavar="ID...")
@store_option
@json_option
def runs_delete(run_ids: tuple[str, ...], store: str | None, as_json: bool) -> None:
    """Delete runs and everything recorded of them (a running run is refused).

    Each ID that cannot be deleted is reported on its own line; exit 2 if any.
    """
    from ablauf_lang import api

    deleted: list[str] = []
    failed: list[dict[str, str]] = []
    with api.opened(store_url(store)) as backend:
        for given in run_ids:
            try:
                run_id = api.resolve_run_id(given, backend)
                api.delete_run(run_id, backend)
            except AblaufError as exc:
                failed.append({"run_id": given, "error": exc.message})
                if not as_json:
                    click.echo(f"ablauf: error: {exc.message}", err=True)
                continue
            deleted.append(run_id)
            if not as_json:
                click.echo(f"deleted run {run_id}")
    if as_json:
        echo_json({"deleted": deleted, "failed": failed})
    if failed:
        leave(EXIT_USAGE)


@runs.command("prune")
@click.option(
    "--older-than",
    "older_than",
    metavar="AGE",
    required=True,
    help="Delete runs not updated for this long: 90m, 12h, 30d, 2w.",
)
@click.option(
    "--status",
    type=click.Choice(("pending", "success", "failure")),
    default=None,
    help="Only runs with this status.",
)
@click.option("--dry-run", is_flag=True, help="Say which runs would go; delete nothing.")
@store_option
@json_option
def runs_prune(
    older_than: str, status: str | None, dry_run: bool, store: str | None, as_json: bool
) -> None:
    """Delete old runs (running runs are always kept)."""
    from ablauf_lang import api

    age = parse_age(older_than, "--older-than")
    gone, kept = api.prune_runs(age, store_url(store), status=status, dry_run=dry_run)
    if as_json:
        echo_json({"deleted" if not dry_run else "would_delete": gone, "kept_running": kept})
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {len(gone)} run(s) not updated for {older_than}")
    if dry_run:
        for run_id in gone:
            click.echo(f"  {run_id}")
    if kept:
        click.echo(f"kept {len(kept)} running run(s): {', '.join(kept)}")


# ---------------------------------------------------------------- signal


@click.command("signal", context_settings={"ignore_unknown_options": True})
@click.argument("run_id", metavar="ID")
@click.argument("name", metavar="NAME")
@click.argument("value", metavar="[JSON]", required=False)
@store_option
@json_option
def signal(run_id: str, name: str, value: str | None, store: str | None, as_json: bool) -> None:
    """Send signal NAME to run ID, with a JSON value (none: null).

    The run's `(await!! :NAME)` takes it, now or when it gets there: each signal is
    delivered once, in order of arrival. A run that does not exist or has finished is
    refused (exit 2). ID may be any unambiguous prefix; JSON may be @FILE.

        ablauf signal 3f0c approval '{"by": "ana"}'
    """
    from ablauf_lang import api

    payload = parse_signal_value(value)
    url = store_url(store)
    with api.opened(url) as backend:
        run_id = api.resolve_run_id(run_id, backend)
        seq = api.signal(run_id, name, payload, store=backend)
    if as_json:
        echo_json({"run_id": run_id, "name": name.removeprefix(":"), "seq": seq})
    else:
        click.echo(f"sent signal {name.removeprefix(':')} to run {run_id} (#{seq})")


# ---------------------------------------------------------------- graph


@runs.command("graph")
@click.argument("run_id", metavar="ID")
@click.option(
    "-o",
    "--output",
    "output",
    metavar="FILE.svg|FILE.png",
    required=True,
    help="Where to write the picture (`-`: the SVG on standard output).",
)
@click.option(
    "--fold",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Draw a branch with more children than this as its first few and their counts "
    "by state (0: never).",
)
@store_option
def runs_graph(run_id: str, output: str, fold: int, store: str | None) -> None:
    """Draw a run as a picture: its job tree, each node coloured by its state.

    SVG needs nothing more; PNG needs cairosvg (pip install cairosvg).

        ablauf runs graph 3f0c -o run.svg
    """
    from ablauf_lang import api
    from ablauf_lang.ui.graph import picture_format, run_svg, write_picture

    if output != "-":
        try:
            picture_format(output)  # a bad name fails before the store is opened
        except AblaufError as exc:
            raise UserError(exc) from None
    with api.opened(store_url(store)) as backend:
        run_id = api.resolve_run_id(run_id, backend)
        stored = api.load_run(run_id, backend)
    job = stored.job
    title = f"run {run_id} · {stored.info.filename or '<program>'} · {job.status}"
    title += f" · restarts {job.restarts}"
    if job.aborted is not None:
        title += f" · aborted: {job.aborted}"
    svg = run_svg(job, title=title, fold=fold)
    if output == "-":
        click.echo(svg, nl=False)
        return
    try:
        write_picture(svg, output)
    except AblaufError as exc:
        raise UserError(exc) from None
    click.echo(f"wrote {output}")
