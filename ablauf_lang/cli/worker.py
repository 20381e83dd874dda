"""`ablauf worker` and `ablauf submit`: distributed execution over a PostgreSQL store."""

from __future__ import annotations

import os
import sys
import time

import click

from ablauf_lang.cli.common import (
    EXIT_INTERRUPTED,
    UserError,
    actions_option,
    concurrency_option,
    context_option,
    echo_json,
    finish,
    json_option,
    leave,
    parse_context,
    read_source,
    seconds_option,
)


def _pg_store_url(store: str | None, command: str, *, one_host: bool = False) -> str:
    """`--store` of `worker` and `submit`: a PostgreSQL URL (for `worker`, a SQLite file
    too: `one_host`), said before anything else."""
    from ablauf_lang import api

    url = store or os.environ.get("ABLAUF_STORE")
    if not url:
        if one_host:
            return api.default_url()
        raise UserError(
            f"ablauf: error: {command} needs a PostgreSQL store: --store postgresql://... "
            "(or set $ABLAUF_STORE)"
        )
    api.check_worker_store(url, one_host=one_host)
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


@click.command()
@pg_store_option
@actions_option
@concurrency_option(4, "Actions performed at the same time by this worker.")
@seconds_option(
    "--lease",
    30.0,
    1.0,
    "How long an action taken by this worker stays its own without a renewal; a dead "
    "worker's actions are recovered by the others after this long.",
)
@seconds_option(
    "--poll",
    5.0,
    0.1,
    "How often an idle worker looks at the queue besides being woken by NOTIFY.",
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

    On a SQLite store (the default one included): wake its parked runs on this host when
    their timers fall due or their signals arrive (`ablauf run --detach` parks one).

    Logs on stderr, with timestamps: a banner, one line per run started and finished,
    failed actions with their error, and what log!! logs."""
    from ablauf_lang import api

    url = _pg_store_url(store, "ablauf worker", one_host=True)
    registry = api.load_actions(actions) or {}
    _worker_logging(verbose, log_level)
    try:
        api.serve_worker(url, registry, concurrency=concurrency, lease=lease, poll=poll)
    except KeyboardInterrupt:
        click.echo("ablauf: worker stopped", err=True)


@click.command()
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
    from ablauf_lang import api

    url = _pg_store_url(store, "ablauf submit")
    source = read_source(file)
    ctx = parse_context(context)
    run_id = api.submit(source, url, context=ctx, filename=file)
    if wait:
        started = time.monotonic()
        try:
            result = api.wait(run_id, url)
        except KeyboardInterrupt:  # Ctrl-C stops waiting only
            click.echo(
                f"ablauf: stopped waiting; run {run_id} goes on with the workers "
                f"(`ablauf runs show {run_id} --store {url}`)",
                err=True,
            )
            leave(EXIT_INTERRUPTED)
        finish(result, as_json, time.monotonic() - started)
    if as_json:
        echo_json({"run_id": run_id, "status": "pending"})
    else:
        click.echo(run_id)
