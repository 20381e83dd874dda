"""The PostgreSQL store: runs shared by workers on many hosts, and the queue they share.

    store = PostgresStore.from_url("postgresql://user@host/db")

The tables live in the schema `ablauf` (`stores/sql/postgres/*.sql`, applied by the store
itself; a database at a newer schema version is refused): `runs`, `nodes`, `context` and
`deltas` laid out as `sqlbase` writes them, plus `tasks` (the queue: restart tasks carrying
results, action tasks carrying dispatches) and `restarts` (one row per recorded step).

`PostgresStore` is `sqlbase.SqlStore` on a psycopg connection (the `JobStore` protocol),
so `ablauf_lang.eval(..., store="postgresql://...")` and the `runs` operations work on the
same database as the workers. Every write of a run holds the run's row lock (`lock_run`,
`FOR NO KEY UPDATE`): one restart of a run at a time, and an API write never interleaves
with a worker's.

The worker's transactions are methods of the store (see `docs/distributed.md`):

- `claim`: take the oldest ready tasks (`FOR UPDATE SKIP LOCKED`), leasing the actions;
- `deliver`: hand over results: restart the run at once when its lock is free (taken
  without waiting), else queue them as restart tasks;
- `run_restart`: wait for a run's lock, then apply every result queued for it at once;
- `queue_result`, and the janitor's `renew_leases`, `release_leases`, `recover_leases`.

A worker process shares what its threads know of the runs they wrote (`SharedKnown`, the
base class's per-run memory of the last job), so a step does not read the tree again:
only what was committed is shared, and a step checks it against the run's newest write
number under the lock; a stale copy is read again, never written over.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

import psycopg

from ablauf_lang import serde
from ablauf_lang.errors import AblaufError, InternalError, RunError, StoreError
from ablauf_lang.job import INTERRUPTED, Job, can_replay, prepare_replay, restart_job
from ablauf_lang.nodes import Dispatch, LeafState, Result, Status
from ablauf_lang.stores import sqlbase

TASKS_CHANNEL = "ablauf_tasks"  # NOTIFY: tasks are ready to be taken
RUNS_CHANNEL = "ablauf_runs"  # NOTIFY run_id: the run finished
MIGRATIONS = ("sql", "postgres")
_MIGRATION_LOCK = 0x61626C61  # pg_advisory_xact_lock key ("abla"): one migrator at a time
_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


# ---------------------------------------------------------------- connections and errors


def one_line(exc: BaseException) -> str:
    """A driver error as one line (libpq messages span several)."""
    text = str(exc).strip() or type(exc).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def redact(url: str) -> str:
    """The URL without its password."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def connect(url: str, *, purpose: str = "store") -> psycopg.Connection:
    """Open an autocommit connection (transactions are explicit); StoreError, one line,
    when the URL is wrong or the server cannot be reached."""
    kwargs: dict[str, Any] = {"application_name": f"ablauf-{purpose}"[:63]}
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise StoreError(f"bad PostgreSQL URL {redact(url)!r}: {one_line(exc)}") from None
    if "connect_timeout" not in params:
        kwargs["connect_timeout"] = 10
    try:
        return psycopg.connect(url, autocommit=True, **kwargs)
    except psycopg.Error as exc:
        raise StoreError(
            f"cannot connect to PostgreSQL at {redact(url)}: {one_line(exc)}"
        ) from None


def is_connection_error(exc: BaseException) -> bool:
    """True when `exc` means the connection is gone (server down or restarted, network cut),
    not that a statement failed (a serialization failure is an OperationalError too)."""
    if isinstance(exc, psycopg.InterfaceError):
        return True
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    # No SQLSTATE: the client lost the connection; class 08: connection exception;
    # 57P01-57P03: the server is shutting down or not accepting connections.
    return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")


# ---------------------------------------------------------------- migrations


def migrations() -> list[tuple[int, str, str]]:
    """The schema's migration files, in order: (version, file name, SQL text)."""
    folder = resources.files("ablauf_lang.stores").joinpath(*MIGRATIONS)
    found = []
    for entry in folder.iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    if [v for v, _, _ in found] != list(range(1, len(found) + 1)):
        raise InternalError(f"migration files are not numbered 1..N: {[n for _, n, _ in found]}")
    return found


def schema_version(conn: psycopg.Connection) -> int:
    """The version of the ablauf schema in this database (0: none yet)."""
    row = conn.execute("SELECT to_regclass('ablauf.schema_version') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM ablauf.schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: psycopg.Connection, url: str = "") -> int:
    """Bring the schema up to date in one transaction; return its version.

    A database at a newer version than this code knows is refused (StoreError). Many
    processes may start at once: an advisory lock lets one migrate while the others wait,
    then find the work done.
    """
    files = migrations()
    latest = files[-1][0]
    current = schema_version(conn)
    if current < latest:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            current = schema_version(conn)
            for version, _name, text in files:
                if version > current:
                    conn.execute(text.encode())
                    conn.execute(
                        "INSERT INTO ablauf.schema_version (version) VALUES (%s)", (version,)
                    )
                    current = version
    if current > latest:
        raise StoreError(
            f"the database at {redact(url)} has ablauf schema version {current}, newer than "
            f"this ablauf_lang supports ({latest}): upgrade ablauf_lang"
        )
    return current


# ---------------------------------------------------------------- results as JSON text


def encode_result(result: Result) -> str:
    """A result as JSON text (an output or error JSON cannot hold becomes a failure)."""
    data: dict[str, Any] = {
        "id": result.id,
        "attempt": result.attempt,
        "state": str(result.state),
        "started_at": result.started_at,
        "finished_at": result.finished_at,
    }
    try:
        data["output"] = serde.encode_value(result.output)
        data["error"] = serde.encode_value(result.error)
        return _dumps(data)
    except (AblaufError, ValueError) as exc:
        data.update(state="failure", output=None, error=f"result cannot be stored: {exc}")
        return _dumps(data)


def decode_result(text: str) -> Result:
    """Invert `encode_result`."""
    data = json.loads(text)
    return Result(
        int(data["id"]),
        data.get("attempt"),
        LeafState(data["state"]),
        serde.decode_value(data.get("output")),
        serde.decode_value(data.get("error")),
        data.get("started_at"),
        data.get("finished_at"),
    )


# ---------------------------------------------------------------- the store


class SharedKnown(OrderedDict[str, sqlbase.Known]):
    """What the store objects of one process's threads know of runs (`SqlStore._known`).

    Only what was committed is shared: a store object stages what it learns inside a
    transaction (`KnownView`) and publishes it after the COMMIT. Otherwise a thread could
    build on a write that was rolled back, whose number another process then took.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def move_to_end(self, key: str, last: bool = True) -> None:
        with self.lock:
            if key in self:  # another thread may have just dropped it
                super().move_to_end(key, last)

    def popitem(self, last: bool = True) -> tuple[str, sqlbase.Known]:
        with self.lock:
            return super().popitem(last)


class KnownView:
    """A store object's `_known`: the shared entries, plus what its open transaction
    learned (staged until it commits, dropped if it rolls back)."""

    def __init__(self, shared: SharedKnown) -> None:
        self.shared = shared
        self.staged: dict[str, sqlbase.Known] | None = None

    def begin(self) -> None:
        self.staged = {}

    def commit(self) -> None:
        staged, self.staged = self.staged or {}, None
        for key, value in staged.items():
            self.shared[key] = value
            self.shared.move_to_end(key)

    def rollback(self) -> None:
        staged, self.staged = self.staged or {}, None
        for key in staged:
            self.shared.pop(key, None)

    def get(self, key: str, default: Any = None) -> Any:
        if self.staged is not None and key in self.staged:
            return self.staged[key]
        return self.shared.get(key, default)

    def __getitem__(self, key: str) -> sqlbase.Known:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value  # type: ignore[no-any-return]

    def __setitem__(self, key: str, value: sqlbase.Known) -> None:
        if self.staged is not None:
            self.staged[key] = value
        else:
            self.shared[key] = value

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.shared)

    def move_to_end(self, key: str, last: bool = True) -> None:
        if self.staged is None:
            self.shared.move_to_end(key, last)

    def popitem(self, last: bool = True) -> tuple[str, sqlbase.Known]:
        return self.shared.popitem(last)

    def pop(self, key: str, default: Any = None) -> Any:
        if self.staged is not None:
            self.staged.pop(key, None)
        return self.shared.pop(key, default)

    def clear(self) -> None:
        if self.staged is not None:
            self.staged.clear()
        self.shared.clear()


class PostgresStore(sqlbase.SqlStore):
    """Runs in a PostgreSQL database (`postgresql://...`), shared by many processes.

    The `JobStore` protocol is `sqlbase.SqlStore`'s. A transaction opened by one of the
    methods below (or by the worker) takes in the `sqlbase` operations called inside it:
    they run in it rather than in transactions of their own.
    """

    PLACEHOLDER = "%s"

    def __init__(
        self, conn: psycopg.Connection, url: str, *, known: SharedKnown | None = None
    ) -> None:
        super().__init__()
        self._known: KnownView = KnownView(known if known is not None else SharedKnown())  # type: ignore[assignment]
        self.conn = conn
        self.url = redact(url)
        self._lock = threading.RLock()
        self._defer: list[tuple[str, Sequence[Any]]] | None = None

    @classmethod
    def from_url(cls, url: str, *, known: SharedKnown | None = None) -> PostgresStore:
        """Connect, create or migrate the schema, and return the store."""
        conn = connect(url)
        try:
            prepare(conn, url)
        except BaseException:
            conn.close()
            raise
        return cls(conn, url, known=known)

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r})"

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ sqlbase hooks

    def _in_transaction(self) -> bool:
        return self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    @contextmanager
    def _write(self) -> Iterator[psycopg.Cursor[Any]]:
        with self._lock, _errors(self.url):
            if self._in_transaction():  # part of the caller's transaction
                yield self.conn.cursor()
                return
            self._known.begin()
            try:
                with self.conn.transaction():
                    yield self.conn.cursor()
            except BaseException:
                self._known.rollback()
                raise
            self._committed()

    @contextmanager
    def _read(self) -> Iterator[psycopg.Cursor[Any]]:
        with self._lock, _errors(self.url):
            if self._in_transaction():
                yield self.conn.cursor()
                return
            with self.conn.transaction():
                # One snapshot for every SELECT of the operation.
                self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield self.conn.cursor()

    def _write_one(self, sql: str, params: Sequence[Any]) -> int:
        """One statement of sqlbase's (the INSERT of a step's delta). In a worker's step it
        is held back and sent with the COMMIT, followed by `ablauf.check_delta`: the
        transaction then fails unless it wrote that row itself (see `_finish_step`)."""
        if self._defer is not None and sql.startswith("INSERT INTO deltas"):
            self._defer.append((sql, params))
            return 1
        return super()._write_one(sql, params)

    def _insert_run(self, cur: Any, columns: Sequence[str], values: Sequence[Any]) -> int:
        marks = ", ".join("%s" for _ in columns)
        cur.execute(
            f"INSERT INTO runs ({', '.join(columns)}) VALUES ({marks}) RETURNING id", values
        )
        return int(cur.fetchone()[0])

    # ------------------------------------------------------------ JobStore

    def create_run(
        self,
        job: Job,
        *,
        source: str | None = None,
        filename: str | None = None,
        run_id: str | None = None,
        enqueue: bool = False,
    ) -> str:
        """Record a new run; with `enqueue`, also queue its first restart for the workers
        (in the same transaction: a submitted run is never left without a task)."""
        with self._write():
            run_id = super().create_run(job, source=source, filename=filename, run_id=run_id)
            if enqueue:
                enqueue_restart(self.conn, run_id, None)
        return run_id

    def record(self, run_id: str, job: Job) -> None:
        """Record a step (see sqlbase), holding the run's row lock like a worker's restart:
        the write of a process that read an older state of the run is refused."""
        with self._write():
            if lock_run(self.conn, run_id) is None:
                raise RunError(f"no run {run_id!r} in {self._where()}")
            self._record_locked(run_id, job)

    def _record_locked(self, run_id: str, job: Job) -> None:
        """Record a step; a run that finishes is announced on `RUNS_CHANNEL`, and in an
        aborted run the actions no one took yet are dropped from the queue."""
        before = self._known.get(run_id)
        super().record(run_id, job)
        if job.status is not Status.PENDING and (before is None or before.status == Status.PENDING):
            self.conn.execute("SELECT pg_notify(%s, %s)", (RUNS_CHANNEL, run_id))
        if job.aborted is not None:
            self.conn.execute(
                "DELETE FROM tasks WHERE run_id = %s AND kind = 'action' AND lease_owner IS NULL",
                (run_id,),
            )

    def _conflict(self, run_id: str) -> StoreError:
        err = super()._conflict(run_id)
        return WriteConflict(err.message)

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    # ------------------------------------------------------------ for workers and tools

    def restart(
        self,
        run_id: str,
        key: int,
        extra: Sequence[Result],
        *,
        worker: str,
        claim: int = 0,
        lease: float = 30.0,
    ) -> Step:
        """Restart a run whose row (`key`) the caller locked in its open transaction: every
        result queued for it plus `extra`, in one go; record the step, queue its actions."""
        body = self._restart_body(run_id, key, extra, worker=worker, force=True)
        assert body is not None
        new, seq, dispatches, queued, log = body
        claimed = enqueue_actions(
            self.conn, run_id, dispatches, claim=claim, owner=worker, lease=lease, log=log
        )
        return Step(new, seq, log[2], queued, claimed)

    def _restart_body(
        self,
        run_id: str,
        key: int,
        extra: Sequence[Result],
        *,
        worker: str,
        force: bool,
        state: Sequence[Any] | None = None,
    ) -> tuple[Job, int, list[Dispatch], list[int], tuple[int, str, int, datetime]] | None:
        """Take the queued results, restart the job, record the step (all but enqueueing the
        new actions); None when there is nothing to do and not `force`. `state`: the run's
        (newest write, clock, queued results) when the caller read them already.

        The job is what this process last wrote or read of the run when that is still the
        newest write (`seq`); otherwise the run is read again.
        """
        if state is None:
            state = self.conn.execute(_RUN_STATE, (run_id, key)).fetchone()
        if state is None:
            raise InternalError(f"run {run_id} vanished under its row lock")
        seq, started, batch = state
        queued = [(int(t), r) for t, r in json.loads(batch)]
        if not queued and not extra and not force:
            return None  # another worker took these results with an earlier restart
        results = [decode_result(r) for _, r in queued if r is not None]
        results.extend(extra)
        known = self._known.get(run_id)
        if known is None or known.seq != seq or known.key != key:
            self.loads += 1
            old = self.load(run_id).job
        else:
            old = known.job
        new, dispatches = restart_job(old, results, time.time())
        self._record_locked(run_id, new)
        seq = self._known[run_id].seq
        return new, seq, dispatches, [t for t, _ in queued], (seq, worker, len(results), started)

    # ------------------------------------------------------------ a worker's transactions
    #
    # Each is one transaction whose BEGIN travels with its first statement and whose COMMIT
    # travels with its last (psycopg pipeline mode): a sequential step is one commit and
    # two round trips.

    def claim(self, owner: str, lease: float, limit: int = 1) -> list[Claimed]:
        """Take the oldest ready tasks, at most `limit` (`FOR UPDATE SKIP LOCKED`), in one
        statement: action tasks are leased to `owner` and returned with their dispatch;
        restart tasks are only named (run them with `run_restart`), in queue order."""
        with self._lock, _errors(self.url):
            rows = self.conn.execute(_CLAIM, (limit, owner, lease)).fetchall()
        out = []
        for row in sorted(rows):
            task_id, run_id, kind = int(row[0]), str(row[1]), str(row[2])
            if kind != "action" or row[3] is None:
                out.append(Claimed(task_id, run_id, kind, None))
                continue
            dispatch = Dispatch(
                int(row[3]),
                row[5],
                serde.decode_value(json.loads(row[7])),
                bool(row[6]),
                int(row[4]),
                serde.decode_value(json.loads(row[8])),
            )
            out.append(Claimed(task_id, run_id, kind, dispatch))
        return out

    @contextlib.contextmanager
    def _step_transaction(self) -> Iterator[None]:
        """The transaction of a restart: whatever way it ends, the staged write and the
        deferred notifications are dropped unless committed; an error abandons it."""
        self._known.begin()
        try:
            yield
        except BaseException:
            self._known.rollback()
            self._abandon()
            raise
        finally:
            self._defer = None
            if self._known.staged is not None:  # every path ends the transaction
                self._known.rollback()

    def run_restart(self, run_id: str, *, worker: str, claim: int, lease: float) -> Step | None:
        """Restart a run for its queued results: wait for its row lock (a restart of the run
        elsewhere finishes first), then apply every result queued for it at once."""
        with self._lock, _errors(self.url), self._step_transaction():
            row = self._begin(_LOCK_RUN, (run_id,))
            if row is None:
                self._end("ROLLBACK")
                return None
            self._defer = []
            body = self._restart_body(run_id, int(row[0]), [], worker=worker, force=False)
            if body is None:
                self._end("ROLLBACK")
                return None
            return self._finish_step(run_id, body, claim=claim, owner=worker, lease=lease)

    def deliver(
        self,
        run_id: str,
        items: Sequence[tuple[int, Result]],
        *,
        worker: str,
        claim: int,
        lease: float,
    ) -> Delivery:
        """Hand over results of action tasks of one run leased to `worker`: remove the tasks
        and, when no one holds the run's row, restart the run with them right away (and
        lease the next action to `worker`); otherwise queue them as restart tasks. Tasks
        whose lease was lost (recovered by another worker) are left alone and their results
        dropped (`Delivery.lost`)."""
        ids = [t for t, _ in items]
        by_id = dict(items)
        with self._lock, _errors(self.url), self._step_transaction():
            if len(items) == 1:
                params: tuple[Any, ...] = (
                    ids[0],
                    worker,
                    run_id,
                    run_id,
                    encode_result(items[0][1]),
                    run_id,
                )
                row = self._begin(_FINISH_ONE, params)
            else:
                results = [encode_result(r) for _, r in items]
                params = (ids, worker, run_id, run_id, ids, results, run_id)
                row = self._begin(_FINISH, params)
            mine = [int(t) for t in (row[0] or [])]
            lost = len(ids) - len(mine)
            if not mine:
                self._end("ROLLBACK")
                return Delivery("lost", run_id, lost=lost)
            key = row[1]
            if key is None:
                self._end("COMMIT")
                return Delivery("queued", run_id, lost=lost)
            self._defer = []
            body = self._restart_body(
                run_id,
                int(key),
                [by_id[t] for t in sorted(mine)],
                worker=worker,
                force=True,
                state=row[2:5],
            )
            assert body is not None
            step = self._finish_step(run_id, body, claim=claim, owner=worker, lease=lease)
            return Delivery("restarted", run_id, step, lost=lost)

    def queue_result(self, task_id: int, result: Result, *, worker: str) -> str | None:
        """Remove an action task leased to `worker` and queue its result as a restart task,
        in one statement; the run id, or None when the lease was lost."""
        with self._lock, _errors(self.url):
            row = self.conn.execute(_QUEUE_RESULT, (task_id, worker, encode_result(result)))
            found = row.fetchone()
        return None if found is None else str(found[0])

    def _begin(self, sql: str, params: Sequence[Any]) -> Any:
        """BEGIN and a first statement in one round trip; the statement's first row."""
        with self.conn.pipeline():
            self.conn.execute("BEGIN")
            cur = self.conn.execute(sql, params)
        return cur.fetchone()

    def _end(self, command: str) -> None:
        self.conn.execute(command)
        if command == "COMMIT":
            self._committed()
        else:
            self._known.rollback()

    def _committed(self) -> None:
        """After a COMMIT: count it, and share what the transaction learned."""
        self.commits += 1
        self._known.commit()

    def _abandon(self) -> None:
        """Roll back a transaction that failed (when the connection still works)."""
        if self.conn.closed or not self._in_transaction():
            return
        with contextlib.suppress(psycopg.Error):
            self.conn.execute("ROLLBACK")

    def _finish_step(
        self,
        run_id: str,
        body: tuple[Job, int, list[Dispatch], list[int], tuple[int, str, int, datetime]],
        *,
        claim: int,
        owner: str,
        lease: float,
    ) -> Step:
        """Queue the step's actions (leasing `claim` of them to `owner`), log it and COMMIT,
        in one round trip."""
        new, seq, dispatches, queued, log = body
        deferred, self._defer = self._defer or [], None
        with self.conn.pipeline():
            for sql, params in deferred:
                self.conn.execute(sql, params)
                self.conn.execute("SELECT ablauf.check_delta(%s, %s)", (params[0], params[1]))
            cur = _enqueue(self.conn, run_id, dispatches, claim, owner, lease, log)
            unclaimed = len(dispatches) - min(claim, len(dispatches))
            if unclaimed:
                self.conn.execute("SELECT pg_notify(%s, %s)", (TASKS_CHANNEL, str(unclaimed)))
            self.conn.execute("COMMIT")
        self._committed()
        claimed = _claimed(cur.fetchall(), dispatches)
        return Step(new, seq, log[2], queued, claimed)

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """A transaction on this store's connection (store methods called inside join it)."""
        with self._write():
            yield self.conn

    def forget(self, run_id: str) -> None:
        """Drop what this process knows of a run (after a failed or doubtful transaction)."""
        self._known.pop(run_id, None)

    def requeue(self, run_id: str, *, retry: bool) -> Job:
        """Hand a run back to the workers: resume it (`retry=False`, an unfinished run) or
        retry its failed steps (`retry=True`, a failed run). The replay is recorded and a
        restart queued in one transaction holding the run's lock; returns the job."""
        with self._write():
            if lock_run(self.conn, run_id) is None:
                raise RunError(f"no run {run_id!r} in {self._where()}")
            job = self.load(run_id).job
            check_replay(run_id, job, retry=retry)
            job = prepare_replay(job, retry_interrupted=retry)
            self._record_locked(run_id, job)
            enqueue_restart(self.conn, run_id, None)
        return job

    def queue_counts(self) -> dict[str, int]:
        """Tasks by state: ready, leased (being performed), broken (kept aside)."""
        with self._read() as cur:
            cur.execute(
                "SELECT count(*) FILTER (WHERE lease_owner IS NULL AND error IS NULL), "
                "count(*) FILTER (WHERE lease_owner IS NOT NULL), "
                "count(*) FILTER (WHERE error IS NOT NULL) FROM tasks"
            )
            row = cur.fetchone()
        ready, leased, broken = row if row is not None else (0, 0, 0)
        return {"ready": int(ready), "leased": int(leased), "broken": int(broken)}

    loads = 0  # jobs read again because another process had written the run since


def check_replay(run_id: str, job: Job, *, retry: bool) -> None:
    """RunError unless the run can be resumed (`retry=False`) or retried (`retry=True`),
    with the same rules as `ablauf_lang.resume` and `ablauf_lang.retry`."""
    if not retry:
        if job.done:
            raise RunError(
                f"run {run_id} already finished ({job.status}); use retry to run "
                "its failed steps again"
            )
        return
    if not job.done:
        raise RunError(f"run {run_id} is still running; resume it, or abort it first")
    if job.status is Status.SUCCESS:
        raise RunError(f"run {run_id} succeeded: nothing to retry")
    if not can_replay(job, retry_interrupted=True):
        raise RunError(
            f"run {run_id} has nothing to retry: its failed steps are not "
            "idempotent (mark them {:idempotent? true} to allow retries)"
        )


def prepare(conn: psycopg.Connection, url: str) -> None:
    """Migrate the schema, and make its tables the connection's default names."""
    with _errors(redact(url)):
        migrate(conn, url)
        conn.execute("SET search_path TO ablauf, public")


class ConnectionLost(StoreError):
    """The connection to the server went away (server down or restarted, network cut)."""


class WriteConflict(StoreError):
    """Another process wrote the run since this one read it: read it again and redo."""


@contextmanager
def _errors(url: str) -> Iterator[None]:
    """Turn driver errors into a one-line StoreError (ConnectionLost for a lost connection)."""
    try:
        yield
    except psycopg.Error as exc:
        kind = StoreError
        if is_connection_error(exc):
            kind = ConnectionLost
        elif isinstance(exc, psycopg.errors.SerializationFailure):
            kind = WriteConflict
        raise kind(f"PostgreSQL store {url}: {one_line(exc)}") from None


# ---------------------------------------------------------------- the run row


_LOCK_RUN = "SELECT id FROM ablauf.runs WHERE run_id = %s FOR NO KEY UPDATE"

# Under the run's lock, in a statement of its own (so that it sees what the holder of the
# lock it waited for wrote): the run's newest write, and the results queued for
# it that no one else holds, taken out of the queue.
_RUN_STATE = (
    "WITH b AS (DELETE FROM ablauf.tasks WHERE task_id IN (SELECT task_id FROM ablauf.tasks "
    "WHERE run_id = %s AND kind = 'restart' AND error IS NULL FOR UPDATE SKIP LOCKED) "
    "RETURNING task_id, result) "
    "SELECT coalesce((SELECT max(d.seq) FROM ablauf.deltas d WHERE d.run = r.id), "
    "r.snapshot_seq), clock_timestamp(), (SELECT coalesce(json_agg(json_build_array("
    "b.task_id, b.result) ORDER BY b.task_id), '[]')::text FROM b) "
    "FROM ablauf.runs r WHERE r.id = %s"
)


# Take the oldest ready tasks; lease those that are actions (one statement, autocommit).
_CLAIM = (
    "WITH t AS (SELECT task_id, run_id, kind FROM ablauf.tasks "
    "WHERE lease_owner IS NULL AND error IS NULL ORDER BY task_id LIMIT %s "
    "FOR UPDATE SKIP LOCKED), "
    "a AS (UPDATE ablauf.tasks k SET lease_owner = %s, "
    "lease_until = now() + %s * interval '1 second', tries = k.tries + 1 FROM t "
    "WHERE k.task_id = t.task_id AND t.kind = 'action' "
    "RETURNING k.task_id, k.node, k.attempt, k.action, k.idempotent, k.payload, k.context) "
    "SELECT t.task_id, t.run_id, t.kind, a.node, a.attempt, a.action, a.idempotent, "
    "a.payload, a.context FROM t LEFT JOIN a ON a.task_id = t.task_id"
)

# What both deliveries below end with: take the results queued for the run (when its row
# lock was had) and return the row described below.
_FINISH_TAIL = (
    "b AS (DELETE FROM ablauf.tasks WHERE task_id IN (SELECT task_id FROM ablauf.tasks "
    "WHERE run_id = %s AND EXISTS (SELECT 1 FROM r) "
    "AND kind = 'restart' AND error IS NULL FOR UPDATE SKIP LOCKED) "
    "RETURNING task_id, result) "
    "SELECT (SELECT array_agg(task_id) FROM t), (SELECT id FROM r), "
    "coalesce((SELECT max(d.seq) FROM ablauf.deltas d WHERE d.run = (SELECT id FROM r)), "
    "(SELECT snapshot_seq FROM r)), clock_timestamp(), "
    "(SELECT coalesce(json_agg(json_build_array(b.task_id, b.result) ORDER BY b.task_id), "
    "'[]')::text FROM b), (SELECT count(*) FROM n)"
)

# Deliver results of one run, in one statement: remove their action tasks (those still
# leased to this worker), try the run's row lock without waiting; when another transaction
# holds it, queue the results as restart tasks (and wake a worker); when this one got it,
# take the results queued for the run and read its newest write. Row: the task ids removed
# (NULL: every lease was lost), the run's key (NULL: the results were queued), its newest
# write, the clock, the queued results.
# (The lock is taken without waiting, so the statement's snapshot is as new as the lock;
# were it not, the write of the step would conflict and be refused, not lost.)
_FINISH = (
    "WITH t AS (DELETE FROM ablauf.tasks WHERE task_id = ANY(%s) AND lease_owner = %s "
    "RETURNING task_id), "
    "r AS (SELECT id, snapshot_seq FROM ablauf.runs WHERE run_id = %s "
    "AND EXISTS (SELECT 1 FROM t) FOR NO KEY UPDATE SKIP LOCKED), "
    "q AS (INSERT INTO ablauf.tasks (run_id, kind, result) SELECT %s, 'restart', u.result "
    "FROM unnest(%s::bigint[], %s::text[]) AS u(task_id, result) "
    "WHERE u.task_id IN (SELECT task_id FROM t) AND NOT EXISTS (SELECT 1 FROM r) "
    "RETURNING task_id), "
    "n AS (SELECT pg_notify('"
    + TASKS_CHANNEL
    + "', count(*)::text) FROM q HAVING count(*) > 0), "
    + _FINISH_TAIL
)

# The same for one result (the step of a sequence), with plain parameters: quicker.
_FINISH_ONE = (
    "WITH t AS (DELETE FROM ablauf.tasks WHERE task_id = %s AND lease_owner = %s "
    "RETURNING task_id), "
    "r AS (SELECT id, snapshot_seq FROM ablauf.runs WHERE run_id = %s "
    "AND EXISTS (SELECT 1 FROM t) FOR NO KEY UPDATE SKIP LOCKED), "
    "q AS (INSERT INTO ablauf.tasks (run_id, kind, result) SELECT %s, 'restart', %s "
    "WHERE EXISTS (SELECT 1 FROM t) AND NOT EXISTS (SELECT 1 FROM r) RETURNING task_id), "
    "n AS (SELECT pg_notify('" + TASKS_CHANNEL + "', '1') FROM q), " + _FINISH_TAIL
)

# Remove an action task leased to this worker and queue its result (one statement).
_QUEUE_RESULT = (
    "WITH t AS (DELETE FROM ablauf.tasks WHERE task_id = %s AND lease_owner = %s "
    "RETURNING run_id), "
    "q AS (INSERT INTO ablauf.tasks (run_id, kind, result) SELECT run_id, 'restart', %s "
    "FROM t RETURNING run_id), "
    "n AS (SELECT pg_notify('" + TASKS_CHANNEL + "', '1') FROM q) "
    "SELECT q.run_id, (SELECT count(*) FROM n) FROM q"
)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A task `PostgresStore.claim` took: an action leased (with its dispatch), or a
    restart task to run with `PostgresStore.run_restart`."""

    task_id: int
    run_id: str
    kind: str
    dispatch: Dispatch | None


@dataclass(frozen=True, slots=True)
class Delivery:
    """What became of a result: "restarted" (applied at once), "queued", or "lost"."""

    outcome: str
    run_id: str | None = None
    step: Step | None = None
    lost: int = 0  # results dropped: their task's lease was lost


def lock_run(conn: psycopg.Connection, run_id: str, *, wait: bool = True) -> int | None:
    """Lock the run's row for this transaction (one restart of a run at a time); return
    its key (`runs.id`), or None when there is no such run.

    `FOR NO KEY UPDATE` is the lock an UPDATE of the row takes: it excludes other restarts
    of the run, but not the foreign-key checks of rows being inserted for it (a queued
    result, a delta), so queueing a result never waits for a restart. With `wait=False` a
    row another transaction holds gives None at once.
    """
    row = conn.execute(_LOCK_RUN if wait else _LOCK_RUN + " SKIP LOCKED", (run_id,)).fetchone()
    return None if row is None else int(row[0])


# ---------------------------------------------------------------- the queue


def enqueue_actions(
    conn: psycopg.Connection,
    run_id: str,
    dispatches: Sequence[Dispatch],
    *,
    claim: int = 0,
    owner: str | None = None,
    lease: float = 30.0,
    log: tuple[int, str, int, datetime] | None = None,
) -> list[tuple[int, Dispatch]]:
    """Queue one action task per dispatch; the first `claim` are leased to `owner` at once
    (the caller performs them). Returns their (task_id, dispatch); NOTIFYs for the rest.

    `log` = (seq, worker, results, started): also add the step's row to `restarts`, in the
    same statement.
    """
    if not dispatches and log is None:
        return []
    claimed = _claimed(
        _enqueue(conn, run_id, dispatches, claim, owner, lease, log).fetchall(), dispatches
    )
    if len(dispatches) > len(claimed):
        conn.execute(
            "SELECT pg_notify(%s, %s)", (TASKS_CHANNEL, str(len(dispatches) - len(claimed)))
        )
    return claimed


def _enqueue(
    conn: psycopg.Connection,
    run_id: str,
    dispatches: Sequence[Dispatch],
    claim: int,
    owner: str | None,
    lease: float,
    log: tuple[int, str, int, datetime] | None,
) -> psycopg.Cursor[Any]:
    """Execute the INSERT of `enqueue_actions` (rows: task_id, node, leased?)."""
    contexts: dict[int, str] = {}  # dispatches of one restart share their context object

    def context_text(d: Dispatch) -> str:
        text = contexts.get(id(d.context))
        if text is None:
            text = contexts[id(d.context)] = _dumps(serde.encode_value(d.context or {}))
        return text

    head = ""
    params: list[Any] = []
    if log is not None:
        head = (
            "WITH log AS (INSERT INTO ablauf.restarts (run_id, seq, worker, results, "
            "dispatches, started, finished) VALUES (%s, %s, %s, %s, %s, %s, clock_timestamp())) "
        )
        seq, worker, n_results, started = log
        params = [run_id, seq, worker, n_results, len(dispatches), started]
    if len(dispatches) == 1:  # the common step of a sequence: plain values, no arrays
        d = dispatches[0]
        return conn.execute(
            head + "INSERT INTO ablauf.tasks (run_id, kind, node, attempt, action, "
            "idempotent, payload, context, lease_owner, lease_until, tries) "
            "VALUES (%s, 'action', %s, %s, %s, %s, %s, %s, %s, "
            "CASE WHEN %s THEN now() + %s * interval '1 second' END, %s) "
            "RETURNING task_id, node, lease_owner IS NOT NULL",
            (
                *params,
                run_id,
                d.id,
                d.attempt,
                d.action,
                d.idempotent,
                _dumps(serde.encode_value(d.payload)),
                context_text(d),
                owner if claim > 0 else None,
                claim > 0,
                lease,
                1 if claim > 0 else 0,
            ),
        )
    return conn.execute(
        head
        + "INSERT INTO ablauf.tasks (run_id, kind, node, attempt, action, idempotent, payload, "
        "context, lease_owner, lease_until, tries) "
        "SELECT %s, 'action', u.node, u.attempt, u.action, u.idempotent, u.payload, u.context, "
        "CASE WHEN u.mine THEN %s END, "
        "CASE WHEN u.mine THEN now() + %s * interval '1 second' END, "
        "CASE WHEN u.mine THEN 1 ELSE 0 END "
        "FROM unnest(%s::int[], %s::int[], %s::text[], %s::bool[], %s::text[], %s::text[], "
        "%s::bool[]) AS u(node, attempt, action, idempotent, payload, context, mine) "
        "RETURNING task_id, node, lease_owner IS NOT NULL",
        (
            *params,
            run_id,
            owner,
            lease,
            [d.id for d in dispatches],
            [d.attempt for d in dispatches],
            [d.action for d in dispatches],
            [d.idempotent for d in dispatches],
            [_dumps(serde.encode_value(d.payload)) for d in dispatches],
            [context_text(d) for d in dispatches],
            [i < claim for i in range(len(dispatches))],
        ),
    )


def _claimed(
    rows: Sequence[Sequence[Any]], dispatches: Sequence[Dispatch]
) -> list[tuple[int, Dispatch]]:
    by_node = {d.id: d for d in dispatches}
    return [(int(task_id), by_node[int(node)]) for task_id, node, mine in rows if mine]


def enqueue_restart(conn: psycopg.Connection, run_id: str, result: Result | None) -> None:
    """Queue a restart task (with a result to apply, or none) and wake a worker."""
    conn.execute(
        "INSERT INTO ablauf.tasks (run_id, kind, result) VALUES (%s, 'restart', %s)",
        (run_id, None if result is None else encode_result(result)),
    )
    conn.execute("SELECT pg_notify(%s, '1')", (TASKS_CHANNEL,))


@dataclass(frozen=True, slots=True)
class Step:
    """What a restart did: the new job and its write number, the actions it claimed."""

    job: Job
    seq: int
    results: int
    task_ids: list[int]  # the restart tasks it consumed
    claimed: list[tuple[int, Dispatch]]


@dataclass(frozen=True, slots=True)
class Task:
    """A task taken from the queue (locked by the caller's transaction)."""

    task_id: int
    run_id: str
    kind: str  # "restart" or "action"


def take_task(conn: psycopg.Connection) -> Task | None:
    """Lock the oldest task no one holds (`FOR UPDATE SKIP LOCKED`), or None."""
    row = conn.execute(
        "SELECT task_id, run_id, kind FROM ablauf.tasks "
        "WHERE lease_owner IS NULL AND error IS NULL "
        "ORDER BY task_id LIMIT 1 FOR UPDATE SKIP LOCKED"
    ).fetchone()
    return None if row is None else Task(int(row[0]), row[1], row[2])


def renew_leases(
    conn: psycopg.Connection, owners: Sequence[str], task_ids: Sequence[int], lease: float
) -> int:
    """Extend the leases `owners` hold on these tasks; return how many they still hold."""
    if not task_ids:
        return 0
    cur = conn.execute(
        "UPDATE ablauf.tasks SET lease_until = now() + %s * interval '1 second' "
        "WHERE task_id = ANY(%s) AND lease_owner = ANY(%s)",
        (lease, list(task_ids), list(owners)),
    )
    return cur.rowcount


def release_leases(conn: psycopg.Connection, owner: str, keep: Sequence[int] = ()) -> int:
    """Put the action tasks `owner` leased but did not start (all but `keep`) back in the
    queue, as if never taken."""
    cur = conn.execute(
        "UPDATE ablauf.tasks SET lease_owner = NULL, lease_until = NULL, "
        "tries = greatest(tries - 1, 0) WHERE lease_owner = %s AND NOT (task_id = ANY(%s))",
        (owner, list(keep)),
    )
    if cur.rowcount:
        conn.execute("SELECT pg_notify(%s, %s)", (TASKS_CHANNEL, str(cur.rowcount)))
    return cur.rowcount


def recover_leases(conn: psycopg.Connection, limit: int = 100) -> tuple[int, int]:
    """Recover action tasks whose lease expired (their worker died or lost the database).

    An idempotent action goes back in the queue, to run again; a non-idempotent one becomes
    a failure result (error `interrupted: ...`) queued as a restart task, so the run goes on
    by the normal rules and can be retried later. Returns (requeued, failed).
    """
    rows = conn.execute(
        "SELECT task_id, run_id, node, attempt, action, idempotent, lease_owner "
        "FROM ablauf.tasks WHERE lease_owner IS NOT NULL AND lease_until < now() "
        "AND error IS NULL ORDER BY lease_until LIMIT %s FOR UPDATE SKIP LOCKED",
        (limit,),
    ).fetchall()
    again = [r[0] for r in rows if r[5]]
    lost = [r for r in rows if not r[5]]
    if again:
        conn.execute(
            "UPDATE ablauf.tasks SET lease_owner = NULL, lease_until = NULL "
            "WHERE task_id = ANY(%s)",
            (again,),
        )
    if lost:
        conn.execute("DELETE FROM ablauf.tasks WHERE task_id = ANY(%s)", ([r[0] for r in lost],))
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
        conn.execute(
            "INSERT INTO ablauf.tasks (run_id, kind, result) "
            "SELECT u.run_id, 'restart', u.result FROM unnest(%s::text[], %s::text[]) "
            "AS u(run_id, result)",
            ([r[1] for r in lost], results),
        )
    if rows:
        conn.execute("SELECT pg_notify(%s, %s)", (TASKS_CHANNEL, str(len(rows))))
    return len(again), len(lost)


def set_aside(conn: psycopg.Connection, run_id: str, task_ids: Sequence[int], message: str) -> None:
    """Keep tasks that cannot be processed out of the queue, saying why (never lost)."""
    conn.execute(
        "UPDATE ablauf.tasks SET error = %s WHERE task_id = ANY(%s)", (message, list(task_ids))
    )
    conn.execute(
        "UPDATE ablauf.runs SET error = %s, updated = %s WHERE run_id = %s",
        (message, time.time(), run_id),
    )


def process_name() -> str:
    """`host:pid`: names this process in leases and in the restarts table."""
    return f"{socket.gethostname()}:{os.getpid()}"


__all__ = [
    "ConnectionLost",
    "PostgresStore",
    "SharedKnown",
    "WriteConflict",
    "migrate",
    "schema_version",
]
