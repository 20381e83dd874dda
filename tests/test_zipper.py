"""The zipper's laws, on plain nested tuples and on job trees."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ablauf_lang.engine import zipper as z
from ablauf_lang.engine.job import OPS
from tests.builders import Do, L, Par_, job_of

# A plain tree: ("label", child, child...) tuples; leaves are ints.
TUPLES = z.Ops(
    lambda n: isinstance(n, tuple),
    lambda n: n[1:],
    lambda n, i, c: (*n[: i + 1], c, *n[i + 2 :]),
)
plain = st.recursive(
    st.integers(0, 9),
    lambda kids: st.lists(kids, max_size=3).map(lambda k: ("n", *k)),
    max_leaves=15,
)


def preorder(node: Any) -> list[Any]:
    out = [node]
    if isinstance(node, tuple):
        for c in node[1:]:
            out.extend(preorder(c))
    return out


@given(plain)
def test_next_walks_in_pre_order(tree: Any) -> None:
    loc = z.zipper(tree, TUPLES)
    seen = []
    while not z.is_end(loc):
        seen.append(loc.node)
        loc = z.next(loc)
    assert seen == preorder(tree)


@given(plain)
def test_up_down_is_identity(tree: Any) -> None:
    loc = z.zipper(tree, TUPLES)
    while not z.is_end(loc):
        child = z.down(loc)
        if child is not None:
            assert z.up(child) == loc
        loc = z.next(loc)


def test_edit_then_root_rebuilds_only_the_path() -> None:
    tree = ("n", ("n", 1, 2), ("n", 3))
    loc = z.down(z.down(z.zipper(tree, TUPLES), 0), 1)
    assert loc.node == 2
    new = z.root(z.edit(loc, lambda n: n * 10))
    assert new == ("n", ("n", 1, 20), ("n", 3))
    assert new[2] is tree[2]  # untouched sibling shared
    assert tree == ("n", ("n", 1, 2), ("n", 3))  # nothing mutated


def test_left_right_carry_edits() -> None:
    tree = ("n", 1, 2, 3)
    loc = z.down(z.zipper(tree, TUPLES), 0)
    loc = z.right(z.replace(loc, 10))
    loc = z.right(z.edit(loc, lambda n: n + 1))
    assert z.left(z.left(loc)).node == 10
    assert z.right(loc) is None
    assert z.left(z.down(z.zipper(tree, TUPLES))) is None
    assert z.root(loc) == ("n", 10, 3, 3)
    assert z.path_indices(loc) == (2,)


def test_job_tree_zipper_keeps_summaries() -> None:
    job = job_of(Do(Par_(L("a"), L("b")), L("c")))
    loc = z.down(z.down(z.zipper(job.root, OPS), 0), 1)
    from dataclasses import replace

    from ablauf_lang.engine.nodes import LeafState

    root = z.root(z.edit(loc, lambda leaf: replace(leaf, result=LeafState.FAILURE)))
    assert root.children[0].n_failed == 1
    assert root.n_failed == 1
    assert job.root.n_failed == 0
