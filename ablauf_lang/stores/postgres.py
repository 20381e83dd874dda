"""The PostgreSQL store: runs shared by workers on many hosts, and the queue they share.

    store = PostgresStore.from_url("postgresql://user@host/db")

The tables live in the schema `ablauf` (`stores/sql/postgres/*.sql`, applied by the store
itself under a session advisory lock; a database at a newer schema version is refused):
`runs`, `nodes`, `context` and `deltas` laid out as `sqlbase` writes them, plus `tasks`
(the queue: restart tasks carrying results, action tasks carrying dispatches), `restarts`
(one row per recorded step) and `workers` (the live workers and the actions they serve).

`PostgresStore` is `sqlbase.SqlStore` on a psycopg connection (the `JobStore` protocol),
so `ablauf_lang.eval(..., store="postgresql://...")` and the `runs` operations work on the
same database as the workers. Every write of a run holds the run's row lock (`lock_run`,
`FOR NO KEY UPDATE`): one restart of a run at a time, and an API write never interleaves
with a worker's. A client store (the default) reconnects when the server restarts and
runs the operation again, settling first what became of a write whose COMMIT it sent.

The worker's transactions are methods of the store (see `docs/distributed.md`):

- `claim`: take the oldest ready tasks this worker can perform (`FOR UPDATE SKIP LOCKED`),
  leasing the actions;
- `deliver`: hand over results: restart the run at once when its lock is free (taken
  without waiting), else queue them as restart tasks;
- `run_restart`: wait for a run's lock, then apply every result queued for it at once;
- `queue_result`, and the janitor's `renew_leases`, `recover_leases`, `repair_stranded`.

A worker process shares what its threads know of the runs they wrote (`SharedKnown`, the
base class's per-run memory of the last job), so a step does not read the tree again. A
step computes the new job from one base (what the process knew, if it is the run's newest
write under the lock, else the run read again), pins it for its transaction and writes the
delta against that same base, numbered right after it: a base that turns out stale is a
refused write (the unique write number, `ablauf.check_delta`), never a write over another.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any, TypeVar

import psycopg

from ablauf_lang.codec import job as serde
from ablauf_lang.engine.job import (
    INTERRUPTED,
    Job,
    can_resume,
    can_retry,
    inflight_leaves,
    prepare_replay,
    restart_job,
)
from ablauf_lang.engine.nodes import Dispatch, LeafState, Result, Status
from ablauf_lang.errors import AblaufError, InternalError, RunError, StoreError
from ablauf_lang.stores import sql as sqlbase
from ablauf_lang.stores.base import RunInfo, StoredRun, new_run_id

log = logging.getLogger("ablauf.store")

TASKS_CHANNEL = "ablauf_tasks"  # NOTIFY: tasks are ready to be taken
RUNS_CHANNEL = "ablauf_runs"  # NOTIFY run_id: the run finished
MIGRATIONS = ("sql", "postgres")
_MIGRATION_LOCK = 0x61626C61  # pg_advisory_lock key ("abla"): one migrator at a time
_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
RECONNECT_FOR = 60.0  # seconds a client store keeps trying to reach a server that went away
WAITING_NOTE = 5.0  # seconds a ready task waits before `notes` says no worker serves it
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
T = TypeVar("T")


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
    not that a statement failed (a serialization failure is an OperationalError too, and
    so is psycopg's PipelineAborted: a statement skipped after an earlier one failed)."""
    if isinstance(exc, psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.errors.PipelineAborted):
        return False
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    # No SQLSTATE: the client lost the connection; class 08: connection exception;
    # 57P01-57P03: the server is shutting down or not accepting connections.
    return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")


# ---------------------------------------------------------------- migrations


def migrations() -> list[tuple[int, str, str]]:
    """The schema's migration files, in order: (version, file name, SQL text).

    Versions are unique and increasing; a gap is allowed (a number kept for another
    change): every file whose version a database has not recorded is applied, in order.
    """
    folder = resources.files("ablauf_lang.stores").joinpath(*MIGRATIONS)
    found = []
    for entry in folder.iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if not versions or versions[0] != 1 or len(set(versions)) != len(versions):
        raise InternalError(f"migration files must start at 0001, once each: {versions}")
    return found


def applied_versions(conn: psycopg.Connection) -> set[int]:
    """The migrations this database has recorded (empty: no ablauf schema yet).

    The table is looked up in `pg_catalog` with the statement's own snapshot, not with
    `to_regclass`: a backend's catalog cache can keep saying "no such table" after another
    backend created it, for the rest of a transaction that was waiting for that one.
    """
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'ablauf' AND c.relname = 'schema_version')"
    ).fetchone()
    if not row or not row[0]:
        return set()
    return {int(r[0]) for r in conn.execute("SELECT version FROM ablauf.schema_version")}


def schema_version(conn: psycopg.Connection) -> int:
    """The version of the ablauf schema in this database (0: none yet)."""
    return max(applied_versions(conn), default=0)


def migrate(conn: psycopg.Connection, url: str = "") -> int:
    """Bring the schema up to date; return its version.

    A database at a newer version than this code knows is refused (StoreError). Many
    processes may start at once on a fresh database: the first takes a session advisory
    lock in a statement of its own and migrates in one transaction; the others wait for
    the lock, then look again in a new transaction (which sees what the first committed)
    and find nothing left to do.
    """
    files = migrations()
    latest = files[-1][0]
    applied = applied_versions(conn)
    if any(v not in applied for v, _, _ in files) and max(applied, default=0) <= latest:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raise InternalError("migrate needs a connection outside any transaction")
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            with conn.transaction():
                applied = applied_versions(conn)
                for version, _name, text in files:
                    if version not in applied:
                        conn.execute(text.encode())
                        conn.execute(
                            "INSERT INTO ablauf.schema_version (version) VALUES (%s)", (version,)
                        )
                        applied.add(version)
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    current = max(applied, default=0)
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


# ---------------------------------------------------------------- fault injection


@dataclass
class Faults:
    """Faults injected into the workers' step transactions, for stress tests only.

    Read from `$ABLAUF_PG_FAULTS` when the module is imported, for example
    `delay=0.003,rollback=0.05,drop=0.02,seed=7`:

    - `delay`: pauses of up to that many seconds where a step is most exposed to races
      (after choosing its base, before its COMMIT, between its COMMIT and sharing what it
      learned with the other threads);
    - `rollback`: the probability that a step is rolled back instead of committed (as a
      write race would);
    - `drop`: the probability that the connection is closed just before a step's COMMIT,
      or just after it (the worker then does not know whether it committed).
    """

    delay: float = 0.0
    rollback: float = 0.0
    drop: float = 0.0
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def parse(cls, text: str) -> Faults:
        """`name=value,...` as described above (StoreError for anything else)."""
        faults = cls()
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = item.partition("=")
            try:
                number = float(value)
            except ValueError:
                raise StoreError(f"ABLAUF_PG_FAULTS: {item!r} is not name=number") from None
            if name == "seed":
                faults.rng.seed(int(number))
            elif name in ("delay", "rollback", "drop"):
                setattr(faults, name, number)
            else:
                raise StoreError(f"ABLAUF_PG_FAULTS: unknown fault {name!r}")
        return faults

    def pause(self) -> None:
        if self.delay > 0:
            time.sleep(self.rng.uniform(0, self.delay))

    def chance(self, probability: float) -> bool:
        return probability > 0 and self.rng.random() < probability


FAULTS = (
    Faults.parse(os.environ["ABLAUF_PG_FAULTS"]) if os.environ.get("ABLAUF_PG_FAULTS") else None
)


# ---------------------------------------------------------------- the store


class SharedKnown(OrderedDict[str, sqlbase.Known]):
    """What the store objects of one process's threads know of runs (`SqlStore._known`).

    Only what was committed is shared: a store object stages what it learns inside a
    transaction (`KnownView`) and publishes it after the COMMIT. Otherwise a thread could
    build on a write that was rolled back, whose number another process then took. A
    publication never replaces a newer write of the run by an older one (a thread can be
    preempted between its COMMIT and publishing, while others go on writing the run).
    """

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def publish(self, key: str, value: sqlbase.Known) -> None:
        """Share what a committed transaction learned of a run, unless newer is known."""
        with self.lock:
            current = super().get(key)
            if current is not None and current.key == value.key and current.seq > value.seq:
                return
            super().__setitem__(key, value)
            super().move_to_end(key)

    def move_to_end(self, key: str, last: bool = True) -> None:
        with self.lock:
            if key in self:  # another thread may have just dropped it
                super().move_to_end(key, last)

    def popitem(self, last: bool = True) -> tuple[str, sqlbase.Known]:
        with self.lock:
            return super().popitem(last)


class KnownView:
    """A store object's `_known`: the shared entries, plus what its open transaction
    learned or pinned (staged until it commits, dropped if it rolls back)."""

    def __init__(self, shared: SharedKnown) -> None:
        self.shared = shared
        self.staged: dict[str, sqlbase.Known] | None = None

    def begin(self) -> None:
        self.staged = {}

    def pin(self, key: str, value: sqlbase.Known) -> None:
        """Make `value` what this transaction knows of the run, whatever other threads
        publish meanwhile: the base its write is computed, diffed and numbered from."""
        if self.staged is None:
            raise InternalError("pin outside a transaction")
        self.staged[key] = value

    def commit(self) -> None:
        staged, self.staged = self.staged or {}, None
        for key, value in staged.items():
            self.shared.publish(key, value)

    def rollback(self) -> None:
        # What the shared entries say was committed: it stays true. The step of a worker
        # checks an entry against the run's newest write under the lock before using it.
        self.staged = None

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
            self.shared.publish(key, value)

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
        with self.shared.lock:
            return self.shared.pop(key, default)

    def clear(self) -> None:
        if self.staged is not None:
            self.staged.clear()
        with self.shared.lock:
            self.shared.clear()


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
        return not (self.live or self.expired or self.broken)

    def describe(self) -> str:
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


class PostgresStore(sqlbase.SqlStore):
    """Runs in a PostgreSQL database (`postgresql://...`), shared by many processes.

    The `JobStore` protocol is `sqlbase.SqlStore`'s. A transaction opened by one of the
    methods below (or by the worker) takes in the `sqlbase` operations called inside it:
    they run in it rather than in transactions of their own.

    `reconnect` (clients: on; the worker's slots, which handle it themselves: off): when
    the connection is lost, an operation outside a caller's transaction reconnects with
    backoff for up to `reconnect_for` seconds and runs again; a write whose COMMIT was sent
    is first looked up, so it is never done twice nor lost.
    """

    PLACEHOLDER = "%s"
    # Tests: called as hook(point, store, run_id) at the points "based" (a step chose its
    # base job) and "committed" (a step committed, not yet shared with other threads).
    hook: Callable[[str, PostgresStore, str], None] | None = None
    faults: Faults | None = FAULTS

    def __init__(
        self,
        conn: psycopg.Connection,
        url: str,
        *,
        known: SharedKnown | None = None,
        reconnect: bool = True,
        reconnect_for: float = RECONNECT_FOR,
    ) -> None:
        super().__init__()
        self._known: KnownView = KnownView(known if known is not None else SharedKnown())  # type: ignore[assignment]
        self.conn = conn
        self._dsn = url
        self.url = redact(url)
        self.reconnect = reconnect
        self.reconnect_for = reconnect_for
        self.reconnects = 0
        self._lock = threading.RLock()
        self._defer: list[tuple[str, Sequence[Any]]] | None = None

    @classmethod
    def from_url(
        cls, url: str, *, known: SharedKnown | None = None, reconnect: bool = True
    ) -> PostgresStore:
        """Connect, create or migrate the schema, and return the store."""
        conn = _open_prepared(url)
        return cls(conn, url, known=known, reconnect=reconnect)

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r})"

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ reconnecting

    def _retrying(
        self, attempt: Callable[[], T], settle: Callable[[], T | None] | None = None
    ) -> T:
        """Run `attempt`; when the connection is lost, reconnect and run it again (see the
        class docstring). `settle`, for a write, is called first after reconnecting: a
        value other than None is what the write returned when it was in fact done."""
        if not self.reconnect or self._in_transaction():
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
        delay = 0.05
        while True:
            try:
                conn = _open_prepared(self._dsn)
            except StoreError as exc:
                if time.monotonic() + delay > deadline:
                    raise ConnectionLost(
                        f"{lost.message}; could not reconnect within {self.reconnect_for:g}s: "
                        f"{exc.message}"
                    ) from None
                time.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(2.0, delay * 2)
                continue
            with self._lock:
                with contextlib.suppress(Exception):
                    self.conn.close()
                self.conn = conn
                self.reconnects += 1
            return

    # ------------------------------------------------------------ sqlbase hooks

    def _in_transaction(self) -> bool:
        status = self.conn.info.transaction_status
        return status in (
            psycopg.pq.TransactionStatus.INTRANS,
            psycopg.pq.TransactionStatus.INERROR,
        )

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
        new_id = run_id or new_run_id()

        def attempt() -> str:
            with self._write():
                made = super(PostgresStore, self).create_run(
                    job, source=source, filename=filename, run_id=new_id
                )
                if enqueue:
                    self.conn.execute("UPDATE runs SET on_queue = true WHERE run_id = %s", (made,))
                    enqueue_restart(self.conn, made, None, note="submit")
            return made

        def settle() -> str | None:
            # The COMMIT was sent: if the run is there, it is this one (a fresh id, or one
            # that was free when the write began).
            return new_id if self._exists_now(new_id) else None

        return self._retrying(attempt, settle)

    def _exists_now(self, run_id: str) -> bool:
        with self._read() as cur:
            cur.execute("SELECT 1 FROM runs WHERE run_id = %s", (run_id,))
            return cur.fetchone() is not None

    def record(self, run_id: str, job: Job) -> None:
        """Record a step (see sqlbase), holding the run's row lock like a worker's restart:
        the write of a process that read an older state of the run is refused.

        This is a write through the API (the calling process drives the run). On a run the
        workers serve it is refused while they are at work on it (tasks queued or leased),
        except for an abort; otherwise the run is taken off the queue: its action tasks
        are dropped (an abort's too: none of them may be performed any more), so no worker
        performs a step whose leaf is no longer pending for that attempt.
        """
        base = self._known.get(run_id)

        def attempt() -> bool:
            with self._write():
                row = self.conn.execute(_LOCK_RUN_API, (run_id,)).fetchone()
                if row is None:
                    raise RunError(f"no run {run_id!r} in {self._where()}")
                if row[1]:
                    self._take_off_queue(run_id, job)
                self._record_locked(run_id, job)
            return True

        def settle() -> bool | None:
            newest = self._newest_write(run_id)
            if base is not None and newest == base.seq:
                sqlbase.SqlStore.load(self, run_id)  # not written: write again from it
                return None
            stored = sqlbase.SqlStore.load(self, run_id).job
            if stored == job:
                return True  # it was written
            if base is None:
                return None
            raise self._conflict(run_id)

        self._retrying(attempt, settle)

    def _newest_write(self, run_id: str) -> int | None:
        with self._read() as cur:
            cur.execute(
                "SELECT coalesce((SELECT max(d.seq) FROM deltas d WHERE d.run = r.id), "
                "r.snapshot_seq) FROM runs r WHERE r.run_id = %s",
                (run_id,),
            )
            row = cur.fetchone()
        return None if row is None else int(row[0])

    def _take_off_queue(self, run_id: str, job: Job) -> None:
        """An API write on a run the workers serve (under its lock): see `record`."""
        serving = self._serving_locked(run_id)
        if serving.live and job.aborted is None:
            raise RunError(
                f"run {run_id} is being served by the workers ({serving.describe()}): "
                "wait for them, or abort it first"
            )
        self.conn.execute("DELETE FROM tasks WHERE run_id = %s AND kind = 'action'", (run_id,))
        self.conn.execute("UPDATE runs SET on_queue = false WHERE run_id = %s", (run_id,))

    def _record_locked(self, run_id: str, job: Job, base: sqlbase.Known | None = None) -> None:
        """Record a step; a run that finishes is announced on `RUNS_CHANNEL`. `base`: what
        the write is computed from (pinned: what `record` diffs against, numbered after)."""
        before = base if base is not None else self._known.get(run_id)
        super().record(run_id, job)
        if base is not None and self._known[run_id].seq != base.seq + 1:
            raise InternalError(f"run {run_id}: a step was not written right after its base")
        if job.status is not Status.PENDING and (before is None or before.status == Status.PENDING):
            self.conn.execute("SELECT pg_notify(%s, %s)", (RUNS_CHANNEL, run_id))

    def load(self, run_id: str) -> StoredRun:
        """Load a run with its whole job (see sqlbase); reconnects like every client call."""
        return self._retrying(lambda: sqlbase.SqlStore.load(self, run_id))

    def info(self, run_id: str) -> RunInfo:
        """What the store knows of a run, without loading its tree."""
        return self._retrying(lambda: sqlbase.SqlStore.info(self, run_id))

    def exists(self, run_id: str) -> bool:
        """True when the store has this run."""
        return self._retrying(lambda: sqlbase.SqlStore.exists(self, run_id))

    def list_runs(
        self,
        *,
        limit: int | None = None,
        status: str | None = None,
        offset: int = 0,
        filename: str | None = None,
        since: float | None = None,
    ) -> list[RunInfo]:
        """Runs, newest first (see `sqlbase.SqlStore.list_runs` for the filters)."""
        return self._retrying(
            lambda: sqlbase.SqlStore.list_runs(
                self, limit=limit, status=status, offset=offset, filename=filename, since=since
            )
        )

    def count_runs(
        self, *, status: str | None = None, filename: str | None = None, since: float | None = None
    ) -> int:
        """How many runs `list_runs` would give without a limit."""
        return self._retrying(
            lambda: sqlbase.SqlStore.count_runs(self, status=status, filename=filename, since=since)
        )

    def resolve_run_id(self, prefix: str) -> str:
        """The id of the one run whose id starts with `prefix`."""
        return self._retrying(lambda: sqlbase.SqlStore.resolve_run_id(self, prefix))

    def _conflict(self, run_id: str) -> StoreError:
        err = super()._conflict(run_id)
        return WriteConflict(err.message)

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    # ------------------------------------------------------------ faults (tests)

    def _fault(self, point: str, run_id: str) -> None:
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

    def _slow(self, sql: str, params: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
        """With fault delays, the delivery statement pauses between taking its snapshot
        and trying the run's lock (what a busy server does now and then)."""
        faults = self.faults
        if faults is None or faults.delay <= 0 or not faults.chance(0.5):
            return sql, params
        head = "WITH t AS (DELETE FROM ablauf.tasks WHERE "
        slow = "WITH s AS (SELECT pg_sleep(%s)), " + head[5:] + "EXISTS (SELECT 1 FROM s) AND "
        return sql.replace(head, slow, 1), (faults.rng.uniform(0, faults.delay), *params)

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
        serves: Collection[str] | None = None,
    ) -> Step:
        """Restart a run whose row (`key`) the caller locked in a transaction opened with
        `transaction()`: every result queued for it plus `extra`, in one go; record the
        step, queue its actions (leasing `claim` of those whose action is in `serves` to
        `worker`). What the step learned is shared with other threads at the COMMIT."""
        body = self._restart_body(run_id, key, extra, worker=worker, force=True)
        assert body is not None
        new, seq, dispatches, queued, log_row = body
        claimed = enqueue_actions(
            self.conn,
            run_id,
            dispatches,
            claim=claim,
            owner=worker,
            lease=lease,
            log=log_row,
            serves=serves,
        )
        return Step(new, seq, log_row[2], queued, claimed)

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

        The base is what this process last wrote or read of the run when that is the newest
        write the caller saw under the lock, else the run read again; it is pinned for the
        transaction, so the delta is diffed against it and numbered right after it, whatever
        other threads share meanwhile. A base that is not the run's newest write (the
        caller's statement saw an older snapshot than its lock) makes the write's number
        taken: the transaction is refused (WriteConflict), never written over another.
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
        base = self._known.get(run_id)
        if base is None or base.seq != seq or base.key != key:
            self.loads += 1
            sqlbase.SqlStore.load(self, run_id)
            base = self._known[run_id]
        self._known.pin(run_id, base)
        self._fault("based", run_id)
        new, dispatches = restart_job(base.job, results, time.time())
        self._record_locked(run_id, new, base)
        seq = self._known[run_id].seq
        return new, seq, dispatches, [t for t, _ in queued], (seq, worker, len(results), started)

    # ------------------------------------------------------------ a worker's transactions
    #
    # Each is one transaction whose BEGIN travels with its first statement and whose COMMIT
    # travels with its last (psycopg pipeline mode): a sequential step is one commit and
    # two round trips.

    def claim(
        self, owner: str, lease: float, limit: int = 1, actions: Collection[str] | None = None
    ) -> list[Claimed]:
        """Take the oldest ready tasks, at most `limit` (`FOR UPDATE SKIP LOCKED`), in one
        statement: action tasks whose action is in `actions` (None: any) are leased to
        `owner` and returned with their dispatch; restart tasks (any worker can run them)
        are only named (run them with `run_restart`), in queue order."""
        names = None if actions is None else sorted(actions)
        with self._lock, _errors(self.url):
            rows = self.conn.execute(_CLAIM, (names, names, limit, owner, lease)).fetchall()
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

    def run_restart(
        self,
        run_id: str,
        *,
        worker: str,
        claim: int,
        lease: float,
        serves: Collection[str] | None = None,
    ) -> Step | None:
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
            return self._finish_step(
                run_id, body, claim=claim, owner=worker, lease=lease, serves=serves
            )

    def deliver(
        self,
        run_id: str,
        items: Sequence[tuple[int, Result]],
        *,
        worker: str,
        claim: int,
        lease: float,
        serves: Collection[str] | None = None,
    ) -> Delivery:
        """Hand over results of action tasks of one run leased to `worker`: remove the tasks
        and, when no one holds the run's row, restart the run with them right away (and
        lease the next action to `worker`); otherwise queue them as restart tasks. Tasks
        whose lease was lost (recovered by another worker) are left alone and their results
        dropped (`Delivery.lost`). A WriteConflict means nothing was done: the tasks are
        still leased to `worker` (queue the results with `queue_result`)."""
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
                row = self._begin(*self._slow(_FINISH_ONE, params))
            else:
                results = [encode_result(r) for _, r in items]
                params = (ids, worker, run_id, run_id, ids, results, run_id)
                row = self._begin(*self._slow(_FINISH, params))
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
            step = self._finish_step(
                run_id, body, claim=claim, owner=worker, lease=lease, serves=serves
            )
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
        serves: Collection[str] | None = None,
    ) -> Step:
        """Queue the step's actions (leasing `claim` of them to `owner`), log it and COMMIT,
        in one round trip."""
        new, seq, dispatches, queued, log_row = body
        deferred, self._defer = self._defer or [], None
        self._fault("commit", run_id)
        with self.conn.pipeline():
            for sql, params in deferred:
                self.conn.execute(sql, params)
                self.conn.execute("SELECT ablauf.check_delta(%s, %s)", (params[0], params[1]))
            cur, mine = _enqueue(
                self.conn, run_id, dispatches, claim, owner, lease, log_row, serves
            )
            unclaimed = len(dispatches) - mine
            if unclaimed:
                self.conn.execute("SELECT pg_notify(%s, %s)", (TASKS_CHANNEL, str(unclaimed)))
            self.conn.execute("COMMIT")
        self._fault("committed", run_id)
        self._committed()
        claimed = _claimed(cur.fetchall(), dispatches)
        return Step(new, seq, log_row[2], queued, claimed)

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """A transaction on this store's connection (store methods called inside join it)."""
        with self._write():
            yield self.conn

    def forget(self, run_id: str) -> None:
        """Drop what this process knows of a run (after a failed or doubtful transaction)."""
        self._known.pop(run_id, None)

    # ------------------------------------------------------------ handing runs back

    def serving(self, run_id: str) -> Serving:
        """What the workers are doing for a run (RunError for an unknown run)."""

        def attempt() -> Serving:
            with self._read() as cur:
                cur.execute("SELECT 1 FROM runs WHERE run_id = %s", (run_id,))
                if cur.fetchone() is None:
                    raise RunError(f"no run {run_id!r} in {self._where()}")
                return self._serving_locked(run_id)

        return self._retrying(attempt)

    def _serving_locked(self, run_id: str) -> Serving:
        row = self.conn.execute(_SERVING, (run_id,)).fetchone()
        assert row is not None
        return Serving(
            int(row[0]),
            int(row[1]),
            int(row[2]),
            int(row[3]),
            int(row[4]),
            tuple(row[5] or ()),
            row[6],
        )

    def requeue(self, run_id: str, *, retry: bool) -> Job:
        """Hand a run back to the workers: resume it (`retry=False`) or retry it
        (`retry=True`, see `prepare_replay`), in one transaction holding the run's lock:
        the replay is recorded, a restart queued, the run marked served by the workers.

        Refused (RunError) while the workers are at work on the run: actions queued or
        leased by a live worker, or results waiting. When the only tasks left are actions
        whose worker's lease expired, only those are touched (as the janitor would: an
        idempotent one queued again, a non-idempotent one failed as interrupted) and the
        run goes on. Returns the job as recorded.
        """
        token = f"requeue {process_name()} {uuid.uuid4().hex[:8]}"

        def attempt() -> Job:
            with self._write():
                if lock_run(self.conn, run_id) is None:
                    raise RunError(f"no run {run_id!r} in {self._where()}")
                serving = self._serving_locked(run_id)
                if serving.broken:
                    raise RunError(
                        f"run {run_id}: a restart of it failed and its results are set aside "
                        f"({serving.error}); clear ablauf.tasks.error for them to try again"
                    )
                if serving.expired:
                    again, lost = recover_leases(self.conn, run_id=run_id)
                    log.info(
                        "run %s: recovered %d expired action(s): %d to run again, %d interrupted",
                        run_id,
                        again + lost,
                        again,
                        lost,
                    )
                    return self.load(run_id).job
                what = "retry" if retry else "resume"
                if serving.live:
                    raise RunError(
                        f"run {run_id} is being served by the workers ({serving.describe()}): "
                        f"nothing to {what}; wait for it, or abort it first"
                    )
                job = self.load(run_id).job
                check_replay(run_id, job, retry=retry)
                started = self.conn.execute("SELECT clock_timestamp()").fetchone()
                new = prepare_replay(job, retry_interrupted=retry)
                self._record_locked(run_id, new)
                self._mark_served(run_id, token, started[0] if started else None)
            return new

        def settle() -> Job | None:
            with self._read() as cur:
                cur.execute(
                    "SELECT 1 FROM restarts WHERE run_id = %s AND worker = %s", (run_id, token)
                )
                found = cur.fetchone() is not None
            return sqlbase.SqlStore.load(self, run_id).job if found else None

        return self._retrying(attempt, settle)

    def _mark_served(self, run_id: str, who: str, started: datetime | None) -> None:
        """After an API write that hands the run to the workers (requeue, the janitor):
        log the write, queue a restart, mark the run served by the workers."""
        seq = self._known[run_id].seq
        self.conn.execute(
            "INSERT INTO restarts (run_id, seq, worker, results, dispatches, started, finished) "
            "VALUES (%s, %s, %s, NULL, 0, coalesce(%s, clock_timestamp()), clock_timestamp())",
            (run_id, seq, who, started),
        )
        self.conn.execute("UPDATE runs SET on_queue = true WHERE run_id = %s", (run_id,))
        enqueue_restart(self.conn, run_id, None, note=who)

    def repair_stranded(self, *, worker: str, grace: float = 2.0, limit: int = 10) -> list[str]:
        """The janitor's check: a run the workers serve that is not done and has no task at
        all (nothing queued, leased, waiting or set aside) and is not being restarted can
        never finish by itself. Hand it back to the workers by the rules of a resume
        (`prepare_replay`: steps in flight that are idempotent run again, the others fail
        as interrupted) and return what was done, one line per run."""
        with self._read() as cur:
            cur.execute(_STRANDED, (grace, limit))
            candidates = [str(r[0]) for r in cur.fetchall()]
        done = []
        for run_id in candidates:
            try:
                line = self._repair(run_id, worker)
            except (StoreError, RunError) as exc:
                if isinstance(exc, ConnectionLost):
                    raise
                line = f"run {run_id}: stranded, and cannot be handed back: {exc.message}"
            if line is not None:
                done.append(line)
        return done

    def _repair(self, run_id: str, worker: str) -> str | None:
        """`repair_stranded` for one run, in a transaction of its own."""
        with self._write():
            row = self.conn.execute(_LOCK_RUN_API + " SKIP LOCKED", (run_id,)).fetchone()
            if row is None or not row[1] or not self._serving_locked(run_id).empty:
                return None  # being restarted, taken off the queue, or served meanwhile
            started = self.conn.execute("SELECT clock_timestamp()").fetchone()
            job = self.load(run_id).job
            if job.done:
                return None
            inflight = inflight_leaves(job.root)
            again = [leaf.id for leaf in inflight if leaf.idempotent]
            lost = [leaf.id for leaf in inflight if not leaf.idempotent]
            new = prepare_replay(job)
            self._record_locked(run_id, new)
            self._mark_served(run_id, f"janitor {worker}", started[0] if started else None)
        return (
            f"run {run_id}: {len(inflight)} step(s) were in flight with no task to finish "
            f"them{_ids(again + lost)}; handed back to the workers: {len(again)} "
            f"idempotent to run again, {len(lost)} failed as interrupted"
        )

    # ------------------------------------------------------------ for people

    def notes(
        self, run_id: str, job: Job | None = None, *, after: float = WAITING_NOTE
    ) -> list[str]:
        """What a person looking at a run should know beyond its job, one line each: an
        action no live worker serves (its steps waited more than `after` seconds for one),
        a restart that failed, and (given the `job`) steps in flight with no task to
        finish them. `runs show` prints them."""

        def attempt() -> list[str]:
            out = []
            with self._read() as cur:
                cur.execute(_UNSERVED, (run_id, after))
                for action, count, waited in cur.fetchall():
                    out.append(
                        f"waiting for a worker that serves {action}: {count} step(s) queued "
                        f"for {float(waited):.0f}s and no live worker has this action"
                    )
                cur.execute("SELECT on_queue FROM runs WHERE run_id = %s", (run_id,))
                row = cur.fetchone()
                serving = self._serving_locked(run_id)
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

        return self._retrying(attempt)

    def queue_counts(self) -> dict[str, int]:
        """Tasks by state: ready, leased (being performed), broken (kept aside)."""

        def attempt() -> dict[str, int]:
            with self._read() as cur:
                cur.execute(
                    "SELECT count(*) FILTER (WHERE lease_owner IS NULL AND error IS NULL), "
                    "count(*) FILTER (WHERE lease_owner IS NOT NULL), "
                    "count(*) FILTER (WHERE error IS NOT NULL) FROM tasks"
                )
                row = cur.fetchone()
            ready, leased, broken = row if row is not None else (0, 0, 0)
            return {"ready": int(ready), "leased": int(leased), "broken": int(broken)}

        return self._retrying(attempt)

    loads = 0  # jobs read again because another process had written the run since


def _ids(ids: Sequence[int]) -> str:
    if not ids:
        return ""
    shown = ", ".join(str(i) for i in sorted(ids)[:8])
    return f" (ids {shown}{', ...' if len(ids) > 8 else ''})"


def check_replay(run_id: str, job: Job, *, retry: bool) -> None:
    """RunError unless the run can be resumed (`retry=False`) or retried (`retry=True`),
    with the same rules as `ablauf_lang.resume` and `ablauf_lang.retry`."""
    if not retry:
        if job.done:
            raise RunError(
                f"run {run_id} already finished ({job.status}); use retry to run "
                "its failed steps again"
            )
        if not can_resume(job):
            raise RunError(f"run {run_id} has nothing to resume")
        return
    if job.status is Status.SUCCESS:
        raise RunError(f"run {run_id} succeeded: nothing to retry")
    if not can_retry(job):
        raise RunError(f"run {run_id} has nothing to retry")


def _open_prepared(url: str) -> psycopg.Connection:
    conn = connect(url)
    try:
        prepare(conn, url)
    except BaseException:
        conn.close()
        raise
    return conn


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
# The same for a write through the API, which also needs to know whether workers serve it.
_LOCK_RUN_API = "SELECT id, on_queue FROM ablauf.runs WHERE run_id = %s FOR NO KEY UPDATE"

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


# Take the oldest ready tasks: restarts, and actions among those given (all when NULL);
# lease the actions (one statement, autocommit).
_CLAIM = (
    "WITH t AS (SELECT task_id, run_id, kind FROM ablauf.tasks "
    "WHERE lease_owner IS NULL AND error IS NULL "
    "AND (kind = 'restart' OR %s::text[] IS NULL OR action = ANY(%s::text[])) "
    "ORDER BY task_id LIMIT %s FOR UPDATE SKIP LOCKED), "
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


# The tasks of one run by state (see `Serving`).
_SERVING = (
    "SELECT count(*) FILTER (WHERE kind = 'action' AND lease_owner IS NULL AND error IS NULL), "
    "count(*) FILTER (WHERE kind = 'action' AND lease_owner IS NOT NULL "
    "AND lease_until >= now() AND error IS NULL), "
    "count(*) FILTER (WHERE kind = 'action' AND lease_owner IS NOT NULL "
    "AND lease_until < now() AND error IS NULL), "
    "count(*) FILTER (WHERE kind = 'restart' AND error IS NULL), "
    "count(*) FILTER (WHERE error IS NOT NULL), "
    "array_agg(DISTINCT lease_owner) FILTER (WHERE lease_until >= now()), "
    "min(error) FROM ablauf.tasks WHERE run_id = %s"
)

# Runs the workers serve that are not done, have no task at all, are not being restarted
# (checked again under the lock) and were last written more than %s seconds ago.
_STRANDED = (
    "SELECT r.run_id FROM ablauf.runs r WHERE r.status = 'pending' AND r.on_queue "
    "AND NOT EXISTS (SELECT 1 FROM ablauf.tasks t WHERE t.run_id = r.run_id) "
    "AND coalesce((SELECT max(d.updated) FROM ablauf.deltas d WHERE d.run = r.id), r.updated) "
    "< extract(epoch FROM now()) - %s ORDER BY r.id LIMIT %s"
)

# Actions of a run's ready tasks, older than %s seconds, that no live worker serves.
_UNSERVED = (
    "SELECT t.action, count(*), extract(epoch FROM now() - min(t.created)) "
    "FROM ablauf.tasks t WHERE t.run_id = %s AND t.kind = 'action' "
    "AND t.lease_owner IS NULL AND t.error IS NULL "
    "AND t.created < now() - %s * interval '1 second' "
    "AND NOT EXISTS (SELECT 1 FROM ablauf.workers w WHERE w.expires > now() "
    "AND t.action = ANY(w.actions)) GROUP BY t.action ORDER BY t.action"
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
    serves: Collection[str] | None = None,
) -> list[tuple[int, Dispatch]]:
    """Queue one action task per dispatch; the first `claim` whose action is in `serves`
    (None: any) are leased to `owner` at once (the caller performs them). Returns their
    (task_id, dispatch); NOTIFYs for the rest.

    `log` = (seq, worker, results, started): also add the step's row to `restarts`, in the
    same statement.
    """
    if not dispatches and log is None:
        return []
    cur, _ = _enqueue(conn, run_id, dispatches, claim, owner, lease, log, serves)
    claimed = _claimed(cur.fetchall(), dispatches)
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
    serves: Collection[str] | None = None,
) -> tuple[psycopg.Cursor[Any], int]:
    """Execute the INSERT of `enqueue_actions` (rows: task_id, node, leased?); return the
    cursor and how many are leased to `owner`."""
    mine: list[bool] = []
    left = claim
    for d in dispatches:
        take = left > 0 and (serves is None or d.action in serves)
        mine.append(take)
        left -= take
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
        cur = conn.execute(
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
                owner if mine[0] else None,
                mine[0],
                lease,
                1 if mine[0] else 0,
            ),
        )
        return cur, sum(mine)
    cur = conn.execute(
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
            mine,
        ),
    )
    return cur, sum(mine)


def _claimed(
    rows: Sequence[Sequence[Any]], dispatches: Sequence[Dispatch]
) -> list[tuple[int, Dispatch]]:
    by_node = {d.id: d for d in dispatches}
    return [(int(task_id), by_node[int(node)]) for task_id, node, mine in rows if mine]


def enqueue_restart(
    conn: psycopg.Connection, run_id: str, result: Result | None, *, note: str | None = None
) -> None:
    """Queue a restart task (with a result to apply, or none) and wake a worker; `note`
    says why (shown in `ablauf.queue`)."""
    conn.execute(
        "INSERT INTO ablauf.tasks (run_id, kind, result, note) VALUES (%s, 'restart', %s, %s)",
        (run_id, None if result is None else encode_result(result), note),
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


def recover_leases(
    conn: psycopg.Connection, limit: int = 100, *, run_id: str | None = None
) -> tuple[int, int]:
    """Recover action tasks whose lease expired (their worker died or lost the database),
    of one run or of any.

    An idempotent action goes back in the queue, to run again; a non-idempotent one becomes
    a failure result (error `interrupted: ...`) queued as a restart task, so the run goes on
    by the normal rules and can be retried later. Returns (requeued, failed).
    """
    rows = conn.execute(
        "SELECT task_id, run_id, node, attempt, action, idempotent, lease_owner "
        "FROM ablauf.tasks WHERE lease_owner IS NOT NULL AND lease_until < now() "
        "AND error IS NULL AND (%s::text IS NULL OR run_id = %s) "
        "ORDER BY lease_until LIMIT %s FOR UPDATE SKIP LOCKED",
        (run_id, run_id, limit),
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
            "INSERT INTO ablauf.tasks (run_id, kind, result, note) "
            "SELECT u.run_id, 'restart', u.result, 'lease expired' "
            "FROM unnest(%s::text[], %s::text[]) AS u(run_id, result)",
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


# ---------------------------------------------------------------- the workers table


def register_worker(
    conn: psycopg.Connection, name: str, actions: Collection[str], concurrency: int, lease: float
) -> None:
    """Say (again) that worker `name` is alive and serves `actions`, for `lease` seconds."""
    conn.execute(
        "INSERT INTO ablauf.workers (name, host, pid, actions, concurrency, expires) "
        "VALUES (%s, %s, %s, %s, %s, now() + %s * interval '1 second') "
        "ON CONFLICT (name) DO UPDATE SET heartbeat = now(), expires = excluded.expires, "
        "actions = excluded.actions",
        (name, socket.gethostname(), os.getpid(), sorted(actions), concurrency, lease),
    )


def unregister_worker(conn: psycopg.Connection, name: str) -> None:
    """A worker that stops says so (and forgets workers gone for more than a day)."""
    conn.execute(
        "DELETE FROM ablauf.workers WHERE name = %s OR expires < now() - interval '1 day'",
        (name,),
    )


def live_workers(conn: psycopg.Connection) -> list[tuple[str, list[str]]]:
    """(name, actions) of the workers whose heartbeat is current."""
    rows = conn.execute(
        "SELECT name, actions FROM ablauf.workers WHERE expires > now() ORDER BY name"
    ).fetchall()
    return [(str(r[0]), list(r[1])) for r in rows]


__all__ = [
    "ConnectionLost",
    "Faults",
    "PostgresStore",
    "Serving",
    "SharedKnown",
    "WriteConflict",
    "migrate",
    "schema_version",
]
