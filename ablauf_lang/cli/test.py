"""`ablauf test`: workflow tests. Test files (`*.abltest`: recorded REPL sessions, fault
schedules) are replayed; a program (`FILE.abl --faults N`) is run under N random
schedules of failures, timeouts and crashes and checked against the recovery invariants.

Exit 0 when every test passes, 1 when one failed (or a schedule broke an invariant),
2 when a file is broken (not a test file, damaged, missing) or the usage is wrong.
"""

from __future__ import annotations

from typing import Any

import click

from ablauf_lang.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    UserError,
    context_option,
    echo_json,
    json_option,
    leave,
    parse_context,
    read_program,
)

PROGRAM_SUFFIX = ".abl"


@click.command("test")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option(
    "--faults",
    "faults",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Run each FILE.abl under N random schedules of failures, timeouts and crashes "
    "and check the recovery invariants.",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=None,
    help="With --faults: the seed of the schedules (the same seed, the same schedules) "
    "[default: a random one, printed].",
)
@click.option(
    "--out",
    "out_dir",
    metavar="DIR",
    type=click.Path(file_okay=False),
    default=None,
    help="With --faults: where the test file reproducing a broken invariant is written "
    "[default: beside the program].",
)
@context_option
@json_option
def test(
    files: tuple[str, ...],
    faults: int | None,
    seed: int | None,
    out_dir: str | None,
    context: str | None,
    as_json: bool,
) -> None:
    """Replay workflow tests: FILE is a test file (*.abltest, written by the REPL's
    `:record` or by --faults) or a directory holding some. A recorded session passes
    when the program, fed the recorded results, makes the same dispatches in the same
    restarts and ends the same way; the first restart that differs is shown side by side.

    With --faults N, FILE is a program (.abl): N random schedules of failures, timeouts
    and crashes (resumed in between) are run against it with stand-in actions; the first
    that breaks an invariant (the run ends, every finally!! runs, no non-idempotent action
    twice) is shrunk and written as a test file that reproduces it.

    Exit 0 all pass, 1 a test failed, 2 a file is broken.
    """
    if faults is not None:
        _faults(files, faults, seed, out_dir, context, as_json)
    for name, what in (("--seed", seed), ("--out", out_dir), ("--context", context)):
        if what is not None:
            raise UserError(f"ablauf: error: {name} goes with --faults N")
    _replay(files, as_json)


def _replay(files: tuple[str, ...], as_json: bool) -> None:
    from ablauf_lang.testing.outcome import TestFileError
    from ablauf_lang.testing.runner import check_file, collect

    programs = [f for f in files if f.endswith(PROGRAM_SUFFIX)]
    if programs:
        raise UserError(
            f"ablauf: error: {programs[0]} is a program: test it with "
            f"`ablauf test {programs[0]} --faults N`, or give test files (*.abltest)"
        )
    try:
        paths = collect(files)
    except TestFileError as exc:
        raise UserError(f"ablauf: error: {exc.message}") from None
    rows: list[dict[str, Any]] = []
    for path in paths:
        try:
            rows.append(check_file(path).to_dict() | {"broken": False})
        except TestFileError as exc:
            rows.append(
                {"path": str(path), "passed": False, "broken": True, "message": exc.message}
            )
    counts = {
        "passed": sum(1 for r in rows if r["passed"]),
        "failed": sum(1 for r in rows if not r["passed"] and not r["broken"]),
        "broken": sum(1 for r in rows if r["broken"]),
    }
    if as_json:
        echo_json({"tests": rows, **counts})
    else:
        _print_rows(rows, counts)
    if counts["broken"]:
        leave(EXIT_USAGE)
    leave(EXIT_FAILED if counts["failed"] else EXIT_OK)


def _print_rows(rows: list[dict[str, Any]], counts: dict[str, int]) -> None:
    for row in rows:
        if row["broken"]:
            click.echo(f"BROKEN {row['message']}", err=True)
            continue
        mark = "ok    " if row["passed"] else "FAILED"
        click.echo(f"{mark} {row['path']} ({row['name']}): {row['message']}")
        if row.get("diff"):
            click.echo("\n".join("       " + line for line in row["diff"].splitlines()))
    total = len(rows)
    shown = ", ".join(f"{n} {k}" for k, n in counts.items() if n or k == "passed")
    click.echo(f"{total} test{'' if total == 1 else 's'}: {shown}")


def _faults(
    files: tuple[str, ...],
    n: int,
    seed: int | None,
    out_dir: str | None,
    context: str | None,
    as_json: bool,
) -> None:
    from ablauf_lang import api
    from ablauf_lang.testing.faults import format_report, run_faults

    given = parse_context(context)
    others = [f for f in files if f.endswith(".abltest")]
    if others:
        raise UserError(
            f"ablauf: error: {others[0]} is a test file: --faults N runs programs (.abl); "
            f"replay test files without it"
        )
    reports = []
    for file in files:
        source, name = read_program(file)
        api.compile(source, name)  # a program that does not compile: its error, exit 2
        reports.append(run_faults(source, name, n, seed=seed, context=given, out_dir=out_dir))
    if as_json:
        echo_json(
            reports[0].to_dict() if len(reports) == 1 else {"runs": [r.to_dict() for r in reports]}
        )
    else:
        click.echo("\n\n".join(format_report(r) for r in reports))
    leave(EXIT_OK if all(r.passed for r in reports) else EXIT_FAILED)
