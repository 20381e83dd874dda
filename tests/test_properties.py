"""Property tests over random trees, random outcomes and random arrival order of results."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ablauf_lang.engine.job import Job, make_job, restart_job
from ablauf_lang.engine.kinds import Leaf, Node, Par, Seq, Try
from ablauf_lang.engine.nodes import LeafState, Status, failure, success
from ablauf_lang.engine.replay import prepare_replay
from tests.builders import Do, L, Par_, Try_, number

# ---------------------------------------------------------------- strategies

leaves = st.builds(lambda idem: L("act", idempotent=idem), st.booleans())


def _branches(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    kids = st.lists(children, max_size=4)
    return st.one_of(
        kids.map(lambda k: Do(*k)),
        kids.map(lambda k: Par_(*k)),
        st.tuples(kids, st.lists(children, max_size=2), st.lists(children, max_size=2)).map(
            lambda t: Try_(*t)
        ),
    )


trees = st.recursive(leaves, _branches, max_leaves=25).map(number)


# ---------------------------------------------------------------- reference evaluator


def reference_ok(node: Node, fails: set[int]) -> bool:
    """Does `node` succeed when exactly the leaves in `fails` fail? (the obvious recursion)"""
    if isinstance(node, Leaf):
        return node.id not in fails
    if isinstance(node, Seq | Par):
        # A sequence stops at its first failing child; a parallel fails if any child fails.
        return all(reference_ok(c, fails) for c in node.children)
    assert isinstance(node, Try)
    body, rescue, fin = node.children
    body_ok = reference_ok(body, fails)
    rescued = body_ok or (len(rescue.children) > 0 and reference_ok(rescue, fails))
    return rescued and reference_ok(fin, fails)


# ---------------------------------------------------------------- the driver under test


def run_randomly(
    tree: Node, data: st.DataObject, fails: set[int], *, crash: bool = False
) -> tuple[Job, list[int]]:
    """Drive a job, delivering random subsets of in-flight results (duplicates included)."""
    job = make_job(tree)
    job, dispatches = restart_job(job)
    inflight = {d.id: d for d in dispatches}
    started = [d.id for d in dispatches]
    delivered: list[Any] = []
    crashes = 3 if crash else 0
    for _step in range(500):
        check_invariants(job, tree)
        if not inflight:
            break
        if crashes and data.draw(st.booleans(), label="crash?"):
            crashes -= 1
            # A crash: in-flight work is lost; prepare_replay reruns what is safe to rerun.
            job = prepare_replay(Job.from_json(job.to_json()))
            inflight = {}
            job, dispatches = restart_job(job)
        else:
            ids = sorted(inflight)
            chosen = data.draw(
                st.lists(st.sampled_from(ids), min_size=1, unique=True), label="arrive"
            )
            results = [
                failure(inflight[i], "x") if i in fails else success(inflight[i], i) for i in chosen
            ]
            if delivered and data.draw(st.booleans(), label="dup"):
                results.append(data.draw(st.sampled_from(delivered), label="which dup"))
            delivered.extend(results)
            for i in chosen:
                del inflight[i]
            before = job.to_json()
            job, dispatches = restart_job(job, results)
            assert Job.from_json(before).to_json() == before  # restart is pure
        for d in dispatches:
            assert d.id not in inflight
            inflight[d.id] = d
            started.append(d.id)
        assert Job.from_json(job.to_json()) == job  # JSON round trip at every step
    else:
        raise AssertionError("run did not terminate")
    return job, started


def check_invariants(job: Job, tree: Node) -> None:
    """Sequences keep their order; a rescue runs only after its body failed."""
    for node in job.nodes():
        if isinstance(node, Try):
            body, rescue, _ = node.children
            if not _untouched(rescue):
                assert body.done, f"try {node.id} ran its rescue before its body was done"
                assert body.failed, f"try {node.id} ran its rescue after its body succeeded"
        if isinstance(node, Seq):
            blocked = False
            for child in node.children:
                if blocked:
                    assert _untouched(child), f"seq {node.id} started a child too early"
                if not (child.done and not child.failed):
                    blocked = True


def _untouched(node: Node) -> bool:
    if isinstance(node, Leaf):
        return node.result in (None, LeafState.SKIPPED)
    return all(_untouched(c) for c in node.children)


# ---------------------------------------------------------------- properties


@given(trees, st.data())
def test_random_runs_terminate_and_match_the_reference(tree: Node, data: st.DataObject) -> None:
    leaf_ids = [n.id for n in make_job(tree).leaves()]
    fails = (
        set(data.draw(st.lists(st.sampled_from(leaf_ids), unique=True), label="fails"))
        if leaf_ids
        else set()
    )
    job, started = run_randomly(tree, data, fails)
    assert job.done
    assert len(started) == len(set(started)), "a leaf ran twice"
    expected = Status.SUCCESS if reference_ok(tree, fails) else Status.FAILURE
    assert job.status is expected
    assert job.inflight == 0


@given(trees, st.data())
def test_crashes_and_replays_still_finish(tree: Node, data: st.DataObject) -> None:
    # All leaves idempotent and succeeding: any number of crashes still ends in success.
    job, _ = run_randomly(_all_idempotent(tree), data, set(), crash=True)
    assert job.done
    assert job.status is Status.SUCCESS
    assert all(leaf.result in (LeafState.SUCCESS, LeafState.SKIPPED) for leaf in job.leaves())


def _all_idempotent(tree: Node) -> Node:
    from ablauf_lang.engine.kinds.base import rebuild

    return rebuild(tree, lambda leaf: leaf.__class__(leaf.id, leaf.action, leaf.payload, True))


@given(trees)
def test_paths_find_every_node(tree: Node) -> None:
    job = make_job(tree)
    for node in job.nodes():
        assert job.node(node.id) is node


def test_reference_agrees_on_a_known_case() -> None:
    tree = number(Try_([L("a")], [L("r")], [L("f")]))
    # ids: try 0, body 1, a 2, rescue 3, r 4, finally 5, f 6
    assert reference_ok(tree, {2})  # the body fails, the rescue saves it
    assert not reference_ok(tree, {2, 4})  # and the rescue fails too
    assert not reference_ok(tree, {6})  # finally fails
