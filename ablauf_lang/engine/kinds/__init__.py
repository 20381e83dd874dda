"""The node kinds: one module per kind, each answering every question about its kind.

The same immutable nodes form the compiled AST and the job tree: a job is the AST with
results filled in. Branch nodes cache a summary of their subtree (leaves in flight,
children done and failed, the sequence cursor) so a restart never rescans the tree.

Adding a kind: write its module here (a frozen dataclass deriving `base.Branch`, with its
`kind`, `label`, `stored` fields and the restart methods), list its class in `KINDS` and
`Node` below, and give the language a compiler rule that builds it (`lang.compiler`). The
codec, the stores, the renderer and the replay functions read what the kind declares. A
kind defined outside this package is added with `@register` instead (tests/test_kinds.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pyrsistent import pvector

from ablauf_lang.engine.kinds.base import Branch, Kind, Next, Stored
from ablauf_lang.engine.kinds.deadline import Deadline
from ablauf_lang.engine.kinds.expansion import Doseq, Expansion, Pmap
from ablauf_lang.engine.kinds.if_ import If
from ablauf_lang.engine.kinds.leaf import Augment, Leaf
from ablauf_lang.engine.kinds.par import Par
from ablauf_lang.engine.kinds.seq import Seq
from ablauf_lang.engine.kinds.try_ import Try

__all__ = [
    "KINDS",
    "Augment",
    "Branch",
    "Deadline",
    "Doseq",
    "Expansion",
    "If",
    "Kind",
    "Leaf",
    "Next",
    "Node",
    "Par",
    "Pmap",
    "Seq",
    "Stored",
    "Try",
    "by_name",
    "is_branch",
    "label_of",
    "register",
    "renumber",
    "roles_of",
]

Node = Leaf | Seq | Par | Try | If | Doseq | Pmap | Deadline

# The kinds of the language (the codec's and the display's registry, by stored name).
KINDS: tuple[type[Kind], ...] = (Leaf, Seq, Par, Try, If, Doseq, Pmap, Deadline)

_BY_NAME: dict[str, type[Kind]] = {cls.kind: cls for cls in KINDS}


def register(cls: type[Kind]) -> type[Kind]:
    """Add a kind defined outside this package (a class decorator): the codec, the stores
    and the display then handle it from its declarations."""
    known = _BY_NAME.get(cls.kind)
    if known is not None and known is not cls:
        raise ValueError(f"node kind {cls.kind!r} is taken by {known.__name__}")
    _BY_NAME[cls.kind] = cls
    return cls


def by_name(kind: str) -> type[Kind] | None:
    """The class of the kind stored as `kind`, or None."""
    return _BY_NAME.get(kind)


def label_of(kind: str) -> str:
    """The language's name of a node kind: `do!!` for seq, `dopar!!` for par..."""
    cls = _BY_NAME.get(kind)
    return cls.label if cls is not None and cls.label else kind


def roles_of(kind: str) -> tuple[str | None, ...]:
    """What the fixed children of a kind are called, by position (empty: not fixed)."""
    cls = _BY_NAME.get(kind)
    return cls.roles if cls is not None else ()


def is_branch(node: Any) -> bool:
    """True for nodes with children (every kind but a leaf)."""
    return not isinstance(node, Leaf)


def renumber(
    root: Node, first_id: int, each: Callable[[Node], Node] | None = None
) -> tuple[Node, list[tuple[int, ...]]]:
    """Copy a tree with fresh pre-order ids from `first_id`, without recursion.

    `each` (when given) rewrites every copied node, children first. Returns the copy and
    the path of each new node relative to the root, in id order (so the next free id is
    `first_id + len(paths)`).
    """
    next_id = first_id
    out: list[Node] = []
    paths: list[tuple[int, ...]] = []
    # frame: node, next child, assigned id, len(out) at entry, path
    stack: list[list[Any]] = [[root, 0, None, 0, ()]]
    while stack:
        frame = stack[-1]
        node = frame[0]
        if frame[2] is None:
            frame[2], frame[3] = next_id, len(out)
            next_id += 1
            paths.append(frame[4])
        if is_branch(node) and frame[1] < len(node.children):
            i = frame[1]
            frame[1] += 1
            stack.append([node.children[i], 0, None, 0, (*frame[4], i)])
            continue
        stack.pop()
        new: Node
        if is_branch(node):
            kids = out[frame[3] :]
            del out[frame[3] :]
            new = replace(node, id=frame[2], children=pvector(kids))
        else:
            new = replace(node, id=frame[2])
        out.append(new if each is None else each(new))
    return out[0], paths
