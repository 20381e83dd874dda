"""Every execution rule of SPEC section 4, each as its own test, on hand-built trees."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from ablauf_lang.engine.job import INTERRUPTED, LAST_ERROR, Job, make_job, restart_job
from ablauf_lang.engine.kinds import renumber
from ablauf_lang.engine.kinds.base import rebuild
from ablauf_lang.engine.nodes import LeafState, Result, Status, failure, success, timeout
from ablauf_lang.engine.replay import abort, prepare_replay
from ablauf_lang.errors import AblaufError, InvariantError, JobError
from tests.builders import Do, L, Par_, Try_, by_name, drive, job_of, ran

BOOM = RuntimeError("boom")


def leaf_states(job: Job) -> dict[str, str | None]:
    return {leaf.action: leaf.result and str(leaf.result) for leaf in job.leaves()}


# ---------------------------------------------------------------- sequence


def test_sequence_starts_only_its_first_child() -> None:
    job, dispatches = restart_job(job_of(Do(L("a"), L("b"), L("c"))))
    assert ran(dispatches) == ["a"]
    assert job.status is Status.PENDING


def test_sequence_starts_next_child_after_success() -> None:
    job, [d] = restart_job(job_of(Do(L("a"), L("b"))))
    job, dispatches = restart_job(job, [success(d, 1)])
    assert ran(dispatches) == ["b"]


def test_failing_first_step_of_do_stops_the_rest() -> None:
    job, seen = drive(job_of(Do(L("a"), L("b"), L("c"))), by_name({"a": BOOM}))
    assert ran(seen) == ["a"]
    assert job.status is Status.FAILURE
    assert leaf_states(job) == {"a": "failure", "b": None, "c": None}


def test_sequence_succeeds_when_all_children_succeed() -> None:
    job, seen = drive(job_of(Do(L("a"), L("b"))), by_name({}))
    assert ran(seen) == ["a", "b"]
    assert job.status is Status.SUCCESS


def test_empty_sequence_is_done_at_once() -> None:
    job, dispatches = restart_job(job_of(Do()))
    assert dispatches == []
    assert job.status is Status.SUCCESS


def test_sequence_waits_for_in_flight_work_before_it_is_done() -> None:
    # (do!! (dopar!! a b) c): a fails while b is in flight: not done until b is back.
    job, [da, db] = restart_job(job_of(Do(Par_(L("a"), L("b")), L("c"))))
    job, more = restart_job(job, [failure(da, "x")])
    assert more == []
    assert job.status is Status.PENDING
    job, more = restart_job(job, [success(db, 2)])
    assert more == []
    assert job.status is Status.FAILURE
    assert leaf_states(job)["b"] == "success"


# ---------------------------------------------------------------- parallel


def test_parallel_starts_all_children_together() -> None:
    _, dispatches = restart_job(job_of(Par_(L("a"), Do(L("b"), L("c")), L("d"))))
    assert ran(dispatches) == ["a", "b", "d"]


def test_dopar_with_one_failing_branch_lets_the_others_finish() -> None:
    job, [da, db, dc] = restart_job(job_of(Par_(L("a"), L("b"), L("c"))))
    job, more = restart_job(job, [failure(db, "x")])
    assert more == []
    assert job.status is Status.PENDING
    job, _ = restart_job(job, [success(da, 1), success(dc, 3)])
    assert job.status is Status.FAILURE
    assert leaf_states(job) == {"a": "success", "b": "failure", "c": "success"}
    assert job.node(da.id).output == 1


def test_failed_parallel_starts_nothing_new_in_sibling_branches() -> None:
    # b1 is in flight when a fails: b1's result is recorded, b2 never starts.
    job, [da, db1] = restart_job(job_of(Par_(L("a"), Do(L("b1"), L("b2")))))
    job, _ = restart_job(job, [failure(da, "x")])
    job, more = restart_job(job, [success(db1, "ok")])
    assert more == []
    assert job.status is Status.FAILURE
    assert leaf_states(job) == {"a": "failure", "b1": "success", "b2": None}


def test_parallel_rule_holds_at_every_depth() -> None:
    # The same rule inside a nested dopar!! that is not the root.
    tree = Do(L("first"), Par_(L("a"), Do(L("b1"), L("b2"))), L("after"))
    job, [d] = restart_job(job_of(tree))
    job, [da, db1] = restart_job(job, [success(d, 0)])
    job, _ = restart_job(job, [failure(da, "x")])
    job, more = restart_job(job, [success(db1, 1)])
    assert more == []
    assert job.status is Status.FAILURE
    assert leaf_states(job)["b2"] is None
    assert leaf_states(job)["after"] is None


def test_results_arriving_together_with_a_failure_start_nothing_in_the_failed_parallel() -> None:
    # Order within one restart must not matter: the failure wins over the success.
    job, [da, db1] = restart_job(job_of(Par_(L("a"), Do(L("b1"), L("b2")))))
    for order in ([success(db1, 1), failure(da, "x")], [failure(da, "x"), success(db1, 1)]):
        done, more = restart_job(job, order)
        assert more == []
        assert done.status is Status.FAILURE


def test_empty_parallel_is_done_at_once() -> None:
    job, dispatches = restart_job(job_of(Par_()))
    assert dispatches == []
    assert job.status is Status.SUCCESS


# ---------------------------------------------------------------- try / rescue / finally

OUTCOMES = {"ok": "ok", "fail": BOOM}


def _try_case(body: str, rescue: str | None, fin: str | None) -> tuple[Job, list[str]]:
    tree = Try_(
        [L("body", idempotent=False)],
        [] if rescue is None else [L("rescue")],
        [] if fin is None else [L("finally")],
    )
    outcomes = {"body": OUTCOMES[body]}
    if rescue is not None:
        outcomes["rescue"] = OUTCOMES[rescue]
    if fin is not None:
        outcomes["finally"] = OUTCOMES[fin]
    job, seen = drive(job_of(tree), by_name(outcomes))
    return job, ran(seen)


def _expected(body: str, rescue: str | None, fin: str | None) -> tuple[Status, list[str]]:
    runs = ["body"]
    body_failed = body == "fail"
    if body_failed and rescue is not None:
        runs.append("rescue")
    if fin is not None:
        runs.append("finally")
    failed = (body_failed and (rescue is None or rescue == "fail")) or fin == "fail"
    return (Status.FAILURE if failed else Status.SUCCESS), runs


@pytest.mark.parametrize("body", ["ok", "fail"])
@pytest.mark.parametrize("rescue", [None, "ok", "fail"])
@pytest.mark.parametrize("fin", [None, "ok", "fail"])
def test_try_every_combination(body: str, rescue: str | None, fin: str | None) -> None:
    job, runs = _try_case(body, rescue, fin)
    status, expected_runs = _expected(body, rescue, fin)
    assert job.status is status
    assert runs == expected_runs


def test_rescue_not_taken_is_marked_skipped() -> None:
    job, _ = drive(job_of(Try_([L("body")], [L("r1"), L("r2")])), by_name({}))
    assert leaf_states(job) == {"body": "success", "r1": "skipped", "r2": "skipped"}
    assert job.node(2).result is LeafState.SUCCESS  # the rescue branch counts as done


def test_rescue_and_finally_see_the_last_error() -> None:
    tree = Try_([L("body")], [L("rescue")], [L("finally")])
    job, seen = drive(job_of(tree), by_name({"body": RuntimeError("disk full")}))
    rescue, fin = seen[1], seen[2]
    assert rescue.context[LAST_ERROR] == "disk full"
    assert fin.context[LAST_ERROR] == "disk full"
    assert job.context[LAST_ERROR] == "disk full"


def test_try_waits_for_the_whole_body_before_rescue() -> None:
    job, [da, db] = restart_job(job_of(Try_([Par_(L("a"), L("b"))], [L("r")])))
    job, more = restart_job(job, [failure(da, "x")])
    assert more == []
    job, more = restart_job(job, [success(db, 1)])
    assert ran(more) == ["r"]


def test_finally_runs_after_rescue_failed_and_try_fails() -> None:
    job, seen = drive(
        job_of(Do(Try_([L("b")], [L("r")], [L("f")]), L("next"))), by_name({"b": BOOM, "r": BOOM})
    )
    assert ran(seen) == ["b", "r", "f"]
    assert job.status is Status.FAILURE


def test_rescued_try_lets_the_sequence_go_on() -> None:
    job, seen = drive(job_of(Do(Try_([L("b")], [L("r")]), L("next"))), by_name({"b": BOOM}))
    assert ran(seen) == ["b", "r", "next"]
    assert job.status is Status.SUCCESS


# ---------------------------------------------------------------- context


def test_context_after_a_chain_of_augments() -> None:
    tree = Do(
        L("repo", {"url": "git@x", "id": 7}, augment=(("url",), ("repo",))),
        L("ci", {"job": {"id": 42}}, augment=(("job", "id"), ("ci", "job-id"))),
        L("whole", [1, 2], augment=((), ("all", "of", "it"))),
        L("check"),
    )
    job, seen = drive(job_of(tree, {"start": True}), by_name({}))
    assert job.context == {
        "start": True,
        "repo": "git@x",
        "ci": {"job-id": 42},
        "all": {"of": {"it": [1, 2]}},
    }
    # Each dispatch carries the context as it was when dispatched.
    assert seen[1].context == {"start": True, "repo": "git@x"}
    assert "ci" not in seen[1].context


def test_augment_path_missing_in_output_gives_nil() -> None:
    job, _ = drive(job_of(L("a", {"x": 1}, augment=(("nope", "deeper"), ("dst",)))), by_name({}))
    assert job.context == {"dst": None}


def test_augment_does_not_apply_on_failure() -> None:
    job, _ = drive(job_of(L("a", augment=((), ("dst",)))), by_name({"a": BOOM}))
    assert "dst" not in job.context
    assert job.context[LAST_ERROR] == "boom"


def test_initial_context_is_not_mutated() -> None:
    ctx = {"a": {"b": 1}}
    job, _ = drive(job_of(L("x", 5, augment=((), ("a", "c"))), ctx), by_name({}))
    assert ctx == {"a": {"b": 1}}
    assert job.context == {"a": {"b": 1, "c": 5}}


# ---------------------------------------------------------------- results


def test_duplicate_result_is_ignored() -> None:
    job, [d] = restart_job(job_of(Do(L("a"), L("b"))))
    job, [db] = restart_job(job, [success(d, 1)])
    again, more = restart_job(job, [success(d, 999)])
    assert more == []
    assert again.node(d.id).output == 1
    assert again.node(db.id).result is LeafState.PENDING


def test_stale_attempt_is_ignored() -> None:
    job, [d] = restart_job(job_of(L("a", idempotent=True)))
    job = prepare_replay(job)
    job, [d2] = restart_job(job)
    assert d2.attempt == d.attempt + 1
    job, _ = restart_job(job, [success(d, "old")])
    assert job.node(d.id).result is LeafState.PENDING
    job, _ = restart_job(job, [success(d2, "new")])
    assert job.node(d.id).output == "new"
    assert job.status is Status.SUCCESS


def test_same_result_twice_in_one_restart_is_applied_once() -> None:
    job, [d] = restart_job(job_of(Do(L("a"), L("b"))))
    job, more = restart_job(job, [success(d, 1), success(d, 2)])
    assert ran(more) == ["b"]
    assert job.node(d.id).output == 1


def test_result_for_unknown_node_is_an_error() -> None:
    job, _ = restart_job(job_of(L("a")))
    with pytest.raises(JobError, match="unknown node id 99"):
        restart_job(job, [success(99, 1)])


def test_result_for_a_branch_is_an_error() -> None:
    job, _ = restart_job(job_of(Do(L("a"))))
    with pytest.raises(JobError, match="not an action"):
        restart_job(job, [success(0, 1)])


def test_timeout_is_a_failure_kind() -> None:
    job, [d] = restart_job(job_of(Try_([L("a")], [L("r")])))
    job, more = restart_job(job, [timeout(d)])
    assert job.node(d.id).result is LeafState.TIMEOUT
    assert ran(more) == ["r"]


def test_result_records_times_and_attempt() -> None:
    job, [d] = restart_job(job_of(L("a")), now=100.0)
    job, _ = restart_job(job, [success(d, 1, finished_at=101.5)], now=102.0)
    leaf = job.node(0)
    assert (leaf.dispatched_at, leaf.finished_at, leaf.attempt) == (100.0, 101.5, 1)


def test_restart_on_a_done_job_does_nothing() -> None:
    job, _ = drive(job_of(Do(L("a"))), by_name({}))
    again, more = restart_job(job)
    assert more == []
    assert again.status is Status.SUCCESS


def test_root_can_be_a_single_leaf() -> None:
    job, seen = drive(job_of(L("solo", 3)), by_name({}))
    assert ran(seen) == ["solo"]
    assert job.status is Status.SUCCESS
    assert job.node(0).output == 3


# ---------------------------------------------------------------- abort and replay


def test_abort_fails_pending_leaves_and_stops_the_run() -> None:
    job, [da, db] = restart_job(job_of(Try_([Par_(L("a"), L("b"))], [L("r")], [L("f")])))
    job = abort(job, "operator said stop")
    assert job.node(da.id).error == "operator said stop"
    assert job.node(db.id).result is LeafState.FAILURE
    job, more = restart_job(job)
    assert more == []
    assert job.done
    assert job.status is Status.FAILURE
    assert job.aborted == "operator said stop"


def test_prepare_replay_reruns_idempotent_pending_leaves() -> None:
    job, [ds, dd] = restart_job(job_of(Par_(L("safe", idempotent=True), L("done"))))
    job, _ = restart_job(job, [success(dd, 1)])
    job = prepare_replay(job)
    assert job.node(ds.id).result is None
    assert not job.done  # handed back: the next restart dispatches it
    assert job.node(dd.id).output == 1  # finished work is kept
    job, more = restart_job(job)
    assert ran(more) == ["safe"]
    assert more[0].attempt == 2
    job, _ = restart_job(job, [success(more[0], 1)])
    assert job.status is Status.SUCCESS


def test_prepare_replay_fails_pending_non_idempotent_leaves() -> None:
    # The interrupted leaf fails, so its dopar!! fails; the idempotent sibling was in flight
    # too: it runs again and ends in a recorded state (a leaf in flight is never left unset).
    job, [ds, du] = restart_job(job_of(Par_(L("safe", idempotent=True), L("unsafe"))))
    job = prepare_replay(job)
    unsafe = job.node(du.id)
    assert unsafe.result is LeafState.FAILURE
    assert unsafe.error.startswith(INTERRUPTED)
    assert job.context == {LAST_ERROR: unsafe.error}  # a rescue would see why
    job, more = restart_job(job)
    assert ran(more) == ["safe"]
    job, more = restart_job(job, [success(more[0], "ok")])
    assert more == []
    assert job.node(ds.id).output == "ok"
    assert job.status is Status.FAILURE


def test_resume_lets_a_rescue_handle_an_interrupted_leaf() -> None:
    job, [_d] = restart_job(job_of(Try_([L("unsafe")], [L("r")])))
    job, seen = drive(prepare_replay(job), by_name({}))
    assert ran(seen) == ["r"]
    assert job.status is Status.SUCCESS


def test_resume_keeps_recorded_failures() -> None:
    calls = {"n": 0}

    def flaky(d):  # fails the first time only
        calls["n"] += 1
        return failure(d, "flaky") if calls["n"] == 1 else success(d, "ok")

    job, _ = drive(job_of(Do(L("a", idempotent=True), L("b"))), flaky)
    assert job.status is Status.FAILURE
    again = prepare_replay(job)
    assert again.done
    assert again.status is Status.FAILURE
    assert restart_job(again)[1] == []


def test_retry_reruns_failed_leaves_of_a_finished_run() -> None:
    calls = {"n": 0}

    def flaky(d):  # fails the first time only
        calls["n"] += 1
        return failure(d, "flaky") if calls["n"] == 1 else success(d, "ok")

    job, _ = drive(job_of(Do(L("a"), L("b"))), flaky)
    assert job.status is Status.FAILURE
    assert LAST_ERROR in job.context
    job, seen = drive(prepare_replay(job, retry_interrupted=True), flaky)
    assert ran(seen) == ["a", "b"]
    assert job.status is Status.SUCCESS
    assert LAST_ERROR not in job.context


def test_retry_of_unhandled_body_failure_runs_body_again() -> None:
    tree = Try_([L("b", idempotent=True)], [], [L("f")])
    job, _ = drive(job_of(tree), by_name({"b": BOOM}))
    assert job.status is Status.FAILURE
    job, seen = drive(prepare_replay(job, retry_interrupted=True), by_name({}))
    assert ran(seen) == ["b"]  # finally already ran: it is not run twice
    assert job.status is Status.SUCCESS


def test_retry_never_reruns_a_handled_failure() -> None:
    tree = Do(Try_([L("b")], [L("r")]), L("c"))
    job, _ = drive(job_of(tree), by_name({"b": BOOM, "c": BOOM}))
    assert job.status is Status.FAILURE
    job, seen = drive(prepare_replay(job, retry_interrupted=True), by_name({}))
    assert ran(seen) == ["c"]
    assert job.status is Status.SUCCESS


def test_retry_lets_the_siblings_of_a_failed_dopar_start() -> None:
    tree = Par_(L("a"), Do(L("b"), L("c")))
    job, [da, db] = restart_job(job_of(tree))
    job, more = restart_job(job, [failure(da, "x"), success(db, 1)])
    assert more == []
    assert job.status is Status.FAILURE
    job, seen = drive(prepare_replay(job, retry_interrupted=True), by_name({}))
    assert sorted(ran(seen)) == ["a", "c"]
    assert job.status is Status.SUCCESS


def test_resume_keeps_an_abort_and_retry_clears_it() -> None:
    job, _ = restart_job(job_of(Do(L("a", idempotent=True), L("b"))))
    aborted = abort(job)
    assert prepare_replay(aborted).aborted is not None
    job = prepare_replay(aborted, retry_interrupted=True)
    assert job.aborted is None
    job, _seen = drive(job, by_name({}))
    assert job.status is Status.SUCCESS


# ---------------------------------------------------------------- purity, access, depth


def test_restart_never_mutates_its_input() -> None:
    job, [da, db] = restart_job(job_of(Par_(L("a", augment=((), ("x",))), L("b"))))
    before = job.to_json()
    restart_job(job, [success(da, 1), failure(db, "e")])
    assert job.to_json() == before


def test_nodes_are_pre_order_and_node_finds_by_id() -> None:
    job = job_of(Try_([Par_(L("a1"), L("a2")), L("b1")], [L("r1")], [L("f1")]))
    assert [n.id for n in job.nodes()] == list(range(10))
    assert [n.kind for n in job.nodes()] == [
        "try",
        "seq",
        "par",
        "leaf",
        "leaf",
        "leaf",
        "seq",
        "leaf",
        "seq",
        "leaf",
    ]
    assert job.node(7).action == "r1"
    with pytest.raises(JobError):
        job.node(10)


def test_spec_example_first_restart_dispatches_leaves_3_and_4() -> None:
    job = job_of(
        Try_([Par_(L("record"), L("action/log")), L("record")], [L("record")], [L("record")])
    )
    _, dispatches = restart_job(job)
    assert [d.id for d in dispatches] == [3, 4]


def _deep(depth: int):
    tree = L("bottom")
    for i in range(depth):
        tree = Do(L(f"x{i}"), tree) if i % 2 else Try_([tree], [L("r")])
    return tree


def test_deep_nesting_never_hits_the_recursion_limit() -> None:
    # builders.number recurses; build the ids with a raised limit, the engine must not need it.
    import sys

    from tests.builders import number

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        tree = number(_deep(700))
    finally:
        sys.setrecursionlimit(old)
    from ablauf_lang.engine.job import make_job

    job, _seen = drive(make_job(tree), by_name({}))
    assert job.status is Status.SUCCESS
    assert Job.from_json(job.to_json()) == job
    assert sum(1 for _ in job.nodes()) > 1_400


# ---------------------------------------------------------------- the reducer's boundary


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (Result(1, 1, LeafState.SKIPPED), "a result is success, failure or timeout"),
        (Result(1, 1, LeafState.PENDING), "a result is success, failure or timeout"),
        (Result(1, 1, "success"), "a result is success, failure or timeout"),  # type: ignore[arg-type]
        (Result(True, 1, LeafState.SUCCESS), "unknown node id True"),  # type: ignore[arg-type]
        (Result(1.0, 1, LeafState.SUCCESS), "unknown node id 1.0"),  # type: ignore[arg-type]
        (Result(-1, 1, LeafState.SUCCESS), "unknown node id -1"),
        (Result(1, 0, LeafState.SUCCESS), "bad attempt 0"),
        (Result(1, True, LeafState.SUCCESS), "bad attempt True"),  # type: ignore[arg-type]
        ("success", "not a result"),
    ],
)
def test_restart_refuses_what_is_not_a_result(result: Any, message: str) -> None:
    job, _ = restart_job(job_of(Do(L("a"), L("b"))))
    before = job.to_json()
    with pytest.raises(JobError, match=message):
        restart_job(job, [result])
    assert job.to_json() == before


def test_a_stuck_restart_is_refused_with_one_clear_error() -> None:
    # A job whose only pending leaf was made unset by hand, with nothing to look at: the
    # engine would strand it, so restart_job refuses instead of returning it.
    job, [_d] = restart_job(job_of(Do(L("a"))))
    broken = replace(job, root=replace(job.root, children=job.root.children.set(0, L("a"))))
    broken = Job(rebuild(broken.root, lambda leaf: replace(leaf, id=1)), {}, job.paths)
    with pytest.raises(InvariantError, match="stuck"):
        restart_job(broken)
    assert isinstance(InvariantError("x"), AblaufError)


def test_jobs_compare_without_serialising_their_values() -> None:
    class Opaque:  # not JSON: equality must still answer
        def __eq__(self, other: object) -> bool:
            return isinstance(other, Opaque)

        __hash__ = None  # type: ignore[assignment]

    job, [d] = restart_job(job_of(Do(L("a"), L("b"))))
    a, _ = restart_job(job, [success(d, Opaque())])
    b, _ = restart_job(job, [success(d, Opaque())])
    c, _ = restart_job(job, [success(d, 1)])
    assert a == b
    assert a != c
    deep = L("x")
    for _ in range(5000):
        deep = Do(deep)
    numbered, _ = renumber(deep, 0)  # iterative: tests.builders.number recurses
    assert make_job(numbered) == make_job(numbered)


def test_a_jobs_repr_is_a_summary_whatever_its_size() -> None:
    # asyncio reprs a finished task's result (the job) when signal handlers are swapped:
    # the dataclass's repr printed the whole tree, 11 us a step of a 5,000-step run.
    from ablauf_lang import api

    source = "(do!! " + " ".join(f"(log!! {i})" for i in range(5000)) + ")"
    job = api.make_job(source)
    text = repr(job)
    assert text == "<Job pending restarts=0 nodes=5001 root=seq#0>"
    assert len(repr(api.make_job("(log!! 1)"))) < 80
