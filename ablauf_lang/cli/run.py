"""`ablauf run`, `ablauf check` and `ablauf repl`: a program file, here and now."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import click

from ablauf_lang.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    STDIN,
    STDIN_NAME,
    UserError,
    actions_option,
    break_option,
    concurrency_option,
    context_option,
    echo_json,
    error_dict,
    json_option,
    leave,
    parse_context,
    read_program,
    read_source,
    render_error,
    stderr_console,
    stdout_console,
    store_option,
    store_url,
)
from ablauf_lang.cli.drive import LiveProgress, drive_and_finish
from ablauf_lang.errors import AblaufError

if TYPE_CHECKING:
    from ablauf_lang.api import Action, Node, Run

# `ablauf run --concurrency` when not given (the runner's own default).
DEFAULT_CONCURRENCY = 32


def _duration(text: str | None, option: str) -> float | None:
    """A duration option's seconds; a usage error (exit 2) naming the option when bad."""
    if text is None:
        return None
    from ablauf_lang.stdlib.durations import parse_duration

    try:
        return parse_duration(text)
    except AblaufError as exc:
        raise UserError(f"ablauf: error: {option}: {exc.message}") from None


def _unknown_actions(
    root: Node, actions: dict[str, Action] | None, spec: str | None, name: str, source: str
) -> list[AblaufError]:
    from ablauf_lang import api

    return api.unknown_actions(root, actions, spec, filename=name, source=source)


@click.command()
@click.argument("file", metavar="FILE.abl")
@context_option
@actions_option
@store_option
@json_option
@click.option("-q", "--quiet", is_flag=True, help="No live progress, even on a terminal.")
@concurrency_option(
    DEFAULT_CONCURRENCY,
    "At most N actions at the same time, sync and async alike (each sync one in a "
    "thread of its own); the others wait their turn.",
    metavar="N",
)
@click.option(
    "--timeout",
    "deadline",
    metavar="DURATION",
    default=None,
    help="A deadline for the whole run (seconds, or 90s, 10m, 2h, 1d): past it, what is "
    "in flight becomes timeout and the run fails.",
)
@click.option(
    "--detach",
    is_flag=True,
    help="Return as soon as the run only waits (sleep!!, await!!, a retry's wait), leaving "
    "it to `ablauf worker` to wake (exit 0, status pending).",
)
@break_option
def run(
    file: str,
    context: str | None,
    actions: str | None,
    store: str | None,
    as_json: bool,
    quiet: bool,
    concurrency: int,
    deadline: str | None,
    detach: bool,
    breaks: tuple[str, ...],
) -> None:
    """Run a program to completion; exit 0 on success, 1 when the workflow fails.

    FILE `-` reads the program from standard input. On a terminal the job tree is shown
    live on stderr as it runs, with what it waits for. Ctrl-C (or SIGTERM) stops it,
    leaving the run recorded to resume later (exit 130); a sleep goes on with the time it
    had left.
    """
    from ablauf_lang import api

    source, name = read_program(file)
    ctx = parse_context(context)
    seconds = _duration(deadline, "--timeout")
    if detach and (store_url(store).startswith("memory:")):
        raise UserError(
            "ablauf: error: --detach needs a durable store (a worker wakes the run there)"
        )
    registry = api.load_actions(actions)
    # Compile once up front: a bad program is reported before any store is opened, and so
    # are actions nobody registered.
    root = api.compile(source, name)
    if breaks:
        api.with_breaks(root, breaks)  # an action the program does not use: exit 2 now
    unknown = _unknown_actions(root, registry, actions, name, source)
    if unknown:
        for error in unknown:
            click.echo(render_error(error), err=True)
        leave(EXIT_USAGE)
    url = store_url(store)
    run_id = api.new_run_id()
    err = stderr_console()
    progress = None if quiet or not err.is_terminal else LiveProgress(name, err)
    started = time.monotonic()

    def make(on_restart: Any, on_start: Any) -> Coroutine[Any, Any, Run]:
        return api.eval_async(
            source,
            registry,
            ctx,
            store=url,
            run_id=run_id,
            filename=name,
            on_restart=on_restart,
            concurrency=concurrency,
            on_start=on_start,
            timeout=seconds,
            detach=detach,
            breaks=breaks,
        )

    drive_and_finish(
        make,
        run_id=run_id,
        url=url,
        store_given=store is not None,
        as_json=as_json,
        progress=progress,
        started=started,
    )


@click.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE.abl...")
@click.option(
    "--actions",
    "actions",
    metavar="MODULE",
    default=None,
    help="Also report the actions a program names that neither MODULE nor the standard "
    "library defines.",
)
@click.option(
    "--tree", is_flag=True, help="Print each program's compiled tree (run-time parts as source)."
)
@click.option(
    "--graph",
    "graph",
    metavar="FILE.svg|FILE.png",
    default=None,
    help="Draw the program's tree as a picture (SVG; PNG when cairosvg is installed).",
)
@json_option
def check(
    files: tuple[str, ...], actions: str | None, tree: bool, graph: str | None, as_json: bool
) -> None:
    """Check programs without running them; exit 2 when any has an error.

    A FILE `-` reads a program from standard input. With --graph, the one program given
    is also drawn (nothing is written when it has an error).
    """
    from rich.text import Text

    from ablauf_lang import api
    from ablauf_lang.ui.render import program_tree, value_width

    if graph is not None:
        _picture_path(graph, len(files))
    registry = api.load_actions(actions)
    console = stdout_console()
    reports: list[dict[str, Any]] = []
    for path in files:
        report: dict[str, Any] = {"file": STDIN_NAME if path == STDIN else path, "ok": False}
        reports.append(report)
        try:
            source, name = read_program(path)
            root = api.compile(source, name)
        except UserError as exc:
            report["errors"] = [{"message": exc.message.removeprefix("ablauf: error: ")}]
            if not as_json:
                exc.show()
            continue
        except AblaufError as exc:
            report["errors"] = [error_dict(exc)]
            if not as_json:
                click.echo(render_error(exc), err=True)
            continue
        nodes = api.program_nodes(root)
        used = sorted(api.used_actions(root))  # templates of doseq!!/pmap!! included
        unknown = _unknown_actions(root, registry, actions, name, source) if actions else []
        report.update(nodes=len(nodes), actions=used)
        if unknown:
            report["errors"] = [error_dict(e) for e in unknown]
            if not as_json:
                for error in unknown:
                    click.echo(render_error(error), err=True)
            continue
        if graph is not None:
            from ablauf_lang.ui.graph import program_svg, write_picture

            try:
                write_picture(program_svg(root, title=report["file"]), graph)
            except AblaufError as exc:
                raise UserError(exc) from None
            report["graph"] = graph
        report["ok"] = True
        if tree:
            report["tree"] = nodes
        if not as_json:
            click.echo(f"{report['file']}: ok ({len(nodes)} nodes)")
            if graph is not None:
                click.echo(f"wrote {graph}")
            if tree:
                label = Text(report["file"], style="bold")
                console.print(
                    program_tree(root, label=label, width=value_width(console.width, 2)),
                    soft_wrap=True,
                )
    failed = sum(1 for r in reports if not r["ok"])
    if as_json:
        echo_json({"ok": failed == 0, "files": reports})
    if failed:
        leave(EXIT_USAGE)


def _picture_path(path: str, programs: int) -> None:
    """Refuse `check --graph` for more than one program, or a picture it cannot write
    (a name other than .svg/.png, a PNG without cairosvg): exit 2, before any work."""
    from ablauf_lang.ui.graph import picture_format

    if programs != 1:
        raise UserError("ablauf: error: --graph draws one program: give one FILE.abl")
    try:
        picture_format(path)
    except AblaufError as exc:
        raise UserError(exc) from None


@click.command()
@click.argument("file", required=False, metavar="[FILE.abl]")
@actions_option
@context_option
@click.option(
    "--live",
    is_flag=True,
    help="Waits use the real clock (default: a clock that moves only by :advance).",
)
@click.option(
    "--attach",
    "attach",
    metavar="RUN_ID",
    default=None,
    help="Open a recorded run (as :attach RUN_ID): step it here without touching it.",
)
@store_option
def repl(
    file: str | None,
    actions: str | None,
    context: str | None,
    live: bool,
    attach: str | None,
    store: str | None,
) -> None:
    """Step through workflows interactively (see :help inside).

    Enter a workflow form (or load FILE.abl) and step through it with :step, feed results
    by hand with :manual, :ok and :fail, undo with :back. A plain expression such as
    (+ 1 2) or (ctx :k) prints its value. Waits: :clock, :advance 10m, :signal NAME VALUE.
    Time travel: :history, :goto N, :attach RUN_ID, :fork; tests: :record FILE;
    breakpoints: :break ACTION|ID|(when EXPR), :continue; :plan.
    """
    from ablauf_lang import api
    from ablauf_lang.repl.app import Repl
    from ablauf_lang.runners.clock import SYSTEM

    registry = api.load_actions(actions)
    ctx = parse_context(context)
    if file is not None:
        read_source(file)  # a missing file is a usage error before the session starts
    if attach is not None:
        attach = api.resolve_run_id(attach, store_url(store))  # a run that is not there: exit 2
    app = Repl(
        actions=registry, context=ctx, console=stdout_console(), clock=SYSTEM if live else None
    )
    if file is not None:
        app.handle(f":load {file}")
    if attach is not None:
        app.handle(f":attach {shlex.quote(attach)} --store {shlex.quote(store_url(store))}")
    if sys.stdin.isatty():
        app.run()
    else:
        app.run_lines(sys.stdin)  # a script piped in: no prompt, inputs echoed
    leave(EXIT_OK)
