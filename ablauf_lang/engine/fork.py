"""A fork of a run: its job at some restart, made ready to go on as a new run.

    fork_point :: Job -> Job             what was in flight handed back to be performed again
    graft      :: Job, Node -> Job       the part not started taken from an edited program

A fork goes on from the state the old run had after restart N: every leaf in flight then
is handed back (a person asked for the fork, so a non-idempotent one is performed again,
as for a retry), an abort recorded after it is cleared, everything recorded stays.

With an edited program (`graft`), each node that had started by then must be the same in
the edit (kind, action, payload, options, its children's count; positions in the file may
move; a `do!!` or `dopar!!` may gain or lose children that had not started); a node that
had not started is taken from the edit as it is. ForkError names the first started node
the edit changes. The merged tree is numbered again in pre-order and walked whole by the
next restart (as a retry's is), so what came from the edit starts where it is reached.
"""

from __future__ import annotations

from dataclasses import MISSING, fields, replace
from typing import Any

from pyrsistent import pvector

from ablauf_lang.code import Expr
from ablauf_lang.engine.job import REDO, ROOT, Job, Step, index_paths
from ablauf_lang.engine.kinds import Leaf, Node, renumber
from ablauf_lang.engine.kinds.base import SPEC, STATE, T_TREE, Branch, Counting
from ablauf_lang.engine.kinds.expansion import Expansion
from ablauf_lang.engine.nodes import ALL
from ablauf_lang.engine.replay import inflight_leaves
from ablauf_lang.errors import AblaufError
from ablauf_lang.stdlib.builtins import show_value


class ForkError(AblaufError):
    """An edited program that changes a part of the run that had already started."""


def fork_point(job: Job) -> Job:
    """The job ready to go on as a new run: every leaf in flight handed back (performed
    again as a new attempt), an abort cleared."""
    rs = Step(job, None)
    for leaf in inflight_leaves(job.root):
        rs.hand_back(leaf)
    todo: dict[int, Any] = {k: v if v is ALL else frozenset(v) for k, v in rs.dirty.items() if v}
    if rs.redo:
        todo[REDO] = frozenset(rs.redo)
    return Job(rs.root, job.context, rs.paths, todo, job.restarts, frozenset(rs.touched), None)


def graft(job: Job, program: Node) -> Job:
    """The job with the parts that had not started taken from `program` (an edit of the
    run's program); ForkError when the edit changes a part that had started."""
    merged = _merge(job.root, program)
    if merged is job.root:
        return job
    root, _ = renumber(merged, 0)
    paths = index_paths(root)
    by_path = {tuple(paths[i]): i for i in range(len(paths))}

    def moved(node_id: int) -> int | None:
        if node_id == ROOT or node_id < 0:
            return node_id
        if node_id >= len(job.paths):
            return None
        return by_path.get(tuple(job.paths[node_id]))

    todo: dict[int, Any] = {}
    for key, dirty in job.todo.items():
        if key == REDO:
            ids = {m for i in dirty if (m := moved(i)) is not None}
            if ids:
                todo[REDO] = frozenset(ids)
            continue
        new = moved(key)
        if new is not None:
            todo[new] = dirty
    todo[ROOT] = ALL  # walk the whole tree once: parts taken from the edit get started
    return Job(root, job.context, paths, todo, job.restarts, frozenset(), job.aborted)


def started(node: Node) -> bool:
    """True when anything happened to the node or inside it."""
    if isinstance(node, Leaf):
        return node.result is not None or node.attempt > 0
    if node.done:
        return True  # an empty branch is done as soon as it is reached
    for name, default in _state_defaults(type(node)):
        if getattr(node, name) != default:
            return True
    return any(started(c) for c in node.children)


def _state_defaults(cls: type) -> list[tuple[str, Any]]:
    found = _DEFAULTS.get(cls)
    if found is None:
        declared = {f.name for f in getattr(cls, "stored", ()) if f.part == STATE}
        found = _DEFAULTS[cls] = [
            (f.name, f.default)
            for f in fields(cls)
            if f.name in declared and f.default is not MISSING
        ]
    return found


_DEFAULTS: dict[type, list[tuple[str, Any]]] = {}


def _merge(old: Node, new: Node) -> Node:
    if not started(old):
        return old if not _tree_differs(old, new) else new
    why = _differs(old, new)
    if why is not None:
        raise ForkError(
            f"the edited program changes {_describe(old)}, which had already started: {why}"
        )
    if isinstance(old, (Leaf, Expansion)):
        return old
    assert isinstance(old, Branch)
    kids = [_merge(o, n) for o, n in zip(old.children, new.children, strict=False)]
    for gone in old.children[len(new.children) :]:
        if started(gone):
            raise ForkError(
                f"the edited program removes {_describe(gone)}, which had already started"
            )
    kids.extend(new.children[len(old.children) :])  # steps added at the end of a do!!
    if len(kids) == len(old.children) and all(
        k is o for k, o in zip(kids, old.children, strict=True)
    ):
        return old
    merged: Node = replace(old, children=pvector(kids))
    return merged.summarize() if isinstance(merged, Branch) else merged


def _differs(old: Node, new: Node) -> str | None:
    """What differs between two nodes' specs (positions aside), or None."""
    if type(old) is not type(new):
        return f"{old.label} became {new.label}"
    for f in getattr(type(old), "stored", ()):
        if f.part != SPEC or f.name == "span":
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if f.type == T_TREE:
            if _tree_differs(a, b):
                return f"its {f.name} changed"
        elif not _same(a, b):
            return f"its {f.name} changed from {_show(a)} to {_show(b)}"
    if (
        isinstance(old, Branch)
        and not isinstance(old, Expansion | Counting)
        and len(old.children) != len(new.children)
    ):
        return f"it had {len(old.children)} children, now {len(new.children)}"
    return None


def _tree_differs(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is not b
    if _differs(a, b) is not None:
        return True
    if isinstance(a, Branch):
        if len(a.children) != len(b.children):
            return True
        return any(_tree_differs(x, y) for x, y in zip(a.children, b.children, strict=True))
    return False


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Expr) or isinstance(b, Expr):
        # The same source text and bindings (positions in the file may move).
        return isinstance(a, Expr) and isinstance(b, Expr) and a.show == b.show and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _show(value: Any) -> str:
    text = value.show if isinstance(value, Expr) else show_value(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(node: Node) -> str:
    what = f"node {node.id} ({node.label}"
    if isinstance(node, Leaf):
        what += f" :{node.action}"
    span = node.span
    if span is not None:
        what += f", line {span.line}"
    return what + ")"
