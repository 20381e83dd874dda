"""Dialect-neutral SQL persistence of runs: tables, per-restart deltas, reading back a Job.

The SQLite and PostgreSQL stores (`stores/sqlite.py`, `stores/postgres/`) are built on this
module: one `SqlStore`, built with a `Dialect` (placeholders, LIMIT, INSERT ... RETURNING)
and a `KnownRuns` (what it knows of runs); a subclass is only the connection policy
(connections, transactions, error mapping).
What the rows and deltas hold (the spec/state split of node records, the delta JSON,
reading them back into a Job) is `codec.delta`'s: this module only runs the SQL.
Every statement it runs is a named query of `sql.sql` (`Q`, loaded once); Python adds only
the dynamic parts: the `?` marks of `IN (...)` lists, the listing's WHERE/ORDER/LIMIT and
`Dialect.insert_run`'s column list.

Tables (column types are the dialect's; JSON columns are text written by `json.dumps`):

    runs    id            integer key (other tables refer to it)
            run_id        text, unique: the public id
            status        "pending" | "success" | "failure", always current
            created, updated, restarts        as of the snapshot (see `deltas`)
            aborted, todo, touched, n_nodes   the job's own fields, as of the snapshot
            snapshot_seq  the write the `nodes`/`context` rows are current with
            head_seq      the newest write (kept by a trigger on `deltas`): the run's
                          deltas are exactly snapshot_seq + 1 .. head_seq
            source, filename, initial_context, format (codec.job.VERSION), error
    nodes   (run, node) key; spec, state, children        the snapshot of the tree
    context (run, key) key; pos, value                    the snapshot of the context
    deltas  (run, seq) key; updated, restarts, data       writes since the snapshot
    leases  run key; token, host, pid, started, heartbeat, expires
                          the process driving the run (see `base.DriverLease`)
    signals (run, seq) key; name, value, sent_at, consumed_by, consumed_at
                          the run's mailbox: `send_signal` numbers them in order of
                          arrival, `take_signal` gives each to one node (`consumed_by`)
    waits   (run, node) key; kind, signal, until, attempt
                          what the run waits for (`engine.waits.wait_of` of its leaves in
                          flight): kept by `record` in the step's own transaction
                          (`clear_wait` deletes a retry's wait once its dispatch is sent)
    attempts (run, node, attempt) key; owner, lease_until, started_at, taken_from,
                          result, finished_at: the claims of non-idempotent actions'
                          attempts (`begin_attempts`), so a redelivered dispatch is never
                          performed twice

A node row is its record (`codec.job`) in three JSON texts: `spec`, `state` and
`children` (see `codec.delta`). The context is one row per top-level key.

Writing (`SqlStore.record`, one transaction per restart):

- a restart appends one `deltas` row: JSON holding the new state of the nodes it changed
  (`diff`), the context keys it changed and the job's own fields. That is one INSERT, so a
  durable step costs about one commit, whatever the size of the tree or the payloads;
- every `COMPACT_EVERY` deltas (or `COMPACT_BYTES` of them) the write folds instead: the
  `nodes`/`context` rows of everything changed since the snapshot are rewritten from the
  job in memory and the deltas deleted. So loading reads the snapshot plus at most
  `COMPACT_EVERY` small deltas, and the file does not grow with the number of steps.
- a store object that never read the run writes a whole snapshot (O(tree), rare).

Several processes: each write names the sequence number it follows (`deltas.seq`,
`runs.snapshot_seq`); if another process wrote the run in between, the write is refused
with a StoreError (two drivers of one run) instead of applying a delta to the wrong base.

Damage: every read checks what it reads (`Damage`, reported as `run ID is damaged: ...`
for that run only): the run row's fields, the step log (no write missing between the
snapshot and `head_seq`), one node row per node, each node's record (JSON, its id, the
state fields every kind has), each delta's shape. Text that is not UTF-8 (SQLite does not
check) is read as `BadText` and reported. `list_runs` checks the cheap part (the run row,
the step log and the node count) and lists a damaged run with its `damage` said.

The delta JSON (`data`) is described in `codec.delta`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

from ablauf_lang.codec import job as serde
from ablauf_lang.codec.delta import (
    STATUSES,
    BadText,
    Change,
    Damage,
    NodeRow,
    catch_up,
    context_rows,
    diff,
    job_from_parts,
    node_row,
    nodes_by_id,
    replay,
    run_fields,
    snapshot_parts,
)
from ablauf_lang.codec.delta import column_text as _text
from ablauf_lang.codec.delta import dumps_text as _dumps
from ablauf_lang.codec.delta import read_json as _json
from ablauf_lang.codec.history import RunHistory, build_history, whole_data
from ablauf_lang.engine.job import Job
from ablauf_lang.engine.kinds import Leaf
from ablauf_lang.engine.nodes import Status, quick_init
from ablauf_lang.engine.waits import RETRY, Wait, wait_of
from ablauf_lang.engine.waits import waits as waits_of
from ablauf_lang.errors import AblaufError, RunError, StoreError
from ablauf_lang.stores.base import (
    Claim,
    Driver,
    Owner,
    RunInfo,
    StoredRun,
    finished_error,
    new_run_id,
    refuse_live,
    resolve_prefix,
    run_error,
    signal_name,
    signal_text,
    waits_described,
)
from ablauf_lang.stores.queries import load_queries
from ablauf_lang.values import decode as decode_value
from ablauf_lang.values import encode as encode_value

SCHEMA_VERSION = 5  # of the tables above; stores refuse a database with a larger one
COMPACT_EVERY = 64  # deltas between two snapshots of the node rows
COMPACT_BYTES = 256 * 1024  # or this many bytes of deltas
ROWS_AT_ONCE = 1000  # node rows made and sent together when many are written

# ---------------------------------------------------------------- reading back


def check_log(snapshot_seq: Any, head_seq: Any, seqs: Sequence[int]) -> None:
    """Damage unless the deltas `seqs` are exactly the writes after the snapshot."""
    if type(snapshot_seq) is not int or type(head_seq) is not int or snapshot_seq < 0:
        raise Damage("its write numbers are not numbers")
    if head_seq < snapshot_seq:
        raise Damage(f"its newest write ({head_seq}) is older than its snapshot ({snapshot_seq})")
    want = head_seq - snapshot_seq
    if any(type(seq) is not int for seq in seqs):  # a damaged page: NULL, text
        raise Damage("its step log's write numbers are not numbers")
    if len(seqs) == want and (not seqs or (seqs[0] == snapshot_seq + 1 and seqs[-1] == head_seq)):
        return  # seqs are unique and sorted: the right count between the ends is all of them
    if want > len(seqs) + 1000:
        raise Damage(f"its step log holds {len(seqs)} writes, {want} expected")
    expected = range(snapshot_seq + 1, head_seq + 1)
    missing = sorted(set(expected).difference(seqs))
    extra = sorted(set(seqs).difference(expected))
    if missing:
        raise Damage(
            f"its step log lacks {_numbers(missing)} of writes "
            f"{snapshot_seq + 1}..{head_seq}: steps were lost"
        )
    raise Damage(f"its step log has writes {_numbers(extra)} past its newest ({head_seq})")


def _numbers(items: Sequence[int]) -> str:
    shown = ", ".join(map(str, items[:5]))
    return shown + (f" (and {len(items) - 5} more)" if len(items) > 5 else "")


# ---------------------------------------------------------------- the store

RUN_COLUMNS = (
    "id",
    "run_id",
    "status",
    "created",
    "updated",
    "restarts",
    "aborted",
    "todo",
    "touched",
    "n_nodes",
    "snapshot_seq",
    "source",
    "filename",
    "initial_context",
    "format",
    "error",
    "head_seq",
)
# The queries of a run's rows `SqlStore.load` reads (by the run's public id), in order.
LOAD_TABLES = ("load_run", "load_nodes", "load_context", "load_deltas")
LEASE_COLUMNS = ("token", "host", "pid", "started", "heartbeat", "expires")
# The statements, by name (`sql.sql`), loaded once.
Q = load_queries(__package__ or "ablauf_lang.stores", "sql.sql")
# The rows of a run, deleted before it.
RUN_TABLES = (
    "attempts",
    "waits",
    "signals",
    "leases",
    "forks",
    "history",
    "deltas",
    "context",
    "nodes",
)


# What changed since the snapshot, newest first: (new states by node id, ids written whole,
# context keys, context keys dropped?, older history). A cons list: a write adds to it in
# O(1), and folding takes each node's newest state from it without encoding it again.
History = tuple[dict[int, dict[str, Any]], tuple[int, ...], tuple[str, ...], bool, Any] | None


@quick_init
@dataclass(frozen=True, slots=True)
class Known:
    """What a store object knows of a run it wrote or read: the base of its next delta."""

    key: int  # runs.id
    seq: int  # the newest write: a delta's seq, or the snapshot's
    snapshot_seq: int  # the write the node rows are current with
    snapshot_nodes: int  # how many node rows the snapshot has
    status: str  # runs.status
    job: Job
    deltas: int = 0  # deltas since the snapshot
    delta_bytes: int = 0
    history: History = None  # what the deltas since the snapshot changed

    def since(self) -> tuple[dict[int, dict[str, Any]], set[int], set[str], bool]:
        """(newest state by node id, ids written whole, context keys, keys dropped?) since
        the snapshot."""
        states: dict[int, dict[str, Any]] = {}
        wholes: set[int] = set()
        keys: set[str] = set()
        dropped = False
        entry = self.history
        while entry is not None:
            s, w, k, d, entry = entry
            for node_id, state in s.items():
                states.setdefault(node_id, state)  # newest first: keep the first seen
            wholes.update(w)
            keys.update(k)
            dropped = dropped or d
        return states, wholes, keys, dropped


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between SQL databases in the statements `SqlStore` runs (the
    connection policy, transactions and error mapping, is the store subclass's)."""

    name: str  # "sqlite", "postgresql"
    placeholder: str  # "?" or "%s" (the SQL here is written with "?")
    limit_all: str  # what LIMIT takes for no limit ("ALL"; SQLite: "-1")
    returning: bool  # INSERT ... RETURNING id; else the cursor's `lastrowid`
    # Statements of `sql.sql` (by name) this database runs for many rows at once as one
    # statement taking them as one JSON array of their parameter rows (see `many`).
    bulk: dict[str, str] = field(default_factory=dict)

    def q(self, sql: str) -> str:
        """`sql` (written with "?") in this dialect's placeholders."""
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def many(self, cur: Any, name: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run the statement `name` of `sql.sql` once for each parameter row: as one
        statement when the dialect has a bulk form of it (the rows as JSON text: one
        statement to parse, plan and run, where `executemany` costs every row all three),
        else with `executemany` (SQLite's costs a row little: no round trips, no plans)."""
        bulk = self.bulk.get(name)
        if bulk is not None and len(rows) > 1:
            cur.execute(bulk, (json_rows(rows),))
        else:
            cur.executemany(self.q(Q[name]), rows)

    def insert_run(
        self, cur: Any, columns: Sequence[str], values: Sequence[Any], key: int | None = None
    ) -> int:
        """Insert a `runs` row; return its `id` (`key` when given: nothing is read back)."""
        if key is not None:
            columns, values = ("id", *columns), (key, *values)
        marks = ", ".join(self.placeholder for _ in columns)
        sql = f"INSERT INTO runs ({', '.join(columns)}) VALUES ({marks})"
        if key is not None:
            cur.execute(sql, values)
            return key
        if self.returning:
            cur.execute(sql + " RETURNING id", values)
            return int(cur.fetchone()[0])
        cur.execute(sql, values)
        return int(cur.lastrowid)


class KnownRuns:
    """What a store object knows of the runs it last wrote or read (`Known`: the base its
    next delta is diffed against and numbered after), for the newest `size` runs.

    A store is built with one (its own by default). The PostgreSQL store's is shared by the
    threads of a process and staged per transaction (`stores.postgres.known`): it overrides
    these four methods and adds `begin`, `pin`, `commit` and `rollback`.
    """

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._runs: OrderedDict[str, Known] = OrderedDict()

    def get(self, run_id: str) -> Known | None:
        """What is known of the run, or None."""
        return self._runs.get(run_id)

    def put(self, run_id: str, known: Known) -> None:
        """Remember `known` as the run's newest write (forgetting the oldest run past `size`)."""
        self._runs[run_id] = known
        self._runs.move_to_end(run_id)
        while len(self._runs) > self.size:
            self._runs.popitem(last=False)

    def drop(self, run_id: str) -> None:
        """Forget the run (after a refused or doubtful write, or its deletion)."""
        self._runs.pop(run_id, None)

    def clear(self) -> None:
        """Forget every run."""
        self._runs.clear()


P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S", bound="SqlStore")

# A statement of a write and the parameters of each of its executions.
Statement = tuple[str, Sequence[Sequence[Any]]]


def json_rows(rows: Sequence[Sequence[Any]]) -> str:
    """Parameter rows as one JSON array, for a statement that takes many rows in one
    parameter (PostgreSQL's `json_array_elements`): written in C, where psycopg builds a
    text array's literal in Python (ten times the work a row). Numbers must be finite:
    JSON has no infinity (give one as text, which PostgreSQL's float8 reads)."""
    return _dumps(rows)


def execute_all(cur: Any, statements: Iterable[Statement]) -> None:
    """Run statements on a cursor (one with many parameter rows: `executemany`)."""
    for sql, rows in statements:
        if len(rows) == 1:
            cur.execute(sql, rows[0])
        else:
            cur.executemany(sql, rows)


def _reads(method: Callable[Concatenate[S, P], T]) -> Callable[Concatenate[S, P], T]:
    """A read of the JobStore protocol, run through the store's `_attempt` (a PostgreSQL
    client store reconnects and runs it again when its connection is lost)."""

    def read(store: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return store._attempt(lambda: method(store, *args, **kwargs))

    functools.update_wrapper(read, method)
    return read


def _run_columns(job: Job) -> tuple[Any, ...]:
    """The job's own columns of its `runs` row: status, then restarts, aborted, todo,
    touched and the node count, as both a new run and a snapshot write them."""
    restarts, aborted, todo, touched, n_nodes, status = run_fields(job)
    return (status, restarts, _text(aborted), _dumps(todo), _dumps(touched), n_nodes)


# ---------------------------------------------------------------- waits

WaitRow = tuple[str, str | None, float | None, int]  # kind, signal (or action), until, attempt


def wait_row(wait: Wait) -> WaitRow:
    """The columns of a `waits` row (after run and node) for a wait."""
    return (wait.kind, wait.name, wait.until, wait.attempt)


def row_wait(node: Any, kind: Any, name: Any, until: Any, attempt: Any) -> Wait:
    """The Wait a `waits` row holds."""
    return Wait(
        int(node),
        str(kind),
        None if name is None else str(name),
        None if until is None else float(until),
        _int(attempt),
    )


@quick_init
@dataclass(frozen=True, slots=True)
class WaitChange:
    """What one write changes in a run's `waits` rows."""

    upsert: dict[int, WaitRow]  # node id -> its wait now
    delete: tuple[int, ...] = ()  # nodes that no longer wait
    drop_from: int | None = None  # nodes with an id at least this are gone
    clear: bool = False  # the run finished: it waits for nothing

    @property
    def empty(self) -> bool:
        """True when the write changes no wait."""
        return not (self.upsert or self.delete or self.clear) and self.drop_from is None


NO_WAIT_CHANGE = WaitChange({})


def wait_change(old: Job, new: Job, change: Change) -> WaitChange:
    """How the waits of a run change from `old` to `new`, looking only at the nodes the
    write changes (`change`): O(touched), like the delta itself."""
    if new.status is not Status.PENDING:
        return WaitChange({}, clear=old.status is Status.PENDING)
    ids = set(change.states)
    ids.update(change.wholes)
    if not ids and change.drop_from is None:
        return NO_WAIT_CHANGE
    pairs, n_old = change.pairs, len(old.paths)
    if pairs and all(i in pairs and (pairs[i][0] is not None or i >= n_old) for i in ids):
        # The diff walked to each of them in both jobs (a node under a reshaped branch has
        # no old self there, though the old job has a node of that id: walked for below).
        now = {i: pairs[i][1] for i in ids}
        before = {i: was for i in ids if (was := pairs[i][0]) is not None}
    else:
        now = nodes_by_id(new, ids)
        before = nodes_by_id(old, ids)
    now.update(change.wholes)
    upsert: dict[int, WaitRow] = {}
    delete: list[int] = []
    for node_id in sorted(ids):
        node = now.get(node_id)
        was = before.get(node_id)
        if node is was:
            continue
        wait = wait_of(node) if isinstance(node, Leaf) else None
        prior = wait_of(was) if isinstance(was, Leaf) else None
        row = None if wait is None else wait_row(wait)
        if row == (None if prior is None else wait_row(prior)):
            continue
        if row is None:
            delete.append(node_id)
        else:
            upsert[node_id] = row
    drop = change.drop_from
    if not upsert and not delete and drop is None:
        return NO_WAIT_CHANGE
    return WaitChange(upsert, tuple(delete), drop)


class SqlStore:
    """The JobStore protocol over a DB-API connection, built with a `Dialect` (how its SQL
    is spelled) and a `KnownRuns` (what it knows of runs). A subclass is the connection
    policy; it supplies:

    - `_write()`: a context manager yielding a cursor in a transaction that holds the write
      lock (SQLite: BEGIN IMMEDIATE), committed on exit, rolled back on an exception,
      driver errors raised as StoreError with a one-line message;
    - `_read()`: the same for reading (one consistent snapshot);
    - `url`, and `close()`;
    - optionally `_attempt(operation)`: how a read of the protocol is run (the PostgreSQL
      client store reconnects and runs it again); `_write_one(sql, params) -> rowcount`:
      one statement as its own transaction (SQLite runs it in autocommit mode: one call
      instead of three); and
      `_append_delta(params, then) -> rowcount`: how a step's delta row and what goes
      with it are written (the PostgreSQL worker's step sends them with its COMMIT).

    Counters for benchmarks and tests: `commits` (set by `_write`), `rows_written` (rows
    inserted or updated), `bytes_written` (JSON text written), `compactions`.
    """

    durable = True
    url: str = ""

    def __init__(self, dialect: Dialect, known: KnownRuns | None = None) -> None:
        self.dialect = dialect
        self._known = known if known is not None else KnownRuns()
        self.commits = 0
        self.rows_written = 0
        self.bytes_written = 0
        self.compactions = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------- connection policy

    def _write(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _new_key(self, cur: Any) -> int | None:
        """The `id` of a new `runs` row, or None: the database numbers it as it inserts
        it (a PostgreSQL store takes numbers from the table's sequence in advance, so
        nothing of the insert is read back)."""
        return None

    def _read_rows(self, queries: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Any]]:
        """The rows of each query, read in one snapshot (a PostgreSQL store sends them with
        the transaction's BEGIN and COMMIT: one round trip)."""
        with self._read() as cur:
            return self._fetch_all(cur, queries)

    def _fetch_all(self, cur: Any, queries: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Any]]:
        """The rows of each query, in turn (a PostgreSQL store sends them together)."""
        out = []
        for sql, params in queries:
            cur.execute(sql, params)
            out.append(cur.fetchall())
        return out

    def _write_one(self, sql: str, params: Sequence[Any]) -> int:
        """Run one statement in a transaction of its own; return the rows it changed."""
        with self._write() as cur:
            cur.execute(sql, params)
            return int(cur.rowcount)

    def _attempt(
        self, operation: Callable[[], T], settle: Callable[[], T | None] | None = None
    ) -> T:
        """Run an operation of the protocol (a read, see `_reads`; or a write with `settle`,
        which finds out whether a write whose COMMIT answer was lost was done: its result,
        else None). Here: just run it; a PostgreSQL client store reconnects and runs it
        again."""
        return operation()

    def _caught_up(self, cur: Any, known: Known, seq: int) -> Known | None:
        """What is known of the run once caught up with its writes after `known`'s (up to
        its newest: `seq` or later), read in the caller's transaction, which holds the
        run's lock (`codec.delta.catch_up`: what a load would build, in O(what they
        changed)); None when they cannot be (nodes made or dropped, a write missing): read
        the run instead."""
        q = self._q
        cur.execute(q(Q["snapshot_of"]), (known.key,))
        row = cur.fetchone()
        if row is None:
            return None
        cur.execute(q(Q["writes_since"]), (known.key, known.seq, known.key, known.seq))
        return self._caught_up_with(known, seq, int(row[0]), cur.fetchall())

    def _caught_up_with(
        self, known: Known, seq: int, snapshot_seq: int, writes: Sequence[Sequence[Any]]
    ) -> Known | None:
        """`_caught_up` from the rows it reads: the run's snapshot number and its writes
        after `known`'s (`writes_since`)."""
        try:
            rows = [(int(s), len(d), _json(d, f"write {s}")) for s, d in writes]
        except Damage:
            return None
        # The newest write is the last row read here (the caller may have named an older
        # one, from a snapshot taken before its lock).
        seq = max(seq, rows[-1][0]) if rows else seq
        if [s for s, _, _ in rows] != list(range(known.seq + 1, seq + 1)):
            return None
        if snapshot_seq != known.snapshot_seq and not known.seq < snapshot_seq <= seq:
            return None
        job = catch_up(known.job, [delta for _, _, delta in rows])
        if job is None:
            return None
        if snapshot_seq == known.snapshot_seq:
            history, deltas, size = known.history, known.deltas, known.delta_bytes
        else:  # folded meanwhile: what its deltas changed is in the node rows now
            history, deltas, size = None, 0, 0
        for s, length, delta in rows:
            if s <= snapshot_seq:
                continue
            states = {int(i): state for i, state in delta.get("s", ())}
            keys = tuple(str(row[0]) for row in delta.get("c", ()))
            history = (states, (), keys, bool(delta.get("cd")), history)
            deltas += 1
            size += length
        nodes = known.snapshot_nodes if snapshot_seq == known.snapshot_seq else len(job.paths)
        return Known(
            known.key, seq, snapshot_seq, nodes, str(job.status), job, deltas, size, history
        )

    @_reads
    def load_job(self, run_id: str) -> Job:
        """The run's job as it is now, in one snapshot: what this store knows of it caught
        up with the writes since (O(what they changed): a client reading the run it
        submitted, once the workers are done with it), else read whole (`load`)."""
        known = self._known.get(run_id)
        if known is not None:
            q = self._q
            params = (known.key, known.seq, known.key, known.seq)
            snapshot, writes = self._read_rows(
                [(q(Q["snapshot_of"]), (known.key,)), (q(Q["writes_since"]), params)]
            )
            caught = None
            if snapshot:  # else the run is gone (or is another of that id): read it
                caught = self._caught_up_with(known, known.seq, int(snapshot[0][0]), writes)
            if caught is not None:
                self._known.put(run_id, caught)
                return caught.job
        return self.load(run_id).job

    def reserve_known(self, count: int) -> None:
        """Keep `count` more runs in the cache of what this store knows (negative: fewer),
        each run a runner drives while it drives it: a driven run that fell out of the
        cache would be written whole at its next restart."""
        self._known.size = max(1, self._known.size + count)

    def _append_delta(self, params: Sequence[Any], then: Sequence[Statement] = ()) -> int:
        """Write a step's `deltas` row (`Q["insert_delta"]`) and, when it was written, the
        statements `then` (what listings read: status, error, waits), as one transaction;
        the delta's row count (0: the run was written elsewhere, nothing else is done)."""
        if not then:
            return self._write_one(self._q(Q["insert_delta"]), params)
        with self._write() as cur:
            cur.execute(self._q(Q["insert_delta"]), params)
            count = int(cur.rowcount)
            if count == 1:
                execute_all(cur, then)
            return count

    def close(self) -> None:
        raise NotImplementedError

    def _q(self, sql: str) -> str:
        return self.dialect.q(sql)

    # -------------------------------------------------- bookkeeping

    def _where(self) -> str:
        return self.url or "this store"

    def _conflict(self, run_id: str) -> StoreError:
        self._known.drop(run_id)
        return StoreError(
            f"run {run_id} was written by another process since this one read it "
            "(resumed, retried or aborted elsewhere?); not overwriting it"
        )

    # -------------------------------------------------- JobStore

    def create_run(
        self,
        job: Job,
        *,
        source: str | None = None,
        filename: str | None = None,
        run_id: str | None = None,
        parent: str | None = None,
        parent_step: int | None = None,
        fresh: bool = False,
    ) -> str:
        """Record a new run: its program, initial context and a snapshot of its job (and,
        for a fork, the run and restart it was forked from). `fresh`: `run_id` was just
        made by `new_run_id` (no run has it: not looked for; the table's unique `run_id`
        would still refuse it)."""
        fresh = fresh or run_id is None
        run_id = run_id or new_run_id()
        initial = _dumps(encode_value(job.context))
        now = time.time()
        status, *counts = _run_columns(job)
        values = (
            run_id,
            status,
            now,
            now,
            *counts,
            0,
            _text(source),
            _text(filename),
            initial,
            serde.VERSION,
            _text(run_error(job)),
            0,
        )
        exists = self._q(Q["run_exists"])

        def write() -> str:
            with self._write() as cur:
                if not fresh:
                    cur.execute(exists, (run_id,))
                    if cur.fetchone() is not None:
                        raise RunError(f"run {run_id!r} already exists in {self._where()}")
                key = self.dialect.insert_run(cur, RUN_COLUMNS[1:], values, self._new_key(cur))
                rows = self._write_all(cur, key, job)
                first = whole_data(job, rows)
                cur.execute(self._q(Q["insert_history"]), (key, 0, now, job.restarts, first))
                if parent is not None:
                    cur.execute(self._q(Q["insert_fork"]), (key, parent, int(parent_step or 0)))
            self.bytes_written += len(initial) + len(source or "") + len(first)
            self._known.put(run_id, Known(key, 0, 0, len(job.paths), status, job))
            return run_id

        def written() -> str | None:
            # The COMMIT was sent: if the run is there, it is this one (a fresh id, or one
            # that was free when the write began).
            with self._read() as cur:
                cur.execute(exists, (run_id,))
                return run_id if cur.fetchone() is not None else None

        return self._attempt(write, written)

    def record(self, run_id: str, job: Job) -> None:
        """Record the job after a restart (or abort, replay): what changed, in one commit."""
        known = self._known.get(run_id)
        if known is None:
            self._record_whole(run_id, job)
            return
        change = diff(known.job, job)
        waits = wait_change(known.job, job, change)
        data = change.data(job)
        seq = known.seq + 1
        status = str(job.status)
        now = time.time()
        if known.deltas + 1 >= COMPACT_EVERY or known.delta_bytes + len(data) >= COMPACT_BYTES:
            self._compact(run_id, known, change, job, seq, now, waits, data)
            return
        params = (known.key, seq, now, job.restarts, data, known.key, known.seq)
        # What listings show without reading deltas (status, error, abort reason: the
        # newest delta's fields say the same; `aborted` is the snapshot's field too) and
        # what the run waits for, in the step's transaction; the common step has neither.
        then = self._wait_statements(known.key, waits)
        if status != known.status or job.aborted != known.job.aborted:
            finish = (status, _text(run_error(job)), _text(job.aborted), now, known.key)
            then.insert(0, (self._q(Q["finish_step"]), [finish]))
        if self._append_delta(params, then) != 1:
            raise self._conflict(run_id)
        self.rows_written += 1
        self.bytes_written += len(data)
        history = (
            change.states,
            tuple(change.wholes),
            tuple(row[0] for row in change.context),
            bool(change.context_drop),
            known.history,
        )
        self._known.put(
            run_id,
            Known(
                known.key,
                seq,
                known.snapshot_seq,
                known.snapshot_nodes,
                status,
                job,
                known.deltas + 1,
                known.delta_bytes + len(data),
                history,
            ),
        )

    def _compact(
        self,
        run_id: str,
        known: Known,
        change: Change,
        job: Job,
        seq: int,
        now: float,
        waits: WaitChange = NO_WAIT_CHANGE,
        data: str | None = None,
    ) -> None:
        """Fold everything changed since the snapshot into the node and context rows; the
        step log's writes and this one (`data`, its delta) go to the run's history."""
        q = self._q
        n = len(job.paths)
        states, wholes, keys, dropped = known.since()
        states.update(change.states)
        wholes = {i for i in wholes.union(change.wholes) if i < n}
        state_rows = [
            (_dumps(state), known.key, i)
            for i, state in sorted(states.items())
            if i < n and i not in wholes
        ]
        reset = dropped or bool(change.context_drop)
        if reset:
            ctx = context_rows(job.context)
        else:
            keys.update(row[0] for row in change.context)
            ctx = [row for row in context_rows(job.context) if row[0] in keys] if keys else []
        with self._write() as cur:
            cur.execute(q(Q["count_deltas"]), (known.key,))
            count, newest = cur.fetchone()
            if count != known.deltas or (newest or known.snapshot_seq) != known.seq:
                raise self._conflict(run_id)
            self._write_snapshot_run(cur, known.key, job, seq, now, known.snapshot_seq)
            if cur.rowcount != 1:
                raise self._conflict(run_id)
            if n < known.snapshot_nodes:
                cur.execute(q(Q["delete_nodes_from"]), (known.key, n))
            # Node rows made and sent a chunk at a time: a fold after an expansion writes
            # every node it made (their rows at once would cost several times the job).
            whole_ids = sorted(wholes)
            for at in range(0, len(whole_ids), ROWS_AT_ONCE):
                full = [node_row(job.node(i)) for i in whole_ids[at : at + ROWS_AT_ONCE]]
                self.dialect.many(
                    cur,
                    "upsert_node",
                    [(known.key, r.node, r.spec, r.state, r.children) for r in full],
                )
                self.rows_written += len(full)
                self.bytes_written += sum(
                    len(r.spec) + len(r.state) + len(r.children or "") for r in full
                )
            if state_rows:
                self.dialect.many(cur, "update_state", state_rows)
            if reset:
                cur.execute(q(Q["delete_context_of_run"]), (known.key,))
            ctx_rows = [(known.key, k, pos, _dumps(v)) for k, pos, v in ctx]
            if ctx_rows:
                self.dialect.many(cur, "upsert_context", ctx_rows)
            if count:
                cur.execute(q(Q["archive_deltas"]), (known.key,))
                cur.execute(q(Q["delete_deltas_of_run"]), (known.key,))
            delta = data if data is not None else change.data(job)
            cur.execute(q(Q["insert_history"]), (known.key, seq, now, job.restarts, delta))
            self._write_waits(cur, known.key, waits)
        self.compactions += 1
        self.rows_written += 1 + len(state_rows) + len(ctx_rows)
        self.bytes_written += sum(len(s) for s, _, _ in state_rows)
        self.bytes_written += sum(len(k) + len(v) for _, k, _, v in ctx_rows)
        self._known.put(run_id, Known(known.key, seq, seq, n, str(job.status), job))

    def _write_snapshot_run(
        self, cur: Any, key: int, job: Job, seq: int, now: float, expect: int | None
    ) -> None:
        status, *counts = _run_columns(job)
        params = (
            status,
            now,
            *counts,
            _text(run_error(job)),
            serde.VERSION,
            seq,
            seq,
            key,
        )
        if expect is None:
            cur.execute(self._q(Q["snapshot_run"]), params)
        else:
            cur.execute(self._q(Q["snapshot_run_after"]), (*params, expect))

    def _write_waits(self, cur: Any, key: int, change: WaitChange) -> None:
        """Bring the run's `waits` rows up to date with a write (in its transaction)."""
        execute_all(cur, self._wait_statements(key, change))

    def _wait_statements(self, key: int, change: WaitChange) -> list[Statement]:
        """The statements bringing the run's `waits` rows up to date with a write."""
        q = self._q
        if change.clear:
            return [(q(Q["delete_waits_of_run"]), [(key,)])]
        out: list[Statement] = []
        if change.drop_from is not None:
            out.append((q(Q["delete_waits_from"]), [(key, change.drop_from)]))
        if change.delete:
            out.append((q(Q["delete_wait"]), [(key, i) for i in change.delete]))
        if change.upsert:
            rows = [(key, i, *row) for i, row in change.upsert.items()]
            out.append((q(Q["upsert_wait"]), rows))
        self.rows_written += len(change.delete) + len(change.upsert)
        return out

    def _write_all(
        self, cur: Any, key: int, job: Job, cleared: Iterable[Wait] = ()
    ) -> list[NodeRow]:
        """Write every row of the job (nodes, context, waits but those `cleared`); return
        the node rows."""
        made = [node_row(n) for n in job.nodes()]
        rows = [(key, r.node, r.spec, r.state, r.children) for r in made]
        self.dialect.many(cur, "upsert_node", rows)
        ctx = [(key, k, pos, _dumps(v)) for k, pos, v in context_rows(job.context)]
        if ctx:
            self.dialect.many(cur, "upsert_context", ctx)
        found = waits_of(job) if job.status is Status.PENDING else []
        skip = set(cleared)
        found = [w for w in found if w not in skip] if skip else found
        if found:
            cur.executemany(self._q(Q["upsert_wait"]), [(key, w.node, *wait_row(w)) for w in found])
        self.rows_written += 1 + len(rows) + len(ctx)
        self.bytes_written += sum(len(r[2]) + len(r[3]) + len(r[4] or "") for r in rows)
        self.bytes_written += sum(len(r[1]) + len(r[3]) for r in ctx)
        return made

    def _record_whole(self, run_id: str, job: Job) -> None:
        """Write a whole snapshot of a run this store object never read (O(tree))."""
        q = self._q
        now = time.time()
        with self._write() as cur:
            cur.execute(q(Q["run_seqs"]), (run_id,))
            row = cur.fetchone()
            if row is None:
                raise RunError(f"no run {run_id!r} in {self._where()}")
            key, snapshot_seq, head_seq = row
            cur.execute(q(Q["max_seq"]), (key,))
            newest = cur.fetchone()[0]
            seq = max(_int(snapshot_seq), _int(head_seq), _int(newest)) + 1
            cleared = self._cleared_waits(cur, run_id, key, job)
            cur.execute(q(Q["archive_deltas"]), (key,))
            for table in ("nodes", "context", "deltas", "waits"):
                cur.execute(q(Q[f"delete_{table}_of_run"]), (key,))
            self._write_snapshot_run(cur, key, job, seq, now, None)
            rows = self._write_all(cur, key, job, cleared)
            whole = whole_data(job, rows)
            cur.execute(q(Q["insert_history"]), (key, seq, now, job.restarts, whole))
        self._known.put(run_id, Known(key, seq, seq, len(job.paths), str(job.status), job))

    def _cleared_waits(self, cur: Any, run_id: str, key: int, job: Job) -> set[Wait]:
        """The retry waits of `job` whose dispatch was sent (`clear_wait`): the stored run
        has the same wait, but no row for it. A whole write keeps them cleared, as a delta
        does (the leaf did not change). Read only when a retry wait lacks its row; a stored
        run that cannot be read clears nothing."""
        if job.status is not Status.PENDING:
            return set()
        cur.execute(self._q(Q["waits_of_run"]), (key,))
        rows = {int(row[0]) for row in cur.fetchall()}
        missing = {w for w in waits_of(job) if w.kind == RETRY and w.node not in rows}
        if not missing:
            return set()
        stored = self._stored_job(cur, run_id)
        if stored is None or stored.status is not Status.PENDING:
            return set()
        return missing.intersection(waits_of(stored))

    def _stored_job(self, cur: Any, run_id: str) -> Job | None:
        """The run's job as stored, read in the caller's transaction; None when its rows
        do not make one (a damaged run: `load` says what is wrong)."""
        try:
            runs, nodes, context, deltas = self._fetch_all(cur, self.load_queries(run_id))
            if not runs:
                return None
            run, _, _ = _run_row(runs[0])
            parts = snapshot_parts(run, nodes, context)
            for seq, _, data in deltas:
                replay(parts, data, seq)
            return job_from_parts(run_id, parts, run["format"])
        except (Damage, AblaufError, RecursionError, TypeError, ValueError, KeyError):
            return None

    @_reads
    def load(self, run_id: str) -> StoredRun:
        """Load a run with its whole job (every node's state, output, attempts, times).

        StoreError `run ID is damaged: ...` when its rows are not what the store wrote."""
        try:
            rows = self._read_rows(self.load_queries(run_id))
        except Damaged as exc:
            raise StoreError(f"run {run_id} is damaged: {exc.message}") from None
        return self.loaded(run_id, rows)

    def load_queries(self, run_id: str) -> list[tuple[str, Sequence[Any]]]:
        """The statements whose rows, read in one snapshot, make the run (`loaded`)."""
        return [(self._q(Q[name]), (run_id,)) for name in LOAD_TABLES]

    def loaded(self, run_id: str, rows: list[list[Any]]) -> StoredRun:
        """The run the rows of `load_queries` make (what `load` returns); what this store
        knows of it is then that."""
        runs, nodes, context, deltas = rows
        if not runs:
            raise RunError(f"no run {run_id!r} in {self._where()}")
        run, lease, fork = _run_row(runs[0])
        key = run["id"]
        try:
            if run["status"] not in STATUSES:
                raise Damage(
                    f"its status {str(run['status'])[:40]!r} is not pending, success or failure"
                )
            check_log(run["snapshot_seq"], run["head_seq"], [d[0] for d in deltas])
            if len(nodes) != run["n_nodes"]:
                raise Damage(f"{len(nodes)} node rows, {run['n_nodes']} expected")
            parts = snapshot_parts(run, nodes, context)
            nodes.clear()  # their text read: not held while the job is built
            for seq, _, data in deltas:
                replay(parts, data, seq)
            initial = decode_value(_json(run["initial_context"] or "{}", "its context"))
            for column in ("source", "filename", "error"):
                if isinstance(run[column], BadText):
                    raise Damage(f"its {column} is not UTF-8 text")
        except Damage as exc:
            raise StoreError(f"run {run_id} is damaged: {exc}") from None
        except RecursionError:
            raise StoreError(f"run {run_id} is damaged: a value is nested too deeply") from None
        except AblaufError as exc:
            raise StoreError(f"run {run_id} is damaged: {exc.message}") from None
        # What the deltas changed since the snapshot (for the next compaction), taken
        # before the job is built from the parts (which gives up their node entries).
        changed = {i: parts.nodes[i][1] for i in parts.touched_since if i in parts.nodes}
        job = job_from_parts(run_id, parts, run["format"])
        recorded = parts.run[5]
        if str(job.status) != recorded or run["status"] != recorded:
            # Its rows make a job, but not the one recorded (steps lost along with their
            # bookkeeping, or rows of another state of the run).
            raise StoreError(
                f"run {run_id} is damaged: it was recorded {run['status']} but its steps "
                f"make it {job.status}"
            )
        seq = run["head_seq"]
        self._known.put(
            run_id,
            Known(
                key,
                seq,
                run["snapshot_seq"],
                run["n_nodes"],
                run["status"],
                job,
                len(deltas),
                sum(len(d[2]) for d in deltas),
                (
                    changed,
                    tuple(parts.whole_since),
                    tuple(parts.keys_since),
                    parts.context_reset,
                    None,
                )
                if deltas
                else None,
            ),
        )
        updated = deltas[-1][1] if deltas else run["updated"]
        info = RunInfo(
            run_id,
            Status(run["status"]),
            run["created"],
            updated,
            job.restarts,
            run["filename"],
            run["error"],
            None if job.aborted is None else str(job.aborted),
            _driver(lease),
            None,
            waits_described(waits_of(job)) if job.status is Status.PENDING else None,
            None if fork is None else str(fork[0]),
            None if fork is None else int(fork[1]),
        )
        return StoredRun(info, job, run["source"], initial)

    @_reads
    def history(self, run_id: str) -> RunHistory:
        """Every write kept of a run (`codec.history`): write 0, the run as created, and
        each write after it. A run made by a store of an older version kept no writes
        before its last fold: its history begins at that snapshot (`partial`)."""
        q = self._q
        with self._read() as cur:
            cur.execute(q(Q["load_run"]), (run_id,))
            row = cur.fetchone()
            if row is None:
                raise RunError(f"no run {run_id!r} in {self._where()}")
            run, _, _ = _run_row(row)
            key = run["id"]
            cur.execute(q(Q["load_history"]), (key, key))
            rows = [(int(seq), float(updated), str(data)) for seq, updated, data in cur.fetchall()]
            if rows and rows[0][0] == 0:
                return build_history(run_id, rows, run["format"])
            cur.execute(q(Q["load_nodes"]), (run_id,))
            nodes = cur.fetchall()
            cur.execute(q(Q["load_context"]), (run_id,))
            context = cur.fetchall()
        try:
            snapshot = snapshot_parts(run, nodes, context)
        except Damage as exc:
            raise StoreError(f"run {run_id} is damaged: {exc}") from None
        job = job_from_parts(run_id, snapshot, run["format"])
        base = int(run["snapshot_seq"])
        live = [r for r in rows if r[0] > base]
        first = (base, float(run["updated"]), whole_data(job))
        return build_history(run_id, [first, *live], run["format"], partial=True)

    @_reads
    def info(self, run_id: str) -> RunInfo:
        """What the store knows of a run, without loading its tree (damage said in it)."""
        infos = self._infos(" WHERE r.run_id = ?", [run_id])
        if not infos:
            raise RunError(f"no run {run_id!r} in {self._where()}")
        return infos[0]

    @_reads
    def status(self, run_id: str) -> str:
        """The run's status as recorded ("pending", "success" or "failure"), in one
        statement: what a caller waiting for it looks at (`info` says more, at more cost).
        RunError for an unknown run."""
        (rows,) = self._read_rows([(self._q(Q["run_status"]), (run_id,))])
        if not rows:
            raise RunError(f"no run {run_id!r} in {self._where()}")
        return str(rows[0][0])

    @_reads
    def exists(self, run_id: str) -> bool:
        """True when the store has this run."""
        (rows,) = self._read_rows([(self._q(Q["run_exists"]), (run_id,))])
        return bool(rows)

    # -------------------------------------------------- listing

    def _filters(
        self,
        status: str | None,
        filename: str | None,
        since: float | None,
        waiting: bool,
        forks_of: str | None = None,
    ) -> tuple[str, list[Any]]:
        where: list[str] = []
        params: list[Any] = []
        if forks_of is not None:
            where.append("EXISTS (SELECT 1 FROM forks p WHERE p.run = r.id AND p.parent = ?)")
            params.append(forks_of)
        if waiting:
            where.append("EXISTS (SELECT 1 FROM waits w WHERE w.run = r.id)")
        if status is not None:
            where.append("r.status = ?")
            params.append(str(Status(status)))
        if filename is not None:
            where.append("(r.filename = ? OR r.filename LIKE ? ESCAPE '!')")
            escaped = filename.replace("!", "!!").replace("%", "!%").replace("_", "!_")
            params += [filename, "%/" + escaped]
        if since is not None:
            where.append("r.created >= ?")
            params.append(float(since))
        return (" WHERE " + " AND ".join(where)) if where else "", params

    @_reads
    def list_runs(
        self,
        *,
        limit: int | None = None,
        status: str | None = None,
        offset: int = 0,
        filename: str | None = None,
        since: float | None = None,
        waiting: bool = False,
        forks_of: str | None = None,
    ) -> list[RunInfo]:
        """Runs, newest first (see `JobStore.list_runs`); a damaged run is listed with
        what is wrong with it, the others as they are."""
        where, params = self._filters(status, filename, since, waiting, forks_of)
        sql = where + " ORDER BY r.created DESC, r.id DESC"
        if limit is not None or offset:
            sql += " LIMIT " + ("?" if limit is not None else self.dialect.limit_all)
            if limit is not None:
                params.append(int(limit))
            if offset:
                sql += " OFFSET ?"
                params.append(int(offset))
        return self._infos(sql, params)

    @_reads
    def count_runs(
        self,
        *,
        status: str | None = None,
        filename: str | None = None,
        since: float | None = None,
        waiting: bool = False,
        forks_of: str | None = None,
    ) -> int:
        """How many runs `list_runs` would give without a limit."""
        where, params = self._filters(status, filename, since, waiting, forks_of)
        with self._read() as cur:
            cur.execute(self._q(Q["count_runs"] + where), params)
            return int(cur.fetchone()[0])

    def _infos(self, tail: str, params: Sequence[Any]) -> list[RunInfo]:
        """RunInfo of the runs `Q["info_select"] + tail` selects, each checked for damage."""
        with self._read() as cur:
            cur.execute(self._q(Q["info_select"] + tail), params)
            rows = cur.fetchall()
        keys = [row[0] for row in rows]
        logs: dict[int, Any] = {}
        counts: dict[int, int] = {}
        broken: dict[int, str] = {}
        found: dict[int, list[Wait]] = {}
        for chunk in range(0, len(keys), 500):
            part = keys[chunk : chunk + 500]
            with contextlib.suppress(Damaged):  # unsaid then; its damage is found below
                found.update(self._waits_in(part))
            try:
                logs.update(self._grouped(Q["log_select"], part))
                counts.update(self._grouped(Q["nodes_select"], part))
            except Damaged:
                for key in part:  # find the runs whose rows cannot be read
                    try:
                        logs.update(self._grouped(Q["log_select"], [key]))
                        counts.update(self._grouped(Q["nodes_select"], [key]))
                    except Damaged as exc:
                        broken[key] = f"its rows cannot be read ({exc.message})"
        return [
            _info(
                row,
                logs.get(row[0]),
                counts.get(row[0], 0),
                broken.get(row[0]),
                waits_described(found.get(row[0], ())) if row[2] == "pending" else None,
            )
            for row in rows
        ]

    def _waits_in(self, keys: Sequence[int]) -> dict[int, list[Wait]]:
        """The waits of the runs with these keys, by key."""
        if not keys:
            return {}
        marks = ", ".join("?" for _ in keys)
        out: dict[int, list[Wait]] = {}
        with self._read() as cur:
            cur.execute(self._q(Q["waits_select"].format(marks=marks)), list(keys))
            for key, *row in cur.fetchall():
                try:
                    out.setdefault(key, []).append(row_wait(*row))
                except (TypeError, ValueError):
                    continue  # an unreadable row says nothing
        return out

    def _grouped(self, sql: str, keys: Sequence[int]) -> dict[int, Any]:
        marks = ", ".join("?" for _ in keys)
        with self._read() as cur:
            cur.execute(self._q(sql.format(marks=marks)), list(keys))
            return {row[0]: row[1:] if len(row) > 2 else row[1] for row in cur.fetchall()}

    @_reads
    def resolve_run_id(self, prefix: str) -> str:
        """The id of the one run whose id starts with `prefix` (see `JobStore`)."""
        if not prefix:
            raise RunError("a run id cannot be empty")
        with self._read() as cur:
            cur.execute(self._q(Q["run_id_exact"]), (prefix,))
            if cur.fetchone() is not None:
                return prefix
            cur.execute(
                self._q(Q["run_id_prefix"]),
                (len(prefix), prefix),
            )
            found = [row[0] for row in cur.fetchall()]
        return resolve_prefix(prefix, found, self._where())

    # -------------------------------------------------- deleting

    def delete_run(self, run_id: str) -> None:
        """Delete a run and all its rows; RunError when it is running."""
        with self._write() as cur:
            cur.execute(self._q(Q["info_select"] + " WHERE r.run_id = ?"), (run_id,))
            row = cur.fetchone()
            if row is None:
                raise RunError(f"no run {run_id!r} in {self._where()}")
            driver = _driver(row[12:18])
            if row[2] == "pending" and driver is not None and driver.is_live():
                raise refuse_live(run_id, driver, "deleting")
            self._delete(cur, [row[0]])
        self._known.drop(run_id)

    def _delete(self, cur: Any, keys: Sequence[int]) -> None:
        for chunk in range(0, len(keys), 500):
            part = list(keys[chunk : chunk + 500])
            marks = ", ".join("?" for _ in part)
            for table in RUN_TABLES:
                cur.execute(self._q(Q[f"delete_{table}_in"].format(marks=marks)), part)
            cur.execute(self._q(Q["delete_runs_in"].format(marks=marks)), part)

    def prune_runs(
        self, *, before: float, status: str | None = None, dry_run: bool = False
    ) -> tuple[list[str], list[str]]:
        """Delete runs last updated before `before` (see `JobStore.prune_runs`)."""
        sql = Q["prune_select"]
        params: list[Any] = [float(before)]
        if status is not None:
            sql += " AND r.status = ?"
            params.append(str(Status(status)))
        sql += " ORDER BY r.created, r.id"
        with self._write() as cur:
            cur.execute(self._q(sql), params)
            rows = cur.fetchall()
            gone: list[tuple[int, str]] = []
            kept: list[str] = []
            for key, run_id, state, *lease in rows:
                driver = _driver(lease)
                if state == "pending" and driver is not None and driver.is_live():
                    kept.append(run_id)
                else:
                    gone.append((key, run_id))
            if not dry_run:
                self._delete(cur, [key for key, _ in gone])
        for _, run_id in gone:
            self._known.drop(run_id)
        return [run_id for _, run_id in gone], kept

    # -------------------------------------------------- the driver's lease

    def acquire_lease(
        self, run_id: str, owner: Owner, ttl: float, *, force: bool = False
    ) -> Driver:
        """Take the lease of a run (see `JobStore.acquire_lease`)."""
        q = self._q
        for _ in range(10):  # another process may take it between our read and our write
            now = time.time()
            mine = (owner.token, owner.host, owner.pid, owner.started, now, now + ttl)
            with self._write() as cur:
                cur.execute(
                    q(Q["lease_of_run"]),
                    (run_id,),
                )
                row = cur.fetchone()
                if row is None:
                    raise RunError(f"no run {run_id!r} in {self._where()}")
                key, held = row[0], _driver(row[1:])
                if held is None:
                    cur.execute(q(Q["take_lease"]), (key, *mine))
                else:
                    if held.token != owner.token and not force and held.is_live(now):
                        raise refuse_live(run_id, held, "driving")
                    cur.execute(q(Q["take_over_lease"]), (*mine, key, held.token))
                if cur.rowcount == 1:
                    return Driver(owner.host, owner.pid, now, now + ttl, owner.started, owner.token)
        raise StoreError(f"run {run_id}: could not take its lease (it keeps changing hands)")

    def renew_lease(self, run_id: str, token: str, ttl: float) -> bool:
        """Renew our lease; False when it is not ours any more."""
        now = time.time()
        return self._write_one(self._q(Q["renew_lease"]), (now, now + ttl, run_id, token)) == 1

    def release_lease(self, run_id: str, token: str, *, finished: bool) -> None:
        """Give the lease back: removed when the run finished, else marked released."""
        if finished:
            self._write_one(self._q(Q["drop_lease"]), (run_id, token))
        else:
            self._write_one(self._q(Q["release_lease"]), (time.time(), run_id, token))

    # -------------------------------------------------- signals and waits

    def _signal_run(self, cur: Any, run_id: str) -> tuple[int, str, Any] | None:
        """(key, status, abort reason) of the run a signal is sent to, in the write's
        transaction (the PostgreSQL store locks its row: senders take turns)."""
        cur.execute(self._q(Q["signal_run"]), (run_id,))
        row = cur.fetchone()
        return None if row is None else (int(row[0]), str(row[1]), row[2])

    def send_signal(self, run_id: str, name: str, value: Any = None) -> int:
        """Put a signal in the run's mailbox; return its number (see `JobStore`)."""
        name = signal_name(name)
        text = signal_text(value)
        now = time.time()

        def write() -> int:
            with self._write() as cur:
                found = self._signal_run(cur, run_id)
                if found is None:
                    raise RunError(f"run {run_id} does not exist")
                key, status, aborted = found
                if status != "pending":
                    raise finished_error(run_id, status, aborted)
                cur.execute(self._q(Q["newest_signal"]), (key,))
                seq = _int(cur.fetchone()[0]) + 1
                cur.execute(self._q(Q["insert_signal"]), (key, seq, name, text, now))
            self.rows_written += 1
            self.bytes_written += len(text)
            return seq

        def written() -> int | None:
            with self._read() as cur:
                cur.execute(self._q(Q["signal_sent"]), (run_id, name, now, text))
                row = cur.fetchone()
            return None if row is None else int(row[0])

        return self._attempt(write, written)

    def take_signal(self, run_id: str, name: str, node: int) -> tuple[int, Any] | None:
        """The earliest signal `name` for `node`, marked taken by it (see `JobStore`)."""
        q = self._q

        def write() -> tuple[int, Any] | None:
            for _ in range(10):  # another node may take it between our read and our write
                with self._write() as cur:
                    found = self._signal_run(cur, run_id)
                    if found is None:
                        raise RunError(f"run {run_id} does not exist")
                    key = found[0]
                    cur.execute(q(Q["next_signal"]), (key, name, node))
                    row = cur.fetchone()
                    if row is None:
                        return None
                    seq, text, taken_by = row
                    if taken_by is None:
                        cur.execute(q(Q["consume_signal"]), (node, time.time(), key, seq))
                        if cur.rowcount != 1:
                            continue
                return int(seq), signal_value(run_id, text)
            raise StoreError(f"run {run_id}: could not take signal {name} (it keeps being taken)")

        # Taking again after a lost COMMIT answer gives the same signal: no settling needed.
        return self._attempt(write)

    @_reads
    def signals(self, run_id: str) -> list[dict[str, Any]]:
        """The run's mailbox in order of arrival (see `JobStore.signals`)."""
        with self._read() as cur:
            cur.execute(self._q(Q["run_seqs"]), (run_id,))
            row = cur.fetchone()
            if row is None:
                raise RunError(f"run {run_id} does not exist")
            cur.execute(self._q(Q["signals_of_run"]), (row[0],))
            rows = cur.fetchall()
        return [
            {
                "seq": int(seq),
                "name": str(name),
                "value": signal_value(run_id, text),
                "sent_at": _float(sent_at),
                "consumed_by": None if by is None else int(by),
                "consumed_at": None if at is None else _float(at),
            }
            for seq, name, text, sent_at, by, at in rows
        ]

    @_reads
    def run_waits(self, run_id: str) -> list[Wait]:
        """What the run waits for, as its `waits` rows say (tree order)."""
        with self._read() as cur:
            cur.execute(self._q(Q["run_seqs"]), (run_id,))
            row = cur.fetchone()
            if row is None:
                raise RunError(f"run {run_id} does not exist")
            cur.execute(self._q(Q["waits_of_run"]), (row[0],))
            return [row_wait(*r) for r in cur.fetchall()]

    @_reads
    def due_runs(self, now: float, limit: int = 100) -> list[str]:
        """Pending runs with a wait due at `now`, or awaiting a signal in their mailbox
        (see `JobStore.due_runs`): two index look-ups, never a walk over every run."""
        with self._read() as cur:
            cur.execute(self._q(Q["due_runs"]), (float(now), int(limit)))
            return [str(row[0]) for row in cur.fetchall()]

    @_reads
    def taken_unrecorded(self) -> list[str]:
        """Pending runs whose await took a signal but never recorded it (see
        `JobStore.taken_unrecorded`)."""
        with self._read() as cur:
            cur.execute(self._q(Q["taken_unrecorded"]))
            return [str(row[0]) for row in cur.fetchall()]

    @_reads
    def next_wake(self) -> float | None:
        """The earliest time any run waits for (see `JobStore.next_wake`)."""
        with self._read() as cur:
            cur.execute(self._q(Q["next_wake"]))
            row = cur.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    # -------------------------------------------------- attempts of actions

    def _claim_runs(self, cur: Any, run_ids: Sequence[str]) -> dict[str, tuple[int, str]]:
        """Key and status of the runs named (those the store has), in the write's
        transaction (the PostgreSQL store keeps them from being deleted meanwhile)."""
        out: dict[str, tuple[int, str]] = {}
        for chunk in range(0, len(run_ids), 500):
            part = list(run_ids[chunk : chunk + 500])
            marks = ", ".join("?" for _ in part)
            cur.execute(self._q(Q["attempt_runs"].format(marks=marks)), part)
            for key, run_id, status in cur.fetchall():
                out[str(run_id)] = (int(key), str(status))
        return out

    def _claims_sql(self, count: int) -> str:
        """`attempts_select` for `count` keys (the PostgreSQL store locks the rows)."""
        return self._q(Q["attempts_select"].format(marks=", ".join(["(?, ?, ?)"] * count)))

    def begin_attempts(
        self, items: Sequence[tuple[str, int, int]], owner: str, ttl: float
    ) -> list[Claim]:
        """Claim attempts for `owner`, the batch in one transaction (see `JobStore`)."""
        wanted = [(str(r), int(n), int(a)) for r, n, a in items]
        if not wanted:
            return []
        owner = str(owner)
        now = time.time()
        until = now + float(ttl)

        def write() -> list[Claim]:
            with self._write() as cur:
                runs = self._claim_runs(cur, sorted({r for r, _, _ in wanted}))
                keys: dict[tuple[str, int, int], tuple[int, int, int]] = {}
                for run_id, node, attempt in wanted:
                    found = runs.get(run_id)
                    if found is not None and found[1] == "pending":
                        keys[(run_id, node, attempt)] = (found[0], node, attempt)
                rows = sorted(set(keys.values()))
                cur.executemany(
                    self._q(Q["insert_attempt"]),
                    [(k, n, a, owner, until, now) for k, n, a in rows],
                )
                claims: dict[tuple[int, int, int], Claim] = {}
                taken: list[tuple[Any, ...]] = []
                for chunk in range(0, len(rows), 1000):
                    part = rows[chunk : chunk + 1000]
                    cur.execute(self._claims_sql(len(part)), [x for row in part for x in row])
                    for key, node, attempt, held, lease, began, was, result in cur.fetchall():
                        row = (int(key), int(node), int(attempt))
                        claim, take = _claim(owner, now, held, lease, began, was, result)
                        if take:
                            taken.append((owner, until, now, str(held), *row))
                        claims[row] = claim
                if taken:
                    cur.executemany(self._q(Q["take_over_attempt"]), taken)
            self.rows_written += len(rows)
            out: list[Claim] = []
            seen: set[tuple[int, int, int]] = set()
            for item in wanted:
                at = keys.get(item)
                if at is None:
                    out.append(Claim("gone"))
                    continue
                claim = claims.get(at, Claim("gone"))
                if at in seen and claim.state in ("new", "abandoned"):
                    claim = Claim("running", owner)  # the same attempt twice in the batch
                seen.add(at)
                out.append(claim)
            return out

        # Run again after a lost COMMIT answer, this write's own claims are told apart by
        # their start (`now`, see `_claim`): the same answers again.
        return self._attempt(write)

    def renew_attempts(self, items: Sequence[tuple[str, int, int]], owner: str, ttl: float) -> int:
        """Extend `owner`'s leases of these attempts (see `JobStore.renew_attempts`)."""
        wanted = [(str(r), int(n), int(a)) for r, n, a in items]
        if not wanted:
            return 0

        def write() -> int:
            until = time.time() + float(ttl)
            renewed = 0
            with self._write() as cur:
                runs = self._claim_runs(cur, sorted({r for r, _, _ in wanted}))
                rows = sorted({(runs[r][0], n, a) for r, n, a in wanted if r in runs})
                for chunk in range(0, len(rows), 1000):
                    part = rows[chunk : chunk + 1000]
                    marks = ", ".join(["(?, ?, ?)"] * len(part))
                    cur.execute(
                        self._q(Q["renew_attempts"].format(marks=marks)),
                        [until, str(owner), *(x for row in part for x in row)],
                    )
                    renewed += max(0, int(cur.rowcount))
            self.rows_written += renewed
            return renewed

        return self._attempt(write)

    def finish_attempts(self, items: Sequence[tuple[str, int, int, str]]) -> None:
        """Keep the results of claimed attempts (see `JobStore.finish_attempts`)."""
        now = time.time()
        rows = [(str(t), now, str(r), int(n), int(a)) for r, n, a, t in items]
        if not rows:
            return

        def write() -> None:
            with self._write() as cur:
                cur.executemany(self._q(Q["finish_attempt"]), rows)
            self.rows_written += len(rows)
            self.bytes_written += sum(len(row[0]) for row in rows)

        # Writing the results again is harmless: the first result kept stays.
        self._attempt(write)

    def clear_wait(self, run_id: str, node: int, attempt: int) -> None:
        """Delete the run's retry wait of `node` for `attempt` (see `JobStore.clear_wait`).

        A later write leaves it deleted unless the leaf changed: a delta or a compaction
        looks only at changed leaves (`wait_change`); a whole snapshot (`_record_whole`, a
        store object that never read the run) skips a retry wait the stored run has too
        but without its row (`_cleared_waits`)."""
        sql = self._q(Q["clear_wait"])
        self._attempt(lambda: self._write_one(sql, (str(run_id), int(node), int(attempt))))


def _claim(
    owner: str, now: float, held: Any, lease: Any, began: Any, was: Any, result: Any
) -> tuple[Claim, bool]:
    """What an `attempts` row tells a claim by `owner` at `now`, and whether the claim
    takes the row over (its lease ran out). This write's own claims are those of `owner`
    begun at `now`: inserted, or taken over from `was` (a write run again after a lost
    COMMIT answer finds them so)."""
    if result is not None:
        return Claim("finished", str(held), str(result)), False
    if held == owner and began is not None and float(began) == now:
        return (Claim("new") if was is None else Claim("abandoned", str(was))), False
    if lease is not None and float(lease) > now:
        return Claim("running", str(held)), False
    return Claim("abandoned", str(held)), True


def signal_value(run_id: str, text: Any) -> Any:
    """A stored signal's value; StoreError when its row is damaged."""
    try:
        return decode_value(_json(text, "a signal's value"))
    except Damage as exc:
        raise StoreError(f"run {run_id} is damaged: {exc}") from None
    except AblaufError as exc:
        raise StoreError(f"run {run_id} is damaged: {exc.message}") from None


class Damaged(StoreError):
    """A dialect's error for rows the database itself cannot read (a damaged file)."""


def _run_row(row: Sequence[Any]) -> tuple[dict[str, Any], Sequence[Any], Sequence[Any] | None]:
    """A `load_run` row: the run's columns by name, its lease's (NULLs: none, see
    `_driver`) and the run and restart it was forked from (None: not a fork)."""
    n = len(RUN_COLUMNS)
    lease = row[n : n + len(LEASE_COLUMNS)]
    forked = row[n + len(LEASE_COLUMNS) :]
    return (
        dict(zip(RUN_COLUMNS, row[:n], strict=True)),
        lease,
        (forked if forked[0] is not None else None),
    )


def _int(value: Any) -> int:
    return value if type(value) is int else 0


def _driver(lease: Sequence[Any] | None) -> Driver | None:
    """The Driver of a leases row (token, host, pid, started, heartbeat, expires)."""
    if lease is None or lease[0] is None:
        return None
    token, host, pid, started, heartbeat, expires = lease
    try:
        return Driver(
            str(host),
            int(pid),
            float(heartbeat),
            float(expires),
            None if started is None else float(started),
            str(token),
        )
    except (TypeError, ValueError):
        return Driver("?", 0, 0.0, 0.0, None, str(token))  # unreadable: taken as expired


def _info(
    row: Sequence[Any],
    log: Sequence[Any] | None,
    n_rows: int,
    broken: str | None,
    waiting: str | None = None,
) -> RunInfo:
    """RunInfo of an `Q["info_select"]` row, the run's deltas (count, min and max seq, newest
    updated and restarts) and node row count; `damage` says what is wrong, if anything."""
    (_, run_id, status, created, updated, restarts, filename, error, aborted) = row[:9]
    snapshot_seq, head_seq, n_nodes = row[9:12]
    driver = _driver(row[12:18])
    parent, parent_step = row[18:20] if len(row) >= 20 else (None, None)
    damage = broken
    try:
        state = Status(status)
    except ValueError:
        state = Status.FAILURE
        damage = damage or f"its status {str(status)[:40]!r} is not pending, success or failure"
    count, first, last, newest, newest_restarts = (
        log if log is not None else (0, None, None, None, None)
    )
    if damage is None:
        damage = log_damage(snapshot_seq, head_seq, count, first, last)
    if damage is None and n_rows != n_nodes:
        damage = f"{n_rows} node rows, {n_nodes} expected"
    for name, value in (("id", run_id), ("file name", filename), ("error", error)):
        if damage is None and isinstance(value, BadText):
            damage = f"its {name} is not UTF-8 text"
    if damage is None and isinstance(aborted, BadText):
        damage = "its abort reason is not UTF-8 text"
    return RunInfo(
        str(run_id),
        state,
        _float(created),
        _float(newest if newest is not None else updated),
        int(newest_restarts if newest_restarts is not None else _int(restarts)),
        filename,
        error,
        aborted,
        driver,
        damage,
        waiting,
        None if parent is None else str(parent),
        None if parent_step is None else int(parent_step),
    )


def log_damage(snapshot_seq: Any, head_seq: Any, count: Any, first: Any, last: Any) -> str | None:
    """What is wrong with a step log known by its deltas' count and smallest and largest
    seq (the listing counts them instead of reading them), or None."""
    if type(snapshot_seq) is not int or type(head_seq) is not int or snapshot_seq < 0:
        return "its write numbers are not numbers"
    if head_seq < snapshot_seq:
        return f"its newest write ({head_seq}) is older than its snapshot ({snapshot_seq})"
    want = head_seq - snapshot_seq
    if count == want and (not count or (first, last) == (snapshot_seq + 1, head_seq)):
        return None
    if type(last) is int and last > head_seq:
        return f"its step log has writes past its newest ({head_seq})"
    return f"its step log holds {count} of writes {snapshot_seq + 1}..{head_seq}: steps were lost"


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0
