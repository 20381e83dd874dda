"""`ablauf worker` and `ablauf submit`: distributed execution over a PostgreSQL store, or
over Kafka topics (`--kafka`) with any store."""

from __future__ import annotations

import os
import sys
import time

import click

from ablauf_lang.cli.common import (
    EXIT_INTERRUPTED,
    UserError,
    actions_option,
    break_option,
    concurrency_option,
    context_option,
    echo_json,
    finish,
    json_option,
    kafka_options,
    kafka_settings,
    leave,
    parse_context,
    read_source,
    seconds_option,
    store_url,
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
@kafka_options
@click.option(
    "--role",
    type=click.Choice(["restarter", "actions", "all"]),
    default=None,
    help="With --kafka: consume the restarter topic (restart runs, record them in the "
    "store, dispatch), the action topics (perform), or both [default: all].",
)
@click.option(
    "--only",
    "only",
    metavar="ACTION",
    multiple=True,
    help="With --kafka: serve only this action (repeatable) [default: every action "
    "of --actions and the standard library].",
)
def worker(
    store: str | None,
    actions: str | None,
    concurrency: int,
    lease: float,
    poll: float,
    verbose: int,
    log_level: str | None,
    kafka: str | None,
    kafka_prefix: str | None,
    kafka_option: tuple[str, ...],
    role: str | None,
    only: tuple[str, ...],
) -> None:
    """Serve runs from a shared PostgreSQL store until stopped (SIGTERM or Ctrl-C).

    On a SQLite store (the default one included): wake its parked runs on this host when
    their timers fall due or their signals arrive (`ablauf run --detach` parks one).

    With --kafka BOOTSTRAP: a Kafka worker (`--role restarter|actions|all`) beside any
    store (SQLite on one host, PostgreSQL across hosts); see docs/distributed.md.

    Logs on stderr, with timestamps: a banner, one line per run started and finished,
    failed actions with their error, and what log!! logs."""
    from ablauf_lang import api

    settings = kafka_settings(kafka, kafka_prefix, kafka_option)
    if settings is None:
        if role is not None or only:
            raise UserError("ablauf: error: --role and --only need --kafka")
    else:
        _serve_kafka(
            settings,
            store,
            actions,
            role or "all",
            list(only),
            concurrency,
            lease,
            poll,
            verbose,
            log_level,
        )
        return
    url = _pg_store_url(store, "ablauf worker", one_host=True)
    registry = api.load_actions(actions) or {}
    _worker_logging(verbose, log_level)
    try:
        api.serve_worker(url, registry, concurrency=concurrency, lease=lease, poll=poll)
    except KeyboardInterrupt:
        click.echo("ablauf: worker stopped", err=True)


def _serve_kafka(
    settings: object,
    store: str | None,
    actions: str | None,
    role: str,
    only: list[str],
    concurrency: int,
    lease: float,
    poll: float,
    verbose: int,
    log_level: str | None,
) -> None:
    from ablauf_lang import api

    url = store_url(store)
    registry = api.load_actions(actions) or {}
    if role == "restarter" and (actions or only):
        raise UserError("ablauf: error: --actions and --only are for --role actions or all")
    _worker_logging(verbose, log_level)
    try:
        api.serve_kafka(
            settings,
            url,
            role=role,
            actions=registry,
            only=only or None,
            concurrency=concurrency,
            lease=lease,
            poll=min(poll, 1.0),
        )
    except KeyboardInterrupt:
        click.echo("ablauf: worker stopped", err=True)


@click.command()
@click.argument("file", metavar="FILE.abl")
@click.option(
    "--store",
    "store",
    metavar="URL",
    default=None,
    help="Where the run is recorded: postgresql://user@host/db, the database the workers "
    "share (with --kafka: the store the Kafka workers use) [default: $ABLAUF_STORE]",
)
@context_option
@json_option
@click.option(
    "--wait",
    is_flag=True,
    help="Wait until the run ends, print its outcome as `run` does, and exit with its code "
    "(0 success, 1 failure).",
)
@break_option
@kafka_options
def submit(
    file: str,
    store: str | None,
    context: str | None,
    as_json: bool,
    wait: bool,
    breaks: tuple[str, ...],
    kafka: str | None,
    kafka_prefix: str | None,
    kafka_option: tuple[str, ...],
) -> None:
    """Queue a program for the workers of a shared PostgreSQL store, or with --kafka for
    the Kafka workers; print its run id."""
    from ablauf_lang import api

    settings = kafka_settings(kafka, kafka_prefix, kafka_option)
    url = store_url(store) if settings is not None else _pg_store_url(store, "ablauf submit")
    source = read_source(file)
    ctx = parse_context(context)
    if settings is not None:
        run_id = api.submit_kafka(source, url, settings, context=ctx, filename=file, breaks=breaks)
    else:
        run_id = api.submit(source, url, context=ctx, filename=file, breaks=breaks)
    if wait:
        started = time.monotonic()
        try:
            result = api.wait_any(run_id, url)
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
