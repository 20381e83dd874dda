"""The stored format of a run in rows: node rows split into spec and state, per-restart
deltas, the context by key, and reading them back into a Job. No database here: the SQL
stores (`stores.sql`) write and read these texts; this module says what they hold.

A node's record (`codec.job`) is kept in three JSON texts: `spec`, what the node is (id,
kind, span and the fields its kind declares SPEC: action, payload, a doseq's template
...), written once; `state`, what happened to it (the fields declared STATE: result,
output, error, attempt, timestamps, a sequence's cursor ...); and `children`, a branch's
child ids (NULL for a leaf). The context is one row per top-level key (`key` is the key
as JSON text, `pos` keeps the order).

What a delta holds, from the previous job this store object wrote or read (`diff`):

- `new.restarts == old.restarts + 1` (a restart of it): the nodes in `new.touched`, their
  ancestors whose own fields changed (a sequence's cursor), nodes created by run-time
  expansion (ids past the old count) and the branches whose child list changed. A restart
  must list in `touched` every node whose own fields changed other than those ancestors.
- anything else (abort, prepare_replay, an undo in the REPL): a walk of both trees that
  skips the subtrees they share (`old is new`): every node whose record differs.

Delta JSON (`data`): {"r": [restarts, aborted, todo, touched, n_nodes, status],
"s": [[id, state], ...], "n": [[id, spec, state, children], ...], "c": [[key, pos,
value], ...], "cd": [key, ...] (context keys dropped first), "d": n (drop nodes >= n)}.

Damage: every read checks what it reads (`Damage`): each node's record (JSON, its id, the
state fields every version of the codec wrote for its kind: `Stored.required`), each
delta's shape, the run's own fields. Text that is not UTF-8 is `BadText` and reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

from ablauf_lang import values
from ablauf_lang.codec import job as codec
from ablauf_lang.engine.job import Job
from ablauf_lang.engine.kinds import Leaf, Node, by_name
from ablauf_lang.engine.kinds.base import SPEC, STATE, T_RESULT
from ablauf_lang.engine.nodes import LeafState, Status, quick_init
from ablauf_lang.errors import AblaufError, JobError, StoreError


def _not_json(value: Any) -> Any:
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def _compact_json(ensure_ascii: bool) -> Callable[[Any], str]:
    """Compact JSON, its encoder built once: `json.dumps` builds one a call, and so does
    `JSONEncoder.encode` (the C encoder it makes for each value is kept here, when the
    C accelerator is there). Values are encoded by the value codec first, so there is no
    cycle to look for."""
    encoder = json.JSONEncoder(
        separators=(",", ":"), ensure_ascii=ensure_ascii, check_circular=False, default=_not_json
    )
    make = json.encoder.c_make_encoder  # type: ignore[attr-defined]
    if make is None:  # pragma: no cover - a Python without the _json accelerator
        return encoder.encode
    strings = (
        json.encoder.encode_basestring_ascii if ensure_ascii else json.encoder.encode_basestring
    )
    chunks = make(None, _not_json, strings, None, ":", ",", False, False, True)
    join = "".join

    def encode(value: Any) -> str:
        return join(chunks(value, 0))

    return encode


# Non-ASCII text is written as it is (unless it cannot be: see `dumps_text`).
_dumps_utf8 = _compact_json(ensure_ascii=False)
_dumps_ascii = _compact_json(ensure_ascii=True)


def dumps_text(value: Any) -> str:
    """Compact JSON text that any database takes: non-ASCII characters are kept as they
    are, unless the text holds a lone surrogate (a Python str may, UTF-8 may not): then
    every non-ASCII character is escaped (`\\ud800`), which `json.loads` reads back."""
    try:
        text: str = _dumps_utf8(value)
    except RecursionError:
        raise JobError("a value is nested too deeply to be stored") from None
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = _dumps_ascii(value)
    return text


def column_text(value: Any) -> str | None:
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


def _child_ids(node: Node) -> list[int] | None:
    return None if isinstance(node, Leaf) else [c.id for c in node.children]


def node_row(node: Node) -> NodeRow:
    """The whole row of one node."""
    children = _child_ids(node)
    kids = None if children is None else dumps_text(children)
    return NodeRow(
        node.id,
        dumps_text(codec.encode_spec(node)),
        dumps_text(codec.encode_state(node)),
        kids,
    )


def node_state(node: Node) -> dict[str, Any]:
    """A node's state: its record without spec and children (O(1) for a sequence)."""
    return codec.encode_state(node)


@cache
def _own_fields(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(spec fields, state fields) of a node class, summaries left out."""
    stored = getattr(cls, "stored", ())
    spec = ("id", "span", *(f.name for f in stored if f.part == SPEC))
    return spec, tuple(f.name for f in stored if f.part == STATE)


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


@quick_init
@dataclass(frozen=True, slots=True)
class Change:
    """What one write changes: node states, whole nodes, context keys (JSON-able values)."""

    states: dict[int, dict[str, Any]]  # node id -> new state
    wholes: dict[int, Node]  # node id -> node written whole (new, or spec/children changed)
    drop_from: int | None  # nodes with an id at least this are gone (an undone expansion)
    context: list[list[Any]]  # [key text, pos, encoded value] to write
    context_drop: list[str]  # key texts to delete first
    # node id -> (its node in the old job or None, in the new) for the nodes a restart's
    # diff walked to (every changed one among them); empty when the diff walked both trees
    pairs: dict[int, tuple[Node | None, Node]] = field(default_factory=dict)

    def data(self, job: Job) -> str:
        """The delta as JSON text (the `deltas.data` column). Nodes written whole are
        encoded one by one into the text: an expansion's delta holds every node it made
        (100,000 for a wide `pmap!!`), and their records as Python values all at once
        would cost several times the text."""
        out: dict[str, Any] = {"r": run_fields(job)}
        if self.states:
            out["s"] = [[i, s] for i, s in self.states.items()]
        if self.wholes:
            out["n"] = None  # its place: filled in below
        if self.context:
            out["c"] = self.context
        if self.context_drop:
            out["cd"] = self.context_drop
        if self.drop_from is not None:
            out["d"] = self.drop_from
        if not self.wholes:
            return dumps_text(out)
        parts = ["{"]
        for key, value in out.items():
            if len(parts) > 1:
                parts.append(",")
            parts.append(f'"{key}":')
            if key != "n":
                parts.append(dumps_text(value))
                continue
            parts.append("[")
            for i, node in enumerate(self.wholes.values()):
                if i:
                    parts.append(",")
                parts.append(dumps_text(_whole(node)))
            parts.append("]")
        parts.append("}")
        return "".join(parts)


def _whole(node: Node) -> list[Any]:
    return [node.id, codec.encode_spec(node), codec.encode_state(node), _child_ids(node)]


def run_fields(job: Job) -> list[Any]:
    """The job's own fields as a delta stores them."""
    todo = codec.encode_todo(job.todo)
    return [job.restarts, job.aborted, todo, sorted(job.touched), len(job.paths), str(job.status)]


def diff(old: Job, new: Job) -> Change:
    """What turns the stored `old` job into `new` (see the module docstring)."""
    pairs: dict[int, tuple[Node | None, Node]] = {}
    if new.restarts == old.restarts + 1:
        states, wholes = _restart_nodes(old, new, pairs)
    else:
        states, wholes = _walk_nodes(old, new)
    drop_from = len(new.paths) if len(new.paths) < len(old.paths) else None
    ctx, ctx_drop = context_delta(old.context, new.context)
    return Change(states, wholes, drop_from, ctx, ctx_drop, pairs)


def nodes_by_id(job: Job, ids: Iterable[int]) -> dict[int, Node]:
    """The nodes of `job` with these ids (ids it does not have are left out), walking each
    path only from the nearest node already found: the cost is the nodes on those paths,
    not ids x depth."""
    parent, pos = job.paths.parent, job.paths.pos
    n = len(job.paths)
    found: dict[int, Node] = {job.root.id: job.root}
    for node_id in ids:
        if node_id in found or not 0 <= node_id < n:
            continue
        chain: list[int] = []
        up = node_id
        while up not in found:
            chain.append(up)
            up = parent[up]
        node = found[up]
        for i in reversed(chain):
            node = node.children[pos[i]]
            found[i] = node
    return found


def _restart_nodes(
    old: Job, new: Job, pairs: dict[int, tuple[Node | None, Node]]
) -> tuple[dict[int, dict[str, Any]], dict[int, Node]]:
    # Walk from the root down to every touched or new node, visiting each node on those
    # paths once: the cost is the number of such nodes (not touched x depth: a 10,000-deep
    # `do!!` touches 10,000 nodes on one path).
    n_old = len(old.paths)
    touched = new.touched
    starts = set(touched)
    starts.update(range(n_old, len(new.paths)))  # created by run-time expansion
    pairs[new.root.id] = (old.root, new.root)
    reshaped: set[int] = set()
    parent, pos = new.paths.parent, new.paths.pos  # (parent id, child index) by id
    for node_id in sorted(starts):
        if node_id in pairs:
            continue
        # Up through the parent links to the nearest node already walked to...
        chain = []
        up = node_id
        while up not in pairs:
            chain.append(pos[up])
            up = parent[up]
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
    return dumps_text(values.encode(key))


def decode_key(text: str) -> Any:
    """Invert `context_key`."""
    value = values.decode(json.loads(text))
    return tuple(value) if isinstance(value, list) else value


def context_rows(context: Mapping[Any, Any]) -> list[list[Any]]:
    """Every [key text, pos, encoded value] of a context."""
    return [[context_key(k), pos, values.encode(v)] for pos, (k, v) in enumerate(context.items())]


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
            rows.append([context_key(k), pos, values.encode(v)])
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


def read_json(text: Any, what: str) -> Any:
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


# State fields every version of the codec wrote, by kind: a state without them (`{}`) is
# damage, not a node that never ran. (Other fields have defaults; `codec.job` checks types.)
@cache
def _checked_state(kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required state fields, fields holding a leaf state) of a kind (none if unknown)."""
    cls = by_name(kind)
    stored = () if cls is None else cls.stored
    return (
        tuple(f.name for f in stored if f.part == STATE and f.required),
        tuple(f.name for f in stored if f.type == T_RESULT),
    )


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
    required, results = _checked_state(kind)
    missing = [k for k in required if k not in state]
    if missing:
        raise Damage(f"node {node_id} ({kind}) has no {', '.join(missing)} in its state")
    for name in results:
        result = state.get(name)
        if result is not None and result not in _LEAF_RESULTS:
            raise Damage(f"node {node_id} has result {str(result)[:40]!r}, not a leaf state")
    if by_name(kind) is Leaf:
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
        spec = read_json(spec_text, f"{what}'s record")
        state = read_json(state_text, f"{what}'s state")
        kids = None if kids_text is None else read_json(kids_text, f"{what}'s children")
        check_node(node_id, spec, state, kids)
        parts[node_id] = [spec, state, kids]
    ctx: dict[str, list[Any]] = {}
    for key, pos, value in context:
        if isinstance(key, BadText) or not isinstance(key, str):
            raise Damage("a context key is not UTF-8 text")
        if type(pos) is not int:
            raise Damage(f"context key {key[:40]} has no position")
        ctx[key] = [pos, read_json(value, f"context key {key[:40]}")]
    aborted = run["aborted"]
    if isinstance(aborted, BadText):
        raise Damage("its abort reason is not UTF-8 text")
    fields = [
        run["restarts"],
        aborted,
        read_json(run["todo"], "its to-do list"),
        read_json(run["touched"], "its list of touched nodes"),
        run["n_nodes"],
        run["status"],
    ]
    check_fields(fields, "its row")
    return Parts(parts, ctx, fields)


def replay(parts: Parts, data: str, seq: int | None = None) -> None:
    """Apply one delta (`deltas.data`) to `parts`; Damage when it does not fit them."""
    what = "a write" if seq is None else f"write {seq}"
    replay_delta(parts, read_json(data, what), what)


def replay_delta(parts: Parts, delta: Any, what: str) -> None:
    """Apply one delta already read from its JSON text; Damage when it does not fit."""
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
    """Build the job; StoreError (`run ID is damaged: ...`) when the rows do not make one.
    The parts' node entries are used up (`parts.nodes` is empty after): read what else
    is needed of them first."""
    restarts, aborted, todo, touched, n_nodes, _status = parts.run
    if len(parts.nodes) != n_nodes or (n_nodes and max(parts.nodes) != n_nodes - 1):
        raise StoreError(
            f"run {run_id} is damaged: {len(parts.nodes)} node rows, {n_nodes} expected"
            if len(parts.nodes) != n_nodes
            else f"run {run_id} is damaged: its node ids are not 0..{n_nodes - 1}"
        )
    # The parts' node entries are given up as the records are made (each spec becomes its
    # record), and the records as the nodes are built: a wide run is not held three times.
    records = []
    nodes = parts.nodes
    for node_id in list(nodes):
        spec, state, children = nodes.pop(node_id)
        spec.update(state)
        if children is not None:
            spec["children"] = children
        records.append(spec)
    data = {
        "format": codec.FORMAT,
        "version": format_version,
        "context": {},
        "restarts": restarts,
        "aborted": aborted,
        "todo": todo,
        "touched": touched,
        "nodes": records,
    }
    try:
        job = codec.from_data(data, consume=True)
        ordered = sorted(parts.context.items(), key=lambda kv: kv[1][0])
        ctx = {decode_key(k): values.decode(v) for k, (_, v) in ordered}
    except RecursionError:
        raise StoreError(f"run {run_id} is damaged: a value is nested too deeply") from None
    except (AblaufError, KeyError, TypeError, ValueError, IndexError) as exc:
        why = exc.message if isinstance(exc, AblaufError) else f"{type(exc).__name__}: {exc}"
        raise StoreError(f"run {run_id} is damaged: {why}") from None
    return replace(job, context=ctx)


def catch_up(job: Job, deltas: Sequence[Any]) -> Job | None:
    """`job` with the writes `deltas` (each one's JSON read, in order) applied, as loading
    the run after them would build it; None when one of them does more than change node
    states, context keys and the run's own fields (nodes written whole or dropped, a write
    that does not fit): read the run instead. O(the nodes the writes changed and
    their ancestors), not O(the tree): a process that did not write a run's last steps
    catches up with them."""
    changed: dict[int, dict[str, Any]] = {}
    fields: list[Any] | None = None
    context: dict[Any, list[Any]] | None = None  # key -> [position, value], as a load has it
    try:
        for delta in deltas:
            if not isinstance(delta, dict) or not set(delta) <= {"r", "s", "c", "cd"}:
                return None
            check_fields(delta["r"], "a write")
            fields = delta["r"]
            for node_id, state in delta.get("s", ()):
                if not isinstance(state, dict) or not isinstance(node_id, int):
                    return None
                changed[node_id] = state  # a later write's state replaces an earlier one's
            if "c" in delta or "cd" in delta:
                if context is None:
                    context = {k: [i, v] for i, (k, v) in enumerate(job.context.items())}
                for key_text in delta.get("cd", ()):
                    context.pop(decode_key(key_text), None)
                for key_text, pos, value in delta.get("c", ()):
                    if type(pos) is not int:
                        return None
                    context[decode_key(key_text)] = [pos, values.decode(value)]
    except (AblaufError, Damage, ValueError, TypeError, KeyError, RecursionError):
        return None
    if fields is None:
        return job
    restarts, aborted, todo, touched, n_nodes, status = fields
    n = len(job.paths)
    if n_nodes != n or any(not 0 <= i < n for i in changed):
        return None
    try:
        root = _with_states(job, changed)
        ctx = job.context
        if context is not None:
            ctx = {k: v for k, (_, v) in sorted(context.items(), key=lambda kv: kv[1][0])}
        new = Job(
            root,
            ctx,
            job.paths,
            codec.decode_todo(todo),
            restarts,
            frozenset(touched),
            aborted,
        )
    except (JobError, ValueError, TypeError, KeyError, AttributeError, IndexError):
        return None
    return new if str(new.status) == status else None


def _with_states(job: Job, changed: Mapping[int, dict[str, Any]]) -> Node:
    """The tree of `job` with these nodes' states replaced and every ancestor of theirs
    built again over its new children (its summaries computed from them): children have
    larger ids than their parents, so in falling id order each is built before its parent."""
    parent, pos = job.paths.parent, job.paths.pos
    found = nodes_by_id(job, changed)
    built: dict[int, Node] = {}
    kids_of: dict[int, dict[int, Node]] = {}  # parent id -> {child position: new child}
    for node_id in sorted(found, reverse=True):
        node = found[node_id]
        if isinstance(node, Leaf):
            new = codec.with_state(node, changed.get(node_id))
        else:
            kids = node.children
            for at, kid in kids_of.pop(node_id, {}).items():
                kids = kids.set(at, kid)
            new = codec.with_state(node, changed.get(node_id) or codec.encode_state(node), kids)
        built[node_id] = new
        if node_id != job.root.id:
            kids_of.setdefault(parent[node_id], {})[pos[node_id]] = new
    return built[job.root.id]
