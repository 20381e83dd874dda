"""Dialect-neutral SQL persistence of runs: the tables, the per-restart delta, reading back.

Shared by the SQLite store (`stores/sqlite.py`) and the PostgreSQL store. Three tables
(column types are the dialect's; every JSON column is text written by `json.dumps`):

    runs    id          integer key (the run's row; other tables refer to it)
            run_id      text, unique: the public id
            status      "pending" | "success" | "failure"
            created, updated   seconds since the epoch
            restarts, aborted, todo (JSON), touched (JSON): the job's own fields
            n_nodes     how many node rows the run has (a check when loading)
            version     +1 on every write: optimistic concurrency between processes
            source, filename, initial_context (JSON), format (serde.VERSION), error
    nodes   (run, node) key; spec, state, children
    context (run, key) key; pos, value

A node's record (`serde.encode_node`) is split in three JSON texts:

- `spec`: what the node is (id, kind, action, payload, idempotent, augment, span), written
  when the node is created and never again unless it changes;
- `state`: what happened to it (result, output, error, attempt, timestamps; a branch's own
  fields such as a sequence's cursor), rewritten when it changes;
- `children`: a branch's child ids, written when the branch is created and again only when
  run-time expansion changes them (NULL for a leaf).

So a step of a sequential run rewrites two small `state` texts (the leaf that finished, the
leaf dispatched) and the cursor of their sequence, however large the tree or the payloads.
The context is one row per top-level key, rewritten when that key's value changes.

The node rows *are* the snapshot: loading is one range scan of `nodes` and `context`,
never a replay of a log, so no compaction is needed and loading never slows down.

What is written for a `record(run_id, job)` (see `diff`):

- `job.restarts == previous.restarts + 1` (a restart of the job this store last wrote or
  read): the nodes in `job.touched`, their ancestors whose own fields changed, nodes
  created since (ids past the previous count) and their parents. A restart must list in
  `touched` every node whose record changed other than those ancestors' summaries.
- anything else (abort, prepare_replay, an undo in the REPL): a walk of both trees that
  skips shared subtrees (`old is new`), writing every node whose record differs.
- no previous job known to this store object: every row is rewritten.

The previous job is kept per run in the store object (`SqlStore._known`); `runs.version`
makes sure it is still what the database holds: if another process wrote the run in
between, `record` raises StoreError instead of writing a delta against the wrong base.

`SqlStore` implements the whole `JobStore` protocol on a DB-API connection; a dialect
supplies the connection, the transactions and the error mapping (see its hooks). The SQL it
issues is the common subset of SQLite 3.24+ and PostgreSQL 9.5+ (`INSERT ... ON CONFLICT`),
written with `?` placeholders and rewritten to `%s` when `PLACEHOLDER` is "%s".
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any

from ablauf_lang import serde
from ablauf_lang.errors import AblaufError, RunError, StoreError
from ablauf_lang.job import ALL, Job
from ablauf_lang.nodes import Leaf, Node, Status
from ablauf_lang.stores.base import RunInfo, StoredRun, new_run_id, run_error

SCHEMA_VERSION = 1  # of the tables below; stores refuse a database with a larger one

# Keys of a node record that say what the node is; every other key is its state.
SPEC_KEYS = frozenset({"id", "kind", "action", "payload", "idempotent", "augment", "span"})

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

# ---------------------------------------------------------------- node rows


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One row of `nodes`: a node's record split into spec, state and child ids (JSON)."""

    node: int
    spec: str
    state: str
    children: str | None


def split_record(
    record: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], list[int] | None]:
    """Split a node record into (spec, state, children)."""
    spec: dict[str, Any] = {}
    state: dict[str, Any] = {}
    for key, value in record.items():
        if key in SPEC_KEYS:
            spec[key] = value
        elif key != "children":
            state[key] = value
    return spec, state, record.get("children")


def node_row(node: Node) -> NodeRow:
    """The full row of one node."""
    spec, state, children = split_record(serde.encode_node(node))
    return NodeRow(
        node.id, _dumps(spec), _dumps(state), None if children is None else _dumps(children)
    )


def node_state(node: Node) -> dict[str, Any]:
    """A node's state (no spec, no children): O(1) for a branch, whatever its width."""
    if isinstance(node, Leaf):
        return split_record(serde.encode_node(node))[1]
    return serde.encode_branch_fields(node)


def _spec_changed(old: Node, new: Node) -> bool:
    if type(old) is not type(new) or old.id != new.id:
        return True
    if isinstance(new, Leaf):
        assert isinstance(old, Leaf)
        return (
            old.action != new.action
            or old.idempotent != new.idempotent
            or old.augment != new.augment
            or old.span != new.span
            or (old.payload is not new.payload and old.payload != new.payload)
        )
    return old.span != new.span


def record_from_row(spec: str, state: str, children: str | None) -> dict[str, Any]:
    """Join a row's three texts back into a node record for `serde.decode_nodes`."""
    record: dict[str, Any] = json.loads(spec)
    record.update(json.loads(state))
    if children is not None:
        record["children"] = json.loads(children)
    return record


# ---------------------------------------------------------------- the delta of one write


@dataclass(frozen=True, slots=True)
class Delta:
    """The rows one `record` writes (all JSON text), apart from the run's own row."""

    reset: bool  # delete every node and context row of the run first
    full: list[NodeRow]  # rows to write whole (insert or replace)
    states: list[tuple[str, int]]  # (state, node): rows whose state alone changed
    drop_from: int | None  # delete nodes with an id at least this (an undone expansion)
    context: list[tuple[str, int, str]]  # (key, pos, value) to insert or replace
    context_drop: list[str]  # keys to delete

    @property
    def size(self) -> int:
        """Bytes of JSON text written (the measure the benchmark reports)."""
        n = sum(len(r.spec) + len(r.state) + len(r.children or "") for r in self.full)
        n += sum(len(s) for s, _ in self.states)
        return n + sum(len(k) + len(v) for k, _, v in self.context)


def all_rows(job: Job) -> list[NodeRow]:
    """Every node's full row, in pre-order."""
    return [node_row(n) for n in job.nodes()]


def diff(old: Job | None, new: Job) -> Delta:
    """The rows that turn the stored `old` into `new` (all of them when `old` is None)."""
    if old is None:
        return Delta(True, all_rows(new), [], None, context_rows(new.context), [])
    if new.restarts == old.restarts + 1:
        full, states = _restart_nodes(old, new)
    else:
        full, states = _walk_nodes(old, new)
    drop_from = len(new.paths) if len(new.paths) < len(old.paths) else None
    ctx, ctx_drop = context_delta(old.context, new.context)
    return Delta(False, full, states, drop_from, ctx, ctx_drop)


def _restart_nodes(old: Job, new: Job) -> tuple[list[NodeRow], list[tuple[str, int]]]:
    """Rows changed by one restart: touched nodes, their ancestors, nodes created since."""
    n_old = len(old.paths)
    touched = new.touched
    starts = set(touched)
    starts.update(range(n_old, len(new.paths)))  # created by run-time expansion
    pairs: dict[int, tuple[Node | None, Node]] = {}
    whole: set[int] = {i for i in starts if i >= n_old}
    for node_id in starts:
        o: Node | None = old.root
        n: Node = new.root
        for i in new.paths[node_id]:
            if n.id not in pairs:
                pairs[n.id] = (o, n)
            kids = n.children
            if o is not None:
                okids = o.children
                if len(okids) != len(kids) or okids[i].id != kids[i].id:
                    whole.add(n.id)  # its child list changed
                    o = None
                else:
                    o = okids[i]
            n = kids[i]
        pairs[n.id] = (o, n)
    full: list[NodeRow] = []
    states: list[tuple[str, int]] = []
    for node_id, (o, n) in pairs.items():
        if o is n:
            continue
        if (
            o is None
            or node_id in whole
            or _spec_changed(o, n)
            or (node_id in touched and not isinstance(n, Leaf))
        ):
            full.append(node_row(n))
            continue
        state = node_state(n)
        if node_id in touched or state != node_state(o):
            states.append((_dumps(state), node_id))
    return full, states


def _walk_nodes(old: Job, new: Job) -> tuple[list[NodeRow], list[tuple[str, int]]]:
    """Rows that differ between two jobs of one run, skipping subtrees they share."""
    full: list[NodeRow] = []
    states: list[tuple[str, int]] = []
    stack: list[tuple[Node, Node]] = [(old.root, new.root)]
    while stack:
        o, n = stack.pop()
        if o is n:
            continue
        if _spec_changed(o, n):
            full.extend(_subtree_rows(n))
            continue
        if isinstance(n, Leaf):
            state = node_state(n)
            if state != node_state(o):
                states.append((_dumps(state), n.id))
            continue
        okids, kids = o.children, n.children
        if len(okids) != len(kids) or any(a.id != b.id for a, b in zip(okids, kids, strict=True)):
            full.extend(_subtree_rows(n))
            continue
        state = node_state(n)
        if state != node_state(o):
            states.append((_dumps(state), n.id))
        stack.extend(zip(okids, kids, strict=True))
    return full, states


def _subtree_rows(node: Node) -> Iterator[NodeRow]:
    stack = [node]
    while stack:
        n = stack.pop()
        yield node_row(n)
        if not isinstance(n, Leaf):
            stack.extend(n.children)


# ---------------------------------------------------------------- context rows


def context_key(key: Any) -> str:
    """The text a context key is stored under (JSON, so any key survives the trip)."""
    return _dumps(serde.encode_value(key))


def _decode_key(text: str) -> Any:
    value = serde.decode_value(json.loads(text))
    return tuple(value) if isinstance(value, list) else value


def context_rows(context: Mapping[Any, Any]) -> list[tuple[str, int, str]]:
    """Every (key, pos, value) row of a context."""
    return [
        (context_key(k), pos, _dumps(serde.encode_value(v)))
        for pos, (k, v) in enumerate(context.items())
    ]


def context_delta(
    old: Mapping[Any, Any], new: Mapping[Any, Any]
) -> tuple[list[tuple[str, int, str]], list[str]]:
    """(rows to write, keys to drop first) that turn the stored `old` context into `new`.

    The context is never mutated, so `old is new` means unchanged, and a top-level value
    that is the same object as before is unchanged too (`assoc_in` copies on write).
    """
    if old is new:
        return [], []
    if any(k not in new for k in old):
        # Positions of later keys would shift: rewrite them all (contexts rarely lose keys).
        return context_rows(new), [context_key(k) for k in old]
    rows = []
    for pos, (k, v) in enumerate(new.items()):
        if k not in old or old[k] is not v:
            rows.append((context_key(k), pos, _dumps(serde.encode_value(v))))
    return rows, []


# ---------------------------------------------------------------- the run row


def encode_todo(job: Job) -> str:
    """`job.todo` as JSON (as `serde.to_data` writes it)."""
    return _dumps({str(k): "all" if v is ALL else sorted(v) for k, v in job.todo.items()})


def job_from_rows(
    run: Mapping[str, Any], nodes: Iterable[Sequence[Any]], context: Iterable[Sequence[Any]]
) -> Job:
    """Build a job from its run row (a mapping by column name), its node rows
    `(node, spec, state, children)` and its context rows `(key, value)` in position order."""
    records = [record_from_row(spec, state, children) for _, spec, state, children in nodes]
    if len(records) != run["n_nodes"]:
        raise StoreError(
            f"run {run['run_id']} is damaged in the store: it has "
            f"{len(records)} node rows, {run['n_nodes']} expected"
        )
    data = {
        "format": serde.FORMAT,
        "version": run["format"],
        "context": {},
        "restarts": run["restarts"],
        "aborted": run["aborted"],
        "todo": json.loads(run["todo"]),
        "touched": json.loads(run["touched"]),
        "nodes": records,
    }
    try:
        job = serde.from_data(data)
    except AblaufError as exc:
        raise StoreError(
            f"run {run['run_id']} cannot be read from the store: {exc.message}"
        ) from None
    ctx = {_decode_key(k): serde.decode_value(json.loads(v)) for k, v in context}
    return replace(job, context=ctx)


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
    "version",
    "source",
    "filename",
    "initial_context",
    "format",
    "error",
)
_INFO_COLUMNS = "run_id, status, created, updated, restarts, filename, error"

SQL_UPSERT_NODE = (
    "INSERT INTO nodes (run, node, spec, state, children) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (run, node) DO UPDATE SET spec = excluded.spec, state = excluded.state, "
    "children = excluded.children"
)
SQL_UPDATE_STATE = "UPDATE nodes SET state = ? WHERE run = ? AND node = ?"
SQL_UPSERT_CONTEXT = (
    "INSERT INTO context (run, key, pos, value) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (run, key) DO UPDATE SET pos = excluded.pos, value = excluded.value"
)
SQL_UPDATE_RUN = (
    "UPDATE runs SET status = ?, updated = ?, restarts = ?, aborted = ?, todo = ?, "
    "touched = ?, n_nodes = ?, error = ?, format = ?, version = version + 1 WHERE id = ?"
)


@dataclass(frozen=True, slots=True)
class _Known:
    key: int  # runs.id
    version: int  # runs.version when this process last wrote or read the run
    job: Job


class SqlStore:
    """The JobStore protocol over a DB-API connection; a dialect subclass supplies:

    - `PLACEHOLDER`: "?" or "%s";
    - `_write()`: a context manager yielding a cursor inside a transaction that holds the
      write lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: a transaction, rows locked by the
      UPDATE), committed on exit and rolled back on an exception, driver errors raised as
      StoreError with a one-line message;
    - `_read()`: the same for reading (a consistent snapshot);
    - `_insert_run(cur, columns, values) -> int`: insert a `runs` row, return its `id`.

    Counters for benchmarks and tests: `commits`, `rows_written`, `bytes_written`.
    """

    PLACEHOLDER = "?"
    durable = True
    KNOWN_RUNS = 256  # runs whose last job is kept in memory to write deltas against
    url: str = ""

    def __init__(self) -> None:
        self._known: OrderedDict[str, _Known] = OrderedDict()
        self.commits = 0
        self.rows_written = 0
        self.bytes_written = 0

    # -------------------------------------------------- dialect hooks

    def _write(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _insert_run(self, cur: Any, columns: Sequence[str], values: Sequence[Any]) -> int:
        raise NotImplementedError

    def _q(self, sql: str) -> str:
        return sql if self.PLACEHOLDER == "?" else sql.replace("?", self.PLACEHOLDER)

    # -------------------------------------------------- bookkeeping

    def _remember(self, run_id: str, known: _Known) -> None:
        self._known[run_id] = known
        self._known.move_to_end(run_id)
        while len(self._known) > self.KNOWN_RUNS:
            self._known.popitem(last=False)

    def _unknown(self, run_id: str) -> RunError:
        return RunError(f"no run {run_id!r} in {self.url or 'this store'}")

    # -------------------------------------------------- JobStore

    def create_run(
        self,
        job: Job,
        *,
        source: str | None = None,
        filename: str | None = None,
        run_id: str | None = None,
    ) -> str:
        """Record a new run: its program, initial context and every node of its job."""
        run_id = run_id or new_run_id()
        rows = all_rows(job)
        ctx = context_rows(job.context)
        initial = _dumps(serde.encode_value(job.context))
        now = time.time()
        values = (
            run_id,
            str(job.status),
            now,
            now,
            job.restarts,
            job.aborted,
            encode_todo(job),
            _dumps(sorted(job.touched)),
            len(rows),
            0,
            source,
            filename,
            initial,
            serde.VERSION,
            run_error(job),
        )
        with self._write() as cur:
            cur.execute(self._q("SELECT 1 FROM runs WHERE run_id = ?"), (run_id,))
            if cur.fetchone() is not None:
                raise RunError(f"run {run_id!r} already exists in {self.url or 'this store'}")
            key = self._insert_run(cur, RUN_COLUMNS[1:], values)
            self._write_rows(cur, key, Delta(False, rows, [], None, ctx, []))
        self.bytes_written += len(initial) + len(source or "")
        self._remember(run_id, _Known(key, 0, job))
        return run_id

    def record(self, run_id: str, job: Job) -> None:
        """Record the job after a restart (or abort, replay): only what changed, one commit."""
        known = self._known.get(run_id)
        with self._write() as cur:
            if known is None:
                cur.execute(self._q("SELECT id, version FROM runs WHERE run_id = ?"), (run_id,))
                row = cur.fetchone()
                if row is None:
                    raise self._unknown(run_id)
                key, version, old = row[0], row[1], None
            else:
                key, version, old = known.key, known.version, known.job
            delta = diff(old, job)
            params = (
                str(job.status),
                time.time(),
                job.restarts,
                job.aborted,
                encode_todo(job),
                _dumps(sorted(job.touched)),
                len(job.paths),
                run_error(job),
                serde.VERSION,
                key,
            )
            if known is None:
                cur.execute(self._q(SQL_UPDATE_RUN), params)
            else:
                cur.execute(self._q(SQL_UPDATE_RUN + " AND version = ?"), (*params, version))
                if cur.rowcount != 1:
                    self._known.pop(run_id, None)
                    raise StoreError(
                        f"run {run_id} was changed by another process (aborted, resumed or "
                        "retried elsewhere?) since this one last read it; not overwriting it"
                    )
            self._write_rows(cur, key, delta)
        self._remember(run_id, _Known(key, version + 1, job))

    def _write_rows(self, cur: Any, key: int, delta: Delta) -> None:
        q = self._q
        if delta.reset:
            cur.execute(q("DELETE FROM nodes WHERE run = ?"), (key,))
            cur.execute(q("DELETE FROM context WHERE run = ?"), (key,))
        if delta.drop_from is not None:
            cur.execute(q("DELETE FROM nodes WHERE run = ? AND node >= ?"), (key, delta.drop_from))
        if delta.full:
            cur.executemany(
                q(SQL_UPSERT_NODE), [(key, r.node, r.spec, r.state, r.children) for r in delta.full]
            )
        if delta.states:
            cur.executemany(q(SQL_UPDATE_STATE), [(s, key, n) for s, n in delta.states])
        if delta.context_drop:
            cur.executemany(
                q("DELETE FROM context WHERE run = ? AND key = ?"),
                [(key, k) for k in delta.context_drop],
            )
        if delta.context:
            cur.executemany(q(SQL_UPSERT_CONTEXT), [(key, *row) for row in delta.context])
        self.rows_written += 1 + len(delta.full) + len(delta.states) + len(delta.context)
        self.bytes_written += delta.size

    def load(self, run_id: str) -> StoredRun:
        """Load a run with its whole job (every node's state, output, attempts, times)."""
        q = self._q
        with self._read() as cur:
            cur.execute(q(f"SELECT {', '.join(RUN_COLUMNS)} FROM runs WHERE run_id = ?"), (run_id,))
            row = cur.fetchone()
            if row is None:
                raise self._unknown(run_id)
            run = dict(zip(RUN_COLUMNS, row, strict=True))
            cur.execute(
                q("SELECT node, spec, state, children FROM nodes WHERE run = ? ORDER BY node"),
                (run["id"],),
            )
            nodes = cur.fetchall()
            cur.execute(
                q("SELECT key, value FROM context WHERE run = ? ORDER BY pos, key"), (run["id"],)
            )
            context = cur.fetchall()
        job = job_from_rows(run, nodes, context)
        try:
            initial = serde.decode_value(json.loads(run["initial_context"] or "{}"))
        except ValueError:
            raise StoreError(
                f"run {run_id} is damaged in the store: its initial context is not JSON"
            ) from None
        self._remember(run_id, _Known(run["id"], run["version"], job))
        info = RunInfo(
            run_id,
            Status(run["status"]),
            run["created"],
            run["updated"],
            run["restarts"],
            run["filename"],
            run["error"],
        )
        return StoredRun(info, job, run["source"], initial)

    def info(self, run_id: str) -> RunInfo:
        """What the store knows of a run, without loading its tree."""
        with self._read() as cur:
            cur.execute(self._q(f"SELECT {_INFO_COLUMNS} FROM runs WHERE run_id = ?"), (run_id,))
            row = cur.fetchone()
        if row is None:
            raise self._unknown(run_id)
        return _info(row)

    def exists(self, run_id: str) -> bool:
        """True when the store has this run."""
        with self._read() as cur:
            cur.execute(self._q("SELECT 1 FROM runs WHERE run_id = ?"), (run_id,))
            return cur.fetchone() is not None

    def list_runs(self, *, limit: int | None = None, status: str | None = None) -> list[RunInfo]:
        """Runs, newest first (optionally only those with `status`)."""
        sql = f"SELECT {_INFO_COLUMNS} FROM runs"
        params: list[Any] = []
        if status is not None:
            sql += " WHERE status = ?"
            params.append(str(status))
        sql += " ORDER BY created DESC, id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._read() as cur:
            cur.execute(self._q(sql), params)
            rows = cur.fetchall()
        return [_info(r) for r in rows]


def _info(row: Sequence[Any]) -> RunInfo:
    run_id, status, created, updated, restarts, filename, error = row
    return RunInfo(run_id, Status(status), created, updated, restarts, filename, error)
