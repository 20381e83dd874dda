"""A generic indexed zipper over immutable trees (after Huet, and Clojure's clojure.zip).

A location is a focused node plus the path back to the root. The path keeps, for each
level, the parent, the child index and whether the parent already changed; siblings stay
inside the parent (a persistent vector), so moving costs O(1) and going up rebuilds only
after an edit, through the tree's own `replace_child` (which may keep summaries current).

Generic over three functions, as clojure.zip is: `is_branch`, `children`, `replace_child`.
Every move returns a new location; nothing is mutated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple


class Ops(NamedTuple):
    """How to look inside a tree: the three functions the zipper is generic over."""

    is_branch: Callable[[Any], bool]
    children: Callable[[Any], Sequence[Any]]
    replace_child: Callable[[Any, int, Any], Any]


class Frame(NamedTuple):
    """One level of the path: the parent, our position in it, and the parent's changed flag."""

    parent: Any
    pos: int  # the child index (a NamedTuple field may not be called `index`)
    parent_changed: bool
    up: Frame | None


class Loc(NamedTuple):
    """A location: the focused node and the path to the root."""

    node: Any
    path: Frame | None
    changed: bool
    ops: Ops
    end: bool = False


# A location or frame built by `tuple.__new__` (the NamedTuple's own __new__ is a Python
# function around it: a third of a move's cost, and a restart makes about ten).
_make: Any = tuple.__new__


def zipper(root: Any, ops: Ops) -> Loc:
    """Return the location of `root`."""
    return Loc(root, None, False, ops)


def down(loc: Loc, index: int = 0) -> Loc | None:
    """Move to child `index` (the leftmost by default); None when there is no such child."""
    node = loc.node
    if not loc.ops.is_branch(node):
        return None
    kids = loc.ops.children(node)
    if not 0 <= index < len(kids):
        return None
    frame = _make(Frame, (node, index, loc.changed, loc.path))
    loc_: Loc = _make(Loc, (kids[index], frame, False, loc.ops, False))
    return loc_


def up(loc: Loc) -> Loc | None:
    """Move to the parent, rebuilding it if the focused node changed; None at the root."""
    frame = loc.path
    if frame is None:
        return None
    if loc.changed:
        parent = loc.ops.replace_child(frame.parent, frame.pos, loc.node)
        made: Loc = _make(Loc, (parent, frame.up, True, loc.ops, False))
        return made
    back: Loc = _make(Loc, (frame.parent, frame.up, frame.parent_changed, loc.ops, False))
    return back


def _sibling(loc: Loc, offset: int) -> Loc | None:
    frame = loc.path
    if frame is None:
        return None
    index = frame.pos + offset
    parent, parent_changed = frame.parent, frame.parent_changed
    if not 0 <= index < len(loc.ops.children(parent)):
        return None
    if loc.changed:
        # Put the edited node back into the parent before leaving it.
        parent = loc.ops.replace_child(parent, frame.pos, loc.node)
        parent_changed = True
    sibling = loc.ops.children(parent)[index]
    return Loc(sibling, Frame(parent, index, parent_changed, frame.up), False, loc.ops)


def left(loc: Loc) -> Loc | None:
    """Move to the left sibling; None at the leftmost."""
    return _sibling(loc, -1)


def right(loc: Loc) -> Loc | None:
    """Move to the right sibling; None at the rightmost."""
    return _sibling(loc, 1)


def replace(loc: Loc, node: Any) -> Loc:
    """Replace the focused node."""
    edited: Loc = _make(Loc, (node, loc.path, True, loc.ops, loc.end))
    return edited


def edit(loc: Loc, fn: Callable[..., Any], *args: Any) -> Loc:
    """Replace the focused node with `fn(node, *args)`."""
    return replace(loc, fn(loc.node, *args))


def root(loc: Loc) -> Any:
    """Zip all the way up and return the (possibly rebuilt) root node."""
    while loc.path is not None:
        parent = up(loc)
        assert parent is not None
        loc = parent
    return loc.node


def top(loc: Loc) -> Loc:
    """Zip all the way up and return the root location (keeping the changed flag)."""
    while loc.path is not None:
        parent = up(loc)
        assert parent is not None
        loc = parent
    return loc


def next(loc: Loc) -> Loc:
    """Move to the next location in a depth-first pre-order walk; `is_end` after the last."""
    if loc.end:
        return loc
    child = down(loc)
    if child is not None:
        return child
    here: Loc | None = loc
    while here is not None:
        sib = right(here)
        if sib is not None:
            return sib
        parent = up(here)
        if parent is None:
            return here._replace(end=True)
        here = parent
    raise AssertionError("unreachable")


def is_end(loc: Loc) -> bool:
    """True once `next` has walked past the last node."""
    return loc.end


def path_indices(loc: Loc) -> tuple[int, ...]:
    """Return the child indices from the root down to the focused node."""
    out: list[int] = []
    frame = loc.path
    while frame is not None:
        out.append(frame.pos)
        frame = frame.up
    return tuple(reversed(out))
