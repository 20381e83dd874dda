"""Dialect-neutral SQL persistence of runs: tables, per-restart deltas, reading back a Job.

The SQLite store (`stores/sqlite.py`) is built on this module; any SQL store can be (a
dialect subclasses `SqlStore` and supplies connections, transactions and error mapping).
The pure functions (`diff`, `node_row`, `node_state`, `context_delta`, `replay`,
`job_from_parts`) need no database at all.

Tables (column types are the dialect's; JSON columns are text written by `json.dumps`):

    runs    id            integer key (other tables refer to it)
            run_id        text, unique: the public id
            status        "pending" | "success" | "failure", always current
            created, updated, restarts        as of the snapshot (see `deltas`)
            aborted, todo, touched, n_nodes   the job's own fields, as of the snapshot
            snapshot_seq  the write the `nodes`/`context` rows are current with
            source, filename, initial_context, format (serde.VERSION), error
    nodes   (run, node) key; spec, state, children        the snapshot of the tree
    context (run, key) key; pos, value                    the snapshot of the context
    deltas  (run, seq) key; updated, restarts, data       writes since the snapshot

A node's record (`serde.encode_node`) is kept in three JSON texts: `spec`, what the node
is (id, kind, action, payload, span, a doseq's template ...), written once; `state`, what
happened to it (result, output, error, attempt, timestamps, a sequence's cursor ...); and
`children`, a branch's child ids (NULL for a leaf). The context is one row per top-level
key (`key` is the key as JSON text, `pos` keeps the order).

Writing (`SqlStore.record`, one transaction per restart):

- a restart appends one `deltas` row: JSON holding the new state of the nodes it changed
  (`diff`), the context keys it changed and the job's own fields. That is one INSERT, so a
  durable step costs about one commit, whatever the size of the tree or the payloads;
- every `COMPACT_EVERY` deltas (or `COMPACT_BYTES` of them) the write folds instead: the
  `nodes`/`context` rows of everything changed since the snapshot are rewritten from the
  job in memory and the deltas deleted. So loading reads the snapshot plus at most
  `COMPACT_EVERY` small deltas, and the file does not grow with the number of steps.
- a store object that never read the run writes a whole snapshot (O(tree), rare).

What a delta holds, from the previous job this store object wrote or read (`diff`):

- `new.restarts == old.restarts + 1` (a restart of it): the nodes in `new.touched`, their
  ancestors whose own fields changed (a sequence's cursor), nodes created by run-time
  expansion (ids past the old count) and the branches whose child list changed. A restart
  must list in `touched` every node whose own fields changed other than those ancestors.
- anything else (abort, prepare_replay, an undo in the REPL): a walk of both trees that
  skips the subtrees they share (`old is new`): every node whose record differs.

Several processes: each write names the sequence number it follows (`deltas.seq`,
`runs.snapshot_seq`); if another process wrote the run in between, the write is refused
with a StoreError (two drivers of one run) instead of applying a delta to the wrong base.

Delta JSON (`data`): {"r": [restarts, aborted, todo, touched, n_nodes, status],
"s": [[id, state], ...], "n": [[id, spec, state, children], ...], "c": [[key, pos,
value], ...], "cd": [key, ...] (context keys dropped first), "d": n (drop nodes >= n)}.
"""

from __future__ import annotations

import dataclasses
import json
import json.encoder
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

from ablauf_lang import serde
from ablauf_lang.errors import AblaufError, RunError, StoreError
from ablauf_lang.job import ALL, Job
from ablauf_lang.nodes import Leaf, LeafState, Node, Status
from ablauf_lang.stores.base import RunInfo, StoredRun, new_run_id, run_error

SCHEMA_VERSION = 1  # of the tables above; stores refuse a database with a larger one
COMPACT_EVERY = 64  # deltas between two snapshots of the node rows
COMPACT_BYTES = 256 * 1024  # or this many bytes of deltas

# Record keys that say what a node is (never changed by running it); the rest is state.
SPEC_KEYS = frozenset(
    {"id", "kind", "action", "payload", "idempotent", "augment", "span"}
    | {"var", "coll", "template", "test"}  # if!!'s test, doseq!!/pmap!!'s binding and body
)
# Branch fields that summarise the children (recomputed when decoding, never stored).
SUMMARY_FIELDS = frozenset({"children", "n_done", "n_failed", "inflight"})


def _not_json(value: Any) -> Any:
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def _make_dumps() -> Any:
    """Compact `json.dumps`; on CPython one C encoder built once (json builds one a call)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    encode = make(None, _not_json, json.encoder.c_encode_basestring, None, ":", ",", False,
                  False, True)  # fmt: skip
    return lambda value: "".join(encode(value, 0))


_dumps = _make_dumps()

# ---------------------------------------------------------------- node records


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One row of `nodes`: a node's record split into spec, state and child ids (JSON)."""

    node: int
    spec: str
    state: str
    children: str | None


def split_record(record: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Split a node record into (spec, state, children or None)."""
    spec: dict[str, Any] = {}
    state: dict[str, Any] = {}
    for key, value in record.items():
        if key in SPEC_KEYS:
            spec[key] = value
        elif key != "children":
            state[key] = value
    return spec, state, record.get("children")


def node_row(node: Node) -> NodeRow:
    """The whole row of one node."""
    spec, state, children = split_record(serde.encode_node(node))
    kids = None if children is None else _dumps(children)
    return NodeRow(node.id, _dumps(spec), _dumps(state), kids)


def _leaf_state(leaf: Leaf) -> dict[str, Any]:
    # The state part of serde's leaf record, without encoding the payload (checked below).
    result = leaf.result
    return {
        "result": None if result is None else result.value,
        "output": serde.encode_value(leaf.output),
        "error": serde.encode_value(leaf.error),
        "attempt": leaf.attempt,
        "dispatched_at": leaf.dispatched_at,
        "finished_at": leaf.finished_at,
    }


def _leaf_state_generic(leaf: Leaf) -> dict[str, Any]:
    return split_record(serde.encode_node(leaf))[1]


def _check_leaf_state() -> Any:
    sample = Leaf(3, "a/b", [1], True, None, LeafState.FAILURE, {"o": 1}, "e", 2, 1.5, 2.5)
    if _leaf_state(sample) == _leaf_state_generic(sample):
        return _leaf_state
    return _leaf_state_generic  # serde's leaf record changed: follow it, a little slower


leaf_state = _check_leaf_state()


def node_state(node: Node) -> dict[str, Any]:
    """A node's state: its record without spec and children (O(1) for a sequence)."""
    if isinstance(node, Leaf):
        return leaf_state(node)  # type: ignore[no-any-return]
    return {k: v for k, v in serde.encode_branch_fields(node).items() if k not in SPEC_KEYS}


@cache
def _own_fields(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(spec fields, state fields) of a node class, summaries left out."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in SUMMARY_FIELDS]
    spec = tuple(n for n in names if n in SPEC_KEYS)
    return spec, tuple(n for n in names if n not in SPEC_KEYS)


def _differ(old: Node, new: Node, names: tuple[str, ...]) -> bool:
    for name in names:
        a, b = getattr(old, name), getattr(new, name)
        if a is not b and a != b:
            return True
    return False


def spec_changed(old: Node, new: Node) -> bool:
    """True when `new` is not the same node as `old` (kind, id or spec differ)."""
    if type(old) is not type(new) or old.id != new.id:
        return True
    return _differ(old, new, _own_fields(type(new))[0])


def state_changed(old: Node, new: Node) -> bool:
    """True when the state of a node (same spec) differs, compared without encoding it."""
    return _differ(old, new, _own_fields(type(new))[1])


# ---------------------------------------------------------------- what changed


@dataclass(frozen=True, slots=True)
class Change:
    """What one write changes: node states, whole nodes, context keys (JSON-able values)."""

    states: dict[int, dict[str, Any]]  # node id -> new state
    wholes: dict[int, Node]  # node id -> node written whole (new, or spec/children changed)
    drop_from: int | None  # nodes with an id at least this are gone (an undone expansion)
    context: list[list[Any]]  # [key text, pos, encoded value] to write
    context_drop: list[str]  # key texts to delete first

    def data(self, job: Job) -> str:
        """The delta as JSON text (the `deltas.data` column)."""
        out: dict[str, Any] = {"r": run_fields(job)}
        if self.states:
            out["s"] = [[i, s] for i, s in self.states.items()]
        if self.wholes:
            out["n"] = [_whole(n) for n in self.wholes.values()]
        if self.context:
            out["c"] = self.context
        if self.context_drop:
            out["cd"] = self.context_drop
        if self.drop_from is not None:
            out["d"] = self.drop_from
        return _dumps(out)


def _whole(node: Node) -> list[Any]:
    spec, state, children = split_record(serde.encode_node(node))
    return [node.id, spec, state, children]


def run_fields(job: Job) -> list[Any]:
    """The job's own fields as a delta stores them."""
    todo = {str(k): "all" if v is ALL else sorted(v) for k, v in job.todo.items()}
    return [job.restarts, job.aborted, todo, sorted(job.touched), len(job.paths), str(job.status)]


def diff(old: Job, new: Job) -> Change:
    """What turns the stored `old` job into `new` (see the module docstring)."""
    if new.restarts == old.restarts + 1:
        states, wholes = _restart_nodes(old, new)
    else:
        states, wholes = _walk_nodes(old, new)
    drop_from = len(new.paths) if len(new.paths) < len(old.paths) else None
    ctx, ctx_drop = context_delta(old.context, new.context)
    return Change(states, wholes, drop_from, ctx, ctx_drop)


def _restart_nodes(old: Job, new: Job) -> tuple[dict[int, dict[str, Any]], dict[int, Node]]:
    n_old = len(old.paths)
    touched = new.touched
    starts = set(touched)
    starts.update(range(n_old, len(new.paths)))  # created by run-time expansion
    pairs: dict[int, tuple[Node | None, Node]] = {}
    reshaped: set[int] = set()
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
                    reshaped.add(n.id)  # its child list changed
                    o = None
                else:
                    o = okids[i]
            n = kids[i]
        pairs[n.id] = (o, n)
    states: dict[int, dict[str, Any]] = {}
    wholes: dict[int, Node] = {}
    for node_id, (o, n) in pairs.items():
        if o is n:
            continue
        if o is None or node_id in reshaped or type(o) is not type(n):
            wholes[node_id] = n
        elif node_id in touched or state_changed(o, n):
            # A restart never changes what an existing node is (its spec): only its state.
            states[node_id] = node_state(n)
    return states, wholes


def _walk_nodes(old: Job, new: Job) -> tuple[dict[int, dict[str, Any]], dict[int, Node]]:
    states: dict[int, dict[str, Any]] = {}
    wholes: dict[int, Node] = {}
    stack: list[tuple[Node, Node]] = [(old.root, new.root)]
    while stack:
        o, n = stack.pop()
        if o is n:
            continue
        if spec_changed(o, n):
            wholes.update((m.id, m) for m in subtree(n))
            continue
        if not isinstance(n, Leaf):
            okids, kids = o.children, n.children
            if len(okids) != len(kids) or any(
                a.id != b.id for a, b in zip(okids, kids, strict=True)
            ):
                wholes.update((m.id, m) for m in subtree(n))
                continue
            stack.extend(zip(okids, kids, strict=True))
        if state_changed(o, n):
            states[n.id] = node_state(n)
    return states, wholes


def subtree(node: Node) -> Iterator[Node]:
    """`node` and every node below it."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        if not isinstance(n, Leaf):
            stack.extend(n.children)


# ---------------------------------------------------------------- context


def context_key(key: Any) -> str:
    """The text a context key is stored under (JSON, so any key survives the trip)."""
    return _dumps(serde.encode_value(key))


def decode_key(text: str) -> Any:
    """Invert `context_key`."""
    value = serde.decode_value(json.loads(text))
    return tuple(value) if isinstance(value, list) else value


def context_rows(context: Mapping[Any, Any]) -> list[list[Any]]:
    """Every [key text, pos, encoded value] of a context."""
    return [
        [context_key(k), pos, serde.encode_value(v)] for pos, (k, v) in enumerate(context.items())
    ]


def context_delta(
    old: Mapping[Any, Any], new: Mapping[Any, Any]
) -> tuple[list[list[Any]], list[str]]:
    """(rows to write, key texts to drop first) that turn the `old` context into `new`.

    The context is never mutated, so `old is new` means unchanged, and a top-level value
    that is the same object as before is unchanged too (`assoc_in` copies on write).
    """
    if old is new:
        return [], []
    if any(k not in new for k in old):
        # Later keys' positions would shift: rewrite them all (contexts rarely lose keys).
        return context_rows(new), [context_key(k) for k in old]
    rows = []
    for pos, (k, v) in enumerate(new.items()):
        if k not in old or old[k] is not v:
            rows.append([context_key(k), pos, serde.encode_value(v)])
    return rows, []


# ---------------------------------------------------------------- reading back


@dataclass(slots=True)
class Parts:
    """A run's records while it is read: the snapshot rows with the deltas applied."""

    nodes: dict[int, list[Any]]  # id -> [spec dict, state dict, children list or None]
    context: dict[str, list[Any]]  # key text -> [pos, encoded value]
    run: list[Any]  # run_fields
    touched_since: set[int] = field(default_factory=set)  # ids the deltas changed
    whole_since: set[int] = field(default_factory=set)
    keys_since: set[str] = field(default_factory=set)
    context_reset: bool = False  # a delta dropped context keys


def snapshot_parts(
    run: Mapping[str, Any], nodes: Iterable[Sequence[Any]], context: Iterable[Sequence[Any]]
) -> Parts:
    """Parts from the snapshot: node rows `(node, spec, state, children)`, context rows
    `(key, pos, value)` and the run row (a mapping by column name)."""
    parts = {
        row[0]: [
            json.loads(row[1]),
            json.loads(row[2]),
            None if row[3] is None else json.loads(row[3]),
        ]
        for row in nodes
    }
    ctx = {k: [pos, json.loads(v)] for k, pos, v in context}
    fields = [
        run["restarts"],
        run["aborted"],
        json.loads(run["todo"]),
        json.loads(run["touched"]),
        run["n_nodes"],
        run["status"],
    ]
    return Parts(parts, ctx, fields)


def replay(parts: Parts, data: str) -> None:
    """Apply one delta (`deltas.data`) to `parts`."""
    delta = json.loads(data)
    parts.run = delta["r"]
    nodes = parts.nodes
    if "d" in delta:
        for node_id in [i for i in nodes if i >= delta["d"]]:
            del nodes[node_id]
    for node_id, state in delta.get("s", ()):
        nodes[node_id][1] = state
        parts.touched_since.add(node_id)
    for node_id, spec, state, children in delta.get("n", ()):
        nodes[node_id] = [spec, state, children]
        parts.whole_since.add(node_id)
    if delta.get("cd"):
        parts.context_reset = True
        for key in delta["cd"]:
            parts.context.pop(key, None)
    for key, pos, value in delta.get("c", ()):
        parts.context[key] = [pos, value]
        parts.keys_since.add(key)


def job_from_parts(run_id: str, parts: Parts, format_version: int) -> Job:
    """Build the job; StoreError when the rows do not make one."""
    restarts, aborted, todo, touched, n_nodes, _status = parts.run
    if len(parts.nodes) != n_nodes:
        raise StoreError(
            f"run {run_id} is damaged in the store: {len(parts.nodes)} nodes, {n_nodes} expected"
        )
    records = []
    for spec, state, children in parts.nodes.values():
        record = {**spec, **state}
        if children is not None:
            record["children"] = children
        records.append(record)
    data = {
        "format": serde.FORMAT,
        "version": format_version,
        "context": {},
        "restarts": restarts,
        "aborted": aborted,
        "todo": todo,
        "touched": touched,
        "nodes": records,
    }
    try:
        job = serde.from_data(data)
        ordered = sorted(parts.context.items(), key=lambda kv: kv[1][0])
        ctx = {decode_key(k): serde.decode_value(v) for k, (_, v) in ordered}
    except (AblaufError, KeyError, TypeError, ValueError) as exc:
        why = exc.message if isinstance(exc, AblaufError) else repr(exc)
        raise StoreError(f"run {run_id} cannot be read from the store: {why}") from None
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
    "snapshot_seq",
    "source",
    "filename",
    "initial_context",
    "format",
    "error",
)
# runs columns for RunInfo, with `updated` and `restarts` taken from the newest delta.
_INFO_SELECT = (
    "SELECT r.run_id, r.status, r.created, "
    "COALESCE((SELECT d.updated FROM deltas d WHERE d.run = r.id ORDER BY d.seq DESC LIMIT 1),"
    " r.updated), "
    "COALESCE((SELECT d.restarts FROM deltas d WHERE d.run = r.id ORDER BY d.seq DESC LIMIT 1),"
    " r.restarts), "
    "r.filename, r.error FROM runs r"
)
SQL_INSERT_DELTA = (
    "INSERT INTO deltas (run, seq, updated, restarts, data) SELECT ?, ?, ?, ?, ? "
    "WHERE NOT EXISTS (SELECT 1 FROM runs WHERE id = ? AND snapshot_seq > ?) "
    "ON CONFLICT (run, seq) DO NOTHING"
)
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
SQL_SNAPSHOT_RUN = (
    "UPDATE runs SET status = ?, updated = ?, restarts = ?, aborted = ?, todo = ?, "
    "touched = ?, n_nodes = ?, error = ?, format = ?, snapshot_seq = ? WHERE id = ?"
)


# What changed since the snapshot, newest first: (new states by node id, ids written whole,
# context keys, context keys dropped?, older history). A cons list: a write adds to it in
# O(1), and folding takes each node's newest state from it without encoding it again.
History = tuple[dict[int, dict[str, Any]], tuple[int, ...], tuple[str, ...], bool, Any] | None


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


class SqlStore:
    """The JobStore protocol over a DB-API connection. A dialect subclass supplies:

    - `PLACEHOLDER`: "?" or "%s" (the SQL here is written with "?");
    - `_write()`: a context manager yielding a cursor in a transaction that holds the write
      lock (SQLite: BEGIN IMMEDIATE), committed on exit, rolled back on an exception,
      driver errors raised as StoreError with a one-line message;
    - `_read()`: the same for reading (one consistent snapshot);
    - `_insert_run(cur, columns, values) -> int`: insert a `runs` row, return its `id`;
    - `url`, and `close()`;
    - optionally `_write_one(sql, params) -> rowcount`: one statement as its own transaction
      (SQLite runs it in autocommit mode: one call instead of three).

    Counters for benchmarks and tests: `commits` (set by `_write`), `rows_written` (rows
    inserted or updated), `bytes_written` (JSON text written), `compactions`.
    """

    PLACEHOLDER = "?"
    durable = True
    KNOWN_RUNS = 256  # runs whose last job is kept in memory to write deltas against
    url: str = ""

    def __init__(self) -> None:
        self._known: OrderedDict[str, Known] = OrderedDict()
        self.commits = 0
        self.rows_written = 0
        self.bytes_written = 0
        self.compactions = 0

    # -------------------------------------------------- dialect hooks

    def _write(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _insert_run(self, cur: Any, columns: Sequence[str], values: Sequence[Any]) -> int:
        raise NotImplementedError

    def _write_one(self, sql: str, params: Sequence[Any]) -> int:
        """Run one statement in a transaction of its own; return the rows it changed."""
        with self._write() as cur:
            cur.execute(sql, params)
            return int(cur.rowcount)

    def close(self) -> None:
        raise NotImplementedError

    def _q(self, sql: str) -> str:
        return sql if self.PLACEHOLDER == "?" else sql.replace("?", self.PLACEHOLDER)

    # -------------------------------------------------- bookkeeping

    def _remember(self, run_id: str, known: Known) -> None:
        self._known[run_id] = known
        self._known.move_to_end(run_id)
        while len(self._known) > self.KNOWN_RUNS:
            self._known.popitem(last=False)

    def _where(self) -> str:
        return self.url or "this store"

    def _conflict(self, run_id: str) -> StoreError:
        self._known.pop(run_id, None)
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
    ) -> str:
        """Record a new run: its program, initial context and a snapshot of its job."""
        run_id = run_id or new_run_id()
        initial = _dumps(serde.encode_value(job.context))
        now = time.time()
        restarts, aborted, todo, touched, n_nodes, status = run_fields(job)
        values = (
            run_id,
            status,
            now,
            now,
            restarts,
            aborted,
            _dumps(todo),
            _dumps(touched),
            n_nodes,
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
                raise RunError(f"run {run_id!r} already exists in {self._where()}")
            key = self._insert_run(cur, RUN_COLUMNS[1:], values)
            self._write_all(cur, key, job)
        self.bytes_written += len(initial) + len(source or "")
        self._remember(run_id, Known(key, 0, 0, n_nodes, status, job))
        return run_id

    def record(self, run_id: str, job: Job) -> None:
        """Record the job after a restart (or abort, replay): what changed, in one commit."""
        known = self._known.get(run_id)
        if known is None:
            self._record_whole(run_id, job)
            return
        change = diff(known.job, job)
        data = change.data(job)
        seq = known.seq + 1
        status = str(job.status)
        now = time.time()
        if known.deltas + 1 >= COMPACT_EVERY or known.delta_bytes + len(data) >= COMPACT_BYTES:
            self._compact(run_id, known, change, job, seq, now)
            return
        params = (known.key, seq, now, job.restarts, data, known.key, known.seq)
        if status == known.status:
            # The common step: one statement, its own transaction.
            if self._write_one(self._q(SQL_INSERT_DELTA), params) != 1:
                raise self._conflict(run_id)
        else:
            with self._write() as cur:
                cur.execute(self._q(SQL_INSERT_DELTA), params)
                if cur.rowcount != 1:
                    raise self._conflict(run_id)
                cur.execute(
                    self._q("UPDATE runs SET status = ?, error = ?, updated = ? WHERE id = ?"),
                    (status, run_error(job), now, known.key),
                )
        self.rows_written += 1
        self.bytes_written += len(data)
        history = (
            change.states,
            tuple(change.wholes),
            tuple(row[0] for row in change.context),
            bool(change.context_drop),
            known.history,
        )
        self._remember(
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
        self, run_id: str, known: Known, change: Change, job: Job, seq: int, now: float
    ) -> None:
        """Fold everything changed since the snapshot into the node and context rows."""
        q = self._q
        n = len(job.paths)
        states, wholes, keys, dropped = known.since()
        states.update(change.states)
        wholes = {i for i in wholes.union(change.wholes) if i < n}
        full = [node_row(job.node(i)) for i in sorted(wholes)]
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
            cur.execute(q("SELECT count(*), max(seq) FROM deltas WHERE run = ?"), (known.key,))
            count, newest = cur.fetchone()
            if count != known.deltas or (newest or known.snapshot_seq) != known.seq:
                raise self._conflict(run_id)
            self._write_snapshot_run(cur, known.key, job, seq, now, known.snapshot_seq)
            if cur.rowcount != 1:
                raise self._conflict(run_id)
            if n < known.snapshot_nodes:
                cur.execute(q("DELETE FROM nodes WHERE run = ? AND node >= ?"), (known.key, n))
            if full:
                cur.executemany(
                    q(SQL_UPSERT_NODE),
                    [(known.key, r.node, r.spec, r.state, r.children) for r in full],
                )
            if state_rows:
                cur.executemany(q(SQL_UPDATE_STATE), state_rows)
            if reset:
                cur.execute(q("DELETE FROM context WHERE run = ?"), (known.key,))
            ctx_rows = [(known.key, k, pos, _dumps(v)) for k, pos, v in ctx]
            if ctx_rows:
                cur.executemany(q(SQL_UPSERT_CONTEXT), ctx_rows)
            if count:
                cur.execute(q("DELETE FROM deltas WHERE run = ?"), (known.key,))
        self.compactions += 1
        self.rows_written += 1 + len(full) + len(state_rows) + len(ctx_rows)
        self.bytes_written += sum(len(r.spec) + len(r.state) + len(r.children or "") for r in full)
        self.bytes_written += sum(len(s) for s, _, _ in state_rows)
        self.bytes_written += sum(len(k) + len(v) for _, k, _, v in ctx_rows)
        self._remember(run_id, Known(known.key, seq, seq, n, str(job.status), job))

    def _write_snapshot_run(
        self, cur: Any, key: int, job: Job, seq: int, now: float, expect: int | None
    ) -> None:
        restarts, aborted, todo, touched, n_nodes, status = run_fields(job)
        params = (
            status,
            now,
            restarts,
            aborted,
            _dumps(todo),
            _dumps(touched),
            n_nodes,
            run_error(job),
            serde.VERSION,
            seq,
            key,
        )
        if expect is None:
            cur.execute(self._q(SQL_SNAPSHOT_RUN), params)
        else:
            cur.execute(self._q(SQL_SNAPSHOT_RUN + " AND snapshot_seq = ?"), (*params, expect))

    def _write_all(self, cur: Any, key: int, job: Job) -> None:
        rows = [(key, r.node, r.spec, r.state, r.children) for r in map(node_row, job.nodes())]
        cur.executemany(self._q(SQL_UPSERT_NODE), rows)
        ctx = [(key, k, pos, _dumps(v)) for k, pos, v in context_rows(job.context)]
        if ctx:
            cur.executemany(self._q(SQL_UPSERT_CONTEXT), ctx)
        self.rows_written += 1 + len(rows) + len(ctx)
        self.bytes_written += sum(len(r[2]) + len(r[3]) + len(r[4] or "") for r in rows)
        self.bytes_written += sum(len(r[1]) + len(r[3]) for r in ctx)

    def _record_whole(self, run_id: str, job: Job) -> None:
        """Write a whole snapshot of a run this store object never read (O(tree))."""
        q = self._q
        now = time.time()
        with self._write() as cur:
            cur.execute(q("SELECT id, snapshot_seq FROM runs WHERE run_id = ?"), (run_id,))
            row = cur.fetchone()
            if row is None:
                raise RunError(f"no run {run_id!r} in {self._where()}")
            key, snapshot_seq = row
            cur.execute(q("SELECT max(seq) FROM deltas WHERE run = ?"), (key,))
            newest = cur.fetchone()[0]
            seq = max(snapshot_seq, newest or 0) + 1
            for table in ("nodes", "context", "deltas"):
                cur.execute(q(f"DELETE FROM {table} WHERE run = ?"), (key,))
            self._write_snapshot_run(cur, key, job, seq, now, None)
            self._write_all(cur, key, job)
        self._remember(run_id, Known(key, seq, seq, len(job.paths), str(job.status), job))

    def load(self, run_id: str) -> StoredRun:
        """Load a run with its whole job (every node's state, output, attempts, times)."""
        q = self._q
        with self._read() as cur:
            cur.execute(q(f"SELECT {', '.join(RUN_COLUMNS)} FROM runs WHERE run_id = ?"), (run_id,))
            row = cur.fetchone()
            if row is None:
                raise RunError(f"no run {run_id!r} in {self._where()}")
            run = dict(zip(RUN_COLUMNS, row, strict=True))
            key = run["id"]
            cur.execute(q("SELECT node, spec, state, children FROM nodes WHERE run = ?"), (key,))
            nodes = cur.fetchall()
            cur.execute(q("SELECT key, pos, value FROM context WHERE run = ?"), (key,))
            context = cur.fetchall()
            cur.execute(
                q("SELECT seq, updated, data FROM deltas WHERE run = ? ORDER BY seq"), (key,)
            )
            deltas = cur.fetchall()
        try:
            parts = snapshot_parts(run, nodes, context)
            for _, _, data in deltas:
                replay(parts, data)
            initial = serde.decode_value(json.loads(run["initial_context"] or "{}"))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise StoreError(f"run {run_id} is damaged in the store: {exc!r}") from None
        job = job_from_parts(run_id, parts, run["format"])
        seq = deltas[-1][0] if deltas else run["snapshot_seq"]
        self._remember(
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
                    {i: parts.nodes[i][1] for i in parts.touched_since if i in parts.nodes},
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
        )
        return StoredRun(info, job, run["source"], initial)

    def info(self, run_id: str) -> RunInfo:
        """What the store knows of a run, without loading its tree."""
        with self._read() as cur:
            cur.execute(self._q(_INFO_SELECT + " WHERE r.run_id = ?"), (run_id,))
            row = cur.fetchone()
        if row is None:
            raise RunError(f"no run {run_id!r} in {self._where()}")
        return _info(row)

    def exists(self, run_id: str) -> bool:
        """True when the store has this run."""
        with self._read() as cur:
            cur.execute(self._q("SELECT 1 FROM runs WHERE run_id = ?"), (run_id,))
            return cur.fetchone() is not None

    def list_runs(self, *, limit: int | None = None, status: str | None = None) -> list[RunInfo]:
        """Runs, newest first (only those with `status` when given)."""
        sql = _INFO_SELECT
        params: list[Any] = []
        if status is not None:
            sql += " WHERE r.status = ?"
            params.append(str(Status(status)))
        sql += " ORDER BY r.created DESC, r.id DESC"
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
