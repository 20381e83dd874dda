"""`ablauf plan FILE.abl`: what a program will do, read from its tree without running it."""

from __future__ import annotations

import click

from ablauf_lang.cli.common import (
    context_option,
    echo_json,
    json_option,
    parse_context,
    read_program,
)


@click.command("plan")
@click.argument("file", metavar="FILE.abl")
@context_option
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Warn about a fan-out wider than this.",
)
@json_option
def plan(file: str, context: str | None, limit: int, as_json: bool) -> None:
    """Show a program's plan without running it: leaves, the widest parallel frontier,
    the longest chain, depth, the run-time fan-outs and what bounds them, the actions
    and whether each is idempotent, an estimate of the bytes stored per run; warnings
    for fan-outs wider than --limit and non-idempotent actions inside retries.

    With --context the fan-outs over the context are sized from it. FILE `-` reads the
    program from standard input. Exit 0, or 2 on bad input.
    """
    from ablauf_lang import api
    from ablauf_lang.ui.plan import format_plan
    from ablauf_lang.ui.plan import plan as make_plan

    given = parse_context(context)
    source, name = read_program(file)
    result = make_plan(api.compile(source, name), given, fanout_limit=limit, filename=name)
    if as_json:
        echo_json({"file": name, **result.to_dict()})
    else:
        click.echo(format_plan(result))
