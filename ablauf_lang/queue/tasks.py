"""The queue's rows, on a connection the caller holds: enqueue, take, leases, set aside,
the workers table. Every statement is a named query of `queries.sql`."""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from ablauf_lang.codec.records import encode_result, value_text
from ablauf_lang.engine.job import INTERRUPTED
from ablauf_lang.engine.nodes import Dispatch, LeafState, Result
from ablauf_lang.stdlib.actions import AWAIT
from ablauf_lang.stores.queries import load_queries
from ablauf_lang.stores.sql import json_rows

Q = load_queries(__package__ or "ablauf_lang.queue", "queries.sql")


def process_name() -> str:
    """`host:pid`: names this process in leases and in the restarts table."""
    return f"{socket.gethostname()}:{os.getpid()}"


DUE = "due"  # the NOTIFY payload saying a task was queued for a later time


def notify(conn: psycopg.Connection, count: int) -> None:
    """Wake idle workers: `count` tasks are ready."""
    if count:
        conn.execute(Q["notify"], (str(count),))


def notify_due(conn: psycopg.Connection) -> None:
    """Tell the workers' listeners that a task is due at a later time (they look at the
    next due time again; no slot is woken)."""
    conn.execute(Q["notify"], (DUE,))


def clock(conn: psycopg.Connection) -> datetime | None:
    """The server's clock now (`clock_timestamp()`)."""
    row = conn.execute(Q["clock"]).fetchone()
    return None if row is None else row[0]


# ---------------------------------------------------------------- enqueueing


@dataclass(frozen=True, slots=True)
class StepLog:
    """The `restarts` row of a step: its write number, who, results applied, when."""

    seq: int
    worker: str
    results: int | None  # None: not a restart (a requeue, the janitor's repair)
    started: datetime | None


def log_step(conn: psycopg.Connection, run_id: str, entry: StepLog, dispatches: int) -> None:
    """Add the step's row to `restarts`."""
    conn.execute(
        Q["log_step"],
        (run_id, entry.seq, entry.worker, entry.results, dispatches, entry.started),
    )


def not_before(d: Dispatch, now: float) -> float | None:
    """When a dispatch's task may be taken (epoch seconds), None: at once. A due time
    that has come is at once; an await is taken at once (a signal may be waiting), and
    put back to sleep until its deadline when there is none (`sleep_await`)."""
    return None if d.due is None or d.due <= now else float(d.due)


def signal_of(d: Dispatch) -> str | None:
    """The signal name an await waits for (None for any other action)."""
    if d.action != AWAIT or not isinstance(d.payload, dict):
        return None
    name = d.payload.get("signal")
    return None if name is None else str(name)


def send_actions(
    conn: psycopg.Connection,
    run_id: str,
    dispatches: Sequence[Dispatch],
    *,
    claim: int = 0,
    owner: str | None = None,
    lease: float = 30.0,
    serves: Collection[str] | None = None,
) -> tuple[psycopg.Cursor[Any] | None, int]:
    """Execute the INSERT of one action task per dispatch; the first `claim` that are due
    now and whose action is in `serves` (None: any) are leased to `owner`. A dispatch
    with a later `due` is queued with that time (`tasks.not_before`). NOTIFYs for the
    tasks ready and not leased (idle workers take them), and once for tasks due later
    (the listeners look at the next due time again). Returns the cursor (rows: task_id,
    node, leased?; of several tasks, only those leased; None when there was nothing to
    insert, see `leased`) and how many are leased. Pipeline-safe: read the cursor after it."""
    if not dispatches:
        return None, 0
    now = time.time()
    dues = [not_before(d, now) for d in dispatches]
    later = sum(due is not None for due in dues)
    mine: list[bool] = []
    left = claim
    for d, due in zip(dispatches, dues, strict=True):
        take = left > 0 and due is None and (serves is None or d.action in serves)
        mine.append(take)
        left -= take
    contexts: dict[int, str] = {}  # dispatches of one restart share their context object

    def context_text(d: Dispatch) -> str:
        text = contexts.get(id(d.context))
        if text is None:
            text = contexts[id(d.context)] = value_text(d.context or {})
        return text

    tasks = [
        (
            d.id,
            d.attempt,
            d.action,
            d.idempotent,
            value_text(d.payload),
            context_text(d),
            take,
            due,
            signal_of(d),
            d.timeout,
            d.heartbeat,
        )
        for d, take, due in zip(dispatches, mine, dues, strict=True)
    ]
    if len(tasks) == 1:  # the common step of a sequence: plain values
        node, attempt, action, idempotent, payload, ctx, take, due, signal, timeout, beat = tasks[0]
        params = (run_id, node, attempt, action, idempotent, payload, ctx)
        leasing = (owner if take else None, take, lease, 1 if take else 0)
        cur = conn.execute(Q["enqueue_action"], (*params, *leasing, due, signal, timeout, beat))
    else:
        rows = [(*t[:7], _number(t[7]), t[8], _number(t[9]), _number(t[10])) for t in tasks]
        cur = conn.execute(Q["enqueue_actions"], (run_id, owner, lease, json_rows(rows)))
    _announce(conn, len(dispatches) - later - sum(mine), later)
    return cur, sum(mine)


def _number(x: float | None) -> float | str | None:
    """A number for `json_rows`: JSON has no infinity (PostgreSQL reads 'inf' as one)."""
    return x if x is None or math.isfinite(x) else str(x)


def _announce(conn: psycopg.Connection, ready: int, later: int) -> None:
    notify(conn, ready)
    if later:
        notify_due(conn)


def leased(
    cur: psycopg.Cursor[Any] | None, dispatches: Sequence[Dispatch]
) -> list[tuple[int, Dispatch]]:
    """(task_id, dispatch) of the tasks `send_actions` leased, read from its cursor."""
    if cur is None:
        return []
    by_node = {d.id: d for d in dispatches}
    return [(int(task_id), by_node[int(node)]) for task_id, node, mine in cur.fetchall() if mine]


def enqueue_restart(
    conn: psycopg.Connection, run_id: str, result: Result | None, *, note: str | None = None
) -> None:
    """Queue a restart task (with a result to apply, or none) and wake a worker; `note`
    says why (shown in `ablauf.queue`)."""
    encoded = None if result is None else encode_result(result)
    conn.execute(Q["enqueue_restart"], (run_id, encoded, note))


def hand_to_workers(
    conn: psycopg.Connection, run_id: str, note: str, entry: StepLog | None = None
) -> None:
    """After a write that hands the run to the workers (submit; a requeue or the janitor's
    repair, logged as `entry`): mark the run served by the workers, queue a restart."""
    if entry is not None:
        log_step(conn, run_id, entry, 0)
    conn.execute(Q["hand_to_workers"], (run_id, run_id, None, note))


# ---------------------------------------------------------------- taking and leases


@dataclass(frozen=True, slots=True)
class Task:
    """A task taken from the queue (locked by the caller's transaction)."""

    task_id: int
    run_id: str
    kind: str  # "restart" or "action"


def take_task(conn: psycopg.Connection) -> Task | None:
    """Lock the oldest ready task no one holds (`FOR UPDATE SKIP LOCKED`), or None; a
    task due later is not ready."""
    row = conn.execute(Q["take_task"]).fetchone()
    return None if row is None else Task(int(row[0]), row[1], row[2])


def next_due(conn: psycopg.Connection, actions: Collection[str] | None = None) -> float | None:
    """Seconds until the next task due later falls due (None: none is), among tasks of
    `actions` (None: any): what an idle worker waits for besides NOTIFY."""
    names = None if actions is None else sorted(actions)
    row = conn.execute(Q["next_due"], (names, names)).fetchone()
    return None if row is None or row[0] is None else max(0.0, float(row[0]))


def park_await(
    conn: psycopg.Connection, task_id: int, owner: str, until: float | None, woken: int
) -> tuple[str, int]:
    """An await leased to `owner` found no signal, `woken` wake-ups after it was queued:
    put it back to sleep until `until` (None: no deadline), in the caller's transaction
    (which holds the task's row until it ends, so a wake-up meanwhile waits and then
    wakes it again). Returns the outcome and the task's wake-ups now: "parked"; "woken"
    (a signal came since: look again, the task stays leased); "expired" (the deadline
    passed: it times out, still leased); "lost" (the lease was lost)."""
    row = conn.execute(Q["park_await"], (until, task_id, owner)).fetchone()
    if row is None:
        return "lost", woken
    now = int(row[0])
    if now != woken:
        return "woken", now
    if row[1]:
        return "expired", now
    conn.execute(Q["sleep_await"], (until, task_id))
    if until is not None:
        notify_due(conn)
    return "parked", now


def wake(conn: psycopg.Connection, run_id: str, name: str) -> int:
    """The run's awaits of signal `name` are due now, and counted woken; wake the idle
    workers. Returns how many awaits."""
    count = conn.execute(Q["wake_awaits"], (run_id, name)).rowcount
    notify(conn, count)
    return count


def drop_settled(conn: psycopg.Connection, run_id: str, nodes: Sequence[int]) -> None:
    """Delete the untaken action tasks of leaves settled without their result."""
    if nodes:
        conn.execute(Q["drop_settled"], (run_id, list(nodes)))


def renew_leases(
    conn: psycopg.Connection, owners: Sequence[str], task_ids: Sequence[int], lease: float
) -> int:
    """Extend the leases `owners` hold on these tasks; return how many they still hold."""
    if not task_ids:
        return 0
    return conn.execute(Q["renew_leases"], (lease, list(task_ids), list(owners))).rowcount


def release_leases(
    conn: psycopg.Connection,
    owner: str,
    task_ids: Sequence[int] | None = None,
    *,
    keep: Sequence[int] = (),
) -> int:
    """Put action tasks `owner` leased but did not start back in the queue, as if never
    taken: `task_ids` (None: all of its tasks) but `keep`. Returns how many."""
    ids = None if task_ids is None else list(task_ids)
    count = conn.execute(Q["release_leases"], (owner, ids, ids, list(keep))).rowcount
    notify(conn, count)
    return count


def recover_leases(
    conn: psycopg.Connection, limit: int = 100, *, run_id: str | None = None
) -> tuple[int, int]:
    """Recover action tasks whose lease expired (their worker died or lost the database),
    of one run or of any.

    An idempotent action goes back in the queue, to run again; a non-idempotent one becomes
    a failure result (error `interrupted: ...`) queued as a restart task, so the run goes on
    by the normal rules and can be retried later. Returns (requeued, failed).
    """
    rows = conn.execute(Q["expired_leases"], (run_id, run_id, limit)).fetchall()
    again = [r[0] for r in rows if r[5]]
    lost = [r for r in rows if not r[5]]
    if again:
        conn.execute(Q["unlease"], (again,))
    if lost:
        conn.execute(Q["delete_tasks"], ([r[0] for r in lost],))
        now = time.time()
        results = [
            encode_result(
                Result(
                    int(r[2]),
                    int(r[3]),
                    LeafState.FAILURE,
                    None,
                    f"{INTERRUPTED}{r[4]} was in flight on worker {r[6]}, whose lease expired; "
                    "it is not idempotent, so it was not run again",
                    None,
                    now,
                )
            )
            for r in lost
        ]
        conn.execute(Q["queue_interrupted"], ([r[1] for r in lost], results))
    notify(conn, len(rows))
    return len(again), len(lost)


def set_aside(conn: psycopg.Connection, run_id: str, message: str) -> None:
    """Keep the run's restart tasks that cannot be processed out of the queue, saying why
    (never lost), and say it on the run."""
    conn.execute(Q["set_aside"], (message, run_id))
    conn.execute(Q["run_error"], (message, time.time(), run_id))


# ---------------------------------------------------------------- the workers table


def register_worker(
    conn: psycopg.Connection, name: str, actions: Collection[str], concurrency: int, lease: float
) -> None:
    """Say (again) that worker `name` is alive and serves `actions`, for `lease` seconds."""
    conn.execute(
        Q["register_worker"],
        (name, socket.gethostname(), os.getpid(), sorted(actions), concurrency, lease),
    )


def unregister_worker(conn: psycopg.Connection, name: str) -> None:
    """A worker that stops says so (and forgets workers gone for more than a day)."""
    conn.execute(Q["unregister_worker"], (name,))


def live_workers(conn: psycopg.Connection) -> list[tuple[str, list[str]]]:
    """(name, actions) of the workers whose heartbeat is current."""
    rows = conn.execute(Q["live_workers"]).fetchall()
    return [(str(r[0]), list(r[1])) for r in rows]


def listen(conn: psycopg.Connection) -> None:
    """LISTEN on this connection for tasks becoming ready (see `notify`)."""
    conn.execute(Q["listen"])
