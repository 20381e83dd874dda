"""The `ablauf` command: run, check, repl, runs, worker, submit.

Exit codes are 0, 1, 2 and 130, nothing else: 0 success (or the command did its job),
1 the workflow failed, 2 bad usage, bad syntax, a compile or store error, a missing file,
unknown actions (and an internal error), 130 interrupted (Ctrl-C or SIGTERM). Every
`AblaufError` reaching the command group is printed as its message (with file, line,
column and caret when it has them); any other exception as one line `ablauf: internal
error: ...`: never a traceback, unless `ABLAUF_DEBUG=1`. Heavy modules are imported
inside the commands that use them.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, NoReturn

import click

from ablauf_lang.errors import AblaufError

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from rich.console import Console, RenderableType

    from ablauf_lang.engine.job import Job
    from ablauf_lang.engine.nodes import Dispatch, Node, Result
    from ablauf_lang.runners.local import Run
    from ablauf_lang.stores.base import StoredRun

__all__ = ["cli", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_CODES = frozenset({EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED})

# `ablauf run --concurrency` when not given (the runner's own default).
DEFAULT_CONCURRENCY = 32
STDIN = "-"
STDIN_NAME = "<stdin>"

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


def debug() -> bool:
    """`ABLAUF_DEBUG=1`: let unexpected exceptions through with their traceback."""
    return os.environ.get("ABLAUF_DEBUG", "") not in ("", "0")


def internal_error(exc: BaseException) -> str:
    """The one line an unexpected exception (a bug) is shown as."""
    try:
        detail = str(exc).splitlines()[0][:300] if str(exc).strip() else ""
    except Exception:  # a broken __str__ must not hide the error
        detail = ""
    what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return f"ablauf: internal error: {what} (please report it; ABLAUF_DEBUG=1 shows where)"


class AblaufGroup(click.Group):
    """The command group: turns language and store errors into messages and exit 2, and
    any other exception into one `internal error` line and exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AblaufError as exc:
            raise UserError(exc) from None
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except RecursionError:
            if debug():
                raise
            raise UserError("ablauf: error: the input is nested too deeply") from None
        except Exception as exc:
            if debug():
                raise
            raise UserError(internal_error(exc)) from None


# ---------------------------------------------------------------- helpers


def read_source(path: str, what: str = "a program file") -> str:
    """The text of a file (`-`: standard input); a one-line error when it cannot be read."""
    try:
        if path == STDIN:
            stream = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else None
            if stream is None:
                return sys.stdin.read()
            return stream.read().decode("utf-8")
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"ablauf: error: {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"ablauf: error: {path}: is a directory, not {what}") from None
    except UnicodeDecodeError as exc:
        name = STDIN_NAME if path == STDIN else path
        raise UserError(
            f"ablauf: error: {name}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except OSError as exc:
        raise UserError(f"ablauf: error: {path}: cannot read ({exc.strerror})") from None


def read_program(path: str) -> tuple[str, str]:
    """A program's text and the name its messages use (`<stdin>` for `-`)."""
    return read_source(path), STDIN_NAME if path == STDIN else path


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (write null, or a string)")


def parse_context(text: str | None) -> dict[str, Any] | None:
    """`--context JSON`: a JSON object, or `@FILE` holding one (`@-`: standard input).

    Strict JSON: `NaN` and `Infinity` are refused. What `--json` prints for a map with
    keys that are not strings (`{"$map": [[key, value], ...]}`) is read back as that map.
    """
    if text is None:
        return None
    where = "--context"
    if text.startswith("@"):
        where = f"--context {text}"
        text = read_source(text[1:], "a JSON file")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"ablauf: error: {where}: not valid JSON: {exc.msg} at line "
            f"{exc.lineno}, column {exc.colno}"
        ) from None
    except ValueError as exc:  # NaN, Infinity; an integer too long to read
        raise UserError(f"ablauf: error: {where}: not valid JSON: {exc}") from None
    except RecursionError:
        raise UserError(f"ablauf: error: {where}: nested too deeply") from None
    if not isinstance(value, dict):
        raise UserError(
            f"ablauf: error: {where}: must be a JSON object such as "
            f'{{"key": "value"}}, not {type(value).__name__}'
        )
    try:
        from ablauf_lang.values import from_plain_json
    except ImportError:  # pragma: no cover - the values module is part of the package
        return value
    decoded = from_plain_json(value)
    return decoded if isinstance(decoded, dict) else value


def load_actions(spec: str | None) -> dict[str, Callable[..., Any]] | None:
    """`--actions MODULE`: the module's actions (None when not given)."""
    if spec is None:
        return None
    from ablauf_lang.stdlib.registry import load_actions as load

    return load(spec)


def check_actions(
    root: Node, actions: dict[str, Any] | None, spec: str | None, name: str, source: str
) -> list[AblaufError]:
    """Errors for the actions a compiled program names that nobody registered."""
    from ablauf_lang.runners.local import registry
    from ablauf_lang.stdlib.registry import unknown_action_errors

    return unknown_action_errors(root, registry(actions), spec, filename=name, source=source)


def store_url(url: str | None) -> str:
    """`--store URL`, else `$ABLAUF_STORE`, else the SQLite file in the user's data dir."""
    from ablauf_lang.stores.base import default_url

    if url is not None and not url.strip():
        raise UserError(
            "ablauf: error: --store is empty: give a URL (memory:, sqlite:///path, "
            "postgresql://...) or leave the option out"
        )
    return url or default_url()


def json_default(value: Any) -> Any:
    """Make values JSON cannot say (tuples are lists already) printable."""
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return str(value)


def json_text(data: Any) -> str:
    """`data` as one JSON document (map keys that are not strings, run-time expressions
    and deep values as `ablauf_lang.values` says)."""
    try:
        from ablauf_lang.values import dumps_json
    except ImportError:  # pragma: no cover - the values module is part of the package
        return json.dumps(data, default=json_default, ensure_ascii=False)
    return dumps_json(data)


def echo_json(data: Any) -> None:
    """Print data as JSON on stdout, and nothing else."""
    click.echo(json_text(data))


def stdout_console() -> Console:
    from rich.console import Console

    from ablauf_lang.ui.render import FULL_WIDTH

    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = FULL_WIDTH  # piped: whole lines, for scripts and files
    return console


def stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def print_outcome(run: Run, elapsed: float | None, console: Console) -> None:
    """The result of a run: status, id, failed steps, context."""
    from rich.text import Text

    from ablauf_lang.engine.nodes import LeafState
    from ablauf_lang.ui.render import FULL_WIDTH, format_value, status_text

    full = console.width >= FULL_WIDTH
    line = Text()
    line.append_text(status_text(run.status))
    line.append(f"  run {run.run_id}  restarts {run.job.restarts}", style="dim")
    if elapsed is not None:
        line.append(f"  {elapsed:.2f}s", style="dim")
    if run.job.aborted is not None:
        line.append(f"  aborted: {run.job.aborted}", style="red")
    console.print(line, soft_wrap=True)
    for leaf in run.job.leaves():
        if leaf.result in (LeafState.FAILURE, LeafState.TIMEOUT):
            err = Text(f"  #{leaf.id} {leaf.action} {leaf.result}: ", style="red")
            err.append(format_value(leaf.error, 0 if full else 200))
            console.print(err, soft_wrap=True)
    if run.context:
        console.print(
            Text("context ", style="dim") + Text(format_value(run.context, 0 if full else 400)),
            soft_wrap=True,
        )


def exit_for(run: Run) -> NoReturn:
    """Exit 0 when the run succeeded, 1 otherwise."""
    from ablauf_lang.engine.nodes import Status

    leave(EXIT_OK if run.status is Status.SUCCESS else EXIT_FAILED)


def leave(code: int) -> NoReturn:
    """Exit with `code`; at once when an interrupted action still runs in a thread (it is
    abandoned: nothing may wait for it, and it must not write while Python shuts down)."""
    from ablauf_lang.runners.local import abandoned_threads

    # Only as the program itself: a caller that swapped the streams (a test runner, an
    # embedding) gets a plain SystemExit.
    if abandoned_threads() and sys.stdout is sys.__stdout__:
        for stream in (sys.stdout, sys.stderr):
            with suppress(OSError, ValueError, AttributeError):
                stream.flush()  # type: ignore[union-attr]
        os._exit(code)
    sys.exit(code)


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """What actions print goes to stderr (`--json`: stdout holds one JSON document only).

    Python's `sys.stdout` is swapped, and when stdout is a real file descriptor it is
    pointed at stderr too, so child processes an action starts write there as well.
    """
    saved = sys.stdout
    fd_copy: int | None = None
    try:
        if saved.fileno() == 1 and sys.stderr.fileno() == 2:
            saved.flush()
            fd_copy = os.dup(1)
            os.dup2(2, 1)
    except (AttributeError, OSError, ValueError):
        fd_copy = None  # not a real stream (tests, embedding): sys.stdout alone is enough
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = saved
        if fd_copy is not None:
            with suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(fd_copy, 1)
            os.close(fd_copy)


# ---------------------------------------------------------------- driving a run here


def _signal_name(signum: int) -> str:
    return "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"


def _run_recorded(url: str, run_id: str) -> bool:
    from ablauf_lang.stores.base import open_store

    try:
        backend = open_store(url)
        try:
            return bool(backend.exists(run_id))
        finally:
            backend.close()
    except Exception:  # the store is unreachable now: say what to try anyway
        return True


def resume_hint(run_id: str, url: str, store_given: bool) -> str:
    """The command that goes on with an interrupted run."""
    store = f" --store {url}" if store_given else ""
    return f"ablauf runs resume {run_id}{store}"


def drive(
    make: Callable[[Any, Any], Coroutine[Any, Any, Run]],
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
    from ablauf_lang.runners.local import Interrupted, interruptible

    hint = resume_hint(run_id, url, store_given)

    def second(signum: int) -> None:
        try:
            sys.stderr.write(f"ablauf: interrupted again; go on with `{hint}`\n")
            sys.stderr.flush()
        finally:
            os._exit(EXIT_INTERRUPTED)

    from ablauf_lang.names import LOG_ACTION
    from ablauf_lang.ui.render import format_value

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
                with stdout_to_stderr() if as_json else _nothing():
                    if progress is None:
                        return asyncio.run(make(on_restart, on_start))
                    from rich.live import Live

                    with Live(
                        console=progress.console,
                        get_renderable=progress.__rich__,
                        refresh_per_second=8,
                        transient=False,
                        redirect_stdout=False,
                        redirect_stderr=False,
                    ):
                        return asyncio.run(make(on_restart, on_start))
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


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# ---------------------------------------------------------------- live progress


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
        if len(job.paths) > self.max_nodes:
            head.append(f"  ({len(job.paths)} nodes)", style="dim")
            return head
        return job_tree(
            job, label=head, width=max(16, self.console.width // 3), timing=dict(self.began)
        )


# ---------------------------------------------------------------- the group


@click.group(cls=AblaufGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ablauf_lang", prog_name="ablauf")
def cli() -> None:
    """ablauf: run, check and explore durable workflow programs (.abl files).

    Exit codes: 0 success, 1 the workflow failed, 2 bad input (or an internal error),
    130 interrupted.
    """


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
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    metavar="N",
    help="At most N actions at the same time, sync and async alike (each sync one in a "
    "thread of its own); the others wait their turn.",
)
def run(
    file: str,
    context: str | None,
    actions: str | None,
    store: str | None,
    as_json: bool,
    quiet: bool,
    concurrency: int,
) -> None:
    """Run a program to completion; exit 0 on success, 1 when the workflow fails.

    FILE `-` reads the program from standard input. On a terminal the job tree is shown
    live on stderr as it runs. Ctrl-C (or SIGTERM) stops it, leaving the run recorded to
    resume later (exit 130).
    """
    from ablauf_lang.api import compile as compile_source
    from ablauf_lang.api import eval_async
    from ablauf_lang.stores.base import new_run_id

    source, name = read_program(file)
    ctx = parse_context(context)
    registry = load_actions(actions)
    # Compile once up front: a bad program is reported before any store is opened, and so
    # are actions nobody registered.
    root = compile_source(source, name)
    unknown = check_actions(root, registry, actions, name, source)
    if unknown:
        for error in unknown:
            click.echo(render_error(error), err=True)
        leave(EXIT_USAGE)
    url = store_url(store)
    run_id = new_run_id()
    err = stderr_console()
    progress = None if quiet or not err.is_terminal else LiveProgress(name, err)
    started = time.monotonic()

    def make(on_restart: Any, on_start: Any) -> Coroutine[Any, Any, Run]:
        return eval_async(
            source,
            registry,
            ctx,
            store=url,
            run_id=run_id,
            filename=name,
            on_restart=on_restart,
            concurrency=concurrency,
            on_start=on_start,
        )

    result = drive(
        make,
        run_id=run_id,
        url=url,
        store_given=store is not None,
        as_json=as_json,
        progress=progress,
    )
    if as_json:
        echo_json(result.to_dict())
    else:
        print_outcome(result, time.monotonic() - started, stdout_console())
    exit_for(result)


# ---------------------------------------------------------------- check


@cli.command()
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
@json_option
def check(files: tuple[str, ...], actions: str | None, tree: bool, as_json: bool) -> None:
    """Check programs without running them; exit 2 when any has an error.

    A FILE `-` reads a program from standard input.
    """
    from rich.text import Text

    from ablauf_lang.api import compile as compile_source
    from ablauf_lang.stdlib.registry import used_actions
    from ablauf_lang.ui.render import program_tree, value_width

    registry = load_actions(actions)
    console = stdout_console()
    reports: list[dict[str, Any]] = []
    for path in files:
        report: dict[str, Any] = {"file": STDIN_NAME if path == STDIN else path, "ok": False}
        reports.append(report)
        try:
            source, name = read_program(path)
            root = compile_source(source, name)
        except UserError as exc:
            report["errors"] = [{"message": exc.message.removeprefix("ablauf: error: ")}]
            if not as_json:
                exc.show()
            continue
        except AblaufError as exc:
            report["errors"] = [_error_dict(exc)]
            if not as_json:
                click.echo(render_error(exc), err=True)
            continue
        nodes = list(_preorder(root))
        used = sorted(used_actions(root))  # templates of doseq!!/pmap!! included
        unknown = check_actions(root, registry, actions, name, source) if actions else []
        report.update(nodes=len(nodes), actions=used)
        if unknown:
            report["errors"] = [_error_dict(e) for e in unknown]
            if not as_json:
                for error in unknown:
                    click.echo(render_error(error), err=True)
            continue
        report["ok"] = True
        if tree:
            report["tree"] = [_node_dict(n) for n in _preorder(root)]
        if not as_json:
            click.echo(f"{report['file']}: ok ({len(nodes)} nodes)")
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


def _error_dict(exc: AblaufError) -> dict[str, Any]:
    return {"message": exc.message, "file": exc.filename, "line": exc.line, "column": exc.column}


def _node_dict(node: Any) -> dict[str, Any]:
    """A compiled node for `check --tree --json` (pre-order; templates nested flat)."""
    data: dict[str, Any] = {"id": node.id, "kind": node.kind}
    if node.kind == "leaf":
        data.update(action=node.action, payload=node.payload, idempotent=node.idempotent)
    for attr in ("test", "var", "coll"):
        if hasattr(node, attr):
            data[attr] = getattr(node, attr)
    data["children"] = [c.id for c in getattr(node, "children", ())]
    template = getattr(node, "template", None)
    if template is not None:
        data["template"] = [_node_dict(n) for n in _preorder(template)]
    return data


def _preorder(root: Any) -> Iterator[Any]:
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(list(getattr(node, "children", ()))))


# ---------------------------------------------------------------- repl


@cli.command()
@click.argument("file", required=False, metavar="[FILE.abl]")
@actions_option
@context_option
def repl(file: str | None, actions: str | None, context: str | None) -> None:
    """Step through workflows interactively (see :help inside).

    Enter a workflow form (or load FILE.abl) and step through it with :step, feed results
    by hand with :manual, :ok and :fail, undo with :back. A plain expression such as
    (+ 1 2) or (ctx :k) prints its value.
    """
    from ablauf_lang.repl.app import Repl

    registry = load_actions(actions)
    ctx = parse_context(context)
    if file is not None:
        read_source(file)  # a missing file is a usage error before the session starts
    app = Repl(actions=registry, context=ctx, console=_repl_console())
    if file is not None:
        app.handle(f":load {file}")
    if sys.stdin.isatty():
        app.run()
    else:
        app.run_lines(sys.stdin)  # a script piped in: no prompt, inputs echoed
    leave(EXIT_OK)


def _repl_console() -> Console:
    from rich.console import Console

    from ablauf_lang.ui.render import FULL_WIDTH

    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = FULL_WIDTH  # a transcript: whole lines
    return console


# ---------------------------------------------------------------- runs

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


@cli.group(cls=AblaufGroup)
def runs() -> None:
    """List, inspect, resume, retry, abort and delete recorded runs.

    An ID may be given by any unambiguous prefix (`ablauf runs show 3f0c`).
    """


def _open(store: str | None) -> Any:
    from ablauf_lang.stores.base import open_store

    return open_store(store_url(store))


def _resolve(backend: Any, run_id: str) -> str:
    """The full id of the run `run_id` names (a whole id or an unambiguous prefix)."""
    return str(backend.resolve_run_id(run_id))


def _state_text(info: Any) -> Any:
    from rich.text import Text

    return Text(info.label(), style=_STATE_STYLE.get(info.state, "bold"))


def _note(info: Any, width: int = 80) -> str:
    """What a listing says beside a run: its damage, abort reason or error, on one line."""
    text = info.damage or (f"aborted: {info.aborted}" if info.aborted is not None else None)
    text = text or info.error or ""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


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
def runs_list(
    store: str | None,
    as_json: bool,
    state: str | None,
    filename: str | None,
    since: str | None,
    limit: int,
    offset: int,
) -> None:
    """List runs, newest first (a page of --limit runs; a note says when there are more)."""
    from rich.table import Table

    from ablauf_lang.stores.base import parse_since

    when = None if since is None else parse_since(since)
    status = state if state in ("pending", "success", "failure") else None
    if state in ("running", "abandoned"):
        status = "pending"
    elif state == "aborted":
        status = "failure"
    backend = _open(store)
    try:
        if state in (None, "pending", "success", "failure"):  # what the store keeps
            infos = backend.list_runs(
                limit=limit, offset=offset, status=status, filename=filename, since=when
            )
            total = backend.count_runs(status=status, filename=filename, since=when)
        else:  # a state the store does not keep: sort them out here
            every = [
                i
                for i in backend.list_runs(status=status, filename=filename, since=when)
                if i.state == state
            ]
            infos, total = every[offset : offset + limit], len(every)
    finally:
        backend.close()
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


def _when(stamp: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(stamp).isoformat(sep=" ", timespec="seconds")


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
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05),
    default=0.5,
    show_default=True,
    metavar="SECONDS",
    help="How often --follow reads the store.",
)
def runs_show(run_id: str, store: str | None, as_json: bool, follow: bool, interval: float) -> None:
    """Show a run: its state, its job tree with each node's state, its context."""
    backend = _open(store)
    try:
        run_id = _resolve(backend, run_id)
        stored = backend.load(run_id)
        drawn = False  # the live view's last frame already shows the end
        if follow:
            stored, drawn = _follow(backend, run_id, stored, interval, quiet=as_json)
    finally:
        backend.close()
    if as_json:
        echo_json(_stored_dict(stored))
    elif not drawn:
        stdout_console().print(_show(stored, stdout_console()), soft_wrap=True)
    if follow:
        from ablauf_lang.engine.nodes import Status

        leave(EXIT_OK if stored.job.status is Status.SUCCESS else EXIT_FAILED)


def _show(stored: StoredRun, console: Console) -> RenderableType:
    """A run as text: a head line (state, times, file), its abort reason or error, the
    job tree and the context."""
    from rich.console import Group
    from rich.text import Text

    from ablauf_lang.ui.render import format_value, job_tree

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
    parts: list[Any] = [job_tree(stored.job, label=head, width=max(16, console.width // 3))]
    if info.aborted is not None:
        parts.append(Text("aborted: ", style="bold red") + Text(str(info.aborted)))
    elif info.error and info.state == "failure":
        parts.append(Text("error: ", style="red") + Text(info.error))
    if info.state == "abandoned":
        parts.append(
            Text(
                f"nobody is driving it: go on with `ablauf runs resume {info.run_id}`",
                style="magenta",
            )
        )
    parts.append(Text("context ", style="dim") + Text(format_value(stored.job.context, 0)))
    return Group(*parts)


def _follow(
    backend: Any, run_id: str, stored: StoredRun, interval: float, *, quiet: bool
) -> tuple[StoredRun, bool]:
    """Read the run again every `interval` seconds until it is no longer pending; on a
    terminal the tree is redrawn in place (then True: the end is on the screen), else a
    line is printed when its state changes."""
    from rich.live import Live

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
                    stored = backend.load(run_id)
                    live.update(_show(stored, console), refresh=True)
            return stored, True
        last = ""
        while not done(stored):
            text = line(stored)
            if text != last and not quiet:
                click.echo(text)
                last = text
            time.sleep(interval)
            stored = backend.load(run_id)
        return stored, False
    except KeyboardInterrupt:
        leave(EXIT_INTERRUPTED)


def _stored_dict(stored: StoredRun) -> dict[str, Any]:
    from ablauf_lang.engine.nodes import Leaf
    from ablauf_lang.engine.semantics import states

    data = stored.info.to_dict()
    data["status"] = str(stored.job.status)
    data["context"] = stored.job.context
    data["initial_context"] = stored.initial_context
    shown = states(stored.job.root)  # a branch that never ran says `skipped`
    data["nodes"] = [
        {
            "id": n.id,
            "kind": n.kind,
            "state": shown[n.id],
            "children": [c.id for c in getattr(n, "children", ())],
            **(
                {
                    "action": n.action,
                    # the payload as written (an expression kept as its source) and, for
                    # one computed at run time, the value that was sent
                    "payload": n.payload,
                    "sent": n.sent,
                    "output": n.output,
                    "error": n.error,
                    "attempt": n.attempt,
                    "dispatched_at": n.dispatched_at,
                    "started_at": n.started_at,
                    "finished_at": n.finished_at,
                }
                if isinstance(n, Leaf)
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
force_option = click.option(
    "--force",
    is_flag=True,
    help="Take the run over even if another live process drives it (that process's "
    "next write is then refused).",
)


def _run_again(
    run_id: str,
    actions: str | None,
    store: str | None,
    as_json: bool,
    queue: bool,
    retry: bool,
    force: bool,
) -> NoReturn:
    url = store_url(store)
    backend = _open(url)
    try:
        run_id = _resolve(backend, run_id)
    finally:
        backend.close()
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

    registry = load_actions(actions)
    again = api.retry_async if retry else api.resume_async

    def make(on_restart: Any, on_start: Any) -> Coroutine[Any, Any, Run]:
        return again(run_id, url, registry, force=force)

    result = drive(
        make, run_id=run_id, url=url, store_given=store is not None, as_json=as_json, progress=None
    )
    _finish(result, as_json)


@runs.command("resume")
@click.argument("run_id", metavar="ID")
@actions_option
@store_option
@json_option
@queue_option
@force_option
def runs_resume(
    run_id: str, actions: str | None, store: str | None, as_json: bool, queue: bool, force: bool
) -> None:
    """Go on with an unfinished run (after a crash or an interrupt).

    Refused while another process drives it (`runs list` says running); --force takes
    it over.
    """
    _run_again(run_id, actions, store, as_json, queue, retry=False, force=force)


@runs.command("retry")
@click.argument("run_id", metavar="ID")
@actions_option
@store_option
@json_option
@queue_option
@force_option
def runs_retry(
    run_id: str, actions: str | None, store: str | None, as_json: bool, queue: bool, force: bool
) -> None:
    """Run a failed run's failed steps again and go on.

    Refused while another process drives it (`runs list` says running); --force takes
    it over.
    """
    _run_again(run_id, actions, store, as_json, queue, retry=True, force=force)


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

    url = store_url(store)
    backend = _open(url)
    try:
        run_id = _resolve(backend, run_id)
    finally:
        backend.close()
    result = abort_run(run_id, store=url, reason=reason)
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(f"aborted run {run_id} ({result.status}): {reason}")


@runs.command("delete")
@click.argument("run_ids", nargs=-1, required=True, metavar="ID...")
@store_option
@json_option
def runs_delete(run_ids: tuple[str, ...], store: str | None, as_json: bool) -> None:
    """Delete runs and everything recorded of them (a running run is refused).

    Each ID that cannot be deleted is reported on its own line; exit 2 if any.
    """
    backend = _open(store)
    deleted: list[str] = []
    failed: list[dict[str, str]] = []
    try:
        for given in run_ids:
            try:
                run_id = _resolve(backend, given)
                backend.delete_run(run_id)
            except AblaufError as exc:
                failed.append({"run_id": given, "error": exc.message})
                if not as_json:
                    click.echo(f"ablauf: error: {exc.message}", err=True)
                continue
            deleted.append(run_id)
            if not as_json:
                click.echo(f"deleted run {run_id}")
    finally:
        backend.close()
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
    from ablauf_lang.stores.base import parse_age

    age = parse_age(older_than, "--older-than")
    backend = _open(store)
    try:
        gone, kept = backend.prune_runs(before=time.time() - age, status=status, dry_run=dry_run)
    finally:
        backend.close()
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


# ---------------------------------------------------------------- distributed


def _worker_module() -> Any:
    try:
        worker = importlib.import_module("ablauf_lang.runners.worker")
    except ImportError as exc:
        raise UserError(f"ablauf: error: distributed execution is not available: {exc}") from None
    return worker


def _pg_store_url(store: str | None, command: str) -> str:
    """`--store` of `worker` and `submit`: a PostgreSQL URL, said before anything else."""
    url = store or os.environ.get("ABLAUF_STORE")
    if not url:
        raise UserError(
            f"ablauf: error: {command} needs a PostgreSQL store: --store postgresql://... "
            "(or set $ABLAUF_STORE)"
        )
    _worker_module().check_url(url)
    return url


def _worker_logging(verbose: int, level: str | None) -> None:
    """The worker's log on stderr, with timestamps: INFO by default, DEBUG with -v."""
    import logging

    name = level.upper() if level else ("DEBUG" if verbose else "INFO")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("ablauf")
    logger.setLevel(name)
    logger.addHandler(handler)
    logger.propagate = False


pg_store_option = click.option(
    "--store",
    "store",
    metavar="URL",
    default=None,
    help="The PostgreSQL database the workers share: postgresql://user@host/db "
    "[default: $ABLAUF_STORE]",
)


@cli.command()
@pg_store_option
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
@click.option("-v", "--verbose", count=True, help="Log every action and step (DEBUG).")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default=None,
    help="What the worker logs on stderr [default: info; debug with -v].",
)
def worker(
    store: str | None,
    actions: str | None,
    concurrency: int,
    lease: float,
    poll: float,
    verbose: int,
    log_level: str | None,
) -> None:
    """Serve runs from a shared PostgreSQL store until stopped (SIGTERM or Ctrl-C).

    Logs on stderr, with timestamps: a banner, one line per run started and finished,
    failed actions with their error, and what log!! logs."""
    url = _pg_store_url(store, "ablauf worker")
    module = _worker_module()
    registry = load_actions(actions) or {}
    _worker_logging(verbose, log_level)
    try:
        module.run_worker(url, registry, concurrency=concurrency, lease=lease, poll=poll)
    except KeyboardInterrupt:
        click.echo("ablauf: worker stopped", err=True)


@cli.command()
@click.argument("file", metavar="FILE.abl")
@pg_store_option
@context_option
@json_option
@click.option(
    "--wait",
    is_flag=True,
    help="Wait until the run ends, print its outcome as `run` does, and exit with its code "
    "(0 success, 1 failure).",
)
def submit(file: str, store: str | None, context: str | None, as_json: bool, wait: bool) -> None:
    """Queue a program for the workers of a shared PostgreSQL store; print its run id."""
    url = _pg_store_url(store, "ablauf submit")
    module = _worker_module()
    source = read_source(file)
    ctx = parse_context(context)
    run_id = module.submit(source, url, context=ctx, filename=file)
    if wait:
        _wait_for(module, run_id, url, as_json)
    if as_json:
        echo_json({"run_id": run_id, "status": "pending"})
    else:
        click.echo(run_id)


def _wait_for(module: Any, run_id: str, url: str, as_json: bool) -> NoReturn:
    """`submit --wait`: the run's outcome once it ended; Ctrl-C stops waiting only."""
    started = time.monotonic()
    try:
        result = module.wait(run_id, url)
    except KeyboardInterrupt:
        click.echo(
            f"ablauf: stopped waiting; run {run_id} goes on with the workers "
            f"(`ablauf runs show {run_id} --store {url}`)",
            err=True,
        )
        leave(EXIT_INTERRUPTED)
    if as_json:
        echo_json(result.to_dict())
    else:
        print_outcome(result, time.monotonic() - started, stdout_console())
    exit_for(result)


# ---------------------------------------------------------------- entry point


def _tolerant_streams() -> None:
    """Text that cannot be encoded (a lone surrogate) is printed escaped, never a crash."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with suppress(ValueError, OSError):
                reconfigure(errors="backslashreplace")


def _exit_code(code: Any) -> int:
    """A `SystemExit` code as one of 0, 1, 2, 130 (a message is printed first)."""
    if code is None:
        return EXIT_OK
    if isinstance(code, int) and not isinstance(code, bool):
        return code if code in EXIT_CODES else EXIT_USAGE
    click.echo(f"ablauf: error: {code}", err=True)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: `ablauf ...`. Exits 0, 1, 2 or 130, and with nothing else."""
    _tolerant_streams()
    try:
        code = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="ablauf",
            standalone_mode=False,
        )
        code = code if isinstance(code, int) and not isinstance(code, bool) else EXIT_OK
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = EXIT_USAGE  # click's own errors (usage) and ours: never 1, which means failed
    except (click.Abort, KeyboardInterrupt):
        click.echo("ablauf: interrupted", err=True)
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (`ablauf runs list | head`): not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_OK
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except AblaufError as exc:
        click.echo(render_error(exc), err=True)
        code = EXIT_USAGE
    except Exception as exc:
        if debug():
            raise
        click.echo(internal_error(exc), err=True)
        code = EXIT_USAGE
    sys.exit(_exit_code(code))
