"""`ablauf runs history` and `ablauf runs fork`: a run's restarts one by one, and a new
run from any of them (`runs show --at N` is in `cli.runs`)."""

from __future__ import annotations

from typing import Literal

import click

from ablauf_lang.cli.common import (
    UserError,
    echo_json,
    json_option,
    read_program,
    stdout_console,
    store_option,
    store_url,
)
from ablauf_lang.errors import AblaufError


@click.command("history")
@click.argument("run_id", metavar="ID")
@store_option
@json_option
def runs_history(run_id: str, store: str | None, as_json: bool) -> None:
    """One line per restart of a run: the results it applied, the dispatches it made,
    what changed in the context, and when.

        ablauf runs history 3f0c
        ablauf runs show 3f0c --at 4        # the tree and context after restart 4
    """
    from ablauf_lang import api

    with api.opened(store_url(store)) as backend:
        run_id = api.resolve_run_id(run_id, backend)
        info = backend.info(run_id)
        history = api.run_history(run_id, backend)
    if as_json:
        echo_json(
            {
                "run_id": run_id,
                "parent": info.parent,
                "parent_step": info.parent_step,
                "partial": history.partial,
                "steps": [step.to_dict() for step in history.steps],
            }
        )
        return
    from rich.table import Table
    from rich.text import Text

    from ablauf_lang.ui.render import step_line

    console = stdout_console()
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("restart", "time", "what"):
        justify: Literal["left", "right"] = "right" if col == "restart" else "left"
        table.add_column(col, no_wrap=col != "what", justify=justify)
    for step in history.steps:
        table.add_row(
            str(step.restart), _clock(step.updated), step_line(step, info.parent, info.parent_step)
        )
    console.print(table)
    if history.partial:
        console.print(
            Text(
                "earlier writes were not kept (the run was made by an older ablauf_lang)",
                style="dim",
            )
        )


def _clock(stamp: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


@click.command("fork")
@click.argument("run_id", metavar="ID")
@click.option(
    "--at",
    "at",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="The restart to fork at (`runs history` lists them); default: the latest.",
)
@click.option(
    "--program",
    "program",
    metavar="FILE.abl",
    default=None,
    help="An edit of the run's program: the part not started by restart N comes from it "
    "(refused, naming the node, when it changes a part that had started).",
)
@store_option
@json_option
def runs_fork(
    run_id: str, at: int | None, program: str | None, store: str | None, as_json: bool
) -> None:
    """Record a new run whose state is run ID's after restart N; print its id.

    What was in flight at restart N is handed back, to be performed again. The new run
    records its parent and the restart (`runs list --forks-of ID`); it waits to be driven:

        ablauf runs fork 3f0c --at 4 --program deploy-fixed.abl
        ablauf runs resume NEW_ID --actions myactions
    """
    from ablauf_lang import api

    url = store_url(store)
    source = filename = None
    if program is not None:
        source, filename = read_program(program)
    with api.opened(url) as backend:
        run_id = api.resolve_run_id(run_id, backend)
        try:
            new = api.fork(run_id, at, program=source, filename=filename, store=backend)
        except AblaufError as exc:
            raise UserError(exc) from None
    if as_json:
        echo_json({"run_id": new, "parent": run_id, "parent_step": at, "status": "pending"})
    else:
        click.echo(new)


@click.command("continue")
@click.argument("run_id", metavar="ID")
@store_option
@json_option
def runs_continue(run_id: str, store: str | None, as_json: bool) -> None:
    """Let a run parked at a breakpoint (`ablauf run --break ACTION`) go on: one parked
    action is dispatched (the signal ablauf/break, as `ablauf signal ID ablauf/break`).
    The driver of the run (a worker, or `runs resume ID`) takes it on."""
    from ablauf_lang import api
    from ablauf_lang.lang.compiler import BREAK_SIGNAL

    with api.opened(store_url(store)) as backend:
        run_id = api.resolve_run_id(run_id, backend)
        seq = api.signal(run_id, BREAK_SIGNAL, None, store=backend)
    if as_json:
        echo_json({"run_id": run_id, "name": BREAK_SIGNAL, "seq": seq})
    else:
        click.echo(f"run {run_id} goes on past one breakpoint (#{seq})")
