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
            head_seq      the newest write (kept by a trigger on `deltas`): the run's
                          deltas are exactly snapshot_seq + 1 .. head_seq
            source, filename, initial_context, format (serde.VERSION), error
    nodes   (run, node) key; spec, state, children        the snapshot of the tree
    context (run, key) key; pos, value                    the snapshot of the context
    deltas  (run, seq) key; updated, restarts, data       writes since the snapshot
    leases  run key; token, host, pid, started, heartbeat, expires
                          the process driving the run (see `base.DriverLease`)

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

Damage: every read checks what it reads (`Damage`, reported as `run ID is damaged: ...`
for that run only): the run row's fields, the step log (no write missing between the
snapshot and `head_seq`), one node row per node, each node's record (JSON, its id, the
state fields every kind has), each delta's shape. Text that is not UTF-8 (SQLite does not
check) is read as `BadText` and reported. `list_runs` checks the cheap part (the run row,
the step log and the node count) and lists a damaged run with its `damage` said.

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

from ablauf_lang.codec import job as serde
from ablauf_lang.engine.job import Job
from ablauf_lang.engine.nodes import Leaf, LeafState, Node, Status
from ablauf_lang.engine.semantics import ALL
from ablauf_lang.errors import AblaufError, JobError, RunError, StoreError
from ablauf_lang.stores.base import (
    Driver,
    Owner,
    RunInfo,
    StoredRun,
    new_run_id,
    refuse_live,
    resolve_prefix,
    run_error,
)

SCHEMA_VERSION = 2  # of the tables above; stores refuse a database with a larger one
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
    basestring = getattr(json.encoder, "c_encode_basestring", None)
    if make is None or basestring is None:
        return json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    # Non-ASCII text is written as it is (lone surrogates too: `_dumps` checks for them).
    encode = make(None, _not_json, basestring, None, ":", ",", False, False, True)
    return lambda value: "".join(encode(value, 0))


_dumps_fast = _make_dumps()
_dumps_ascii = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def _dumps(value: Any) -> str:
    """Compact JSON text that any database takes: non-ASCII characters are kept as they
    are, unless the text holds a lone surrogate (a Python str may, UTF-8 may not): then
    every non-ASCII character is escaped (`\\ud800`), which `json.loads` reads back."""
    try:
        text: str = _dumps_fast(value)
    except RecursionError:
        raise JobError("a value is nested too deeply to be stored") from None
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = _dumps_ascii(value)
    return text


def _text(value: Any) -> str | None:
    """A text column's value that UTF-8 can hold: lone surrogates become `\\udXXX`."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


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
        "started_at": leaf.started_at,
        "sent": serde.encode_value(leaf.sent),
    }


def _leaf_state_generic(leaf: Leaf) -> dict[str, Any]:
    return split_record(serde.encode_node(leaf))[1]


def _check_leaf_state() -> Any:
    sample = Leaf(
        3, "a/b", [1], True, None, LeafState.FAILURE, {"o": 1}, "e", 2, 1.5, 2.5, None, 1.7, [2]
    )
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
    cls: type = type(new)
    return _differ(old, new, _own_fields(cls)[0])


def state_changed(old: Node, new: Node) -> bool:
    """True when the state of a node (same spec) differs, compared without encoding it."""
    cls: type = type(new)
    return _differ(old, new, _own_fields(cls)[1])


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
    # Walk from the root down to every touched or new node, visiting each node on those
    # paths once: the cost is the number of such nodes (not touched x depth: a 10,000-deep
    # `do!!` touches 10,000 nodes on one path).
    n_old = len(old.paths)
    touched = new.touched
    starts = set(touched)
    starts.update(range(n_old, len(new.paths)))  # created by run-time expansion
    pairs: dict[int, tuple[Node | None, Node]] = {new.root.id: (old.root, new.root)}
    reshaped: set[int] = set()
    links = _links(new)
    for node_id in sorted(starts):
        if node_id in pairs:
            continue
        # Up through the parent links to the nearest node already walked to...
        chain = []
        up = node_id
        while up not in pairs:
            chain.append(links[1][up])
            up = links[0][up]
        o, n = pairs[up]
        # ... then down the child indices, pairing each node with its old self.
        for i in reversed(chain):
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


def _links(job: Job) -> tuple[Sequence[int], Sequence[int]]:
    """(parent id, child index) of every node by id: the job's path table keeps them
    (`job.PathTable`); from a table of whole paths they are computed once, O(nodes)."""
    table: Any = job.paths
    parent = getattr(table, "parent", None)
    pos = getattr(table, "pos", None)
    if parent is not None and pos is not None:
        return parent, pos
    parents = [-1] * len(table)
    places = [0] * len(table)
    stack: list[Node] = [job.root]
    while stack:
        node = stack.pop()
        if isinstance(node, Leaf):
            continue
        for i, child in enumerate(node.children):
            parents[child.id], places[child.id] = node.id, i
            stack.append(child)
    return parents, places


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


class Damage(Exception):
    """What is wrong with a run's rows: reported as `run ID is damaged: <this>`."""


class BadText(str):
    """A text column that did not hold UTF-8 (read with the bad bytes replaced)."""


def decode_text(data: bytes) -> str:
    """The SQLite store's text factory: UTF-8, or `BadText` (never a decoding error)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return BadText(data.decode("utf-8", "replace"))


def _json(text: Any, what: str) -> Any:
    """JSON text read back; Damage naming `what` when it is not."""
    if isinstance(text, BadText):
        raise Damage(f"{what} is not UTF-8 text")
    if not isinstance(text, str):
        raise Damage(f"{what} is not text but {type(text).__name__}")
    try:
        return json.loads(text)
    except RecursionError:
        raise Damage(f"{what} is nested too deeply to be read") from None
    except ValueError as exc:
        raise Damage(f"{what} is not valid JSON ({exc})") from None


# State fields every version of the codec wrote, by node kind: a state without them (`{}`)
# is damage, not a node that never ran. (Other fields have defaults; serde checks types.)
REQUIRED_STATE: dict[str, tuple[str, ...]] = {
    "leaf": ("result", "attempt"),
    "seq": ("cursor",),
    "if": ("chosen",),
    "doseq": ("expanded", "cursor"),
    "pmap": ("expanded", "cursor"),
}
_LEAF_RESULTS = frozenset(str(s) for s in LeafState)


def check_node(node_id: int, spec: Any, state: Any, children: Any) -> None:
    """Damage unless (spec, state, children) can be the record of node `node_id`."""
    if not isinstance(spec, dict):
        raise Damage(f"node {node_id}'s record is not an object")
    if spec.get("id") != node_id or type(spec.get("id")) is not int:
        raise Damage(f"node {node_id}'s record names node {str(spec.get('id'))[:40]}")
    kind = spec.get("kind")
    if not isinstance(kind, str):
        raise Damage(f"node {node_id}'s record has no kind")
    if not isinstance(state, dict):
        raise Damage(f"node {node_id}'s state is not an object")
    missing = [k for k in REQUIRED_STATE.get(kind, ()) if k not in state]
    if missing:
        raise Damage(f"node {node_id} ({kind}) has no {', '.join(missing)} in its state")
    if kind == "leaf":
        result = state["result"]
        if result is not None and result not in _LEAF_RESULTS:
            raise Damage(f"node {node_id} has result {str(result)[:40]!r}, not a leaf state")
        if children is not None:
            raise Damage(f"node {node_id} is a leaf with children")
    elif not isinstance(children, list) or not all(type(c) is int for c in children):
        raise Damage(f"node {node_id} ({kind}) has no list of child ids")


def check_fields(fields: Any, what: str) -> None:
    """Damage unless `fields` are a job's own fields as `run_fields` writes them."""
    if not isinstance(fields, list) or len(fields) != 6:
        raise Damage(f"{what} does not hold the run's fields")
    restarts, _aborted, todo, touched, n_nodes, status = fields
    if type(restarts) is not int or restarts < 0:
        raise Damage(f"{what} has {str(restarts)[:40]} restarts")
    if not isinstance(todo, dict) or not isinstance(touched, list):
        raise Damage(f"{what} has no list of what to do next")
    if type(n_nodes) is not int or n_nodes < 1:
        raise Damage(f"{what} says the run has {str(n_nodes)[:40]} nodes")
    if status not in STATUSES:
        raise Damage(f"{what} has status {str(status)[:40]!r}, not pending, success or failure")


STATUSES = frozenset(str(s) for s in Status)


def check_log(snapshot_seq: Any, head_seq: Any, seqs: Sequence[int]) -> None:
    """Damage unless the deltas `seqs` are exactly the writes after the snapshot."""
    if type(snapshot_seq) is not int or type(head_seq) is not int or snapshot_seq < 0:
        raise Damage("its write numbers are not numbers")
    if head_seq < snapshot_seq:
        raise Damage(f"its newest write ({head_seq}) is older than its snapshot ({snapshot_seq})")
    want = head_seq - snapshot_seq
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
    `(key, pos, value)` and the run row (a mapping by column name). Damage when a row is
    not what the store wrote."""
    parts: dict[int, list[Any]] = {}
    for node_id, spec_text, state_text, kids_text in nodes:
        what = f"node {node_id}"
        spec = _json(spec_text, f"{what}'s record")
        state = _json(state_text, f"{what}'s state")
        kids = None if kids_text is None else _json(kids_text, f"{what}'s children")
        check_node(node_id, spec, state, kids)
        parts[node_id] = [spec, state, kids]
    ctx: dict[str, list[Any]] = {}
    for key, pos, value in context:
        if isinstance(key, BadText) or not isinstance(key, str):
            raise Damage("a context key is not UTF-8 text")
        if type(pos) is not int:
            raise Damage(f"context key {key[:40]} has no position")
        ctx[key] = [pos, _json(value, f"context key {key[:40]}")]
    aborted = run["aborted"]
    if isinstance(aborted, BadText):
        raise Damage("its abort reason is not UTF-8 text")
    fields = [
        run["restarts"],
        aborted,
        _json(run["todo"], "its to-do list"),
        _json(run["touched"], "its list of touched nodes"),
        run["n_nodes"],
        run["status"],
    ]
    check_fields(fields, "its row")
    return Parts(parts, ctx, fields)


def replay(parts: Parts, data: str, seq: int | None = None) -> None:
    """Apply one delta (`deltas.data`) to `parts`; Damage when it does not fit them."""
    what = "a write" if seq is None else f"write {seq}"
    delta = _json(data, what)
    if not isinstance(delta, dict):
        raise Damage(f"{what} is not an object")
    try:
        _apply(parts, delta, what)
    except Damage:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise Damage(f"{what} does not fit the run ({type(exc).__name__}: {exc})") from None


def _apply(parts: Parts, delta: dict[str, Any], what: str) -> None:
    check_fields(delta["r"], what)
    parts.run = delta["r"]
    nodes = parts.nodes
    if "d" in delta:
        for node_id in [i for i in nodes if i >= delta["d"]]:
            del nodes[node_id]
    for node_id, state in delta.get("s", ()):
        entry = nodes.get(node_id)
        if entry is None:
            raise Damage(f"{what} changes node {str(node_id)[:20]}, which the run does not have")
        check_node(node_id, entry[0], state, entry[2])
        entry[1] = state
        parts.touched_since.add(node_id)
    for node_id, spec, state, children in delta.get("n", ()):
        check_node(node_id, spec, state, children)
        nodes[node_id] = [spec, state, children]
        parts.whole_since.add(node_id)
    if delta.get("cd"):
        parts.context_reset = True
        for key in delta["cd"]:
            parts.context.pop(key, None)
    for key, pos, value in delta.get("c", ()):
        if not isinstance(key, str) or type(pos) is not int:
            raise Damage(f"{what} has a context entry that is not [key, position, value]")
        parts.context[key] = [pos, value]
        parts.keys_since.add(key)


def job_from_parts(run_id: str, parts: Parts, format_version: int) -> Job:
    """Build the job; StoreError (`run ID is damaged: ...`) when the rows do not make one."""
    restarts, aborted, todo, touched, n_nodes, _status = parts.run
    if len(parts.nodes) != n_nodes or (n_nodes and max(parts.nodes) != n_nodes - 1):
        raise StoreError(
            f"run {run_id} is damaged: {len(parts.nodes)} node rows, {n_nodes} expected"
            if len(parts.nodes) != n_nodes
            else f"run {run_id} is damaged: its node ids are not 0..{n_nodes - 1}"
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
    except RecursionError:
        raise StoreError(f"run {run_id} is damaged: a value is nested too deeply") from None
    except (AblaufError, KeyError, TypeError, ValueError, IndexError) as exc:
        why = exc.message if isinstance(exc, AblaufError) else f"{type(exc).__name__}: {exc}"
        raise StoreError(f"run {run_id} is damaged: {why}") from None
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
    "head_seq",
)
LEASE_COLUMNS = ("token", "host", "pid", "started", "heartbeat", "expires")
# runs and leases columns for RunInfo (the deltas' and nodes' counts are asked apart).
_INFO_SELECT = (
    "SELECT r.id, r.run_id, r.status, r.created, r.updated, r.restarts, r.filename, r.error, "
    "r.aborted, r.snapshot_seq, r.head_seq, r.n_nodes, "
    + ", ".join(f"l.{c}" for c in LEASE_COLUMNS)
    + " FROM runs r LEFT JOIN leases l ON l.run = r.id"
)
_LOG_SELECT = (
    "SELECT run, count(*), min(seq), max(seq), max(updated), max(restarts) FROM deltas "
    "WHERE run IN ({marks}) GROUP BY run"
)
_NODES_SELECT = "SELECT run, count(*) FROM nodes WHERE run IN ({marks}) GROUP BY run"
_UPDATED = "COALESCE((SELECT max(d.updated) FROM deltas d WHERE d.run = r.id), r.updated)"
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
    "touched = ?, n_nodes = ?, error = ?, format = ?, snapshot_seq = ?, head_seq = ? "
    "WHERE id = ?"
)
SQL_TAKE_LEASE = (
    "INSERT INTO leases (run, token, host, pid, started, heartbeat, expires) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run) DO NOTHING"
)
SQL_TAKE_OVER_LEASE = (
    "UPDATE leases SET token = ?, host = ?, pid = ?, started = ?, heartbeat = ?, expires = ? "
    "WHERE run = ? AND token = ?"
)
SQL_RENEW_LEASE = (
    "UPDATE leases SET heartbeat = ?, expires = ? "
    "WHERE run = (SELECT id FROM runs WHERE run_id = ?) AND token = ?"
)
SQL_RELEASE_LEASE = (
    "UPDATE leases SET heartbeat = ?, expires = 0 "
    "WHERE run = (SELECT id FROM runs WHERE run_id = ?) AND token = ?"
)
SQL_DROP_LEASE = (
    "DELETE FROM leases WHERE run = (SELECT id FROM runs WHERE run_id = ?) AND token = ?"
)
RUN_TABLES = ("leases", "deltas", "context", "nodes")  # rows of a run, deleted before it


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
            _text(aborted),
            _dumps(todo),
            _dumps(touched),
            n_nodes,
            0,
            _text(source),
            _text(filename),
            initial,
            serde.VERSION,
            _text(run_error(job)),
            0,
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
        if status == known.status and job.aborted == known.job.aborted:
            # The common step: one statement, its own transaction.
            if self._write_one(self._q(SQL_INSERT_DELTA), params) != 1:
                raise self._conflict(run_id)
        else:
            # What listings show without reading deltas: status, error, abort reason (the
            # newest delta's fields say the same; `aborted` is the snapshot's field too).
            with self._write() as cur:
                cur.execute(self._q(SQL_INSERT_DELTA), params)
                if cur.rowcount != 1:
                    raise self._conflict(run_id)
                cur.execute(
                    self._q(
                        "UPDATE runs SET status = ?, error = ?, aborted = ?, updated = ? "
                        "WHERE id = ?"
                    ),
                    (status, _text(run_error(job)), _text(job.aborted), now, known.key),
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
            _text(aborted),
            _dumps(todo),
            _dumps(touched),
            n_nodes,
            _text(run_error(job)),
            serde.VERSION,
            seq,
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
            cur.execute(
                q("SELECT id, snapshot_seq, head_seq FROM runs WHERE run_id = ?"), (run_id,)
            )
            row = cur.fetchone()
            if row is None:
                raise RunError(f"no run {run_id!r} in {self._where()}")
            key, snapshot_seq, head_seq = row
            cur.execute(q("SELECT max(seq) FROM deltas WHERE run = ?"), (key,))
            newest = cur.fetchone()[0]
            seq = max(_int(snapshot_seq), _int(head_seq), _int(newest)) + 1
            for table in ("nodes", "context", "deltas"):
                cur.execute(q(f"DELETE FROM {table} WHERE run = ?"), (key,))
            self._write_snapshot_run(cur, key, job, seq, now, None)
            self._write_all(cur, key, job)
        self._remember(run_id, Known(key, seq, seq, len(job.paths), str(job.status), job))

    def load(self, run_id: str) -> StoredRun:
        """Load a run with its whole job (every node's state, output, attempts, times).

        StoreError `run ID is damaged: ...` when its rows are not what the store wrote."""
        q = self._q
        try:
            with self._read() as cur:
                cur.execute(
                    q(f"SELECT {', '.join(RUN_COLUMNS)} FROM runs WHERE run_id = ?"), (run_id,)
                )
                row = cur.fetchone()
                if row is None:
                    raise RunError(f"no run {run_id!r} in {self._where()}")
                run = dict(zip(RUN_COLUMNS, row, strict=True))
                key = run["id"]
                cur.execute(
                    q("SELECT node, spec, state, children FROM nodes WHERE run = ?"), (key,)
                )
                nodes = cur.fetchall()
                cur.execute(q("SELECT key, pos, value FROM context WHERE run = ?"), (key,))
                context = cur.fetchall()
                cur.execute(
                    q("SELECT seq, updated, data FROM deltas WHERE run = ? ORDER BY seq"), (key,)
                )
                deltas = cur.fetchall()
                cur.execute(
                    q(f"SELECT {', '.join(LEASE_COLUMNS)} FROM leases WHERE run = ?"), (key,)
                )
                lease = cur.fetchone()
        except Damaged as exc:
            raise StoreError(f"run {run_id} is damaged: {exc.message}") from None
        try:
            if run["status"] not in STATUSES:
                raise Damage(
                    f"its status {str(run['status'])[:40]!r} is not pending, success or failure"
                )
            check_log(run["snapshot_seq"], run["head_seq"], [d[0] for d in deltas])
            if len(nodes) != run["n_nodes"]:
                raise Damage(f"{len(nodes)} node rows, {run['n_nodes']} expected")
            parts = snapshot_parts(run, nodes, context)
            for seq, _, data in deltas:
                replay(parts, data, seq)
            initial = serde.decode_value(_json(run["initial_context"] or "{}", "its context"))
            for column in ("source", "filename", "error"):
                if isinstance(run[column], BadText):
                    raise Damage(f"its {column} is not UTF-8 text")
        except Damage as exc:
            raise StoreError(f"run {run_id} is damaged: {exc}") from None
        except RecursionError:
            raise StoreError(f"run {run_id} is damaged: a value is nested too deeply") from None
        except AblaufError as exc:
            raise StoreError(f"run {run_id} is damaged: {exc.message}") from None
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
            None if job.aborted is None else str(job.aborted),
            _driver(lease),
        )
        return StoredRun(info, job, run["source"], initial)

    def info(self, run_id: str) -> RunInfo:
        """What the store knows of a run, without loading its tree (damage said in it)."""
        infos = self._infos(" WHERE r.run_id = ?", [run_id])
        if not infos:
            raise RunError(f"no run {run_id!r} in {self._where()}")
        return infos[0]

    def exists(self, run_id: str) -> bool:
        """True when the store has this run."""
        with self._read() as cur:
            cur.execute(self._q("SELECT 1 FROM runs WHERE run_id = ?"), (run_id,))
            return cur.fetchone() is not None

    # -------------------------------------------------- listing

    LIMIT_ALL = "ALL"  # what LIMIT takes for no limit (SQLite: -1)

    def _filters(
        self, status: str | None, filename: str | None, since: float | None
    ) -> tuple[str, list[Any]]:
        where: list[str] = []
        params: list[Any] = []
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

    def list_runs(
        self,
        *,
        limit: int | None = None,
        status: str | None = None,
        offset: int = 0,
        filename: str | None = None,
        since: float | None = None,
    ) -> list[RunInfo]:
        """Runs, newest first (see `JobStore.list_runs`); a damaged run is listed with
        what is wrong with it, the others as they are."""
        where, params = self._filters(status, filename, since)
        sql = where + " ORDER BY r.created DESC, r.id DESC"
        if limit is not None or offset:
            sql += " LIMIT " + ("?" if limit is not None else self.LIMIT_ALL)
            if limit is not None:
                params.append(int(limit))
            if offset:
                sql += " OFFSET ?"
                params.append(int(offset))
        return self._infos(sql, params)

    def count_runs(
        self,
        *,
        status: str | None = None,
        filename: str | None = None,
        since: float | None = None,
    ) -> int:
        """How many runs `list_runs` would give without a limit."""
        where, params = self._filters(status, filename, since)
        with self._read() as cur:
            cur.execute(self._q("SELECT count(*) FROM runs r" + where), params)
            return int(cur.fetchone()[0])

    def _infos(self, tail: str, params: Sequence[Any]) -> list[RunInfo]:
        """RunInfo of the runs `_INFO_SELECT + tail` selects, each checked for damage."""
        with self._read() as cur:
            cur.execute(self._q(_INFO_SELECT + tail), params)
            rows = cur.fetchall()
        keys = [row[0] for row in rows]
        logs: dict[int, Any] = {}
        counts: dict[int, int] = {}
        broken: dict[int, str] = {}
        for chunk in range(0, len(keys), 500):
            part = keys[chunk : chunk + 500]
            try:
                logs.update(self._grouped(_LOG_SELECT, part))
                counts.update(self._grouped(_NODES_SELECT, part))
            except Damaged:
                for key in part:  # find the runs whose rows cannot be read
                    try:
                        logs.update(self._grouped(_LOG_SELECT, [key]))
                        counts.update(self._grouped(_NODES_SELECT, [key]))
                    except Damaged as exc:
                        broken[key] = f"its rows cannot be read ({exc.message})"
        return [
            _info(row, logs.get(row[0]), counts.get(row[0], 0), broken.get(row[0])) for row in rows
        ]

    def _grouped(self, sql: str, keys: Sequence[int]) -> dict[int, Any]:
        marks = ", ".join("?" for _ in keys)
        with self._read() as cur:
            cur.execute(self._q(sql.format(marks=marks)), list(keys))
            return {row[0]: row[1:] if len(row) > 2 else row[1] for row in cur.fetchall()}

    def resolve_run_id(self, prefix: str) -> str:
        """The id of the one run whose id starts with `prefix` (see `JobStore`)."""
        if not prefix:
            raise RunError("a run id cannot be empty")
        with self._read() as cur:
            cur.execute(self._q("SELECT run_id FROM runs WHERE run_id = ?"), (prefix,))
            if cur.fetchone() is not None:
                return prefix
            cur.execute(
                self._q("SELECT run_id FROM runs WHERE substr(run_id, 1, ?) = ? LIMIT 50"),
                (len(prefix), prefix),
            )
            found = [row[0] for row in cur.fetchall()]
        return resolve_prefix(prefix, found, self._where())

    # -------------------------------------------------- deleting

    def delete_run(self, run_id: str) -> None:
        """Delete a run and all its rows; RunError when it is running."""
        with self._write() as cur:
            cur.execute(self._q(_INFO_SELECT + " WHERE r.run_id = ?"), (run_id,))
            row = cur.fetchone()
            if row is None:
                raise RunError(f"no run {run_id!r} in {self._where()}")
            driver = _driver(row[12:])
            if row[2] == "pending" and driver is not None and driver.is_live():
                raise refuse_live(run_id, driver, "deleting")
            self._delete(cur, [row[0]])
        self._known.pop(run_id, None)

    def _delete(self, cur: Any, keys: Sequence[int]) -> None:
        for chunk in range(0, len(keys), 500):
            part = list(keys[chunk : chunk + 500])
            marks = ", ".join("?" for _ in part)
            for table in RUN_TABLES:
                cur.execute(self._q(f"DELETE FROM {table} WHERE run IN ({marks})"), part)
            cur.execute(self._q(f"DELETE FROM runs WHERE id IN ({marks})"), part)

    def prune_runs(
        self, *, before: float, status: str | None = None, dry_run: bool = False
    ) -> tuple[list[str], list[str]]:
        """Delete runs last updated before `before` (see `JobStore.prune_runs`)."""
        sql = (
            "SELECT r.id, r.run_id, r.status, "
            + ", ".join(f"l.{c}" for c in LEASE_COLUMNS)
            + f" FROM runs r LEFT JOIN leases l ON l.run = r.id WHERE {_UPDATED} < ?"
        )
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
            self._known.pop(run_id, None)
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
                    q(
                        "SELECT r.id, "
                        + ", ".join(f"l.{c}" for c in LEASE_COLUMNS)
                        + " FROM runs r LEFT JOIN leases l ON l.run = r.id WHERE r.run_id = ?"
                    ),
                    (run_id,),
                )
                row = cur.fetchone()
                if row is None:
                    raise RunError(f"no run {run_id!r} in {self._where()}")
                key, held = row[0], _driver(row[1:])
                if held is None:
                    cur.execute(q(SQL_TAKE_LEASE), (key, *mine))
                else:
                    if held.token != owner.token and not force and held.is_live(now):
                        raise refuse_live(run_id, held, "driving")
                    cur.execute(q(SQL_TAKE_OVER_LEASE), (*mine, key, held.token))
                if cur.rowcount == 1:
                    return Driver(owner.host, owner.pid, now, now + ttl, owner.started, owner.token)
        raise StoreError(f"run {run_id}: could not take its lease (it keeps changing hands)")

    def renew_lease(self, run_id: str, token: str, ttl: float) -> bool:
        """Renew our lease; False when it is not ours any more."""
        now = time.time()
        return self._write_one(self._q(SQL_RENEW_LEASE), (now, now + ttl, run_id, token)) == 1

    def release_lease(self, run_id: str, token: str, *, finished: bool) -> None:
        """Give the lease back: removed when the run finished, else marked released."""
        if finished:
            self._write_one(self._q(SQL_DROP_LEASE), (run_id, token))
        else:
            self._write_one(self._q(SQL_RELEASE_LEASE), (time.time(), run_id, token))


class Damaged(StoreError):
    """A dialect's error for rows the database itself cannot read (a damaged file)."""


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
    row: Sequence[Any], log: Sequence[Any] | None, n_rows: int, broken: str | None
) -> RunInfo:
    """RunInfo of an `_INFO_SELECT` row, the run's deltas (count, min and max seq, newest
    updated and restarts) and node row count; `damage` says what is wrong, if anything."""
    (_, run_id, status, created, updated, restarts, filename, error, aborted) = row[:9]
    snapshot_seq, head_seq, n_nodes = row[9:12]
    driver = _driver(row[12:])
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
