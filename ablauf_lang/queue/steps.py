"""The workers' transactions on the queue: claim tasks, restart a run for its results,
deliver results. The engine is not called here: a step's new job comes from the `advance`
callable the worker passes (`restart_job` with its clock).

Each step is one transaction of the store's (`PostgresStore.step`) whose BEGIN travels with
its first statement and whose COMMIT travels with its last (psycopg pipeline mode).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from ablauf_lang.codec.records import decode_result, encode_result, text_value
from ablauf_lang.engine.job import Job
from ablauf_lang.engine.kinds import Leaf
from ablauf_lang.engine.nodes import DONE_STATES, Dispatch, LeafState, Result
from ablauf_lang.errors import InternalError
from ablauf_lang.queue.tasks import (
    Q,
    StepLog,
    drop_settled,
    leased,
    log_step,
    send_actions,
)
from ablauf_lang.stores.postgres.connection import WriteConflict
from ablauf_lang.stores.postgres.queries import QUERIES as STORE_Q
from ablauf_lang.stores.postgres.store import PostgresStore
from ablauf_lang.stores.sql import Known, json_rows

# A step's engine call: the run's job and the results to apply -> (new job, dispatches).
Advance = Callable[[Job, list[Result]], tuple[Job, list[Dispatch]]]

# The actions of a write performed in the step itself (as Temporal's local activities):
# the dispatches of a write -> their results when the worker performed every one of them
# here, at once; None: queue them as tasks. Only what may run again after a crash belongs
# here (the results are recorded with the step's COMMIT, not before).
Local = Callable[[list[Dispatch]], "list[Result] | None"]

CHAIN = 64  # most writes one step makes while its actions are performed in it


@dataclass(frozen=True, slots=True)
class Claimed:
    """A task `claim` took: an action leased (with its dispatch), or a restart task to run
    with `run_restart`."""

    task_id: int
    run_id: str
    kind: str
    dispatch: Dispatch | None
    woken: int = 0  # an await: how many times a signal woke it (see `tasks.park_await`)


@dataclass(frozen=True, slots=True)
class Step:
    """What a restart did: the new job and its write number, the actions it claimed."""

    job: Job
    seq: int
    results: int
    task_ids: list[int]  # the restart tasks it consumed
    claimed: list[tuple[int, Dispatch]]


@dataclass(frozen=True, slots=True)
class Delivery:
    """What became of a result: "restarted" (applied at once), "queued", or "lost"."""

    outcome: str
    run_id: str | None = None
    step: Step | None = None
    lost: int = 0  # results dropped: their task's lease was lost


@dataclass(frozen=True, slots=True)
class _How:
    """What a worker's step is done with: its engine call, whose it is, how many of the
    new actions it leases to itself (for `lease` seconds, of those in `serves`), and what
    it performs within the step (`local`)."""

    advance: Advance
    worker: str
    claim: int
    lease: float
    serves: Collection[str] | None
    local: Local | None


@dataclass(frozen=True, slots=True)
class _Applied:
    """A step recorded, its actions not queued yet."""

    job: Job
    dispatches: list[Dispatch]
    task_ids: list[int]
    log: StepLog
    settled: list[int]  # leaves in flight before, settled without their result

    def step(self, claimed: list[tuple[int, Dispatch]], before: Sequence[_Applied] = ()) -> Step:
        results = sum(a.log.results or 0 for a in before) + (self.log.results or 0)
        task_ids = before[0].task_ids if before else self.task_ids
        return Step(self.job, self.log.seq, results, task_ids, claimed)


def claim(
    store: PostgresStore,
    owner: str,
    lease: float,
    limit: int = 1,
    actions: Collection[str] | None = None,
) -> list[Claimed]:
    """Take the oldest ready tasks, at most `limit` (`FOR UPDATE SKIP LOCKED`), in one
    statement: action tasks whose action is in `actions` (None: any) are leased to
    `owner` and returned with their dispatch; restart tasks (any worker can run them)
    are only named (run them with `run_restart`), in queue order."""
    names = None if actions is None else sorted(actions)
    params = (names, names, limit, names, names, limit, limit, owner, lease)
    with store.session() as conn:
        rows = conn.execute(Q["claim"], params).fetchall()
    out = []
    for row in sorted(rows):
        task_id, run_id, kind = int(row[0]), str(row[1]), str(row[2])
        if kind != "action" or row[3] is None:
            out.append(Claimed(task_id, run_id, kind, None))
            continue
        dispatch = Dispatch(
            int(row[3]),
            row[5],
            text_value(row[7]),
            bool(row[6]),
            int(row[4]),
            text_value(row[8]),
            timeout=None if row[10] is None else float(row[10]),
            heartbeat=None if row[11] is None else float(row[11]),
        )
        out.append(Claimed(task_id, run_id, kind, dispatch, int(row[9] or 0)))
    return out


def _apply(
    store: PostgresStore,
    run_id: str,
    key: int,
    extra: Sequence[Result],
    how: _How,
    *,
    force: bool,
    state: Sequence[Any],
) -> _Applied | None:
    """Take the queued results, advance the job, record the step (all but queueing the new
    actions); None when there is nothing to do and not `force`. `state`: the run's newest
    write, the clock and the results queued for it, read under its lock.

    The base is `store.base_for` (pinned for the transaction, so the delta is diffed
    against it and numbered right after it). A base that is not the run's newest write (the
    caller's statement saw an older snapshot than its lock) makes the write's number taken:
    the transaction is refused (WriteConflict), never written over another.
    """
    seq, started, batch = state
    queued = [(int(t), r) for t, r in json.loads(batch)]
    if not queued and not extra and not force:
        return None  # another worker took these results with an earlier restart
    results = [decode_result(r) for _, r in queued if r is not None]
    results.extend(extra)
    base = store.base_for(run_id, key, int(seq))
    return _write(store, run_id, base, results, how, [t for t, _ in queued], started)


def _write(
    store: PostgresStore,
    run_id: str,
    base: Known,
    results: list[Result],
    how: _How,
    task_ids: list[int],
    started: Any,
) -> _Applied:
    """Advance the job `base` holds with `results` and record the write after it, in the
    step's transaction (its actions not queued yet). `task_ids`: the restart tasks the
    step consumed; `started`: when its lock was taken (None: when it is logged)."""
    new, dispatches = how.advance(base.job, results)
    written = store.record_locked(run_id, new, base)
    log = StepLog(written, how.worker, len(results), started)
    return _Applied(new, list(dispatches), task_ids, log, settled_leaves(base.job, new, results))


def _chain(
    store: PostgresStore, run_id: str, applied: _Applied, how: _How
) -> tuple[_Applied, list[_Applied]]:
    """While `local` performs a write's actions at once, apply their results and record
    the next write, in the step's transaction (each write is a restart of its own in the
    run's history and step log). Returns the last write and the ones before it."""
    before: list[_Applied] = []
    while how.local is not None and applied.dispatches and len(before) < CHAIN - 1:
        results = how.local(applied.dispatches)
        if results is None:
            break
        base = store.known.get(run_id)
        if base is None or base.job is not applied.job:
            raise InternalError(f"run {run_id}: its write is not the base of the next")
        before.append(applied)
        # Its row lock was taken with the first write: logged as started when written.
        applied = _write(store, run_id, base, results, how, [], None)
    return applied, before


def settled_leaves(old: Job, new: Job, results: Sequence[Result]) -> list[int]:
    """Leaves in flight in `old` that a step settled without a result of theirs (a
    `timeout!!` whose time passed, its timer once the body is done): their queued tasks
    (a parked timer, a retry's wait, an await) must not run. O(touched x depth)."""
    applied = {r.id for r in results}
    out = []
    for node_id in new.touched:
        if node_id in applied or node_id >= len(new.paths):
            continue
        leaf = new.node(node_id)
        if not isinstance(leaf, Leaf) or leaf.result not in DONE_STATES:
            continue
        if node_id < len(old.paths):
            before = old.node(node_id)
            if isinstance(before, Leaf) and before.result is LeafState.PENDING:
                out.append(node_id)
    return sorted(out)


def _finish(store: PostgresStore, run_id: str, applied: _Applied, how: _How) -> Step:
    """Perform what `how.local` takes and record the writes it leads to (`_chain`); log
    the step's writes, queue the last one's actions (leasing `how.claim` of them to the
    worker) and COMMIT, in one round trip."""
    applied, before = _chain(store, run_id, applied, how)
    dispatches = applied.dispatches

    def send(conn: psycopg.Connection) -> psycopg.Cursor[Any] | None:
        for write in (*before, applied):
            log_step(conn, run_id, write.log, len(write.dispatches))
            drop_settled(conn, run_id, write.settled)
        cur, _ = send_actions(
            conn,
            run_id,
            dispatches,
            claim=how.claim,
            owner=how.worker,
            lease=how.lease,
            serves=how.serves,
        )
        return cur

    cur = store.commit_step(run_id, send)
    return applied.step(leased(cur, dispatches), before)


def run_restart(
    store: PostgresStore,
    run_id: str,
    advance: Advance,
    *,
    worker: str,
    claim: int,
    lease: float,
    serves: Collection[str] | None = None,
    local: Local | None = None,
    wait: bool = True,
) -> Step | None:
    """Restart a run for its queued results: wait for its row lock (a restart of the run
    elsewhere finishes first), then apply the results queued for it at once (the oldest
    10,000: a step's work is bounded, the others stay queued for the next; and go on
    with what `local` performs, see `_finish`). Not `wait`: None at once when another
    transaction holds the run (its queued results stay queued)."""
    how = _How(advance, worker, claim, lease, serves, local)
    lock = STORE_Q["lock_run" if wait else "try_lock_run"]
    with store.step():
        row, state = store.begin_with(
            lock, (run_id,), Q["run_state"], (run_id, run_id), run_id=run_id
        )
        if row is None or state is None:
            store.end(commit=False)
            return None
        applied = _apply(store, run_id, int(row[0]), [], how, force=False, state=state)
        if applied is None:
            store.end(commit=False)
            return None
        return _finish(store, run_id, applied, how)


def deliver(
    store: PostgresStore,
    run_id: str,
    items: Sequence[tuple[int, Result]],
    advance: Advance,
    *,
    worker: str,
    claim: int,
    lease: float,
    serves: Collection[str] | None = None,
    local: Local | None = None,
) -> Delivery:
    """Hand over results of action tasks of one run leased to `worker`: remove the tasks
    and, when no one holds the run's row, restart the run with them right away (and
    lease the next action to `worker`); otherwise queue them as restart tasks. Tasks
    whose lease was lost (recovered by another worker) are left alone and their results
    dropped (`Delivery.lost`). A WriteConflict means nothing was done: the tasks are
    still leased to `worker` (queue the results with `queue_result`)."""
    how = _How(advance, worker, claim, lease, serves, local)
    if len(items) == 1 and _alone(store, run_id, items[0][1]):
        try:
            return _deliver_at_once(store, run_id, items[0], how)
        except WriteConflict:
            store.at_once_missed += 1  # delivered the usual way: it reads what is so
            store.known.shared.at_once_missed += 1
    ids = [t for t, _ in items]
    by_id = dict(items)
    with store.step():
        delay = store.statement_delay()
        if len(items) == 1:
            one = encode_result(items[0][1])
            # Not read along (no `run_id`): a delivery often finds the run's lock taken
            # (the results are queued), and the run read for nothing; when the lock is
            # had and the run unknown, `base_for` reads it.
            params = (delay, ids[0], worker, run_id, run_id, one, run_id)
            row = store.begin(Q["deliver_one"], params)
        else:
            results = json_rows([(t, encode_result(r)) for t, r in items])
            row = store.begin(Q["deliver"], (delay, ids, worker, run_id, run_id, results, run_id))
        mine = [int(t) for t in (row[0] or [])]
        lost = len(ids) - len(mine)
        if not mine:
            store.end(commit=False)
            return Delivery("lost", run_id, lost=lost)
        key = row[1]
        if key is None:
            store.end(commit=True)
            return Delivery("queued", run_id, lost=lost)
        extra = [by_id[t] for t in sorted(mine)]
        applied = _apply(store, run_id, int(key), extra, how, force=True, state=row[2:5])
        if applied is None:
            raise InternalError("a forced restart did nothing")
        step = _finish(store, run_id, applied, how)
        return Delivery("restarted", run_id, step, lost=lost)


def _alone(store: PostgresStore, run_id: str, result: Result) -> bool:
    """Whether this process knows the run, and the result's step is the only one in flight
    in it: no other result can come for it, so its step can be computed before the
    server answers (`_deliver_at_once`)."""
    known = store.known.get(run_id)
    if known is None or known.job.inflight != 1 or result.id >= len(known.job.paths):
        return False
    leaf = known.job.node(result.id)
    return isinstance(leaf, Leaf) and leaf.result is LeafState.PENDING


def _deliver_at_once(
    store: PostgresStore, run_id: str, item: tuple[int, Result], how: _How
) -> Delivery:
    """Deliver a result with the step it makes, in one round trip: BEGIN and `deliver_now`
    (remove the task, lock the run, or fail) are sent, the step is computed from what
    this process knows meanwhile, and its writes follow with the COMMIT. WriteConflict
    when it could not be so (the task's lease lost, the run locked or written elsewhere):
    nothing was written, the task is as it was."""
    task_id, result = item
    with store.step():
        store.begin_unanswered(
            Q["deliver_now"], (store.statement_delay(), task_id, how.worker, run_id)
        )
        base = store.base_known(run_id)
        if base is None:
            raise InternalError(f"run {run_id}: not known for a delivery at once")
        step = _finish(store, run_id, _write(store, run_id, base, [result], how, [], None), how)
    store.at_once += 1
    store.known.shared.at_once += 1
    return Delivery("restarted", run_id, step)


def queue_result(store: PostgresStore, task_id: int, result: Result, *, worker: str) -> str | None:
    """Remove an action task leased to `worker` and queue its result as a restart task,
    in one statement; the run id, or None when the lease was lost."""
    with store.session() as conn:
        found = conn.execute(Q["queue_result"], (task_id, worker, encode_result(result))).fetchone()
    return None if found is None else str(found[0])
