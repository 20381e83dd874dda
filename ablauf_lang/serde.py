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

import importlib
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pyrsistent import pvector

from ablauf_lang import semantics
from ablauf_lang.errors import JobError, Span
from ablauf_lang.job import Job, index_paths
from ablauf_lang.nodes import (
    Augment,
    Deferred,
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
from ablauf_lang.semantics import ALL

FORMAT = "ablauf/job"
VERSION = 1

# ---------------------------------------------------------------- values

# tag -> (python type, encode to JSON-able, decode from it)
_VALUE_CODECS: dict[str, tuple[type, Callable[[Any], Any], Callable[[Any], Any]]] = {}


def register_value(
    tag: str, cls: type, encode: Callable[[Any], Any], decode: Callable[[Any], Any]
) -> None:
    """Teach the codec a Python type (stored as `{"$<tag>": encode(value)}`)."""
    _VALUE_CODECS[tag] = (cls, encode, decode)


def encode_value(value: Any) -> Any:
    """Return a JSON-able form of a payload, output, error or context value."""
    if value is None or isinstance(value, bool | int | float | str):
        return str(value) if type(value) is not str and isinstance(value, str) else value
    if isinstance(value, dict):
        if all(type(k) is str or isinstance(k, str) for k in value) and not any(
            isinstance(k, str) and k.startswith("$") for k in value
        ):
            return {str(k): encode_value(v) for k, v in value.items()}
        return {"$map": [[encode_value(k), encode_value(v)] for k, v in value.items()]}
    if isinstance(value, list):
        return [encode_value(v) for v in value]
    if isinstance(value, tuple):
        return {"$tuple": [encode_value(v) for v in value]}
    if isinstance(value, Deferred):
        return {"$deferred": [value.tag, value.to_data()]}
    for tag, (cls, encode, _) in _VALUE_CODECS.items():
        if isinstance(value, cls):
            return {"$" + tag: encode(value)}
    raise JobError(f"cannot store a value of type {type(value).__name__}: {value!r:.80}")


def decode_value(data: Any) -> Any:
    """Invert `encode_value`."""
    if isinstance(data, list):
        return [decode_value(v) for v in data]
    if isinstance(data, dict):
        if len(data) == 1:
            ((key, inner),) = data.items()
            if key == "$map":
                return {_hashable(decode_value(k)): decode_value(v) for k, v in inner}
            if key == "$tuple":
                return tuple(decode_value(v) for v in inner)
            if key == "$deferred":
                return _decode_deferred(inner)
            if key.startswith("$") and key[1:] in _VALUE_CODECS:
                return _VALUE_CODECS[key[1:]][2](inner)
        return {k: decode_value(v) for k, v in data.items()}
    return data


def _decode_deferred(data: list[Any]) -> Deferred:
    tag, inner = data
    if tag not in Deferred.registry:
        # The language's expressions register themselves when their module is imported.
        importlib.import_module("ablauf_lang.expr")
    cls = Deferred.registry.get(tag)
    if cls is None:
        raise JobError(f"stored job holds a run-time expression of unknown kind {tag!r}")
    return cls.from_data(inner)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# ---------------------------------------------------------------- nodes


def _span(span: Span | None) -> list[Any] | None:
    if span is None:
        return None
    return [span.line, span.column, span.filename] if span.filename else [span.line, span.column]


def _unspan(data: list[Any] | None) -> Span | None:
    if not data:
        return None
    return Span(data[0], data[1], filename=data[2] if len(data) > 2 else None)


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
    return Leaf(
        rec["id"],
        rec["action"],
        decode_value(rec.get("payload")),
        bool(rec.get("idempotent", False)),
        None
        if aug is None
        else Augment(tuple(decode_value(aug["source"])), tuple(decode_value(aug["dest"]))),
        None if rec.get("result") is None else LeafState(rec["result"]),
        decode_value(rec.get("output")),
        decode_value(rec.get("error")),
        int(rec.get("attempt", 0)),
        rec.get("dispatched_at"),
        rec.get("finished_at"),
        _unspan(rec.get("span")),
    )


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
    cursor = rec.get("cursor")
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
    lambda r, k: semantics.summarize(Try(r["id"], k, span=_unspan(r.get("span")))),
)


def encode_branch_fields(node: Node) -> dict[str, Any]:
    """Encode a branch's own fields (a sequence's cursor ...): its record without id, kind,
    span and children, in O(1) however many children it has (stores diff these)."""
    encoder = _BRANCH_ENCODERS.get(type(node))
    if encoder is None:
        raise JobError(f"cannot store a node of kind {node.kind}")
    return encoder(node)


def _decode_if(rec: dict[str, Any], kids: Any) -> If:
    node = If(
        rec["id"],
        decode_value(rec.get("test")),
        kids,
        rec.get("chosen"),
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
            rec["var"],
            decode_value(rec.get("coll")),
            decode_nodes(rec["template"]),
            kids,
            bool(rec.get("expanded")),
            decode_value(rec.get("error")),
            cursor=int(rec.get("cursor", 0)),
            span=_unspan(rec.get("span")),
        )
        done = semantics.summarize(node)
        return replace(done, cursor=node.cursor) if done.cursor != node.cursor else done

    return decode


register_branch("doseq", Doseq, _encode_expansion, _decoder(Doseq))
register_branch("pmap", Pmap, _encode_expansion, _decoder(Pmap))


def decode_nodes(records: list[dict[str, Any]]) -> Node:
    """Build a tree from node records (any order; children have larger ids than parents)."""
    by_id = {rec["id"]: rec for rec in records}
    built: dict[int, Node] = {}
    for node_id in sorted(by_id, reverse=True):
        rec = by_id[node_id]
        kind = rec.get("kind")
        if kind == "leaf":
            built[node_id] = _decode_leaf(rec)
            continue
        decode = _BRANCH_DECODERS.get(kind)  # type: ignore[arg-type]
        if decode is None:
            raise JobError(f"unknown node kind {kind!r} in stored job")
        try:
            kids = pvector(built.pop(c) for c in rec["children"])
        except KeyError as exc:
            raise JobError(f"stored node {node_id} names a missing child {exc}") from None
        built[node_id] = decode(rec, kids)
    roots = list(built.values())
    if len(roots) != 1:
        raise JobError("stored job is not one tree")
    return roots[0]


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


def from_data(data: dict[str, Any]) -> Job:
    """Build a job from `to_data` output."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise JobError("not an ablauf job snapshot")
    version = data.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise JobError(
            f"job snapshot version {version} is newer than this ablauf_lang "
            f"understands ({VERSION}); upgrade ablauf_lang"
        )
    root = decode_nodes(data["nodes"])
    todo = {int(k): (ALL if v == "all" else frozenset(v)) for k, v in data["todo"].items()}
    context = decode_value(data.get("context") or {})
    return Job(
        root,
        context,
        index_paths(root),
        todo,
        int(data.get("restarts", 0)),
        frozenset(data.get("touched", ())),
        data.get("aborted"),
    )


def dumps(job: Job) -> str:
    """Serialise a job to JSON text."""
    return json.dumps(to_data(job), separators=(",", ":"))


def loads(text: str | bytes) -> Job:
    """Load a job from JSON text."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise JobError(f"job snapshot is not valid JSON: {exc}") from None
    return from_data(data)
