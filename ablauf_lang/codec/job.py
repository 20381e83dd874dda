"""Versioned JSON for jobs: a flat list of nodes with child ids (never nested, never pickle).

    {"format": "ablauf/job", "version": 1, "context": {...}, "restarts": 3,
     "todo": {...}, "aborted": null, "nodes": [{"id": 0, "kind": "seq", "children": [1, 2]},
                                              {"id": 1, "kind": "leaf", "action": ...}, ...]}

A flat list keeps deep trees clear of the recursion limit. Values are plain JSON; the few
Python values JSON cannot say exactly (maps with non-string keys, tuples, run-time
expressions) are tagged by the one value codec (`ablauf_lang.values`).

Records are built from what each kind declares (`engine.kinds`: `kind`, `stored`,
`arity`): this module holds no per-kind code. A record is the node's id, kind, span,
child ids (a branch) and its stored fields, each encoded by its codec type; `encode_spec`
and `encode_state` give the two parts a store keeps apart (`codec.delta`), and
`encode_node` the whole record, so a store can write only the nodes a restart touched.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Collection
from dataclasses import replace
from operator import attrgetter
from typing import Any, cast

from pyrsistent import pvector

from ablauf_lang import values
from ablauf_lang.engine.job import Job, index_paths, install_codec
from ablauf_lang.engine.kinds import Augment, Kind, Leaf, Node, by_name
from ablauf_lang.engine.kinds.base import (
    SPEC,
    STATE,
    T_AUGMENT,
    T_BOOL,
    T_CHOICE,
    T_CURSOR,
    T_EXPR,
    T_INT,
    T_RESULT,
    T_STR,
    T_TIME,
    T_TREE,
    T_VALUE,
    Stored,
)
from ablauf_lang.engine.nodes import ALL, LeafState
from ablauf_lang.errors import JobError, Span

FORMAT = "ablauf/job"
VERSION = 1

# ---------------------------------------------------------------- spans


def _span(span: Span | None) -> list[Any] | None:
    if span is None:
        return None
    return [span.line, span.column, span.filename] if span.filename else [span.line, span.column]


@functools.lru_cache(maxsize=4096)
def _span_at(line: int, column: int, filename: str | None) -> Span:
    """Equal spans decoded once (the leaves of a `pmap!!` share their template's)."""
    return Span(line, column, filename=filename)


def _unspan(data: Any) -> Span | None:
    if not data:
        return None
    pair = type(data) is list and len(data) > 1 and type(data[0]) is int is type(data[1])
    if pair and len(data) == 2:
        return _span_at(data[0], data[1], None)
    if pair and len(data) == 3 and type(data[2]) is str:
        return _span_at(data[0], data[1], data[2])
    raise _Damaged(f"field 'span' is not [line, column, file?]: {str(data)[:60]}")


# ---------------------------------------------------------------- encoding nodes


def _encode_result(result: LeafState | None) -> str | None:
    return None if result is None else result.value


def _encode_augment(augment: Augment | None) -> dict[str, Any] | None:
    if augment is None:
        return None
    return {
        "source": values.encode(list(augment.source)),
        "dest": values.encode(list(augment.dest)),
    }


# How each codec type is written (None: as it is, a JSON scalar already).
_ENCODERS: dict[str, Callable[[Any], Any] | None] = {
    T_STR: None,
    T_BOOL: None,
    T_INT: None,
    T_CURSOR: None,
    T_CHOICE: None,
    T_TIME: None,
    T_VALUE: values.encode,
    T_EXPR: values.encode,
    T_RESULT: _encode_result,
    T_AUGMENT: _encode_augment,
    T_TREE: lambda root: encode_tree(root),
}

# A part of a record: each field's name, encoder and whether it may be left out when it
# holds nothing (not required: see `encode_state`), and one getter of all the values.
_Plan = tuple[tuple[tuple[str, Callable[[Any], Any] | None, bool], ...], Callable[[Any], Any]]


def _plan(fields: tuple[Stored, ...], part: str | None) -> _Plan:
    chosen = [f for f in fields if part is None or f.part == part]
    names = [f.name for f in chosen]
    marked = tuple((f.name, _ENCODERS[f.type], not f.required) for f in chosen)
    if len(names) > 1:
        return marked, attrgetter(*names)

    def get(node: Any) -> tuple[Any, ...]:  # attrgetter of one name gives no tuple
        return tuple(getattr(node, n) for n in names)

    return marked, get


# kind class -> (every stored field, spec fields, state fields), each with its encoder
_PLANS: dict[type, tuple[_Plan, _Plan, _Plan]] = {}


def _plans(node: Node) -> tuple[_Plan, _Plan, _Plan]:
    plans = _PLANS.get(type(node))
    if plans is None:
        cls = type(node)
        if by_name(getattr(node, "kind", "")) is not cls:
            raise JobError(f"cannot store a node of kind {getattr(node, 'kind', cls.__name__)}")
        stored = cls.stored
        plans = _PLANS[cls] = (_plan(stored, None), _plan(stored, SPEC), _plan(stored, STATE))
    return plans


def _fill(out: dict[str, Any], node: Node, plan: _Plan) -> dict[str, Any]:
    encoders, get = plan
    for (name, encode, _), value in zip(encoders, get(node), strict=True):
        out[name] = value if encode is None else encode(value)
    return out


def encode_node(node: Node) -> dict[str, Any]:
    """Encode one node (a branch names its children by id)."""
    rec: dict[str, Any] = {"id": node.id, "kind": node.kind}
    if not isinstance(node, Leaf):
        rec["children"] = [c.id for c in node.children]
    rec["span"] = _span(node.span)
    return _fill(rec, node, _plans(node)[0])


def encode_spec(node: Node) -> dict[str, Any]:
    """What a node is (id, kind, span and its SPEC fields): never changed by running it."""
    rec = {"id": node.id, "kind": node.kind, "span": _span(node.span)}
    return _fill(rec, node, _plans(node)[1])


def encode_state(node: Node) -> dict[str, Any]:
    """What happened to a node (its STATE fields): O(1) however many children it has.

    A field that is not required and holds nothing (null, or an empty record of attempts)
    is left out: it decodes to its default, and a state is always written whole (a store
    replaces a node's state, never merges it), so leaving it out loses nothing.
    """
    fields, get = _plans(node)[2]
    out: dict[str, Any] = {}
    for (name, encode, optional), value in zip(fields, get(node), strict=True):
        if value is None:  # every encoder writes None as it is
            if not optional:
                out[name] = None
        elif not (optional and isinstance(value, tuple) and not value):  # {"$tuple": []}
            out[name] = value if encode is None else encode(value)
    return out


def encode_tree(root: Node) -> list[dict[str, Any]]:
    """Encode a whole tree as flat records (a template: its ids are local to it)."""
    out = []
    stack = [root]
    while stack:
        node = stack.pop()
        out.append(encode_node(node))
        if not isinstance(node, Leaf):
            stack.extend(reversed(node.children))
    return out


def encode_todo(todo: dict[int, Collection[int]]) -> dict[str, Any]:
    """A job's `todo` as JSON: node id -> "all" or the sorted child indices."""
    return {str(k): "all" if v is ALL else sorted(v) for k, v in todo.items()}


# ---------------------------------------------------------------- decoding nodes


class _Damaged(Exception):
    """A record is not what the codec wrote; the message names the problem."""


_MISSING: Any = object()


def _field(
    rec: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _MISSING
) -> Any:
    """Return `rec[name]`, checking its JSON type; a default when absent (or null)."""
    value = rec.get(name, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise _Damaged(f"missing field {name!r}")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
        raise _Damaged(f"field {name!r} is {_json_type(value)}, not {names}")
    return value


_JSON_NAMES = {
    str: "a string",
    int: "an integer",
    bool: "a boolean",
    list: "a list",
    dict: "an object",
    float: "a number",
    type(None): "null",
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (list, "a list"),
        (dict, "an object"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _id(rec: dict[str, Any]) -> int:
    node_id: int = _field(rec, "id", int)
    if node_id < 0:
        raise _Damaged(f"node id {node_id} is negative")
    return node_id


def _time(rec: dict[str, Any], name: str) -> float | None:
    value = _field(rec, name, (int, float), None)
    return None if value is None else float(value) if isinstance(value, int) else value


_LEAF_STATES = frozenset(str(s) for s in LeafState)


# How each codec type is read back: decode(record, name, number of children) -> the value,
# or _MISSING for the field's default; _Damaged when it is not what the codec wrote.
# (The common case, the JSON type the codec writes, is checked first: a load decodes
# every node.)


def _dec_value(rec: dict[str, Any], name: str, n_kids: int) -> Any:
    value = rec.get(name, _MISSING)
    return value if value is _MISSING else values.decode(value)  # absent: the default


def _dec_str(rec: dict[str, Any], name: str, n_kids: int) -> Any:
    value = rec.get(name)
    if type(value) is str:  # names (an action's, a variable's): one copy of each
        return sys.intern(value) if len(value) <= 64 else value
    return _field(rec, name, str)


def _dec_bool(rec: dict[str, Any], name: str, n_kids: int) -> Any:
    value = rec.get(name)
    if value is None:
        return _MISSING
    return value if type(value) is bool else _field(rec, name, bool)


def _dec_int(rec: dict[str, Any], name: str, n_kids: int) -> Any:
    value = rec.get(name)
    if value is None:
        return _MISSING
    return value if type(value) is int else _field(rec, name, int)


def _dec_cursor(rec: dict[str, Any], name: str, n_kids: int) -> Any:
    value = _dec_int(rec, name, n_kids)
    if value is not _MISSING and not 0 <= value <= n_kids:
        raise _Damaged(f"field {name!r} is {value}, outside 0..{n_kids}")
    return value


def _dec_time(rec: dict[str, Any], name: str, n_kids: int) -> Any:
    value = rec.get(name)
    if value is None or type(value) is float:
        return value
    return float(value) if type(value) is int else _field(rec, name, (int, float))


def _dec_choice(rec: dict[str, Any], name: str, n_kids: int) -> Any:
    value = _field(rec, name, int, None)
    if value is not None and value not in (0, 1):
        raise _Damaged(f"field {name!r} is {value}, not 0 or 1")
    return value


def _dec_result(rec: dict[str, Any], name: str, n_kids: int) -> Any:
    value = rec.get(name)
    if value is None:
        return None
    if value not in _LEAF_STATES:
        raise _Damaged(f"field {name!r} is {value!r}, not a leaf state")
    return LeafState(value)


def _dec_augment(rec: dict[str, Any], name: str, n_kids: int) -> Any:
    aug = rec.get(name)
    if aug is None:
        return None
    if not isinstance(aug, dict):
        raise _Damaged(f"field {name!r} is not an object")
    source = values.decode(_field(aug, "source", list))
    dest = values.decode(_field(aug, "dest", list))
    return Augment(tuple(source), tuple(dest))


def _dec_tree(rec: dict[str, Any], name: str, n_kids: int) -> Any:
    return decode_nodes(_field(rec, name, list))


_Decode = Callable[[dict[str, Any], str, int], Any]
_DECODERS: dict[str, _Decode] = {
    T_STR: _dec_str,
    T_BOOL: _dec_bool,
    T_INT: _dec_int,
    T_CURSOR: _dec_cursor,
    T_CHOICE: _dec_choice,
    T_TIME: _dec_time,
    T_VALUE: _dec_value,
    T_EXPR: _dec_value,
    T_RESULT: _dec_result,
    T_AUGMENT: _dec_augment,
    T_TREE: _dec_tree,
}
_READ: dict[type, tuple[tuple[str, _Decode], ...]] = {}


def _reader(cls: type[Kind]) -> tuple[tuple[str, _Decode], ...]:
    read = _READ.get(cls)
    if read is None:
        read = _READ[cls] = tuple((f.name, _DECODERS[f.type]) for f in cls.stored)
    return read


def _decode_kind(cls: type[Kind], rec: dict[str, Any], kids: Any) -> Node:
    """Build a node of kind `cls` from its record and its decoded children."""
    if cls.arity is not None and len(kids) != cls.arity:
        raise _Damaged(f"a {cls.kind} node has {len(kids)} children, not {cls.arity}")
    n_kids = 0 if kids is None else len(kids)
    kw: dict[str, Any] = {}
    for name, decode in _reader(cls):
        value = decode(rec, name, n_kids)
        if value is not _MISSING:
            kw[name] = value
    span = _unspan(rec.get("span"))
    make: Callable[..., Any] = cls  # a dataclass: its fields are the keywords
    if kids is None:
        leaf: Node = make(id=rec["id"], span=span, **kw)
        return leaf
    node = make(id=rec["id"], children=kids, span=span, **kw)
    summed: Node = node.summarize()  # summaries are never stored: computed from the children
    # ... keeping the stored state (summarize may pull a cursor back).
    kept = {k: v for k, v in kw.items() if getattr(summed, k) != v}
    return replace(summed, **kept) if kept else summed


_STATE_READ: dict[type, tuple[tuple[str, _Decode, Any], ...]] = {}


def _state_reader(cls: type[Kind]) -> tuple[tuple[str, _Decode, Any], ...]:
    """(name, decoder, the value a missing field decodes to) of each STATE field."""
    read = _STATE_READ.get(cls)
    if read is None:
        defaults = {f.name: f for f in dataclasses.fields(cast(Any, cls))}
        out = []
        for f in cls.stored:
            if f.part != STATE:
                continue
            d = defaults[f.name]
            if d.default is not dataclasses.MISSING:
                default = d.default
            elif d.default_factory is not dataclasses.MISSING:
                default = d.default_factory()
            else:
                default = _MISSING
            out.append((f.name, _DECODERS[f.type], default))
        read = _STATE_READ[cls] = tuple(out)
    return read


def with_state(node: Node, state: dict[str, Any] | None, kids: Any = None) -> Node:
    """`node` as a load builds it from its (unchanged) spec, the stored `state` (None: its
    own, as encoded) and the children `kids` (a branch's, already built): the state fields
    decoded (a missing one is its default), a branch's summaries computed from `kids`.
    JobError for a state the codec did not write."""
    cls = type(node)
    rec = encode_state(node) if state is None else state
    n_kids = 0 if kids is None else len(kids)
    kw: dict[str, Any] = {}
    try:
        for name, decode, default in _state_reader(cls):
            value = decode(rec, name, n_kids)
            if value is _MISSING:
                if default is _MISSING:
                    raise _Damaged(f"missing field {name!r}")
                value = default
            kw[name] = value
    except _Damaged as exc:
        raise JobError(f"stored node {node.id} is damaged: {exc}") from None
    if kids is None:
        return replace(node, **kw)
    summed: Node = replace(node, children=kids, **kw).summarize()
    kept = {k: v for k, v in kw.items() if getattr(summed, k) != v}
    return replace(summed, **kept) if kept else summed


def decode_nodes(records: Any, *, consume: bool = False) -> Node:
    """Build a tree from node records (any order; children have larger ids than parents).
    `consume`: the records are the caller's to give up (the list is emptied and each
    record dropped once its node is built: a wide tree is not held twice).

    JobError naming the node for a record the codec did not write (a missing field, a
    wrong type, a missing or shared child).
    """
    if not isinstance(records, list) or not records:
        raise JobError("stored job has no nodes (field 'nodes' must be a non-empty list)")
    by_id: dict[int, dict[str, Any]] = {}
    for index, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise JobError(f"stored node #{index} is {_json_type(rec)}, not an object")
        try:
            node_id = _id(rec)
        except _Damaged as exc:
            raise JobError(f"stored node #{index} is damaged: {exc}") from None
        if node_id in by_id:
            raise JobError(f"stored job has node id {node_id} twice")
        by_id[node_id] = rec
    if consume:
        records.clear()
    built: dict[int, Node] = {}
    for node_id in sorted(by_id, reverse=True):
        rec = by_id.pop(node_id) if consume else by_id[node_id]
        try:
            built[node_id] = _decode_record(rec, node_id, built)
        except _Damaged as exc:
            raise JobError(f"stored node {node_id} is damaged: {exc}") from None
        except JobError as exc:
            if exc.message.startswith("stored node"):
                raise
            raise JobError(f"stored node {node_id} is damaged: {exc.message}") from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            # A backstop: a record that passed the checks above but still does not fit.
            what = f"missing field {exc}" if isinstance(exc, KeyError) else f"{exc}"
            raise JobError(f"stored node {node_id} is damaged: {what}") from None
    roots = list(built.values())
    if len(roots) != 1:
        raise JobError(
            f"stored job is not one tree: nodes {', '.join(map(str, sorted(built)[:5]))} "
            "have no parent"
        )
    return roots[0]


def _decode_record(rec: dict[str, Any], node_id: int, built: dict[int, Node]) -> Node:
    kind = rec.get("kind", _MISSING)
    if kind is _MISSING:
        raise _Damaged("missing field 'kind'")
    cls = by_name(kind) if isinstance(kind, str) else None
    if cls is None:
        raise _Damaged(f"unknown node kind {kind!r}")
    if cls is Leaf:
        return _decode_kind(cls, rec, None)
    child_ids = _field(rec, "children", list)
    kids = []
    for c in child_ids:
        if not isinstance(c, int) or isinstance(c, bool):
            raise _Damaged(f"field 'children' holds {_json_type(c)}, not node ids")
        child = built.pop(c, None)
        if child is None:
            why = "" if c > node_id else " (children have larger ids than their parent)"
            raise _Damaged(f"names a missing child {c}{why}")
        kids.append(child)
    return _decode_kind(cls, rec, pvector(kids))


# ---------------------------------------------------------------- jobs


def to_data(job: Job) -> dict[str, Any]:
    """Return the JSON-able form of a job."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "context": values.encode(job.context),
        "restarts": job.restarts,
        "aborted": job.aborted,
        "todo": encode_todo(job.todo),
        "touched": sorted(job.touched),
        "nodes": [encode_node(n) for n in job.nodes()],
    }


def from_data(data: Any, *, consume: bool = False) -> Job:
    """Build a job from `to_data` output; JobError (one clear line) for anything else.
    `consume`: `data` is the caller's to give up (see `decode_nodes`)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise JobError(f'not an ablauf job snapshot (no "format": "{FORMAT}" field)')
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise JobError(f"job snapshot has no valid version (found {str(version)[:20]})")
    if version > VERSION:
        raise JobError(
            f"job snapshot version {version} is newer than this ablauf_lang "
            f"understands ({VERSION}); upgrade ablauf_lang"
        )
    try:
        root = decode_nodes(data.get("nodes"), consume=consume)
        todo = decode_todo(_field(data, "todo", dict, {}))
        context = values.decode(_field(data, "context", dict, {}))
        if not isinstance(context, dict):
            raise _Damaged("field 'context' is not a map")
        touched = _field(data, "touched", list, [])
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in touched):
            raise _Damaged("field 'touched' must hold node ids")
        restarts = _field(data, "restarts", int, 0)
        aborted = _field(data, "aborted", str, None)
    except _Damaged as exc:
        raise JobError(f"job snapshot is damaged: {exc}") from None
    return Job(root, context, index_paths(root), todo, restarts, frozenset(touched), aborted)


def decode_todo(data: dict[str, Any]) -> dict[int, Any]:
    """Invert `encode_todo`; _Damaged when it is not what it wrote."""
    todo: dict[int, Any] = {}
    for key, value in data.items():
        try:
            node_id = int(key)
        except ValueError:
            raise _Damaged(f"field 'todo' has the key {key!r}, not a node id") from None
        if value == "all":
            todo[node_id] = ALL
        elif isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            todo[node_id] = frozenset(value)
        else:
            raise _Damaged(f"field 'todo' of {key} is neither \"all\" nor a list of ids")
    return todo


def dumps(job: Job) -> str:
    """Serialise a job to JSON text."""
    return json.dumps(to_data(job), separators=(",", ":"))


def loads(text: str | bytes) -> Job:
    """Load a job from JSON text; JobError saying what is wrong (and where) otherwise."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        cut = exc.pos >= len(exc.doc.rstrip()) or exc.msg.startswith("Unterminated")
        end = " (the snapshot is cut short)" if cut else ""
        raise JobError(
            f"job snapshot is not valid JSON at line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg}{end}"
        ) from None
    except UnicodeDecodeError as exc:
        raise JobError(f"job snapshot is not UTF-8 text (byte {exc.start})") from None
    except RecursionError:
        raise JobError("job snapshot is nested too deeply to read") from None
    except ValueError as exc:  # e.g. an integer too long to convert
        raise JobError(f"job snapshot is not valid JSON: {exc}") from None
    return from_data(data)


class _JsonCodec:
    """`Job.to_json`/`Job.from_json` (installed into the engine, which cannot import us)."""

    def dumps(self, job: Job) -> str:
        return dumps(job)

    def loads(self, text: str | bytes) -> Job:
        return loads(text)


def install() -> None:
    """Make `Job.to_json`/`Job.from_json` use this format (`ablauf_lang` does, on import)."""
    install_codec(_JsonCodec())
