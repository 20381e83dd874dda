"""Runs on Kafka: submitting one, waking one, and the `ablauf worker --kafka` roles.

submit(settings, store, job, ...)    record a new run, then a `start` message
wake(settings, run_id)               a `wake` message: the restarter reads the run again
serve(settings, open_store, role=)   restarter, actions, or all (both, one process)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ablauf_lang.codec.records import encode_control_message
from ablauf_lang.engine.job import Job
from ablauf_lang.errors import AblaufError
from ablauf_lang.kafka import actions as action_worker
from ablauf_lang.kafka import restarter
from ablauf_lang.kafka.client import KafkaError, KafkaSettings, Outbox, connect, require
from ablauf_lang.kafka.topics import partition_of, restarter_topic
from ablauf_lang.runners.local import Action, registry, stopping
from ablauf_lang.stores.base import JobStore

log = logging.getLogger("ablauf.kafka")

ROLES = ("restarter", "actions", "all")


def _send(settings: KafkaSettings, kind: str, run_id: str, partitions: int) -> None:
    outbox = Outbox(settings)
    topic = restarter_topic(settings.prefix)
    outbox.send(
        topic, encode_control_message(kind, run_id), run_id, partition_of(run_id, partitions)
    )
    outbox.flush(30)


def _partitions(settings: KafkaSettings) -> int:
    admin = connect(settings)  # KafkaError at once when the broker does not answer
    topic = restarter_topic(settings.prefix)
    return admin.ensure([topic])[topic] or settings.partitions


def check_served(settings: KafkaSettings, used: Sequence[str]) -> None:
    """KafkaError unless every action a program uses has its topic (some action worker
    serves it, or did): a run is not started to fail at its first unknown action."""
    from ablauf_lang.kafka.topics import action_topic
    from ablauf_lang.names import WAIT_ACTIONS

    admin = connect(settings)
    missing = [a for a in used if a not in WAIT_ACTIONS]
    missing = [a for a in missing if admin.partitions(action_topic(settings.prefix, a)) is None]
    if missing:
        names = ", ".join(missing)
        raise KafkaError(
            f"no worker serves {names} on {settings.bootstrap} (no topic "
            f"{action_topic(settings.prefix, missing[0])}): start one first with "
            "`ablauf worker --kafka ... --role actions --actions MODULE`"
        )


def submit(
    settings: KafkaSettings,
    store: JobStore,
    job: Job,
    *,
    source: str | None = None,
    filename: str | None = None,
    run_id: str | None = None,
) -> str:
    """Record `job` as a new run and ask the restarters to start it; return its id. The
    broker is reached first (KafkaError: nothing is recorded)."""
    partitions = _partitions(settings)
    run_id = store.create_run(job, source=source, filename=filename, run_id=run_id)
    try:
        _send(settings, "start", run_id, partitions)
    except KafkaError as exc:
        raise KafkaError(
            f"{exc}; run {run_id} is recorded but not started: "
            f"`ablauf runs resume {run_id} --kafka {settings.bootstrap}` starts it"
        ) from None
    return run_id


def wake(settings: KafkaSettings, run_id: str) -> None:
    """Ask the run's restarter to read it again from the store and dispatch what is in
    flight (after a resume, retry or abort made in the store by a person)."""
    _send(settings, "wake", run_id, _partitions(settings))


def serve(
    settings: KafkaSettings,
    open_store: Callable[[], JobStore],
    *,
    role: str,
    actions: Mapping[str, Action] | None = None,
    only: Sequence[str] | None = None,
    concurrency: int = 4,
    lease: float = 30.0,
    poll: float = 1.0,
    stop: threading.Event | None = None,
) -> None:
    """Serve `role` until SIGTERM/SIGINT (or `stop`). Each part opens its own store
    (`open_store()`): the restarter and the action worker of `all` run in two threads."""
    if role not in ROLES:
        raise AblaufError(f"unknown worker role {role!r}: one of {', '.join(ROLES)}")
    stop = stop or threading.Event()
    if role in ("actions", "all"):
        action_worker.serves(registry(actions), only)  # a bad --only: said at once
    errors: list[BaseException] = []

    def restarts() -> None:
        store = open_store()
        try:
            restarter.serve(settings, store, stop=stop, poll=poll)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            stop.set()
        finally:
            store.close()

    with stopping(stop, log):
        if role == "restarter":
            restarts()
        else:
            thread = None
            if role == "all":
                thread = threading.Thread(target=restarts, name="ablauf-restarter", daemon=True)
                thread.start()
            store = open_store()
            try:
                action_worker.serve(
                    settings,
                    store,
                    actions,
                    stop=stop,
                    only=only,
                    concurrency=concurrency,
                    lease=lease,
                )
            except BaseException:
                stop.set()
                raise
            finally:
                store.close()
                if thread is not None:
                    thread.join(30)
    if errors:
        raise errors[0]


def settings_from(
    bootstrap: str,
    *,
    prefix: str | None = None,
    options: Mapping[str, Any] | None = None,
    partitions: int | None = None,
    session_timeout: float | None = None,
) -> KafkaSettings:
    """Settings from command-line values (None: the defaults); KafkaError at once when
    the client library (the `kafka` extra) is missing."""
    require()
    kwargs: dict[str, Any] = {"bootstrap": bootstrap, "options": dict(options or {})}
    if prefix is not None:
        kwargs["prefix"] = prefix
    if partitions is not None:
        kwargs["partitions"] = partitions
    if session_timeout is not None:
        kwargs["session_timeout"] = session_timeout
    return KafkaSettings(**kwargs)
