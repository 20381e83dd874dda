"""What every `ablauf` command shares: exit codes, errors, input, output, the options.

Exit codes are 0, 1, 2 and 130, nothing else: 0 success (or the command did its job),
1 the workflow failed, 2 bad usage, bad syntax, a compile or store error, a missing file,
unknown actions (and an internal error), 130 interrupted (Ctrl-C or SIGTERM). Every
`AblaufError` reaching a command group is printed as its message (with file, line,
column and caret when it has them); any other exception as one line `ablauf: internal
error: ...`: never a traceback, unless `ABLAUF_DEBUG=1`. Heavy modules are imported
inside the commands that use them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from ablauf_lang.errors import AblaufError, RunError

if TYPE_CHECKING:
    from rich.console import Console

    from ablauf_lang.api import Run

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_CODES = frozenset({EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED})

STDIN = "-"
STDIN_NAME = "<stdin>"

F = TypeVar("F", bound=Callable[..., Any])

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


def error_dict(exc: AblaufError) -> dict[str, Any]:
    """An error as `--json` reports it."""
    return {"message": exc.message, "file": exc.filename, "line": exc.line, "column": exc.column}


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
    """A command group: turns language and store errors into messages and exit 2, and
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


# ---------------------------------------------------------------- options

store_option = click.option(
    "--store",
    "store",
    metavar="URL",
    default=None,
    help="Where runs are recorded: memory:, sqlite:///path or postgresql://... "
    "[default: $ABLAUF_STORE, else SQLite in the user data directory]",
)
break_option = click.option(
    "--break",
    "breaks",
    metavar="ACTION",
    multiple=True,
    help="Park the run before dispatching this action (repeatable): it waits for the "
    "signal ablauf/break (`ablauf runs continue ID`); `runs list` shows it waiting.",
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


def concurrency_option(default: int, help: str, metavar: str | None = None) -> Callable[[F], F]:
    """`--concurrency N` (`run` and `worker` differ in default and meaning)."""
    return click.option(
        "--concurrency",
        type=click.IntRange(min=1),
        default=default,
        show_default=True,
        metavar=metavar,
        help=help,
    )


def seconds_option(name: str, default: float, least: float, help: str) -> Callable[[F], F]:
    """An option giving a number of seconds (at least `least`)."""
    return click.option(
        name,
        type=click.FloatRange(min=least),
        default=default,
        show_default=True,
        metavar="SECONDS",
        help=help,
    )


def kafka_options(command: F) -> F:
    """`--kafka BOOTSTRAP`, `--kafka-prefix`, `--kafka-option KEY=VALUE` (repeatable)."""
    for decorate in reversed(
        (
            click.option(
                "--kafka",
                "kafka",
                metavar="BOOTSTRAP",
                default=None,
                help="Use the Kafka runner: the brokers, HOST:PORT[,HOST:PORT...] "
                "[default: $ABLAUF_KAFKA]",
            ),
            click.option(
                "--kafka-prefix",
                "kafka_prefix",
                metavar="PREFIX",
                default=None,
                help="The prefix of the topics: PREFIX.restarter, PREFIX.action.NS.NAME "
                "[default: $ABLAUF_KAFKA_PREFIX, else ablauf]",
            ),
            click.option(
                "--kafka-option",
                "kafka_option",
                metavar="KEY=VALUE",
                multiple=True,
                help="A librdkafka client setting (security.protocol=SASL_SSL, ...), repeatable.",
            ),
        )
    ):
        command = decorate(command)
    return command


def kafka_settings(kafka: str | None, prefix: str | None, option: tuple[str, ...]) -> Any:
    """The Kafka settings the options give, or None when no broker is named."""
    from ablauf_lang import api

    bootstrap = kafka if kafka is not None else os.environ.get("ABLAUF_KAFKA")
    if bootstrap is None:
        if option or prefix:
            raise UserError("ablauf: error: --kafka-prefix and --kafka-option need --kafka")
        return None
    options: dict[str, str] = {}
    for item in option:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"ablauf: error: --kafka-option {item!r}: expected KEY=VALUE")
        options[key.strip()] = value
    try:
        return api.kafka_settings(
            bootstrap,
            prefix=prefix or os.environ.get("ABLAUF_KAFKA_PREFIX") or None,
            options=options,
        )
    except AblaufError as exc:
        raise UserError(exc) from None


# ---------------------------------------------------------------- input


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
    from ablauf_lang.values import from_plain_json

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
    decoded = from_plain_json(value)
    return decoded if isinstance(decoded, dict) else value


def parse_signal_value(text: str | None) -> Any:
    """`ablauf signal`'s JSON argument: any JSON value (strict: no NaN), or `@FILE` holding
    one (`@-`: standard input); none: null."""
    from ablauf_lang.values import from_plain_json

    if text is None:
        return None
    where = "the signal's value"
    if text.startswith("@"):
        where = f"the signal's value {text}"
        text = read_source(text[1:], "a JSON file")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"ablauf: error: {where} is not valid JSON ({exc.msg} at line {exc.lineno}, "
            f'column {exc.colno}): write it as JSON, e.g. true, 42, "yes" or {{"by": "ana"}}'
        ) from None
    except ValueError as exc:  # NaN, Infinity; an integer too long to read
        raise UserError(f"ablauf: error: {where} is not valid JSON: {exc}") from None
    except RecursionError:
        raise UserError(f"ablauf: error: {where} is nested too deeply") from None
    return from_plain_json(value)


def store_url(url: str | None) -> str:
    """`--store URL`, else `$ABLAUF_STORE`, else the SQLite file in the user's data dir."""
    from ablauf_lang import api

    if url is not None and not url.strip():
        raise UserError(
            "ablauf: error: --store is empty: give a URL (memory:, sqlite:///path, "
            "postgresql://...) or leave the option out"
        )
    return url or api.default_url()


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def parse_age(text: str, what: str = "age") -> float:
    """`90s`, `15m`, `2h`, `3d` or `1w` as seconds."""
    raw = text.strip().lower()
    unit = _UNITS.get(raw[-1:])
    try:
        value = float(raw[:-1]) if unit is not None else None
    except ValueError:
        value = None
    if value is None or unit is None:
        raise RunError(f"{what} {text!r} is not a duration such as 90s, 15m, 2h, 3d or 1w")
    if not 0 <= value * unit < 1e11:
        raise RunError(f"{what} {text!r} must be a positive duration")
    return value * unit


def parse_since(text: str, now: float | None = None) -> float:
    """`--since`: a duration back from now (`2h`, `3d`) or an ISO date or time
    (`2026-11-30`, `2026-11-30T08:00`, local time unless it names a zone)."""
    from datetime import datetime

    raw = text.strip()
    try:
        return (time.time() if now is None else now) - parse_age(raw, "--since")
    except RunError:
        pass
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise RunError(
            f"--since {text!r} is neither a duration (2h, 3d) nor an ISO date "
            "(2026-11-30 or 2026-11-30T08:00)"
        ) from None
    return when.timestamp()


# ---------------------------------------------------------------- output


def echo_json(data: Any) -> None:
    """Print data as one JSON document on stdout, and nothing else (map keys that are not
    strings, run-time expressions and deep values as `ablauf_lang.values` says)."""
    from ablauf_lang.values import dumps_json

    click.echo(dumps_json(data))


def stdout_console() -> Console:
    """The console of stdout; piped (no terminal, no $COLUMNS): whole lines."""
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
    from ablauf_lang.ui.render import outcome

    console.print(outcome(run, elapsed, console.width), soft_wrap=True)


def finish(run: Run, as_json: bool, elapsed: float | None = None) -> NoReturn:
    """Print a run's outcome (or its JSON) and exit 0 when it succeeded, 1 otherwise."""
    if as_json:
        echo_json(run.to_dict())
    else:
        print_outcome(run, elapsed, stdout_console())
    exit_for(run.status)


def exit_for(status: str) -> NoReturn:
    """Exit 0 for a run that succeeded, 1 otherwise."""
    from ablauf_lang.api import Status

    leave(EXIT_OK if status is Status.SUCCESS else EXIT_FAILED)


def leave(code: int) -> NoReturn:
    """Exit with `code`; at once when an interrupted action still runs in a thread (it is
    abandoned: nothing may wait for it, and it must not write while Python shuts down)."""
    from ablauf_lang.api import abandoned_threads

    # Only as the program itself: a caller that swapped the streams (a test runner, an
    # embedding) gets a plain SystemExit.
    if abandoned_threads() and sys.stdout is sys.__stdout__:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                with suppress(OSError, ValueError, AttributeError):
                    stream.flush()
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
