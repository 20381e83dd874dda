"""Runs and the queue: submit a run to the workers, hand one back (requeue, the janitor's
repair), wake a run's awaits when a signal arrives, and what a person should know of a
run's tasks (notes, counts).

The engine is not called here: a replay comes from the callable the caller passes (the
worker module passes `prepare_replay` with the replay policy).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from ablauf_lang.engine.job import Job
from ablauf_lang.errors import RunError, StoreError
from ablauf_lang.queue.tasks import (
    Q,
    StepLog,
    clock,
    hand_to_workers,
    process_name,
    recover_leases,
    wake,
)
from ablauf_lang.stores.base import new_run_id
from ablauf_lang.stores.postgres.connection import ConnectionLost
from ablauf_lang.stores.postgres.queries import QUERIES as STORE_Q
from ablauf_lang.stores.postgres.store import PostgresStore, lock_run

log = logging.getLogger("ablauf.store")

WAITING_NOTE = 5.0  # seconds a ready task waits before `notes` says no worker serves it

# What hands a stranded run back: (run id, job) -> (job to record, one line saying what was
# done), or None when there is nothing to do.
HandBack = Callable[[str, Job], "tuple[Job, str] | None"]


def submit(
    store: PostgresStore,
    job: Job,
    *,
    source: str | None = None,
    filename: str | None = None,
    run_id: str | None = None,
) -> str:
    """Record a new run and queue its first restart for the workers, in one transaction
    (a submitted run is never left without a task); return its id."""
    new_id = run_id or new_run_id()

    def attempt() -> str:
        with store.transaction(pipeline=True) as conn:  # one round trip in all
            made = store.create_run(
                job, source=source, filename=filename, run_id=new_id, fresh=run_id is None
            )
            hand_to_workers(conn, made, "submit")
        return made

    def settle() -> str | None:
        # The COMMIT was sent: if the run is there, it is this one (a fresh id, or one
        # that was free when the write began).
        with store.snapshot() as conn:
            found = conn.execute(STORE_Q["run_exists"], (new_id,)).fetchone() is not None
        return new_id if found else None

    return store.retrying(attempt, settle)


def requeue(store: PostgresStore, run_id: str, replay: Callable[[Job], Job], *, retry: bool) -> Job:
    """Hand a run back to the workers in one transaction holding the run's lock: `replay`
    (a resume, or with `retry` a retry; RunError when there is nothing to do) is recorded,
    a restart queued, the run marked served by the workers.

    Refused (RunError) while the workers are at work on the run: actions queued or
    leased by a live worker, or results waiting. When the only tasks left are actions
    whose worker's lease expired, only those are touched (as the janitor would: an
    idempotent one queued again, a non-idempotent one failed as interrupted) and the
    run goes on. Returns the job as recorded.
    """
    token = f"requeue {process_name()} {uuid.uuid4().hex[:8]}"

    def attempt() -> Job:
        with store.transaction() as conn:
            if lock_run(conn, run_id) is None:
                raise RunError(f"no run {run_id!r} in {store.where()}")
            serving = store.serving_locked(run_id)
            if serving.broken:
                raise RunError(
                    f"run {run_id}: a restart of it failed and its results are set aside "
                    f"({serving.error}); clear ablauf.tasks.error for them to try again"
                )
            if serving.expired:
                again, lost = recover_leases(conn, run_id=run_id)
                log.info(
                    "run %s: recovered %d expired action(s): %d to run again, %d interrupted",
                    run_id,
                    again + lost,
                    again,
                    lost,
                )
                return store.load(run_id).job
            what = "retry" if retry else "resume"
            if serving.live:
                raise RunError(
                    f"run {run_id} is being served by the workers ({serving.describe()}): "
                    f"nothing to {what}; wait for it, or abort it first"
                )
            job = store.load(run_id).job
            new = replay(job)
            started = clock(conn)
            seq = store.record_locked(run_id, new)
            hand_to_workers(conn, run_id, token, StepLog(seq, token, None, started))
        return new

    def settle() -> Job | None:
        with store.snapshot() as conn:
            found = conn.execute(Q["restart_logged"], (run_id, token)).fetchone() is not None
        return store.load(run_id).job if found else None

    return store.retrying(attempt, settle)


def repair_stranded(
    store: PostgresStore, hand_back: HandBack, *, worker: str, grace: float = 2.0, limit: int = 10
) -> list[str]:
    """The janitor's check: a run the workers serve that is not done and has no task at
    all (nothing queued, leased, waiting or set aside) and is not being restarted can
    never finish by itself. Hand it back to the workers (`hand_back`: by the rules of a
    resume) and return what was done, one line per run."""
    with store.snapshot() as conn:
        candidates = [str(r[0]) for r in conn.execute(Q["stranded"], (grace, limit)).fetchall()]
    done = []
    for run_id in candidates:
        try:
            line = _repair(store, run_id, worker, hand_back)
        except (StoreError, RunError) as exc:
            if isinstance(exc, ConnectionLost):
                raise
            line = f"run {run_id}: stranded, and cannot be handed back: {exc.message}"
        if line is not None:
            done.append(line)
    return done


def _repair(store: PostgresStore, run_id: str, worker: str, hand_back: HandBack) -> str | None:
    """`repair_stranded` for one run, in a transaction of its own."""
    who = f"janitor {worker}"
    with store.transaction() as conn:
        row = conn.execute(STORE_Q["try_lock_run_api"], (run_id,)).fetchone()
        if row is None or not row[1] or not store.serving_locked(run_id).empty:
            return None  # being restarted, taken off the queue, or served meanwhile
        started = clock(conn)
        handed = hand_back(run_id, store.load(run_id).job)
        if handed is None:
            return None
        new, line = handed
        seq = store.record_locked(run_id, new)
        hand_to_workers(conn, run_id, who, StepLog(seq, who, None, started))
    return line


def notes(
    store: PostgresStore, run_id: str, job: Job | None = None, *, after: float = WAITING_NOTE
) -> list[str]:
    """What a person looking at a run should know beyond its job, one line each: an
    action no live worker serves (its steps waited more than `after` seconds for one),
    a restart that failed, and (given the `job`) steps in flight with no task to
    finish them."""

    def attempt() -> list[str]:
        out = []
        with store.snapshot() as conn:
            for action, count, waited in conn.execute(Q["unserved"], (run_id, after)).fetchall():
                out.append(
                    f"waiting for a worker that serves {action}: {count} step(s) queued "
                    f"for {float(waited):.0f}s and no live worker has this action"
                )
            row = conn.execute(Q["on_queue"], (run_id,)).fetchone()
            serving = store.serving_locked(run_id)
        if serving.broken:
            out.append(
                f"a restart of this run failed and {serving.broken} task(s) are set "
                f"aside: {serving.error}"
            )
        served = row is not None and bool(row[0])
        if job is not None and not job.done and job.inflight and serving.empty and served:
            out.append(
                f"{job.inflight} step(s) in flight with no task to finish them: the "
                "janitor of a live worker hands them back to the workers"
            )
        return out

    return store.retrying(attempt)


def wake_awaits(store: PostgresStore, run_id: str, name: str) -> int:
    """A signal `name` was sent to the run (`send_signal`): its awaits of that name are due
    now and the idle workers are woken (NOTIFY), so one of them delivers it at once.
    Returns how many awaits were woken (0: the run does not wait for it yet; its first
    await of that name finds the signal in the mailbox). Safe to call twice."""

    def attempt() -> int:
        with store.transaction() as conn:
            return wake(conn, run_id, name)

    return store.retrying(attempt)


def queue_counts(store: PostgresStore) -> dict[str, int]:
    """Tasks by state: ready, leased (being performed), broken (kept aside)."""

    def attempt() -> dict[str, int]:
        with store.snapshot() as conn:
            row = conn.execute(Q["counts"]).fetchone()
        ready, leased, broken = row if row is not None else (0, 0, 0)
        return {"ready": int(ready), "leased": int(leased), "broken": int(broken)}

    return store.retrying(attempt)
