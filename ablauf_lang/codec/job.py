"""Versioned JSON for jobs: a flat list of nodes with child ids (never nested, never pickle).

    {"format": "ablauf/job", "version": 1, "context": {...}, "restarts": 3,
     "todo": {...}, "aborted": null, "nodes": [{"id": 0, "kind": "seq", "children": [1, 2]},
                                              {"id": 1, "kind": "leaf", "action": ...}, ...]}

A flat list keeps deep trees clear of the recursion limit. Values are plain JSON; the few
Python values JSON cannot say exactly (maps with non-string keys, tuples, run-time
expressions) are tagged `{"$map": ...}`, `{"$tuple": ...}` or by a registered codec.
`encode_node` encodes one node, so a store can write only the nodes a restart touched.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pyrsistent import pvector

from ablauf_lang import values
from ablauf_lang.engine import semantics
from ablauf_lang.engine.job import Job, index_paths
from ablauf_lang.engine.nodes import (
    Augment,
    Doseq,
    Expansion,
    If,
    Leaf,
    LeafState,
    Node,
    Par,
    Pmap,
    Seq,
    Try,
)
from ablauf_lang.engine.semantics import ALL
from ablauf_lang.errors import JobError, Span

FORMAT = "ablauf/job"
VERSION = 1

# ---------------------------------------------------------------- values
# One iterative codec for every value (ablauf_lang.values); these names are the stores'.


def register_value(
    tag: str, cls: type, encode: Callable[[Any], Any], decode: Callable[[Any], Any]
) -> None:
    """Teach the codec a Python type (stored as `{"$<tag>": encode(value)}`)."""
    values.register(tag, cls, encode, decode)


def encode_value(value: Any) -> Any:
    """Return a JSON-able form of a payload, output, error or context value (iterative).

    JobError for a value that cannot be stored: an object JSON cannot say, a value nested
    more than `values.MAX_DEPTH` levels or containing itself, a huge integer.
    """
    return values.encode(value)


def decode_value(data: Any) -> Any:
    """Invert `encode_value` (iterative)."""
    return values.decode(data)


# ---------------------------------------------------------------- nodes


def _span(span: Span | None) -> list[Any] | None:
    if span is None:
        return None
    return [span.line, span.column, span.filename] if span.filename else [span.line, span.column]


def _unspan(data: Any) -> Span | None:
    if not data:
        return None
    if type(data) is list and type(data[0]) is int and len(data) > 1 and type(data[1]) is int:
        if len(data) == 2:
            return Span(data[0], data[1])
        if len(data) == 3 and type(data[2]) is str:
            return Span(data[0], data[1], filename=data[2])
    raise _Damaged(f"field 'span' is not [line, column, file?]: {str(data)[:60]}")


def encode_node(node: Node) -> dict[str, Any]:
    """Encode one node (a branch names its children by id)."""
    if isinstance(node, Leaf):
        return {
            "id": node.id,
            "kind": "leaf",
            "action": node.action,
            "payload": encode_value(node.payload),
            "idempotent": node.idempotent,
            "augment": None
            if node.augment is None
            else {
                "source": encode_value(list(node.augment.source)),
                "dest": encode_value(list(node.augment.dest)),
            },
            "result": None if node.result is None else str(node.result),
            "output": encode_value(node.output),
            "error": encode_value(node.error),
            "attempt": node.attempt,
            "dispatched_at": node.dispatched_at,
            "finished_at": node.finished_at,
            "started_at": node.started_at,
            "sent": encode_value(node.sent),
            "span": _span(node.span),
        }
    encoder = _BRANCH_ENCODERS.get(type(node))
    if encoder is None:
        raise JobError(f"cannot store a node of kind {node.kind}")
    record = {
        "id": node.id,
        "kind": node.kind,
        "children": [c.id for c in node.children],
        "span": _span(node.span),
    }
    record.update(encoder(node))
    return record


def _decode_leaf(rec: dict[str, Any]) -> Leaf:
    aug = rec.get("augment")
    if aug is not None:
        if not isinstance(aug, dict):
            raise _Damaged("field 'augment' is not an object")
        source, dest = (
            decode_value(_field(aug, "source", list)),
            decode_value(_field(aug, "dest", list)),
        )
        augment: Augment | None = Augment(tuple(source), tuple(dest))
    else:
        augment = None
    result = rec.get("result")
    if result is not None and result not in _LEAF_STATES:
        raise _Damaged(f"field 'result' is {result!r}, not a leaf state")
    return Leaf(
        _id(rec),
        _field(rec, "action", str),
        decode_value(rec.get("payload")),
        bool(_field(rec, "idempotent", bool, False)),
        augment,
        None if result is None else LeafState(result),
        decode_value(rec.get("output")),
        decode_value(rec.get("error")),
        _field(rec, "attempt", int, 0),
        _time(rec, "dispatched_at"),
        _time(rec, "finished_at"),
        _unspan(rec.get("span")),
        _time(rec, "started_at"),
        decode_value(rec.get("sent")),
    )


_LEAF_STATES = frozenset(str(s) for s in LeafState)


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
    node_id = _field(rec, "id", int)
    if node_id < 0:
        raise _Damaged(f"node id {node_id} is negative")
    return node_id  # type: ignore[no-any-return]


def _time(rec: dict[str, Any], name: str) -> float | None:
    value = _field(rec, name, (int, float), None)
    return None if value is None else float(value) if isinstance(value, int) else value


def _children(kids: Any, want: int, kind: str) -> Any:
    if len(kids) != want:
        raise _Damaged(f"a {kind} node has {len(kids)} children, not {want}")
    return kids


# kind -> (python class, extra fields to store, build from record and children)
_BRANCH_ENCODERS: dict[type, Callable[[Any], dict[str, Any]]] = {}
_BRANCH_DECODERS: dict[str, Callable[[dict[str, Any], Any], Node]] = {}


def register_branch(
    kind: str,
    cls: type,
    encode: Callable[[Any], dict[str, Any]],
    decode: Callable[[dict[str, Any], Any], Node],
) -> None:
    """Teach the codec a branch kind: `decode(record, children_pvector)` builds the node."""
    _BRANCH_ENCODERS[cls] = encode
    _BRANCH_DECODERS[kind] = decode


def _decode_seq(rec: dict[str, Any], kids: Any) -> Seq:
    node = semantics.summarize(Seq(rec["id"], kids, span=_unspan(rec.get("span"))))
    cursor = _field(rec, "cursor", int, None)
    if cursor is not None and not 0 <= cursor <= len(kids):
        raise _Damaged(f"field 'cursor' is {cursor}, outside 0..{len(kids)}")
    if cursor is not None and cursor != node.cursor:
        node = Seq(node.id, kids, node.n_done, node.n_failed, node.inflight, cursor, node.span)
    return node  # type: ignore[no-any-return]


register_branch("seq", Seq, lambda n: {"cursor": n.cursor}, _decode_seq)
register_branch(
    "par",
    Par,
    lambda n: {},
    lambda r, k: semantics.summarize(Par(r["id"], k, span=_unspan(r.get("span")))),
)
register_branch(
    "try",
    Try,
    lambda n: {},
    lambda r, k: semantics.summarize(
        Try(r["id"], _children(k, 3, "try"), span=_unspan(r.get("span")))
    ),
)


def encode_branch_fields(node: Node) -> dict[str, Any]:
    """Encode a branch's own fields (a sequence's cursor ...): its record without id, kind,
    span and children, in O(1) however many children it has (stores diff these)."""
    encoder = _BRANCH_ENCODERS.get(type(node))
    if encoder is None:
        raise JobError(f"cannot store a node of kind {node.kind}")
    return encoder(node)


def _decode_if(rec: dict[str, Any], kids: Any) -> If:
    chosen = _field(rec, "chosen", int, None)
    if chosen is not None and chosen not in (0, 1):
        raise _Damaged(f"field 'chosen' is {chosen}, not 0 or 1")
    node = If(
        rec["id"],
        decode_value(rec.get("test")),
        _children(kids, 2, "if"),
        chosen,
        decode_value(rec.get("error")),
        span=_unspan(rec.get("span")),
    )
    return semantics.summarize(node)  # type: ignore[no-any-return]


register_branch(
    "if",
    If,
    lambda n: {"test": encode_value(n.test), "chosen": n.chosen, "error": encode_value(n.error)},
    _decode_if,
)


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


def _encode_expansion(node: Expansion) -> dict[str, Any]:
    return {
        "var": node.var,
        "coll": encode_value(node.coll),
        "template": encode_tree(node.template),
        "expanded": node.expanded,
        "error": encode_value(node.error),
        "cursor": node.cursor,
    }


def _decoder(cls: type[Expansion]) -> Callable[[dict[str, Any], Any], Node]:
    def decode(rec: dict[str, Any], kids: Any) -> Node:
        node = cls(
            rec["id"],
            _field(rec, "var", str),
            decode_value(rec.get("coll")),
            decode_nodes(_field(rec, "template", list)),
            kids,
            bool(_field(rec, "expanded", bool, False)),
            decode_value(rec.get("error")),
            cursor=_field(rec, "cursor", int, 0),
            span=_unspan(rec.get("span")),
        )
        done: Doseq | Pmap = semantics.summarize(node)
        return replace(done, cursor=node.cursor) if done.cursor != node.cursor else done

    return decode


register_branch("doseq", Doseq, _encode_expansion, _decoder(Doseq))
register_branch("pmap", Pmap, _encode_expansion, _decoder(Pmap))


def decode_nodes(records: Any) -> Node:
    """Build a tree from node records (any order; children have larger ids than parents).

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
    built: dict[int, Node] = {}
    for node_id in sorted(by_id, reverse=True):
        rec = by_id[node_id]
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
    if kind == "leaf":
        return _decode_leaf(rec)
    decode = _BRANCH_DECODERS.get(kind) if isinstance(kind, str) else None
    if decode is None:
        raise _Damaged(f"unknown node kind {kind!r}")
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
    return decode(rec, pvector(kids))


# ---------------------------------------------------------------- jobs


def to_data(job: Job) -> dict[str, Any]:
    """Return the JSON-able form of a job."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "context": encode_value(job.context),
        "restarts": job.restarts,
        "aborted": job.aborted,
        "todo": {str(k): "all" if v is ALL else sorted(v) for k, v in job.todo.items()},
        "touched": sorted(job.touched),
        "nodes": [encode_node(n) for n in job.nodes()],
    }


def from_data(data: Any) -> Job:
    """Build a job from `to_data` output; JobError (one clear line) for anything else."""
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
        root = decode_nodes(data.get("nodes"))
        todo = _todo(_field(data, "todo", dict, {}))
        context = decode_value(_field(data, "context", dict, {}))
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


def _todo(data: dict[str, Any]) -> dict[int, Any]:
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
