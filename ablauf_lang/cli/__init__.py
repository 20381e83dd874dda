"""The `ablauf` command: run, check, plan, test, repl, runs, signal, worker, submit, ui.

One module per command group: `run` (run, check, repl), `plan`, `test` (workflow tests),
`runs` (runs list, show, resume, retry, abort, delete, prune; signal), `worker` (worker,
submit); `common` holds what they share
(exit codes, error handling, options, input and output), `drive` the driving of a run in
this process. Commands reach the package through `ablauf_lang.api` (and `ui` to show
what it returns). Exit codes are 0, 1, 2 and 130, nothing else (see `common`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

import click

from ablauf_lang.cli.common import (
    EXIT_CODES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    AblaufGroup,
    debug,
    internal_error,
    render_error,
)
from ablauf_lang.cli.plan import plan
from ablauf_lang.cli.run import check, repl, run
from ablauf_lang.cli.runs import runs, signal
from ablauf_lang.cli.test import test
from ablauf_lang.cli.ui import ui
from ablauf_lang.cli.worker import submit, worker
from ablauf_lang.errors import AblaufError

__all__ = ["cli", "main"]


@click.group(cls=AblaufGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ablauf_lang", prog_name="ablauf")
def cli() -> None:
    """ablauf: run, check and explore durable workflow programs (.abl files).

    Exit codes: 0 success, 1 the workflow failed, 2 bad input (or an internal error),
    130 interrupted.
    """


for _command in (run, check, plan, test, repl, runs, signal, worker, submit, ui):
    cli.add_command(_command)


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
