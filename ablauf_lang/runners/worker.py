"""Workers: processes on any number of hosts running the runs of one PostgreSQL database.

    submit(source, "postgresql://...")            # queue a run; returns its id at once
    run_worker("postgresql://...", ACTIONS, 4)   # perform restarts and actions until stopped
    wait(run_id, "postgresql://...")             # block until the run is done

A worker process has `concurrency` slots (threads, each with its own connection), a
listener (LISTEN on `ablauf_tasks`: a NOTIFY wakes idle slots at once, with a slow safety
poll behind it) and a janitor (renews the leases of the actions in hand, recovers the
tasks of workers whose lease expired). A slot loops:

1. take the oldest ready task (`FOR UPDATE SKIP LOCKED`);
   - a restart task: lock the run's row (waiting for a restart of the same run elsewhere),
     apply every result queued for the run, record the step, queue the new action tasks
     and lease one of them to itself, all in one transaction;
   - an action task: lease it (one short transaction);
2. perform the action outside any transaction (the janitor renews the lease meanwhile);
3. deliver the result in one transaction: delete the action task (only if still leased to
   this worker: a recovered task's late result is dropped), then, if no one holds the
   run's row, restart the run right there with it (and lease the next action to itself);
   otherwise queue the result as a restart task for whoever comes next.

So a sequential run costs one commit per step, and nothing is lost when a worker dies: its
transactions roll back, its leases expire, and any worker recovers the tasks (an
idempotent action runs again; a non-idempotent one becomes a failure whose error starts
with `interrupted: `, which `ablauf_lang.retry` or `requeue(..., retry=True)` runs again).
A slot that loses its connection reconnects with backoff and delivers what it holds.

Waits are tasks with a due time (`tasks.not_before`): a sleep is taken when it falls due
and is over; a retry's next attempt is taken when its wait is over; an await is taken at
once, when a signal wakes it (`queue.wake_awaits`) and at its deadline, and delivers the
signal from the run's mailbox, a timeout, or goes back to sleep. The listener wakes idle
slots when the next due time comes (`queue.next_due`), so a parked run costs nothing. An
attempt with a `timeout` or `heartbeat` runs under `runners.local.supervise`.

A worker takes only the action tasks whose action it has (restart tasks: any), and says
which actions it serves in `ablauf.workers` (renewed by its janitor's heartbeat), so a run
needing another action waits for a worker that has it and `runs show` can say so. The
janitor also hands back to the workers a run left with steps in flight and no task for
them (`queue.repair_stranded`).

This module decides when; it calls the engine (`restart_job` for a step, `prepare_replay`
for a requeue or a repair) and holds no SQL: the statements are the queue's
(`ablauf_lang.queue`) and the store's (`ablauf_lang.stores.postgres`).

Logging (logger `ablauf.worker`): a banner at start, one line per run started and
finished, every failed action with its error and what `log!!` logs, at INFO; every action
and step at DEBUG; recoveries, repairs and lost connections at WARNING.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import logging
import os
import random
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ablauf_lang.engine.job import Job, restart_job
from ablauf_lang.engine.nodes import (
    FAILED_STATES,
    Dispatch,
    LeafState,
    Result,
    Status,
    failure,
    success,
    timeout,
)
from ablauf_lang.engine.replay import check_replay, inflight_leaves, prepare_replay
from ablauf_lang.errors import AblaufError, StoreError
from ablauf_lang.runners.local import (
    Action,
    ActionThreads,
    Beat,
    Run,
    perform,
    perform_sync,
    plain,
    registry,
    stopping,
    supervise,
)
from ablauf_lang.stdlib.actions import AWAIT, SLEEP, STDLIB_ACTIONS, WAIT_ACTIONS
from ablauf_lang.stores.base import run_error

if TYPE_CHECKING:
    import psycopg

try:  # psycopg: needed only when workers are used (said then, see `_require`)
    from ablauf_lang import queue
    from ablauf_lang.stores import postgres
    from ablauf_lang.stores.postgres import PostgresStore
except ImportError as exc:
    _MISSING: ImportError | None = exc
else:
    _MISSING = None

log = logging.getLogger("ablauf.worker")

LEASE = 30.0  # seconds an action task stays leased without renewal
BATCH = 16  # most action tasks a slot takes at once (while actions prove quick)
QUICK = 0.005  # an action quicker than this lets a slot take more at once
BATCH_TIME = 0.05  # tasks of a batch not started by then go back to the queue
POLL = 5.0  # safety poll of an idle slot (NOTIFY wakes it at once)
MAX_BACKOFF = 5.0  # longest wait between two reconnection attempts
SWITCH_INTERVAL = 0.0005  # seconds: the thread switch interval while a worker runs
HINTS = 64  # runs named by NOTIFYs kept for idle slots to restart at once
LISTEN_TICK = 0.5  # the listener's longest wait for a NOTIFY (it checks for stopping)
DUE_RECHECK = 0.05  # after NOTIFYs, the listener looks at the next due time at most this often
ABANDONED = 256  # threads for actions with a time limit (one abandoned at its limit stays)
# Local actions (performed within the step that dispatched them, their results recorded
# with its COMMIT: `queue.Local`): idempotent, with no time limit, sync, quick so far.
LOCAL_QUICK = 0.002  # seconds an action takes on average here, at most, to be local
LOCAL_SEEN = 3  # times an action was performed here before it may be local
LOCAL_WIDTH = 8  # most actions of one write performed locally
LOCAL_TIME = 0.02  # seconds a step goes on performing local actions, at most


INSTALL = (
    "pip install 'ablauf_lang[postgres]' (from a checkout of ablauf_lang: "
    "pip install -e '.[postgres]')"
)


def check_url(store_url: str) -> None:
    """StoreError unless `store_url` names a PostgreSQL database (said before anything
    else: the workers and the queue exist only there)."""
    scheme = store_url.split(":", 1)[0].lower() if ":" in store_url else ""
    if scheme not in ("postgresql", "postgres"):
        raise StoreError(
            "workers and their queue need a PostgreSQL store (--store postgresql://... or "
            f"$ABLAUF_STORE), not {store_url!r}"
        )


def _require() -> None:
    """StoreError naming what to install when psycopg is missing."""
    if _MISSING is not None:
        raise StoreError(f"workers need psycopg: {INSTALL} ({_MISSING})")


def _open(store_url: str, *, reconnect: bool = True) -> PostgresStore:
    """A PostgresStore for `store_url`; StoreError for any other kind of store."""
    check_url(store_url)
    _require()
    return PostgresStore.from_url(store_url, reconnect=reconnect)


# Stores and listeners kept open for this process's `submit` and `wait`: connecting costs
# about twenty commits' time, more than the short run it submits. A store serialises its
# own use (a lock), so threads share one; a listener is a thread's own (notifications
# are taken by whoever reads them). Keyed by process too: a forked child connects anew.
# At most this many stores are kept (the least recently used is closed): a process that
# talks to many databases does not hold a connection to each.
SHARED_STORES = 4
_shared_stores: OrderedDict[tuple[str, int], PostgresStore] = OrderedDict()
_shared_lock = threading.Lock()
_listeners = threading.local()
REMEMBERED = 1024  # runs a thread remembers it submitted while listening, or heard of


def _shared(store_url: str) -> PostgresStore:
    """The store this process keeps open for `store_url` (it reconnects by itself)."""
    key = (store_url, os.getpid())
    with _shared_lock:
        store = _shared_stores.get(key)
        if store is None or store.conn.closed:
            store = _shared_stores[key] = _open(store_url)
        _shared_stores.move_to_end(key)
        while len(_shared_stores) > SHARED_STORES:
            _, old = _shared_stores.popitem(last=False)
            with contextlib.suppress(Exception):
                old.close()
    return store


def _my_listeners() -> OrderedDict[tuple[str, int], psycopg.Connection]:
    mine: OrderedDict[tuple[str, int], psycopg.Connection] = _listeners.__dict__.setdefault(
        "by", OrderedDict()
    )
    return mine


def _listener(store_url: str, shown: str) -> psycopg.Connection | None:
    """This thread's connection LISTENing for finished runs of `store_url` (opened once,
    at most SHARED_STORES kept); None when it cannot be opened now (the caller polls)."""
    mine = _my_listeners()
    key = (store_url, os.getpid())
    conn = mine.get(key)
    if conn is not None and not conn.closed:
        mine.move_to_end(key)
        return conn
    try:
        conn = postgres.connect(store_url, purpose="wait")
        postgres.listen_finished(conn, shown)
    except StoreError:
        postgres.close_quietly(conn)
        return None
    mine[key] = conn
    while len(mine) > SHARED_STORES:
        postgres.close_quietly(mine.popitem(last=False)[1])
    return conn


def _threads_own(name: str) -> OrderedDict[str, Any]:
    """This thread's runs by id: "submitted" (to the listener then LISTENing), "heard"
    (announced done to its listener)."""
    mine: OrderedDict[str, Any] = _listeners.__dict__.setdefault(name, OrderedDict())
    return mine


def _remember(runs: OrderedDict[str, Any], run_id: str, value: Any) -> None:
    """Keep `value` for the run, the newest REMEMBERED runs only."""
    runs[run_id] = value
    runs.move_to_end(run_id)
    while len(runs) > REMEMBERED:
        runs.popitem(last=False)


def _drop_listener(store_url: str) -> None:
    postgres.close_quietly(_my_listeners().pop((store_url, os.getpid()), None))


@atexit.register
def _close_shared() -> None:
    with _shared_lock:
        for store in _shared_stores.values():
            with contextlib.suppress(Exception):
                store.close()
        _shared_stores.clear()


# ---------------------------------------------------------------- the engine calls


def advance(job: Job, results: list[Result]) -> tuple[Job, list[Dispatch]]:
    """A step of a run (`queue.Advance`): the engine's restart, at this moment."""
    return restart_job(job, results, time.time())


def replay(run_id: str, job: Job, *, retry: bool) -> Job:
    """A requeue's rewrite of the job: resume it, or with `retry` retry it (RunError when
    there is nothing to do, by the rules of `ablauf_lang.resume` and `retry`)."""
    check_replay(run_id, job, retry=retry)
    return prepare_replay(job, retry_interrupted=retry)


def requeue_run(store: PostgresStore, run_id: str, *, retry: bool = False) -> Job:
    """`requeue` on an open store; the job as recorded."""
    return queue.requeue(store, run_id, lambda job: replay(run_id, job, retry=retry), retry=retry)


def hand_back(run_id: str, job: Job) -> tuple[Job, str] | None:
    """The janitor's repair of a stranded run (`queue.HandBack`): resume it (steps in flight
    that are idempotent run again, the others fail as interrupted); None when it is done."""
    if job.done:
        return None
    inflight = inflight_leaves(job.root)
    again = [leaf.id for leaf in inflight if leaf.idempotent]
    lost = [leaf.id for leaf in inflight if not leaf.idempotent]
    line = (
        f"run {run_id}: {len(inflight)} step(s) were in flight with no task to finish "
        f"them{_ids(again + lost)}; handed back to the workers: {len(again)} "
        f"idempotent to run again, {len(lost)} failed as interrupted"
    )
    return prepare_replay(job), line


def _ids(ids: Sequence[int]) -> str:
    if not ids:
        return ""
    shown = ", ".join(str(i) for i in sorted(ids)[:8])
    return f" (ids {shown}{', ...' if len(ids) > 8 else ''})"


# ---------------------------------------------------------------- submitting and waiting


def submit(
    source: str,
    store_url: str,
    *,
    context: dict[str, Any] | None = None,
    filename: str | None = None,
    run_id: str | None = None,
    breaks: Sequence[str] = (),
) -> str:
    """Compile `source`, record it as a new run and queue it for the workers; return its id
    at once (the workers run it). AblaufError for a bad program, StoreError for the store.
    `breaks`: actions to park before (`lang.compiler.with_breaks`)."""
    from ablauf_lang.engine.job import make_job
    from ablauf_lang.lang.cache import compile_file_source
    from ablauf_lang.lang.compiler import with_breaks

    job = make_job(with_breaks(compile_file_source(source, filename), breaks), context)
    listening = _my_listeners().get((store_url, os.getpid()))
    made = queue.submit(_shared(store_url), job, source=source, filename=filename, run_id=run_id)
    if listening is not None and not listening.closed:
        _remember(_threads_own("submitted"), made, listening)
    return made


def wait(run_id: str, store_url: str, timeout: float | None = None) -> Run:
    """Block until the run is done (woken by NOTIFY), or `timeout` seconds passed; return
    it as it is then (`status` is still "pending" after a timeout). RunError for an
    unknown run id. A server that restarts meanwhile is reconnected to, as workers do
    (StoreError when it stays away longer than the store's `reconnect_for`)."""
    store = _shared(store_url)
    deadline = None if timeout is None else time.monotonic() + timeout
    # Listening before the first look: a run that finishes in between is not missed.
    listener = _listener(store_url, store.url)
    heard = _threads_own("heard")
    # No first look when it cannot find the run done: this thread submitted it while its
    # listener was LISTENing (so the run's end is announced to it), which has not
    # announced it yet. (Each later look is made, as after any other wait.)
    unseen = (
        listener is not None
        and _threads_own("submitted").pop(run_id, None) is listener
        and run_id not in heard
    )

    def finished() -> bool:
        return store.status(run_id) != Status.PENDING  # one statement; reconnects by itself

    while unseen or not finished():
        unseen = False
        left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
        if left <= 0:
            break
        if listener is None:
            time.sleep(min(left, 0.2))
            listener = _listener(store_url, store.url)
            continue  # listening now (or still not): look again
        announced = False
        try:
            # Closed at once: a generator left suspended would hold the connection's lock.
            with contextlib.closing(postgres.notifications(listener, store.url, left)) as notes:
                for payload in notes:
                    _remember(heard, payload, True)  # a later wait for it looks first
                    if payload == run_id:
                        announced = True
                        break
        except StoreError as exc:
            log.warning("wait: lost the connection to %s (%s); reconnecting", store.url, exc)
            _drop_listener(store_url)
            listener = None
            continue
        if announced:  # finished: read it once (pending again? retried since: wait on)
            run = Run(run_id, store.load_job(run_id))
            if run.status is not Status.PENDING:
                return run
    return Run(run_id, store.load_job(run_id))


def requeue(run_id: str, store_url: str, *, retry: bool = False) -> str:
    """Hand a run back to the workers: resume an unfinished run (idempotent steps in flight
    run again, the others fail as interrupted), or with `retry` a failed one (what made it
    fail runs again). Returns the run id.

    RunError when there is nothing to do, and while the workers are at work on the run
    (actions queued or running, results waiting): requeueing it then would have its steps
    performed twice. A run whose only tasks are actions of a dead worker (lease expired)
    has just those recovered, by the janitor's rules. See `queue.requeue`."""
    store = _open(store_url)
    try:
        requeue_run(store, run_id, retry=retry)
        return run_id
    finally:
        store.close()


# ---------------------------------------------------------------- the worker


class _Wake:
    """Wakes idle slots: a generation counter bumped by every NOTIFY. `bump(n)` wakes at
    most `n` of the slots waiting (a NOTIFY's payload says how many tasks became ready:
    waking every idle slot for one task had them all run the same claim, contending for
    the cores and the run's row); `bump()` wakes them all. A slot that was busy when the
    generation moved does not wait (it saw a generation that is no longer the current
    one), so no wake-up is lost; a slot that takes a full batch wakes one more
    (`Worker._take`), so work beyond the count still spreads."""

    def __init__(self) -> None:
        self.generation = 0
        self._cond = threading.Condition()
        # Runs a NOTIFY named, a restart task queued for each: a woken slot restarts one
        # at once, without a claim (`Worker._take`); the newest HINTS only.
        self._hints: deque[str] = deque(maxlen=HINTS)

    def bump(self, count: int | None = None, run_id: str | None = None) -> None:
        with self._cond:
            self.generation += 1
            if run_id is not None:
                self._hints.append(run_id)
            if count is None:
                self._cond.notify_all()
            else:
                self._cond.notify(max(1, count))

    def hint(self) -> str | None:
        """A run a NOTIFY named that no slot took yet (the oldest), or None."""
        with self._cond:
            return self._hints.popleft() if self._hints else None

    def wait(self, seen: int, timeout: float, stop: threading.Event) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            if self.generation != seen or stop.is_set():
                return
            left = deadline - time.monotonic()
            if left > 0:
                self._cond.wait(left)  # woken by a bump meant for it, or the time is up


class _Backoff:
    """Growing, jittered waits between reconnection attempts."""

    def __init__(self) -> None:
        self.delay = 0.0

    def reset(self) -> None:
        self.delay = 0.0

    def sleep(self, stop: threading.Event | None = None) -> None:
        self.delay = min(MAX_BACKOFF, max(0.05, self.delay * 2))
        pause = self.delay * random.uniform(0.8, 1.2)
        if stop is None:
            time.sleep(pause)
        else:
            stop.wait(pause)


@dataclass
class _Slot:
    """What one slot holds between iterations (survives a reconnection)."""

    index: int
    owner: str  # the lease owner name of this slot: worker name / slot index
    store: PostgresStore | None = None
    # leased, not started: (task_id, dispatch, run_id)
    todo: list[tuple[int, Dispatch, str]] = field(default_factory=list)
    # performed, not delivered yet, all of one run: (task_id, result)
    done: list[tuple[int, Result]] = field(default_factory=list)
    done_run: str = ""
    done_since: float = 0.0
    loop: asyncio.AbstractEventLoop | None = None
    giving_up: float | None = None  # when it began failing to deliver while stopping
    batch: int = 1  # how many action tasks to take at once (grows while actions are quick)
    taken_at: float = 0.0  # when the current batch was taken
    slow: bool = False  # an action of the current batch was not quick
    woken: dict[int, int] = field(default_factory=dict)  # awaits leased: wake-ups when taken


class Worker:
    """One worker process: slots, a listener and a janitor (see the module docstring)."""

    def __init__(
        self,
        store_url: str,
        actions: Mapping[str, Callable[..., Any]] | None,
        concurrency: int = 4,
        *,
        stop: threading.Event | None = None,
        lease: float = LEASE,
        poll: float = POLL,
    ) -> None:
        if concurrency < 1:
            raise AblaufError(f"concurrency must be at least 1, not {concurrency}")
        if lease <= 0 or poll <= 0:
            raise AblaufError("lease and poll must be positive numbers of seconds")
        check_url(store_url)
        _require()
        self.url = store_url
        self.actions: dict[str, Action] = registry(actions)
        if self.actions.get("action/log") is STDLIB_ACTIONS["action/log"]:
            self.actions["action/log"] = _log_action  # logged by the worker, with its run
        # The waits (sleep!!, await!!) are performed by every worker itself.
        self.serves = frozenset(self.actions) | WAIT_ACTIONS
        self.concurrency = concurrency
        self.stop = stop or threading.Event()
        self.lease = lease
        self.poll = poll
        self.name = f"{queue.process_name()}:{uuid.uuid4().hex[:6]}"
        self.owners = [self.owner(i) for i in range(concurrency)]
        self.known = postgres.SharedKnown()
        self.wake = _Wake()
        self.held: set[int] = set()  # action tasks leased to this worker and not delivered
        self.held_lock = threading.Lock()
        self.finished = threading.Event()  # every slot has stopped
        self.stats = {"actions": 0, "restarts": 0, "fast": 0, "queued_results": 0, "lost": 0}
        self.stats.update(conflicts=0, repaired=0)
        self.reported: set[str] = set()  # runs the janitor could not repair (said once)
        self.stats.update(sleeps=0, signals=0, parked=0, timeouts=0)
        self.limited = ActionThreads(ABANDONED)  # sync actions with a timeout or heartbeat
        self.stats.update(local=0)  # actions performed within the step that dispatched them
        self.stats.update(hinted=0)  # restarts of a run a NOTIFY named, taken without a claim
        # action -> (times performed here, mean seconds, recent ones weigh more)
        self.timing: dict[str, tuple[int, float]] = {}

    # ------------------------------------------------------------ lifecycle

    def run(self) -> None:
        """Run until `stop` is set; slots finish the task in hand first."""
        store = _open(self.url, reconnect=False)  # a wrong URL or a newer schema: fail now
        where = store.url
        store.close()
        own = sorted(n for n in self.actions if n not in STDLIB_ACTIONS)
        log.info(
            "worker %s started: store %s, concurrency %d, lease %gs; actions: %s "
            "(and the standard library's: %s)",
            self.name,
            where,
            self.concurrency,
            self.lease,
            ", ".join(own) or "none",
            ", ".join(sorted(STDLIB_ACTIONS)),
        )
        threads = [
            threading.Thread(target=self._slot_main, args=(i,), name=f"ablauf-slot-{i}")
            for i in range(self.concurrency)
        ]
        helpers = [
            threading.Thread(target=self._listen, name="ablauf-listen", daemon=True),
            threading.Thread(target=self._janitor, name="ablauf-janitor"),
        ]
        for t in helpers + threads:
            t.start()
        try:
            while not self.stop.wait(0.5):
                pass
        finally:
            self.stop.set()
            self.wake.bump()
            for t in threads:
                t.join()
            self.finished.set()
            for t in helpers:
                t.join(timeout=10)
            self.limited.close()
            log.info("worker %s stopped", self.name)

    # ------------------------------------------------------------ the slots

    def owner(self, index: int) -> str:
        """The lease owner name of slot `index` (`host:pid:tag/index`)."""
        return f"{self.name}/{index}"

    def _slot_main(self, index: int) -> None:
        slot = _Slot(index, self.owner(index))
        backoff = _Backoff()
        try:
            while True:
                if slot.store is None:
                    if self.stop.is_set() and not slot.done and not slot.todo:
                        return
                    if not self._reconnect(slot):
                        backoff.sleep(None if slot.done else self.stop)
                        if self.stop.is_set() and slot.done and self._give_up(slot):
                            return
                        continue
                    backoff.reset()
                try:
                    if not self._iterate(slot):
                        return
                except Exception as exc:
                    if self._lost(exc):
                        log.warning(
                            "slot %d lost its connection (%s); reconnecting",
                            index,
                            _message(exc),
                        )
                    else:  # a bug: keep the slot alive, start again from a new connection
                        log.exception("slot %d: unexpected error; reconnecting", index)
                        backoff.sleep(self.stop)
                    self._drop_connection(slot)
        finally:
            if slot.store is not None:
                with contextlib.suppress(Exception):
                    slot.store.close()
            if slot.loop is not None:
                slot.loop.close()

    def _store(self, slot: _Slot) -> PostgresStore:
        """The slot's store (connected: `_slot_main` reconnects first)."""
        if slot.store is None:
            raise StoreError(f"slot {slot.index} has no connection")
        return slot.store

    def _give_up(self, slot: _Slot) -> bool:
        """While stopping with a result the database cannot take: wait a lease, then leave
        the task to the lease recovery of the other workers."""
        if slot.giving_up is None:
            slot.giving_up = time.monotonic()
        if time.monotonic() - slot.giving_up > self.lease:
            log.warning(
                "slot %d: could not deliver the result of task %s before stopping; "
                "its lease will expire and another worker recovers it",
                slot.index,
                [t for t, _ in slot.done],
            )
            return True
        return False

    def _lost(self, exc: BaseException) -> bool:
        return postgres.is_lost(exc)

    def _reconnect(self, slot: _Slot) -> bool:
        try:
            store = PostgresStore.from_url(self.url, known=self.known, reconnect=False)
        except StoreError as exc:
            log.warning("slot %d: %s; retrying", slot.index, exc.message)
            return False
        try:
            # Actions this slot leased in a transaction whose COMMIT it never saw confirmed,
            # and did not start: back to the queue. The one it performed stays leased.
            keep = [t for t, _ in slot.done]
            with store.transaction() as conn:
                queue.release_leases(conn, slot.owner, keep=keep)
        except StoreError as exc:
            log.warning("slot %d: %s; retrying", slot.index, exc.message)
            store.close()
            return False
        slot.store = store
        return True

    def _drop_connection(self, slot: _Slot) -> None:
        if slot.store is not None:
            with contextlib.suppress(Exception):
                slot.store.close()
        slot.store = None
        # What the process knows of runs stays: only committed writes were shared, and a
        # step uses an entry only if it is the run's newest write under the lock.
        self._unhold([task_id for task_id, _, _ in slot.todo])  # released on reconnection
        slot.todo.clear()
        slot.woken.clear()

    def _iterate(self, slot: _Slot) -> bool:
        """One step of a slot; False when it should stop."""
        now = time.monotonic()
        if slot.done and (
            not slot.todo
            or slot.todo[0][2] != slot.done_run
            or self.stop.is_set()
            or now - slot.done_since > BATCH_TIME
        ):
            # Results of one run go together (a batch of quick actions: one transaction).
            self._deliver(slot, slot.done_run, list(slot.done))
            slot.done.clear()
            return True
        if slot.todo:
            if self.stop.is_set():
                self._release(slot, [t for t, _, _ in slot.todo])
                slot.todo.clear()
                return True
            if len(slot.todo) > 1 and now - slot.taken_at > BATCH_TIME:
                # A batch taken for quick actions turned out slow: the tasks not started go
                # back to the queue for others.
                self._release(slot, [t for t, _, _ in slot.todo[1:]])
                del slot.todo[1:]
                slot.slow = True
            task_id, dispatch, run_id = slot.todo.pop(0)
            if dispatch.action == AWAIT:
                got = self._await(slot, task_id, dispatch, run_id)
                if got is None:  # parked again, or its lease was lost: nothing to deliver
                    self._unhold([task_id])
                    return True
                result = got
            else:
                result = self._perform(slot, dispatch, run_id)
            if not slot.done:
                slot.done_run, slot.done_since = run_id, time.monotonic()
            slot.done.append((task_id, result))
            slot.slow = slot.slow or time.monotonic() - now > QUICK
            if not slot.todo:  # the batch is done: take more at once only if it was quick
                slot.batch = 1 if slot.slow else min(BATCH, slot.batch * 2)
                slot.slow = False
            return True
        if self.stop.is_set():
            return False
        seen = self.wake.generation
        if not self._take(slot):
            self.wake.wait(seen, self.poll, self.stop)
        return True

    def _hold(self, task_ids: list[int]) -> None:
        with self.held_lock:
            self.held.update(task_ids)

    def _unhold(self, task_ids: list[int]) -> None:
        with self.held_lock:
            self.held.difference_update(task_ids)

    def _take(self, slot: _Slot) -> bool:
        """Take one task: lease an action (performed next), or run a restart; False if the
        queue has nothing ready. A run a NOTIFY named is restarted at once (its restart
        task was queued: one round trip less than claiming it first; if another slot or
        worker took it, nothing is done and the queue is looked at as usual)."""
        store = self._store(slot)
        hinted = self.wake.hint()
        if hinted is not None and self._restart(slot, hinted, wait=False):
            self.stats["hinted"] += 1
            return True
        taken = queue.claim(store, slot.owner, self.lease, slot.batch, self.serves)
        if not taken:
            return False
        actions = [(c.task_id, c.dispatch, c.run_id) for c in taken if c.dispatch is not None]
        if len(actions) >= slot.batch or len(taken) - len(actions) > 1:
            self.wake.bump(1)  # more may be ready than the NOTIFYs woke slots for
        for c in taken:
            if c.dispatch is not None and c.dispatch.action == AWAIT:
                slot.woken[c.task_id] = c.woken
        if actions:
            self._hold([t for t, _, _ in actions])
            slot.todo.extend(actions)
            slot.taken_at = time.monotonic()
        restarts = [c for c in taken if c.dispatch is None]
        if not restarts:
            return True
        # The others stay queued (the first one's restart may take them).
        self._restart(slot, restarts[0].run_id)
        return True

    def _restart(self, slot: _Slot, run_id: str, *, wait: bool = True) -> bool:
        """Restart a run for its queued results (`queue.run_restart`), leasing one of its
        new actions to the slot; False when there was nothing to do (none queued; not
        `wait`: or another transaction holds the run, which the claim then finds out)."""
        store = self._store(slot)
        try:
            step = queue.run_restart(
                store,
                run_id,
                advance,
                worker=slot.owner,
                claim=1,
                lease=self.lease,
                serves=self.serves,
                local=self._local(slot, run_id),
                wait=wait,
            )
        except Exception as exc:
            store.forget(run_id)
            if self._lost(exc):
                raise
            if isinstance(exc, postgres.WriteConflict):  # the task is back in the queue
                self.stats["conflicts"] += 1
                log.debug("run %s: %s; its restart task stays queued", run_id, exc)
            else:
                self._set_aside(slot, run_id, exc)
            return True
        if step is None:
            return False
        self.stats["restarts"] += 1
        self._stepped(run_id, step)
        self._hold([t for t, _ in step.claimed])
        slot.todo.extend((t, d, run_id) for t, d in step.claimed)
        return True

    def _stepped(self, run_id: str, step: queue.Step) -> None:
        """Log what a step of a run did: it started, it finished, or (DEBUG) anything."""
        job = step.job
        log.debug(
            "run %s: step %d applied %d result(s), started %d action(s)",
            run_id,
            step.seq,
            step.results,
            job.inflight,
        )
        if job.restarts == 1:
            log.info("run %s started: %d action(s) in flight", run_id, job.inflight)
        if job.done:
            if job.status is Status.SUCCESS:
                log.info("run %s finished: success after %d restart(s)", run_id, job.restarts)
            else:
                log.warning("run %s finished: failure: %s", run_id, run_error(job))

    def _await(self, slot: _Slot, task_id: int, dispatch: Dispatch, run_id: str) -> Result | None:
        """An await taken (at once when queued, when a signal woke it, at its deadline):
        the first signal of its name in the run's mailbox is its output; none and the
        deadline passed: a timeout; none yet: back to sleep until the deadline (None: no
        result to deliver, the task is no longer this slot's)."""
        store = self._store(slot)
        payload = dispatch.payload if isinstance(dispatch.payload, dict) else {}
        name = str(payload.get("signal"))
        raw = payload.get("until")
        until = None if raw is None else float(raw)
        take = getattr(store, "take_signal", None)
        if take is None:
            raise StoreError("this store has no signals mailbox (take_signal): upgrade it")
        woken = slot.woken.pop(task_id, 0)
        while True:
            try:
                got = take(run_id, name, dispatch.id)
            except AblaufError as exc:
                if self._lost(exc):
                    raise
                now = time.time()  # a signal that cannot be read fails the await, once
                return failure(
                    dispatch,
                    f"signal {name} could not be taken: {_message(exc)}",
                    started_at=now,
                    finished_at=now,
                )
            if got is not None:
                now = time.time()
                self.stats["signals"] += 1
                log.debug("run %s: step %d received signal %s", run_id, dispatch.id, name)
                return success(dispatch, got[1], started_at=now, finished_at=now)
            with store.transaction() as conn:
                outcome, woken = queue.park_await(conn, task_id, slot.owner, until, woken)
            if outcome == "woken":
                continue  # a signal came meanwhile: look again
            if outcome == "expired":
                now = time.time()
                self.stats["timeouts"] += 1
                return timeout(
                    dispatch,
                    f"timeout: no signal {name} arrived in time",
                    started_at=now,
                    finished_at=now,
                )
            if outcome == "parked":
                self.stats["parked"] += 1
            return None

    def _local(self, slot: _Slot, run_id: str) -> queue.Local:
        """What a step of `run_id` performs itself (`queue.Local`): the actions of a write
        when each is local (`_is_local`), there are at most LOCAL_WIDTH of them, and the
        step began less than LOCAL_TIME ago. A crash before the step's COMMIT loses their
        results, and they run again: so only idempotent actions are local."""
        began = time.monotonic()

        def perform_here(dispatches: list[Dispatch]) -> list[Result] | None:
            if self.stop.is_set() or len(dispatches) > LOCAL_WIDTH:
                return None
            if time.monotonic() - began > LOCAL_TIME:
                return None
            if not all(self._is_local(d) for d in dispatches):
                return None
            self.stats["local"] += len(dispatches)
            return [self._perform(slot, d, run_id) for d in dispatches]

        return perform_here

    def _is_local(self, dispatch: Dispatch) -> bool:
        """An action this worker may perform within the step that dispatched it: it has
        it, it may run again (idempotent), it runs now with no time limit (`plain`), it
        is not async, and it proved quick here (`fail!!`'s always is)."""
        fn = self.actions.get(dispatch.action)
        if fn is None or not plain(dispatch):
            return False
        if fn is STDLIB_ACTIONS["action/fail"]:
            return True  # it does nothing but fail (its dispatch is not idempotent)
        if not dispatch.idempotent or inspect.iscoroutinefunction(fn):
            return False
        seen, mean = self.timing.get(dispatch.action, (0, 0.0))
        return seen >= LOCAL_SEEN and mean <= LOCAL_QUICK

    def _timed(self, action: str, seconds: float) -> None:
        """Count an action's performance here and how long it took (`_is_local`)."""
        seen, mean = self.timing.get(action, (0, 0.0))
        weight = 1.0 / min(seen + 1, 8)
        self.timing[action] = (seen + 1, mean + (seconds - mean) * weight)

    def _perform(self, slot: _Slot, dispatch: Dispatch, run_id: str = "") -> Result:
        """Perform an action here, outside any transaction; never raises for its errors.
        A sleep taken when due is over; an attempt with a `timeout` or `heartbeat` runs
        under `supervise` (cancelled or abandoned at its limit: a timeout result)."""
        if dispatch.action == SLEEP:
            now = time.time()
            self.stats["sleeps"] += 1
            return success(dispatch, None, started_at=now, finished_at=now)
        fn = self.actions.get(dispatch.action)
        self.stats["actions"] += 1
        started = time.monotonic()
        try:
            if fn is not None and (dispatch.timeout is not None or dispatch.heartbeat is not None):
                result = self._limited(slot, dispatch, fn)
            elif fn is not None and inspect.iscoroutinefunction(fn):
                if slot.loop is None:
                    slot.loop = asyncio.new_event_loop()
                result = slot.loop.run_until_complete(perform(dispatch, fn, True))
            else:
                result = perform_sync(dispatch, fn, True)
        except Exception as exc:  # perform* turn the action's errors into failures already
            result = failure(dispatch, f"{type(exc).__name__}: {exc}")
        self._timed(dispatch.action, time.monotonic() - started)
        if fn is _log_action:
            log.info("run %s: log!! %s", run_id, _short(dispatch.payload))
        if result.state in FAILED_STATES:
            log.warning(
                "run %s: step %d (%s) failed: %s",
                run_id,
                dispatch.id,
                dispatch.action,
                _short(result.error),
            )
        else:
            log.debug(
                "run %s: step %d (%s) done in %.3fs",
                run_id,
                dispatch.id,
                dispatch.action,
                time.monotonic() - started,
            )
        return result

    def _limited(self, slot: _Slot, dispatch: Dispatch, fn: Action) -> Result:
        """An attempt within its `timeout` and `heartbeat`, on the slot's event loop: an
        async action is cancelled at the limit, a sync one (in a daemon thread) abandoned;
        `ablauf_lang.heartbeat()` inside it says it is alive (the janitor renews the
        task's lease meanwhile, as for every action in hand)."""
        if slot.loop is None:
            slot.loop = asyncio.new_event_loop()
        beat = Beat() if dispatch.heartbeat is not None else None
        work = perform(dispatch, fn, True, threads=self.limited, beat=beat)
        result = slot.loop.run_until_complete(supervise(dispatch, work, beat))
        if result.state is LeafState.TIMEOUT:
            self.stats["timeouts"] += 1
        return result

    def _deliver(self, slot: _Slot, run_id: str, items: list[tuple[int, Result]]) -> None:
        """Hand results of one run over (see the module docstring, step 3)."""
        store = self._store(slot)
        claim = 0 if self.stop.is_set() else 1
        got: queue.Delivery | None
        try:
            got = queue.deliver(
                store,
                run_id,
                items,
                advance,
                worker=slot.owner,
                claim=claim,
                lease=self.lease,
                serves=self.serves,
                local=self._local(slot, run_id) if claim else None,
            )
        except Exception as exc:
            if self._lost(exc):
                raise
            # The restart failed, not the connection (the transaction was rolled back, the
            # tasks are still leased to this slot): queue the results as they are; the next
            # restart of the run reads it as stored. A write conflict (the run was written
            # elsewhere meanwhile) is routine; anything else is logged, and the restart
            # task is set aside with the reason if it fails again.
            if isinstance(exc, postgres.WriteConflict):
                self.stats["conflicts"] += 1
                log.debug("run %s: %s; queueing %d results", run_id, _message(exc), len(items))
            else:
                log.error(
                    "run %s: restart failed (%s); queueing %d results",
                    run_id,
                    _message(exc),
                    len(items),
                )
            got = None
            for task_id, result in items:
                if queue.queue_result(store, task_id, result, worker=slot.owner) is None:
                    self.stats["lost"] += 1
        if got is not None:
            if got.lost:
                self.stats["lost"] += got.lost
                log.warning(
                    "run %s: %d results dropped: their leases were lost (another "
                    "worker recovered the tasks)",
                    run_id,
                    got.lost,
                )
            if got.outcome == "queued":
                self.stats["queued_results"] += len(items) - got.lost
            elif got.outcome == "restarted" and got.step is not None:
                self.stats["fast"] += 1
                self._stepped(run_id, got.step)
                self._hold([t for t, _ in got.step.claimed])
                slot.todo.extend((t, d, run_id) for t, d in got.step.claimed)
        self._unhold([t for t, _ in items])

    def _release(self, slot: _Slot, task_ids: list[int]) -> None:
        """Give leased, unstarted tasks back to the queue (stopping, or a slow batch)."""
        if not task_ids:
            return
        with self._store(slot).transaction() as conn:
            queue.release_leases(conn, slot.owner, task_ids)
        self._unhold(task_ids)
        for task_id in task_ids:
            slot.woken.pop(task_id, None)

    def _set_aside(self, slot: _Slot, run_id: str | None, exc: Exception) -> None:
        """A restart that cannot be performed (a bug, a damaged run): keep its tasks out of
        the queue with the reason, so the worker goes on with other runs."""
        message = f"restart failed: {_message(exc)}"
        log.error("run %s: %s; its queued results are set aside", run_id, message)
        if run_id is None:
            return
        with self._store(slot).transaction() as conn:
            queue.set_aside(conn, run_id, message)

    # ------------------------------------------------------------ listener and janitor

    def _listen(self) -> None:
        """LISTEN for new tasks and wake idle slots; wake them too when the next task due
        later falls due (`queue.next_due`, looked at again after a `due` NOTIFY, which says
        a task due later was queued, and every `poll` seconds); reconnect when the
        connection drops."""
        backoff = _Backoff()
        conn = None
        due: float | None = None  # monotonic time the next task falls due
        look = 0.0  # when to look at the next due time again
        while not self.finished.is_set():
            try:
                if conn is None:
                    conn = postgres.connect(self.url, purpose="listen")
                    queue.listen(conn)
                    backoff.reset()
                    self.wake.bump()  # tasks may have come while it was away
                    look = 0.0
                now = time.monotonic()
                if due is not None and now >= due:
                    self.wake.bump()  # a task fell due: idle slots take it
                    due, look = None, 0.0
                if now >= look:
                    left = queue.next_due(conn, self.serves)
                    now = time.monotonic()
                    due = None if left is None else now + left
                    look = now + self.poll
                wait = min(LISTEN_TICK, look - now)
                if due is not None:
                    wait = min(wait, due - now)
                # Back as soon as NOTIFYs come (every one of the packet is read: none lost).
                for note in conn.notifies(timeout=max(0.0, wait), stop_after=1):
                    if note.payload == queue.DUE:  # a task due later: maybe before `due`
                        look = min(look, time.monotonic() + DUE_RECHECK)
                    else:  # tasks are ready: as many idle slots take them
                        self.wake.bump(*_count(note.payload))
            except Exception as exc:  # the connection, or a bug: start again
                if conn is not None:
                    log.warning("listener lost its connection (%s); reconnecting", _message(exc))
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                backoff.sleep(self.finished)
        if conn is not None:
            conn.close()

    def _janitor(self) -> None:
        """Renew this worker's leases and its entry in `ablauf.workers`; recover the tasks
        of workers whose lease expired; hand back runs left with no task to finish them."""
        backoff = _Backoff()
        conn = None
        store = None
        renew_every = self.lease / 4
        next_recovery = 0.0
        while not self.finished.is_set():
            try:
                if conn is None or store is None:
                    conn = postgres.connect(self.url, purpose="janitor")
                    postgres.use_schema(conn, self.url)
                    store = PostgresStore(conn, self.url, reconnect=False)
                    backoff.reset()
                with self.held_lock:
                    held = sorted(self.held)
                queue.renew_leases(conn, self.owners, held, self.lease)
                if not self.stop.is_set():
                    queue.register_worker(
                        conn, self.name, self.serves, self.concurrency, self.lease
                    )
                if time.monotonic() >= next_recovery and not self.stop.is_set():
                    with store.transaction():
                        again, lost = queue.recover_leases(conn)
                    if again or lost:
                        log.warning(
                            "recovered %d expired action tasks (%d to run again, %d interrupted)",
                            again + lost,
                            again,
                            lost,
                        )
                    self._repair(store)
                    next_recovery = time.monotonic() + self.lease / 2 * random.uniform(0.5, 1)
            except Exception as exc:
                log.warning("janitor lost its connection (%s); reconnecting", _message(exc))
                postgres.close_quietly(conn)
                conn = store = None
                backoff.sleep(self.finished)
                continue
            self.finished.wait(renew_every)
        if conn is not None:
            with contextlib.suppress(Exception):
                queue.unregister_worker(conn, self.name)
            conn.close()

    def _repair(self, store: PostgresStore) -> None:
        """The janitor's check for runs with steps in flight and no task for them."""
        for line in queue.repair_stranded(store, hand_back, worker=self.name):
            run_id = line.split(":", 1)[0]
            if "cannot be handed back" in line:
                if run_id not in self.reported:
                    self.reported.add(run_id)
                    log.error("%s", line)
                continue
            self.stats["repaired"] += 1
            log.warning("%s", line)


def _count(payload: str) -> tuple[int | None, str | None]:
    """How many tasks a NOTIFY says became ready (None: not a count, wake every slot), and
    the run of the restart task it announces, when it names one ("1 RUN_ID")."""
    count, _, run_id = payload.partition(" ")
    try:
        return int(count), run_id or None
    except ValueError:
        return None, None


def _log_action(payload: Any, context: Any) -> Any:
    """`(log!! x)` on a worker: its output is the payload; the worker logs it (`_perform`)."""
    return payload


def _short(value: Any, width: int = 500) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _message(exc: BaseException) -> str:
    if isinstance(exc, AblaufError):
        return exc.message
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def run_worker(
    store_url: str,
    actions: Mapping[str, Callable[..., Any]],
    concurrency: int = 4,
    *,
    stop: threading.Event | None = None,
    lease: float = LEASE,
    poll: float = POLL,
    switch_interval: float | None = SWITCH_INTERVAL,
) -> None:
    """Perform the restarts and actions of the runs in a PostgreSQL store until SIGTERM or
    SIGINT (or `stop` is set); the tasks in hand are finished first.

    `concurrency` actions run at the same time (threads). `lease`: seconds after which an
    action of a worker that stopped renewing (it died) is recovered by another; `poll`: the
    safety poll of an idle worker (new tasks wake it at once through LISTEN/NOTIFY).
    `switch_interval`: the interpreter's thread switch interval while the worker runs
    (`sys.setswitchinterval`; None leaves it): a worker's threads mostly wait for the
    server, and one woken by a NOTIFY or a result should not wait Python's default 5 ms
    for another thread to let go of the interpreter (a short run's steps took 5 ms each).
    StoreError (one line) when the store cannot be used at start; later connection losses
    are retried with backoff.
    """
    worker = Worker(store_url, actions, concurrency, stop=stop, lease=lease, poll=poll)
    before = sys.getswitchinterval()
    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)
    try:
        with stopping(worker.stop, log):
            worker.run()
    finally:
        sys.setswitchinterval(before)


__all__ = [
    "INSTALL",
    "Worker",
    "advance",
    "check_url",
    "hand_back",
    "replay",
    "requeue",
    "requeue_run",
    "run_worker",
    "submit",
    "wait",
]
