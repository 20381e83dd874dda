"""Engine side of run-time nodes: if!!/when!!, doseq!!, pmap!! and deferred payloads.

Payloads, tests and collections are run-time expressions (`code.Expr`) built by hand:
`(ctx :key)` or a `doseq!!`/`pmap!!` variable, so these tests exercise the reducer alone.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from pyrsistent import pvector

from ablauf_lang.code import Call, Expr, Var
from ablauf_lang.engine.job import Job, restart_job
from ablauf_lang.engine.kinds import Doseq, If, Pmap
from ablauf_lang.engine.nodes import LeafState, Status, failure, success
from ablauf_lang.engine.replay import prepare_replay
from ablauf_lang.errors import Span
from tests.builders import Do, L, Par_, Try_, by_name, drive, job_of, ran


def Ctx(key: str) -> Expr:
    """`(ctx :key)` at t.abl:3:7: an error when the context has no such key."""
    return Expr(Call("ctx", (key,), Span(3, 7)), "t.abl")


def Local(name: str, bindings: dict[str, Any] | None = None) -> Expr:
    """The `doseq!!`/`pmap!!` variable `name` (bound per copy by the engine)."""
    return Expr(Var(name, Span(3, 7)), "t.abl", bindings)


def IfN(test: Any, then: list[Any], other: list[Any] = ()) -> If:
    return If(-1, test, pvector([Do(*then), Do(*other)]))


def DoseqN(var: str, coll: Any, body: Any) -> Doseq:
    from tests.builders import number

    return Doseq(-1, var, coll, number(body))


def PmapN(var: str, coll: Any, body: Any) -> Pmap:
    from tests.builders import number

    return Pmap(-1, var, coll, number(body))


def states(job: Job) -> dict[str, str | None]:
    return {leaf.action: leaf.result and str(leaf.result) for leaf in job.leaves()}


# ---------------------------------------------------------------- deferred payloads


def test_payload_is_evaluated_when_dispatched_against_the_context_then() -> None:
    tree = Do(L("a", augment=((), ("who",))), L("b", Ctx("who")))
    job, seen = drive(job_of(tree), by_name({"a": "alice"}))
    assert seen[1].payload == "alice"
    assert isinstance(job.node(2).payload, Expr)  # the tree keeps the expression


def test_payload_that_fails_to_evaluate_fails_the_leaf_with_its_position() -> None:
    tree = Try_([L("b", Ctx("missing"))], [L("r")])
    job, seen = drive(job_of(tree), by_name({}))
    assert ran(seen) == ["r"]
    leaf = job.node(2)
    assert leaf.result is LeafState.FAILURE
    assert leaf.error == "t.abl:3:7: the context has no :missing (and no default was given)"
    assert seen[0].context["exec/last-error"] == leaf.error


# ---------------------------------------------------------------- if!! / when!!


def test_if_takes_then_and_skips_else() -> None:
    job, seen = drive(job_of(IfN(Ctx("go"), [L("yes")], [L("no")]), {"go": True}), by_name({}))
    assert ran(seen) == ["yes"]
    assert states(job) == {"yes": "success", "no": "skipped"}
    assert job.status is Status.SUCCESS


def test_if_takes_else_on_nil_and_false_only() -> None:
    for value, branch in [(None, "no"), (False, "no"), (0, "yes"), ("", "yes"), ([], "yes")]:
        _, seen = drive(job_of(IfN(Ctx("v"), [L("yes")], [L("no")]), {"v": value}), by_name({}))
        assert ran(seen) == [branch], value


def test_test_is_evaluated_when_reached_not_before() -> None:
    tree = Do(L("set", augment=((), ("flag",))), IfN(Ctx("flag"), [L("yes")], [L("no")]))
    _, seen = drive(job_of(tree, {"flag": False}), by_name({"set": True}))
    assert ran(seen) == ["set", "yes"]


def test_when_without_else_succeeds_when_false() -> None:
    job, seen = drive(job_of(Do(IfN(False, [L("x")]), L("after"))), by_name({}))
    assert ran(seen) == ["after"]
    assert job.status is Status.SUCCESS


def test_failing_test_fails_the_node_and_a_rescue_handles_it() -> None:
    tree = Try_([IfN(Ctx("nope"), [L("yes")])], [L("rescue")])
    job, seen = drive(job_of(tree), by_name({}))
    assert ran(seen) == ["rescue"]
    node = job.node(2)
    assert node.kind == "if"
    assert node.failed
    assert "the context has no :nope" in node.error
    assert job.status is Status.SUCCESS


def test_failing_branch_fails_the_if() -> None:
    job, _ = drive(job_of(IfN(True, [L("yes")])), by_name({"yes": RuntimeError("x")}))
    assert job.status is Status.FAILURE


# ---------------------------------------------------------------- doseq!! / pmap!!


def test_doseq_expands_one_body_per_element_in_sequence() -> None:
    tree = Do(L("first"), DoseqN("host", Ctx("hosts"), L("deploy", Local("host"))), L("last"))
    job = job_of(tree, {"hosts": ["a", "b", "c"]})
    largest = max(n.id for n in job.nodes())
    job, seen = drive(job, by_name({}))
    deploys = [d for d in seen if d.action == "deploy"]
    assert [d.payload for d in deploys] == ["a", "b", "c"]
    assert ran(seen) == ["first", "deploy", "deploy", "deploy", "last"]
    assert [d.id for d in deploys] == [largest + 1, largest + 2, largest + 3]
    assert job.status is Status.SUCCESS


def test_doseq_stops_at_the_first_failing_copy() -> None:
    def outcome(d: Any) -> Any:
        return failure(d, "down") if d.payload == 2 else success(d, d.payload)

    job, seen = drive(job_of(DoseqN("x", [1, 2, 3], L("step", Local("x")))), outcome)
    assert [d.payload for d in seen] == [1, 2]
    assert job.status is Status.FAILURE


def test_pmap_runs_all_copies_at_once() -> None:
    job, dispatches = restart_job(
        job_of(PmapN("x", [1, 2, 3], Do(L("a", Local("x")), L("b", Local("x")))))
    )
    assert [(d.action, d.payload) for d in dispatches] == [("a", 1), ("a", 2), ("a", 3)]
    job, more = restart_job(job, [success(d, 0) for d in dispatches])
    assert [(d.action, d.payload) for d in more] == [("b", 1), ("b", 2), ("b", 3)]


def test_empty_collection_is_done_at_once() -> None:
    job, seen = drive(job_of(Do(DoseqN("x", [], L("never")), L("after"))), by_name({}))
    assert ran(seen) == ["after"]
    assert job.status is Status.SUCCESS


def test_collection_that_is_not_a_sequence_fails_the_node() -> None:
    job, _ = drive(job_of(DoseqN("x", Ctx("m"), L("a")), {"m": {"k": 1}}), by_name({}))
    assert job.status is Status.FAILURE
    assert "needs a sequence" in job.node(0).error


def test_nested_expansion_binds_both_variables() -> None:
    inner = DoseqN("y", [10, 20], L("pair", Local("y")))
    tree = DoseqN("x", Ctx("xs"), Do(L("outer", Local("x")), inner))
    job, seen = drive(job_of(tree, {"xs": [1, 2]}), by_name({}))
    assert [(d.action, d.payload) for d in seen] == [
        ("outer", 1),
        ("pair", 10),
        ("pair", 20),
        ("outer", 2),
        ("pair", 10),
        ("pair", 20),
    ]
    ids = [n.id for n in job.nodes()]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == list(range(len(ids)))


def test_expansion_survives_json_and_replay() -> None:
    tree = PmapN("x", Ctx("xs"), L("work", Local("x"), idempotent=True))
    job, dispatches = restart_job(job_of(tree, {"xs": [1, 2]}))
    job, _ = restart_job(job, [success(dispatches[0], "one")])
    again = Job.from_json(job.to_json())
    assert again == job
    assert again.node(dispatches[1].id).payload == Local("x", {"x": 2})
    job, [redo] = restart_job(prepare_replay(again))
    assert (redo.id, redo.payload, redo.attempt) == (dispatches[1].id, 2, 2)


def test_restart_touches_the_expanded_nodes() -> None:
    job, _ = restart_job(job_of(PmapN("x", [1, 2], L("w", Local("x")))))
    assert job.touched == {0, 1, 2}


@given(st.lists(st.integers(0, 3), max_size=4), st.booleans())
def test_expansion_keeps_ids_unique_and_paths_right(sizes: list[int], parallel: bool) -> None:
    make = PmapN if parallel else DoseqN
    tree = Par_(*[make("x", list(range(n)), Do(L("a", Local("x")), L("b"))) for n in sizes])
    job, _ = drive(job_of(tree), by_name({}))
    ids = [n.id for n in job.nodes()]
    assert len(ids) == len(set(ids)) == len(job.paths)
    for node in job.nodes():
        assert job.node(node.id) is node
    assert Job.from_json(job.to_json()) == job


def test_branches_that_never_ran_are_shown_skipped() -> None:
    import ablauf_lang
    from ablauf_lang.engine.states import states

    run = ablauf_lang.eval(
        "(do!! (try!! (log!! 1) (rescue!! (log!! 2))) (if!! false (log!! 3))"
        " (try!! (log!! 4)) (try!! (fail!! 5) (rescue!! (log!! 6))))"
    )
    shown = states(run.job.root)
    kinds = {n.id: (n.kind, n.action) for n in run.job.nodes()}
    by_state = {i: s for i, s in shown.items()}
    assert len(shown) == len(kinds)
    # the rescue not taken, and the then-branch of a false test, with their leaves
    assert [by_state[i] for i in (4, 5, 8, 9)] == ["skipped"] * 4
    assert by_state[14] == "skipped"  # an empty rescue after a body that succeeded
    assert by_state[3] == "success"
    assert by_state[0] == "success"
    rescued = [i for i, (k, a) in kinds.items() if a == "action/log" and i > 16]
    assert all(by_state[i] == "success" for i in rescued)
