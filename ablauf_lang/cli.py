"""The `ablauf` command: run, check, repl, runs, worker, submit.

Exit codes: 0 success (or the command did its job), 1 the workflow failed, 2 bad usage,
bad syntax, a compile or store error, a missing file. Every `AblaufError` reaching the
command group is printed as its message (with file, line, column and caret when it has
them), never as a traceback. Heavy modules are imported inside the commands that use them.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import click

from ablauf_lang.errors import AblaufError

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from ablauf_lang.api import Run
    from ablauf_lang.job import Job
    from ablauf_lang.nodes import Dispatch, Result
    from ablauf_lang.stores.base import StoredRun

__all__ = ["cli", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# ---------------------------------------------------------------- errors


class UserError(click.ClickException):
    """An error in the user's input, shown as its own message; exit 2."""

    exit_code = EXIT_USAGE

    def __init__(self, error: AblaufError | str) -> None:
        super().__init__(error if isinstance(error, str) else render_error(error))

    def show(self, file: Any = None) -> None:
        click.echo(self.message, file=file or sys.stderr)


def render_error(exc: AblaufError) -> str:
    """`FILE:LINE:COL: error: message` with caret; `ablauf: error: message` when unlocated."""
    if exc.filename is None and exc.line is None:
        return f"ablauf: error: {exc.message}"
    return exc.render()


class AblaufGroup(click.Group):
    """The command group: turns language and store errors into messages and exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AblaufError as exc:
            raise UserError(exc) from None


# ---------------------------------------------------------------- helpers


def read_source(path: str) -> str:
    """The text of a program file; a one-line error when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"ablauf: error: {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"ablauf: error: {path}: is a directory, not a program file") from None
    except UnicodeDecodeError as exc:
        raise UserError(
            f"ablauf: error: {path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except OSError as exc:
        raise UserError(f"ablauf: error: {path}: cannot read ({exc.strerror})") from None


def parse_context(text: str | None) -> dict[str, Any] | None:
    """`--context JSON`: a JSON object, or `@FILE` holding one."""
    if text is None:
        return None
    where = "--context"
    if text.startswith("@"):
        where = f"--context {text}"
        text = read_source(text[1:])
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"ablauf: error: {where}: not valid JSON: {exc.msg} at line "
            f"{exc.lineno}, column {exc.colno}"
        ) from None
    if not isinstance(value, dict):
        raise UserError(
            f"ablauf: error: {where}: must be a JSON object such as "
            f'{{"key": "value"}}, not {type(value).__name__}'
        )
    return value


def load_actions(spec: str | None) -> dict[str, Callable[..., Any]] | None:
    """`--actions MODULE`: the module's actions (None when not given)."""
    if spec is None:
        return None
    from ablauf_lang.actions_registry import load_actions as load

    return load(spec)


def store_url(url: str | None) -> str:
    """`--store URL`, else `$ABLAUF_STORE`, else the SQLite file in the user's data dir."""
    from ablauf_lang.stores.base import default_url

    return url or default_url()


def json_default(value: Any) -> Any:
    """Make values JSON cannot say (tuples are lists already) printable."""
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return str(value)


def echo_json(data: Any) -> None:
    """Print data as JSON on stdout, and nothing else."""
    click.echo(json.dumps(data, default=json_default, ensure_ascii=False))


def stdout_console() -> Console:
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 160  # piped: 80 columns would cut tables and trees short
    return console


def stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def print_outcome(run: Run, elapsed: float | None, console: Console) -> None:
    """The result of a run: status, id, failed steps, context."""
    from rich.text import Text

    from ablauf_lang.nodes import LeafState
    from ablauf_lang.render import format_value, status_text

    line = Text()
    line.append_text(status_text(run.status))
    line.append(f"  run {run.run_id}  restarts {run.job.restarts}", style="dim")
    if elapsed is not None:
        line.append(f"  {elapsed:.2f}s", style="dim")
    console.print(line, soft_wrap=True)
    for leaf in run.job.leaves():
        if leaf.result in (LeafState.FAILURE, LeafState.TIMEOUT):
            err = Text(f"  #{leaf.id} {leaf.action} {leaf.result}: ", style="red")
            err.append(format_value(leaf.error, 200))
            console.print(err, soft_wrap=True)
    if run.context:
        console.print(
            Text("context ", style="dim") + Text(format_value(run.context, 400)), soft_wrap=True
        )


def exit_for(run: Run) -> NoReturn:
    """Exit 0 when the run succeeded, 1 otherwise."""
    from ablauf_lang.nodes import Status

    sys.exit(EXIT_OK if run.status is Status.SUCCESS else EXIT_FAILED)


# ---------------------------------------------------------------- live progress


class LiveProgress:
    """The job tree with each node's state, and the elapsed time; redrawn by rich Live."""

    def __init__(self, title: str, console: Console, max_nodes: int | None = None) -> None:
        self.title = title
        self.console = console
        self.started = time.monotonic()
        self.job: Job | None = None
        self.dispatched = 0
        self.finished = 0
        self.failed = 0
        # Keep the tree within the terminal; bigger jobs show counts instead.
        self.max_nodes = max_nodes if max_nodes is not None else max(console.height - 4, 5)

    def on_restart(self, job: Job, dispatches: list[Dispatch], results: list[Result]) -> None:
        """The runner's hook: called after every restart (cheap: counts only)."""
        self.job = job
        self.dispatched += len(dispatches)
        for r in results:
            self.finished += 1
            self.failed += not r.ok

    def __rich__(self) -> RenderableType:
        from rich.text import Text

        from ablauf_lang.render import job_tree, status_text

        job = self.job
        head = Text(f"{self.title}  ", style="bold")
        if job is None:
            head.append("starting…", style="dim")
            return head
        head.append_text(status_text(job.status))
        head.append(
            f"  {time.monotonic() - self.started:.1f}s  restarts {job.restarts}  "
            f"running {job.inflight}  finished {self.finished}",
            style="dim",
        )
        if self.failed:
            head.append(f"  failed {self.failed}", style="red")
        if len(job.paths) > self.max_nodes:
            head.append(f"  ({len(job.paths)} nodes)", style="dim")
            return head
        return job_tree(job, label=head, width=max(16, self.console.width // 3))


# ---------------------------------------------------------------- the group


@click.group(cls=AblaufGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ablauf_lang", prog_name="ablauf")
def cli() -> None:
    """ablauf: run, check and explore durable workflow programs (.abl files)."""


store_option = click.option(
    "--store",
    "store",
    metavar="URL",
    default=None,
    help="Where runs are recorded: memory:, sqlite:///path or postgresql://... "
    "[default: $ABLAUF_STORE, else SQLite in the user data directory]",
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the result as JSON on stdout, and nothing else."
)
actions_option = click.option(
    "--actions",
    "actions",
    metavar="MODULE",
    default=None,
    help="Python module (dotted name or .py path) exposing ACTIONS or @action functions.",
)
context_option = click.option(
    "--context",
    "context",
    metavar="JSON",
    default=None,
    help="Initial context: a JSON object, or @FILE holding one.",
)


# ---------------------------------------------------------------- run


@cli.command()
@click.argument("file", metavar="FILE.abl")
@context_option
@actions_option
@store_option
@json_option
@click.option("-q", "--quiet", is_flag=True, help="No live progress, even on a terminal.")
def run(
    file: str,
    context: str | None,
    actions: str | None,
    store: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Run a program to completion; exit 0 on success, 1 when the workflow fails.

    On a terminal the job tree is shown live on stderr as it runs.
    """
    from ablauf_lang.api import compile as compile_source
    from ablauf_lang.api import eval_async
    from ablauf_lang.stores.base import new_run_id

    source = read_source(file)
    ctx = parse_context(context)
    registry = load_actions(actions)
    # Compile once up front: a bad program is reported before any store is opened.
    compile_source(source, file)
    url = store_url(store)
    run_id = new_run_id()
    err = stderr_console()
    progress = None if quiet or not err.is_terminal else LiveProgress(file, err)
    started = time.monotonic()

    async def go() -> Run:
        hook = progress.on_restart if progress is not None else None
        return await eval_async(
            source, registry, ctx, store=url, run_id=run_id, filename=file, on_restart=hook
        )

    try:
        if progress is None:
            result = asyncio.run(go())
        else:
            from rich.live import Live

            with Live(
                console=err,
                get_renderable=progress.__rich__,
                refresh_per_second=8,
                transient=False,
                redirect_stdout=False,
                redirect_stderr=False,
            ):
                result = asyncio.run(go())
    except KeyboardInterrupt:
        click.echo(
            f"ablauf: interrupted; run {run_id} is recorded in {url}: go on with "
            f"`ablauf runs resume {run_id} --store {url}`",
            err=True,
        )
        sys.exit(130)
    if as_json:
        echo_json(result.to_dict())
    else:
        print_outcome(result, time.monotonic() - started, stdout_console())
    exit_for(result)


# ---------------------------------------------------------------- check


@cli.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE.abl...")
def check(files: tuple[str, ...]) -> None:
    """Check programs without running them; exit 2 when any has an error."""
    from ablauf_lang.api import compile as compile_source

    failed = 0
    for path in files:
        try:
            source = read_source(path)
            root = compile_source(source, path)
        except UserError as exc:
            exc.show()
            failed += 1
            continue
        except AblaufError as exc:
            click.echo(render_error(exc), err=True)
            failed += 1
            continue
        count = sum(1 for _ in _preorder(root))
        click.echo(f"{path}: ok ({count} nodes)")
    if failed:
        sys.exit(EXIT_USAGE)


def _preorder(root: Any) -> Any:
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(getattr(node, "children", ()))


# ---------------------------------------------------------------- repl


@cli.command()
@click.argument("file", required=False, metavar="[FILE.abl]")
@actions_option
@context_option
def repl(file: str | None, actions: str | None, context: str | None) -> None:
    """Step through workflows interactively (see :help inside).

    Enter a workflow form (or load FILE.abl) and step through it with :step, feed results
    by hand with :manual, :ok and :fail, undo with :back.
    """
    from ablauf_lang.repl.app import Repl

    registry = load_actions(actions)
    ctx = parse_context(context)
    if file is not None:
        read_source(file)  # a missing file is a usage error before the session starts
    app = Repl(actions=registry, context=ctx)
    if file is not None:
        app.handle(f":load {file}")
    if sys.stdin.isatty():
        app.run()
    else:
        app.run_lines(sys.stdin)  # a script piped in: no prompt, inputs echoed


# ---------------------------------------------------------------- runs


@cli.group(cls=AblaufGroup)
def runs() -> None:
    """List, inspect, resume, retry and abort recorded runs."""


@runs.command("list")
@store_option
@json_option
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Newest N runs only.")
def runs_list(store: str | None, as_json: bool, limit: int | None) -> None:
    """List runs, newest first."""
    from rich.table import Table

    from ablauf_lang.render import status_text
    from ablauf_lang.stores.base import open_store

    backend = open_store(store_url(store))
    try:
        infos = backend.list_runs(limit=limit)
    finally:
        backend.close()
    if as_json:
        echo_json([info.to_dict() for info in infos])
        return
    console = stdout_console()
    if not infos:
        console.print("no runs", style="dim")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("run", "status", "created", "updated", "restarts", "file"):
        table.add_column(col, no_wrap=col != "file")
    for info in infos:
        table.add_row(
            info.run_id,
            status_text(info.status),
            _when(info.created),
            _when(info.updated),
            str(info.restarts),
            info.filename or "",
        )
    console.print(table)


def _when(stamp: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(stamp).isoformat(sep=" ", timespec="seconds")


@runs.command("show")
@click.argument("run_id", metavar="ID")
@store_option
@json_option
def runs_show(run_id: str, store: str | None, as_json: bool) -> None:
    """Show a run: its status, its job tree with each node's state, its context."""
    from ablauf_lang.stores.base import open_store

    backend = open_store(store_url(store))
    try:
        stored = backend.load(run_id)
    finally:
        backend.close()
    if as_json:
        echo_json(_stored_dict(stored))
        return
    from rich.text import Text

    from ablauf_lang.render import format_value, job_tree, status_text

    console = stdout_console()
    info = stored.info
    head = Text(f"run {info.run_id}  ", style="bold")
    head.append_text(status_text(stored.job.status))
    head.append(
        f"  created {_when(info.created)}  updated {_when(info.updated)}  "
        f"restarts {stored.job.restarts}",
        style="dim",
    )
    if info.filename:
        head.append(f"  {info.filename}", style="dim")
    console.print(
        job_tree(stored.job, label=head, width=max(16, console.width // 3)), soft_wrap=True
    )
    console.print(Text("context ", style="dim") + Text(format_value(stored.job.context, 0)))


def _stored_dict(stored: StoredRun) -> dict[str, Any]:
    from ablauf_lang.semantics import state_of

    data = stored.info.to_dict()
    data["status"] = str(stored.job.status)
    data["context"] = stored.job.context
    data["initial_context"] = stored.initial_context
    data["nodes"] = [
        {
            "id": n.id,
            "kind": n.kind,
            "state": state_of(n),
            "children": [c.id for c in getattr(n, "children", ())],
            **(
                {
                    "action": n.action,
                    "payload": n.payload,
                    "output": n.output,
                    "error": n.error,
                    "attempt": n.attempt,
                }
                if n.kind == "leaf"
                else {}
            ),
        }
        for n in stored.job.nodes()
    ]
    return data


def _finish(result: Run, as_json: bool) -> NoReturn:
    if as_json:
        echo_json(result.to_dict())
    else:
        print_outcome(result, None, stdout_console())
    exit_for(result)


queue_option = click.option(
    "--queue",
    is_flag=True,
    help="Hand the run back to the workers of its PostgreSQL store instead of running it "
    "here; prints the run id.",
)


def _run_again(
    run_id: str, actions: str | None, store: str | None, as_json: bool, queue: bool, retry: bool
) -> NoReturn:
    url = store_url(store)
    if queue:
        if actions is not None:
            raise UserError(
                "ablauf: error: --actions is not used with --queue: the workers have their own"
            )
        _worker_module().requeue(run_id, url, retry=retry)
        if as_json:
            echo_json({"run_id": run_id, "status": "pending"})
        else:
            click.echo(run_id)
        sys.exit(EXIT_OK)
    from ablauf_lang import api

    again = api.retry if retry else api.resume
    _finish(again(run_id, store=url, actions=load_actions(actions)), as_json)


@runs.command("resume")
@click.argument("run_id", metavar="ID")
@actions_option
@store_option
@json_option
@queue_option
def runs_resume(
    run_id: str, actions: str | None, store: str | None, as_json: bool, queue: bool
) -> None:
    """Go on with an unfinished run (after a crash or an interrupt)."""
    _run_again(run_id, actions, store, as_json, queue, retry=False)


@runs.command("retry")
@click.argument("run_id", metavar="ID")
@actions_option
@store_option
@json_option
@queue_option
def runs_retry(
    run_id: str, actions: str | None, store: str | None, as_json: bool, queue: bool
) -> None:
    """Run a failed run's failed steps again and go on."""
    _run_again(run_id, actions, store, as_json, queue, retry=True)


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
    from ablauf_lang.api import abort_run

    result = abort_run(run_id, store=store_url(store), reason=reason)
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(f"aborted run {run_id} ({result.status}): {reason}")


# ---------------------------------------------------------------- distributed


def _worker_module() -> Any:
    try:
        worker = importlib.import_module("ablauf_lang.runners.worker")
    except ImportError as exc:
        raise UserError(f"ablauf: error: distributed execution is not available: {exc}") from None
    return worker


@cli.command()
@store_option
@actions_option
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Actions performed at the same time by this worker.",
)
@click.option(
    "--lease",
    type=click.FloatRange(min=1.0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long an action taken by this worker stays its own without a renewal; a dead "
    "worker's actions are recovered by the others after this long.",
)
@click.option(
    "--poll",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="How often an idle worker looks at the queue besides being woken by NOTIFY.",
)
def worker(
    store: str | None, actions: str | None, concurrency: int, lease: float, poll: float
) -> None:
    """Serve runs from a shared store until stopped (SIGTERM or Ctrl-C)."""
    module = _worker_module()
    registry = load_actions(actions) or {}
    try:
        module.run_worker(
            store_url(store), registry, concurrency=concurrency, lease=lease, poll=poll
        )
    except KeyboardInterrupt:
        click.echo("ablauf: worker stopped", err=True)


@cli.command()
@click.argument("file", metavar="FILE.abl")
@store_option
@context_option
@json_option
def submit(file: str, store: str | None, context: str | None, as_json: bool) -> None:
    """Queue a program for the workers of a shared store; print its run id."""
    module = _worker_module()
    source = read_source(file)
    ctx = parse_context(context)
    run_id = module.submit(source, store_url(store), context=ctx, filename=file)
    if as_json:
        echo_json({"run_id": run_id, "status": "pending"})
    else:
        click.echo(run_id)


# ---------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: `ablauf ...`."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="ablauf")
    except BrokenPipeError:
        # The reader of our output went away (`ablauf runs list | head`): not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_OK)
