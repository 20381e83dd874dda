"""The PostgreSQL store: runs shared by workers on many hosts (`postgresql://...`).

    store = PostgresStore.from_url("postgresql://user@host/db")

`PostgresStore` is `stores.sql.SqlStore` over the PostgreSQL `Dialect`, with this module as
its connection policy: one autocommit psycopg connection, explicit transactions, and a
client store (the default) that reconnects when the server restarts and runs the operation
again, settling first what became of a write whose COMMIT it sent. Every write of a run
holds the run's row lock (`lock_run`, `FOR NO KEY UPDATE`): one restart of a run at a time,
and an API write never interleaves with a worker's.

The queue (`ablauf_lang.queue`) builds the workers' transactions from the primitives below
(`session`, `transaction`, `snapshot`, `retrying`, and a step's `step`, `begin`, `base_for`,
`record_locked`, `commit_step`); the store itself runs no engine code and knows of the
queue's tables only what an API write needs (`record` on a run the workers serve).

A worker process's threads share what they know of the runs they wrote (`SharedKnown`), so
a step does not read the tree again. A step computes the new job from one base (what the
process knew, if it is the run's newest write under the lock, else the run read again),
pins it for its transaction and writes the delta against that same base, numbered right
after it: a base that turns out stale is a refused write (the unique write number,
`ablauf.check_delta`), never a write over another.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg

from ablauf_lang.engine.job import Job
from ablauf_lang.engine.nodes import Status
from ablauf_lang.errors import InternalError, RunError, StoreError
from ablauf_lang.stores.postgres.connection import (
    RECONNECT_FOR,
    ConnectionLost,
    WriteConflict,
    close_quietly,
    errors,
    forget_prepared,
    prepared_mark,
    redact,
    reopen,
)
from ablauf_lang.stores.postgres.dialect import DIALECT
from ablauf_lang.stores.postgres.faults import FAULTS, Faults
from ablauf_lang.stores.postgres.known import KnownView, SharedKnown
from ablauf_lang.stores.postgres.queries import QUERIES as Q
from ablauf_lang.stores.postgres.schema import open_prepared
from ablauf_lang.stores.sql import Known, SqlStore, Statement, execute_all
from ablauf_lang.stores.sql import Q as SQL

log = logging.getLogger("ablauf.store")
T = TypeVar("T")

# How long a step waits for another thread of this process to publish the write it just
# committed (it let go of the run's lock with its COMMIT): far less than reading the run.
PUBLISH_WAIT = 0.5
# A worker step's delta row (the store's `insert_delta`) and `ablauf.check_delta` in one
# statement: the check runs only when the row was not inserted (another writer of that
# number, or a fold past it), and then fails the transaction.
CHECKED_DELTA = (
    f"WITH i AS ({DIALECT.q(SQL['insert_delta'])} RETURNING 1) "
    "SELECT ablauf.check_delta(%s, %s) WHERE NOT EXISTS (SELECT 1 FROM i)"
)
KEYS_AT_ONCE = 32  # numbers for new runs' rows taken from the sequence at once


def lock_run(conn: psycopg.Connection, run_id: str) -> int | None:
    """Lock the run's row for this transaction (one restart of a run at a time); return
    its key (`runs.id`), or None when there is no such run (see `queries.sql`)."""
    row = conn.execute(Q["lock_run"], (run_id,)).fetchone()
    return None if row is None else int(row[0])


def listen_finished(conn: psycopg.Connection, url: str) -> None:
    """LISTEN on this connection for runs finishing (the payload: the run id)."""
    with errors(url):
        conn.execute(Q["listen_finished"])


@dataclass(frozen=True, slots=True)
class Serving:
    """The tasks of one run, by state: what the workers are doing for it."""

    queued: int = 0  # action tasks ready to be taken
    running: int = 0  # action tasks leased, lease valid
    expired: int = 0  # action tasks leased, lease expired (their worker is gone)
    results: int = 0  # restart tasks: results waiting to be applied
    broken: int = 0  # tasks set aside after a restart failed
    owners: tuple[str, ...] = ()  # who holds the valid leases
    error: str | None = None  # why the broken tasks were set aside

    @property
    def live(self) -> bool:
        """True when workers are performing the run or will (tasks queued or leased)."""
        return bool(self.queued or self.running or self.results)

    @property
    def empty(self) -> bool:
        """True when the run has no task at all."""
        return not (self.live or self.expired or self.broken)

    def describe(self) -> str:
        """The tasks in words, e.g. `2 action(s) running on host:1, 1 action(s) queued`."""
        parts = []
        if self.running:
            where = f" on {', '.join(sorted({o.rsplit('/', 1)[0] for o in self.owners}))}"
            parts.append(f"{self.running} action(s) running{where if self.owners else ''}")
        if self.queued:
            parts.append(f"{self.queued} action(s) queued")
        if self.results:
            parts.append(f"{self.results} result(s) waiting to be applied")
        if self.expired:
            parts.append(f"{self.expired} action(s) whose worker's lease expired")
        if self.broken:
            parts.append(f"{self.broken} task(s) set aside after a failed restart")
        return ", ".join(parts) or "no tasks"


class PostgresStore(SqlStore):
    """Runs in a PostgreSQL database (`postgresql://...`), shared by many processes.

    The `JobStore` protocol is `SqlStore`'s. A transaction opened with `transaction()` or
    `step()` takes in the `SqlStore` operations called inside it: they run in it rather
    than in transactions of their own.

    `reconnect` (clients: on; the worker's slots, which handle it themselves: off): when
    the connection is lost, an operation outside a caller's transaction reconnects with
    backoff for up to `reconnect_for` seconds and runs again; a write whose COMMIT was sent
    is first looked up, so it is never done twice nor lost.
    """

    # Tests: called as hook(point, store, run_id) at the points "based" (a step chose its
    # base job) and "committed" (a step committed, not yet shared with other threads).
    hook: Callable[[str, PostgresStore, str], None] | None = None
    faults: Faults | None = FAULTS
    loads = 0  # jobs read again because another process had written the run since
    catch_ups = 0  # jobs caught up with the writes another process made since

    def __init__(
        self,
        conn: psycopg.Connection,
        url: str,
        *,
        known: SharedKnown | None = None,
        reconnect: bool = True,
        reconnect_for: float = RECONNECT_FOR,
    ) -> None:
        self.known = KnownView(known if known is not None else SharedKnown())
        super().__init__(DIALECT, self.known)
        self.conn = conn
        self._dsn = url
        self.url = redact(url)
        self.reconnect = reconnect
        self.reconnect_for = reconnect_for
        self.reconnects = 0
        self._lock = threading.RLock()
        # A worker's step: its delta rows (and what goes with each) held back for its
        # COMMIT (`commit_step`); None outside a step.
        self._defer: list[tuple[Sequence[Any] | None, Sequence[Statement]]] | None = None
        # A step's rows of a run it did not know, read with its first statements (`begin`).
        self._read_along: tuple[str, list[list[Any]]] | None = None
        self._reading: str | None = None  # the run this step reads along (`start_reading`)
        # A step's pipeline `begin_unanswered` opened, left by `commit_step`.
        self._pipe: contextlib.ExitStack | None = None
        self._keys: list[int] = []  # numbers for new runs' rows (`_new_key`)
        # Deliveries written with their step in one round trip (`queue.deliver`), and
        # those tried so that found the run or task otherwise and went the usual way.
        self.at_once = 0
        self.at_once_missed = 0
        self._keys_pid = os.getpid()

    @classmethod
    def from_url(
        cls, url: str, *, known: SharedKnown | None = None, reconnect: bool = True
    ) -> PostgresStore:
        """Connect, create or migrate the schema, and return the store."""
        return cls(open_prepared(url), url, known=known, reconnect=reconnect)

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r})"

    def where(self) -> str:
        """The store's URL (password hidden), for messages."""
        return self._where()

    # ------------------------------------------------------------ reconnecting

    def retrying(self, attempt: Callable[[], T], settle: Callable[[], T | None] | None = None) -> T:
        """Run `attempt`; when the connection is lost, reconnect and run it again (see the
        class docstring). `settle`, for a write, is called first after reconnecting: a
        value other than None is what the write returned when it was in fact done."""
        if not self.reconnect or self.in_transaction():
            return attempt()
        deadline: float | None = None
        while True:
            try:
                return attempt()
            except ConnectionLost as exc:
                if deadline is None:
                    deadline = time.monotonic() + self.reconnect_for
                    log.warning("%s; reconnecting", exc.message)
                self._reopen(deadline, exc)
            if settle is not None:
                done = self._settle(settle, deadline)
                if done is not None:
                    return done

    def _settle(self, settle: Callable[[], T | None], deadline: float) -> T | None:
        while True:
            try:
                return settle()
            except ConnectionLost as exc:
                self._reopen(deadline, exc)

    def _reopen(self, deadline: float, lost: ConnectionLost) -> None:
        """Replace the lost connection; ConnectionLost once `deadline` has passed."""
        conn = reopen(lambda: open_prepared(self._dsn), deadline, lost, self.reconnect_for)
        with self._lock:
            close_quietly(self.conn)
            self.conn = conn
            self.reconnects += 1

    # ------------------------------------------------------------ transactions

    def in_transaction(self) -> bool:
        """True while a transaction is open on the connection."""
        status = self.conn.info.transaction_status
        return status in (
            psycopg.pq.TransactionStatus.INTRANS,
            psycopg.pq.TransactionStatus.INERROR,
            # In pipeline mode: statements sent (a BEGIN among them), not all answered.
            psycopg.pq.TransactionStatus.ACTIVE,
        )

    @contextmanager
    def _write(self, *, pipeline: bool = False) -> Iterator[psycopg.Cursor[Any]]:
        with self._lock, errors(self.url):
            if self.in_transaction():  # part of the caller's transaction
                self._send_held()  # a step's deltas held back go first, in their order
                yield self.conn.cursor()
                return
            self.known.begin()
            mark = prepared_mark(self.conn)
            try:
                if pipeline:
                    # BEGIN and COMMIT sent with the statements, in one pipeline block: one
                    # round trip. (psycopg's `transaction()` in pipeline mode nests a
                    # pipeline on each side of its BEGIN, each synced on leaving: three.)
                    with self.conn.pipeline():
                        self.conn.execute("BEGIN")
                        yield self.conn.cursor()
                        self.known.committing()
                        self.conn.execute("COMMIT")
                else:
                    with self.conn.transaction():
                        yield self.conn.cursor()
                        self.known.committing()
            except BaseException:
                self.known.rollback()
                self._abandon(mark)  # psycopg's transaction() rolled back already
                raise
            self._committed()

    @contextmanager
    def _read(self) -> Iterator[psycopg.Cursor[Any]]:
        """A read-only transaction with one snapshot, in pipeline mode: its BEGIN travels
        with its first statement, its COMMIT with its last (statements whose rows are not
        fetched in between go together, see `_fetch_all`)."""
        with self._lock, errors(self.url):
            if self.in_transaction():
                yield self.conn.cursor()
                return
            try:
                with self.conn.pipeline():
                    self.conn.execute(Q["begin_read"])
                    yield self.conn.cursor()
                    self.conn.execute("COMMIT")
            except BaseException:
                self._abandon()
                raise

    def _new_key(self, cur: Any) -> int:
        """A number for a new run's row from the table's sequence, taken KEYS_AT_ONCE at a
        time (a submit then reads nothing back: one round trip). A forked child takes
        its own."""
        if self._keys_pid != os.getpid():
            self._keys, self._keys_pid = [], os.getpid()
        if not self._keys:
            with self.conn.cursor() as fresh:
                fresh.execute(Q["run_keys"], (KEYS_AT_ONCE,))
                self._keys = sorted((int(row[0]) for row in fresh.fetchall()), reverse=True)
        return self._keys.pop()

    def _read_rows(self, queries: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Any]]:
        """The rows of each query in one snapshot, sent with the read's BEGIN and COMMIT
        (one round trip; in the caller's open transaction: its statements, together)."""
        with self._lock, errors(self.url):
            if self.in_transaction():
                return self._fetch_all(self.conn.cursor(), queries)
            if len(queries) == 1:  # a statement has a snapshot of its own: no BEGIN, COMMIT
                sql, params = queries[0]
                return [self.conn.execute(sql, params).fetchall()]
            try:
                with self.conn.pipeline():
                    self.conn.execute(Q["begin_read"])
                    cursors = [self.conn.execute(sql, params) for sql, params in queries]
                    self.conn.execute("COMMIT")
            except BaseException:
                self._abandon()
                raise
            return [c.fetchall() for c in cursors]

    def _fetch_all(
        self, cur: psycopg.Cursor[Any], queries: Sequence[tuple[str, Sequence[Any]]]
    ) -> list[list[Any]]:
        """The rows of each query, sent together (one round trip, in pipeline mode)."""
        with self.conn.pipeline():
            cursors = [self.conn.execute(sql, params) for sql, params in queries]
        return [c.fetchall() for c in cursors]

    @contextmanager
    def transaction(self, *, pipeline: bool = False) -> Iterator[psycopg.Connection]:
        """A write transaction on this store's connection (store methods called inside
        join it); what it learned of runs is shared with other threads at its COMMIT.
        `pipeline`: in pipeline mode (statements whose rows are not read go together
        with the next that is, and with the COMMIT): for statements that read no
        `rowcount`."""
        with self._write(pipeline=pipeline):
            yield self.conn

    @contextmanager
    def snapshot(self) -> Iterator[psycopg.Connection]:
        """A read-only transaction with one snapshot (or the caller's open transaction)."""
        with self._read():
            yield self.conn

    @contextmanager
    def session(self) -> Iterator[psycopg.Connection]:
        """The connection for statements of their own (autocommit), errors in one line."""
        with self._lock, errors(self.url):
            yield self.conn

    def _append_delta(self, params: Sequence[Any], then: Sequence[Statement] = ()) -> int:
        """In a worker's step the delta row is held back and sent with the COMMIT, checked
        by `ablauf.check_delta` in the same statement (`CHECKED_DELTA`: the transaction
        then fails unless it wrote that row itself), followed by what goes with it
        (`then`)."""
        if self._defer is not None:
            self._defer.append((params, then))
            return 1
        return super()._append_delta(params, then)

    def _later(self, sql: str, params: Sequence[Any]) -> None:
        """A statement of a step whose answer is not read: sent with the step's COMMIT
        (after what was held back before it), or now outside a worker's step."""
        if self._defer is not None:
            self._defer.append((None, [(sql, [params])]))
        else:
            self.conn.execute(sql, params)

    def _committed(self) -> None:
        """After a COMMIT: count it, and share what the transaction learned."""
        self.commits += 1
        self.known.commit()

    def _abandon(self, mark: int | None = None) -> None:
        """Roll back a transaction that failed (when the connection still works), and
        have psycopg prepare its statements again if it prepared any since `mark`
        (`forget_prepared`)."""
        if self.conn.closed:
            return
        forget_prepared(self.conn, mark)
        if not self.in_transaction():
            return
        try:
            self.conn.execute("ROLLBACK")
        except psycopg.Error as exc:
            log.debug("%s: rollback after a failed step: %s", self.url, exc)

    # ------------------------------------------------------------ a worker's step
    #
    # One transaction whose BEGIN travels with its first statement (`begin`) and whose
    # COMMIT travels with its last (`commit_step`), in psycopg pipeline mode: a sequential
    # step is one commit and two round trips.

    @contextmanager
    def step(self) -> Iterator[psycopg.Connection]:
        """The transaction of a restart: whatever way it ends, what it learned and its
        held-back delta are dropped unless committed; an error abandons it."""
        with self._lock, errors(self.url):
            self.known.begin()
            mark = prepared_mark(self.conn)
            try:
                yield self.conn
            except BaseException:
                self.known.rollback()
                self._close_pipe()
                self._abandon(mark)
                raise
            finally:
                self._close_pipe()
                self._defer = None
                self._read_along = None
                if self._reading is not None:
                    self.known.shared.done_reading(self._reading)
                    self._reading = None
                if self.known.in_transaction:  # every path ends the transaction
                    self.known.rollback()

    def begin(self, sql: str, params: Sequence[Any], *, run_id: str | None = None) -> Any:
        """BEGIN and a first statement in one round trip; the statement's first row. The
        step's delta is then held back for `commit_step`. `run_id`: the run the step
        writes; when this process does not know it, its rows are read along (`base_for`
        builds it from them: no round trip of its own), unless another thread of the
        process reads them along with its own step (`SharedKnown.start_reading`)."""
        return self._begin([(sql, params)], run_id)[0]

    def begin_with(
        self,
        sql: str,
        params: Sequence[Any],
        then: str,
        then_params: Sequence[Any],
        *,
        run_id: str | None = None,
    ) -> tuple[Any, Any]:
        """`begin` with a second statement sent along (run after the first, with a
        snapshot of its own: it sees what the holder of a lock the first waited for
        wrote); the first row of each."""
        first, second = self._begin([(sql, params), (then, then_params)], run_id)
        return first, second

    def begin_unanswered(self, sql: str, params: Sequence[Any]) -> None:
        """BEGIN and a first statement sent, not waited for (pipeline mode, open until
        `commit_step`): the step is computed while the server runs them, and its writes
        and COMMIT follow them. An error of the statement fails the COMMIT (nothing of
        the step is written)."""
        pipe = contextlib.ExitStack()
        pipe.enter_context(self.conn.pipeline())
        self._pipe = pipe
        self.conn.execute("BEGIN")
        self.conn.execute(sql, params)
        self._defer = []

    def _close_pipe(self) -> None:
        """Leave the pipeline `begin_unanswered` opened (after a failure: quietly)."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            with contextlib.suppress(psycopg.Error):
                pipe.close()

    def base_known(self, run_id: str) -> Known | None:
        """What this process knows of the run, pinned for the transaction as the base of
        its next write (`base_for` without the run's newest write read under its lock:
        a base that is not the newest makes the write's number taken, and the COMMIT
        fails); None when it knows nothing of it."""
        base = self.known.get(run_id)
        if base is not None:
            self.known.pin(run_id, base)
            self.fault("based", run_id)
        return base

    def _begin(self, statements: list[tuple[str, Sequence[Any]]], run_id: str | None) -> list[Any]:
        # The run's rows, when read along, are read after the first statements (after the
        # run's lock: they see what its holder wrote, and no one writes them meanwhile).
        reads: list[tuple[str, Sequence[Any]]] = []
        unknown = run_id is not None and self.known.get(run_id) is None
        if unknown and run_id is not None and self.known.shared.start_reading(run_id):
            self._reading = run_id
            reads = self.load_queries(run_id)
        with self.conn.pipeline():
            self.conn.execute("BEGIN")
            cursors = [self.conn.execute(sql, params) for sql, params in statements]
            loads = [self.conn.execute(sql, params) for sql, params in reads]
        self._defer = []
        if run_id is not None and loads:
            self._read_along = (run_id, [cur.fetchall() for cur in loads])
        return [cur.fetchone() for cur in cursors]

    def end(self, *, commit: bool) -> None:
        """End the step's transaction here (nothing written, or only queue rows)."""
        self._defer = None
        if commit:
            self.known.committing()
        self.conn.execute("COMMIT" if commit else "ROLLBACK")
        if commit:
            self._committed()
        else:
            self.known.rollback()

    def base_for(self, run_id: str, key: int, seq: int) -> Known:
        """The job a step of the run builds on, pinned for the transaction: what this
        process knows, when that is the run's newest write `seq` the caller saw under the
        lock (row `key`); else what it knows caught up with the writes since (another
        process made them: `SqlStore._caught_up`); else the run read again."""
        base = self.known.get(run_id)
        if base is None or (base.key == key and base.seq < seq):
            # Another thread of this process committed the write and is publishing it: it
            # released the lock with its COMMIT, before it could say what it wrote.
            base = self.known.wait_for(run_id, seq, PUBLISH_WAIT)
        if base is not None and base.key == key and base.seq > seq:
            # What is known was committed, so the statement saw an older snapshot than its
            # lock (a delivery's statement locks the row it read): ask again.
            seq = self._newest_write_locked(run_id, seq)
        if base is not None and base.key == key and base.seq < seq:
            # Another process wrote its last steps: catch up with them, not the run read.
            caught = self._caught_up(self.conn.cursor(), base, seq)
            if caught is not None:
                self.catch_ups += 1
                self.known.shared.catch_ups += 1
                base, seq = caught, caught.seq
        if base is None or base.seq != seq or base.key != key:
            self.loads += 1
            self.known.shared.loads += 1
            along, self._read_along = self._read_along, None
            if along is not None and along[0] == run_id and base is None:
                self.loaded(run_id, along[1])  # read with the step's first statements
            else:
                self.load(run_id)
            base = self.known.get(run_id)
            if base is None:
                raise InternalError(f"run {run_id} was read but is not known")
        self.known.pin(run_id, base)
        self.fault("based", run_id)
        return base

    def commit_step(self, run_id: str, send: Callable[[psycopg.Connection], T]) -> T:
        """Send the held-back delta (checked to be this transaction's), what `send` sends,
        and COMMIT, in one round trip; what `send` returned (read its cursors after)."""
        self.fault("commit", run_id)
        self.known.committing()
        # The pipeline `begin_unanswered` opened, or one of its own: left (synced) here.
        pipe, self._pipe = self._pipe, None
        with pipe if pipe is not None else self.conn.pipeline():
            self._send_held()
            out = send(self.conn)
            self.conn.execute("COMMIT")
        self._defer = None
        self.fault("committed", run_id)
        self._committed()
        return out

    def _send_held(self) -> None:
        """Send the step's held-back delta rows, each checked (`CHECKED_DELTA`) and followed
        by what goes with it (pipeline-safe: nothing is read)."""
        held = self._defer
        if not held:
            return
        self._defer = []
        cur = self.conn.cursor()
        for params, then in held:
            if params is not None:
                cur.execute(CHECKED_DELTA, (*params, params[0], params[1]))
            execute_all(cur, then)

    def forget(self, run_id: str) -> None:
        """Drop what this process knows of a run (after a failed or doubtful transaction)."""
        self.known.drop(run_id)

    # ------------------------------------------------------------ JobStore

    def record(self, run_id: str, job: Job) -> None:
        """Record a step (see `SqlStore.record`), holding the run's row lock like a
        worker's restart: the write of a process that read an older state is refused.

        This is a write through the API (the calling process drives the run). On a run the
        workers serve it is refused while they are at work on it (tasks queued or leased),
        except for an abort; otherwise the run is taken off the queue: its action tasks
        are dropped (an abort's too: none of them may be performed any more), so no worker
        performs a step whose leaf is no longer pending for that attempt.
        """
        base = self.known.get(run_id)

        def attempt() -> bool:
            with self._write():
                row = self.conn.execute(Q["lock_run_api"], (run_id,)).fetchone()
                if row is None:
                    raise RunError(f"no run {run_id!r} in {self._where()}")
                if row[1]:
                    self._take_off_queue(run_id, job)
                self.record_locked(run_id, job)
            return True

        def settle() -> bool | None:
            newest = self._newest_write(run_id)
            if base is not None and newest == base.seq:
                self.load(run_id)  # not written: write again from it
                return None
            stored = self.load(run_id).job
            if stored == job:
                return True  # it was written
            if base is None:
                return None
            raise self._conflict(run_id)

        self.retrying(attempt, settle)

    def _newest_write_locked(self, run_id: str, seq: int) -> int:
        """The run's newest write, read in the transaction holding its lock."""
        row = self.conn.execute(Q["newest_write"], (run_id,)).fetchone()
        return seq if row is None else int(row[0])

    def _newest_write(self, run_id: str) -> int | None:
        with self._read() as cur:
            cur.execute(Q["newest_write"], (run_id,))
            row = cur.fetchone()
        return None if row is None else int(row[0])

    def _take_off_queue(self, run_id: str, job: Job) -> None:
        """An API write on a run the workers serve (under its lock): see `record`."""
        serving = self.serving_locked(run_id)
        if serving.live and job.aborted is None:
            raise RunError(
                f"run {run_id} is being served by the workers ({serving.describe()}): "
                "wait for them, or abort it first"
            )
        self.conn.execute(Q["take_off_queue"], (run_id, run_id))

    def record_locked(self, run_id: str, job: Job, base: Known | None = None) -> int:
        """Record a step of a run this transaction locked; return its write number. A run
        that finishes is announced (`notify_finished`). `base`: what the write is computed
        from (pinned by `base_for`: what `record` diffs against and numbers after)."""
        before = base if base is not None else self.known.get(run_id)
        SqlStore.record(self, run_id, job)
        known = self.known.get(run_id)
        if known is None or (base is not None and known.seq != base.seq + 1):
            raise InternalError(f"run {run_id}: a step was not written right after its base")
        if job.status is not Status.PENDING and (before is None or before.status == Status.PENDING):
            self._later(Q["notify_finished"], (run_id,))
        return known.seq

    def _signal_run(self, cur: Any, run_id: str) -> tuple[int, str, Any] | None:
        """The run a signal is sent to or taken from, its row locked (`signal_run`)."""
        cur.execute(Q["signal_run"], (run_id,))
        row = cur.fetchone()
        return None if row is None else (int(row[0]), str(row[1]), row[2])

    def _claim_runs(self, cur: Any, run_ids: Sequence[str]) -> dict[str, tuple[int, str]]:
        """The runs of a batch of claims, kept from being deleted meanwhile (`attempt_runs`)."""
        out: dict[str, tuple[int, str]] = {}
        for chunk in range(0, len(run_ids), 500):
            part = list(run_ids[chunk : chunk + 500])
            cur.execute(Q["attempt_runs"].format(marks=", ".join(["%s"] * len(part))), part)
            for key, run_id, status in cur.fetchall():
                out[str(run_id)] = (int(key), str(status))
        return out

    def _claims_sql(self, count: int) -> str:
        """The claims of a batch, locked (`attempts_select`)."""
        return Q["attempts_select"].format(marks=", ".join(["(%s, %s, %s)"] * count))

    def _attempt(
        self, operation: Callable[[], T], settle: Callable[[], T | None] | None = None
    ) -> T:
        """The operations of the protocol reconnect like every client call (`retrying`)."""
        return self.retrying(operation, settle)

    def _conflict(self, run_id: str) -> StoreError:
        err = super()._conflict(run_id)
        return WriteConflict(err.message)

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    # ------------------------------------------------------------ the workers' view

    def serving(self, run_id: str) -> Serving:
        """What the workers are doing for a run (RunError for an unknown run)."""

        def attempt() -> Serving:
            with self._read() as cur:
                cur.execute(Q["run_exists"], (run_id,))
                if cur.fetchone() is None:
                    raise RunError(f"no run {run_id!r} in {self._where()}")
                return self.serving_locked(run_id)

        return self.retrying(attempt)

    def serving_locked(self, run_id: str) -> Serving:
        """`serving` inside the caller's transaction."""
        row = self.conn.execute(Q["serving"], (run_id,)).fetchone()
        if row is None:
            raise InternalError("an aggregate gave no row")
        return Serving(
            int(row[0]),
            int(row[1]),
            int(row[2]),
            int(row[3]),
            int(row[4]),
            tuple(row[5] or ()),
            row[6],
        )

    # ------------------------------------------------------------ faults (tests)

    def fault(self, point: str, run_id: str) -> None:
        """An injected fault at `point` ("based", "commit", "committed"), if any."""
        if self.hook is not None:
            self.hook(point, self, run_id)
        faults = self.faults
        if faults is None:
            return
        faults.pause()
        if point == "commit":
            if faults.chance(faults.rollback):
                raise WriteConflict(f"PostgreSQL store {self.url}: injected rollback")
            if faults.chance(faults.drop / 2):
                self.conn.close()
                raise ConnectionLost(f"PostgreSQL store {self.url}: injected disconnect")
        elif point == "committed" and faults.chance(faults.drop / 2):
            self.conn.close()  # committed, but the caller will not know it
            raise ConnectionLost(f"PostgreSQL store {self.url}: injected disconnect after COMMIT")

    def statement_delay(self) -> float:
        """Seconds an injected fault has a delivery's statement sleep (0: none)."""
        return 0.0 if self.faults is None else self.faults.statement_delay()
