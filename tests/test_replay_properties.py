"""Resume and retry over random programs, random result schedules and random crashes.

The properties of the recovery semantics (docs/persistence.md, "Resume and retry"):

- never stuck: after every restart a job is done or has something in flight;
- every run ends;
- a non-idempotent leaf is never dispatched twice unless a person asked for a retry;
- a recorded success never changes, and a failure a rescue handled never runs again;
- a leaf that was in flight at a crash always ends in a recorded terminal state;
- `success` only when every leaf on the path taken succeeded or was skipped.

Programs are source text with idempotent and non-idempotent actions, `do!!`, `dopar!!`,
`try!!` with rescue and finally, `std/retry`'s `with-retries`, `if!!` and `pmap!!`, so
the compiler's lowering is part of what is checked.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ablauf_lang.api import compile as compile_source
from ablauf_lang.engine.job import Job, make_job, restart_job
from ablauf_lang.engine.kinds import Expansion, If, Leaf, Node, Par, Seq, Try
from ablauf_lang.engine.nodes import Dispatch, LeafState, Status, failure, success
from ablauf_lang.engine.replay import can_retry, failure_causes, prepare_replay

# ---------------------------------------------------------------- programs


def _leaf(draw_id: int, idempotent: bool) -> str:
    head = "idempotent-action!!" if idempotent else "action!!"
    return f"({head} :t/act {draw_id})"


_leaves = st.builds(_leaf, st.integers(0, 99), st.booleans())


def _branches(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    many = st.lists(children, min_size=1, max_size=3).map(" ".join)
    maybe = st.none() | many
    return st.one_of(
        many.map(lambda body: f"(do!! {body})"),
        many.map(lambda body: f"(dopar!! {body})"),
        st.tuples(many, maybe, maybe).map(
            lambda p: "(try!! {}{}{})".format(
                p[0],
                "" if p[1] is None else f" (rescue!! {p[1]})",
                "" if p[2] is None else f" (finally!! {p[2]})",
            )
        ),
        st.tuples(st.integers(2, 3), children).map(lambda p: f"(with-retries {p[0]} {p[1]})"),
        st.tuples(children, st.none() | children).map(
            lambda p: f"(if!! (ctx :flag) {p[0]}{'' if p[1] is None else ' ' + p[1]})"
        ),
        st.tuples(st.booleans(), children).map(
            lambda p: f"(pmap!! [x (ctx :xs)] (do!! {_leaf(7, p[0])} {p[1]}))"
        ),
    )


programs = st.recursive(_leaves, _branches, max_leaves=12).map(
    lambda body: f'(import "std/retry")\n{body}'
)
contexts = st.fixed_dictionaries(
    {"flag": st.booleans(), "xs": st.lists(st.integers(0, 9), max_size=3)}
)


# ---------------------------------------------------------------- reference


def reference_ok(node: Node) -> bool:
    """Did the path taken succeed? Every leaf on it succeeded or was skipped (a recursion)."""
    if isinstance(node, Leaf):
        return node.result in (LeafState.SUCCESS, LeafState.SKIPPED)
    if isinstance(node, Try):
        body, rescue, fin = node.children
        rescued = reference_ok(body) or (len(rescue.children) > 0 and reference_ok(rescue))
        return rescued and reference_ok(fin)
    if isinstance(node, If):
        return (
            node.error is None
            and node.chosen is not None
            and reference_ok(node.children[node.chosen])
        )
    if isinstance(node, Expansion) and (node.error is not None or not node.expanded):
        return False
    assert isinstance(node, Seq | Par | Expansion)
    return all(reference_ok(c) for c in node.children)


def handled_failures(node: Node, handled: bool = False) -> set[int]:
    """Failed leaves whose failure a rescue took over (a recursion, independent of the engine)."""
    if isinstance(node, Leaf):
        return {node.id} if handled and node.failed else set()
    out: set[int] = set()
    if isinstance(node, Try):
        body, rescue, fin = node.children
        rescue_ran = body.failed and len(rescue.children) > 0
        out |= handled_failures(body, handled or rescue_ran)
        out |= handled_failures(rescue, handled)
        out |= handled_failures(fin, handled)
        return out
    for child in node.children:
        out |= handled_failures(child, handled)
    return out


# ---------------------------------------------------------------- the driver


class Schedule:
    """Drives a job with random partial deliveries, duplicates, stale results and crashes."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data
        self.dispatched: dict[int, int] = {}  # leaf id -> dispatches
        self.lost: list[Dispatch] = []  # dispatches of a process that crashed

    def draw(self, strategy: st.SearchStrategy[Any], label: str) -> Any:
        return self.data.draw(strategy, label=label)

    def restart(self, job: Job, results: list[Any]) -> tuple[Job, list[Dispatch]]:
        job, dispatches = restart_job(job, results)
        # Never stuck: restart_job refuses to return a job that is not done with nothing
        # in flight (InvariantError); check the same from outside.
        assert job.done or job.inflight > 0
        assert job.inflight == len(job.pending())
        for d in dispatches:
            self.dispatched[d.id] = self.dispatched.get(d.id, 0) + 1
        return job, dispatches

    def drive(self, job: Job, dispatches: list[Dispatch], *, crashes: int, fail_rate: int) -> Job:
        inflight = {d.id: d for d in dispatches}
        for _ in range(400):
            if job.done:
                assert not inflight, "done with results still to come"
                return job
            assert inflight, "stuck: not done and nothing in flight"
            if crashes and self.draw(st.integers(0, 3), "crash?") == 0:
                crashes -= 1
                in_flight_ids = set(inflight)
                self.lost.extend(inflight.values())
                job = prepare_replay(Job.from_json(job.to_json()))  # resume after a crash
                job, dispatches = self.restart(job, [])
                inflight = {d.id: d for d in dispatches}
                for leaf_id in in_flight_ids:  # in flight at the crash: re-run or recorded
                    leaf = job.node(leaf_id)
                    assert leaf_id in inflight or leaf.done, f"leaf {leaf_id} left {leaf.result}"
                continue
            chosen = self.draw(
                st.lists(st.sampled_from(sorted(inflight)), min_size=1, unique=True), "arrive"
            )
            results = []
            for i in chosen:
                d = inflight.pop(i)
                ok = self.draw(st.integers(0, 99), "outcome") >= fail_rate
                results.append(success(d, d.id) if ok else failure(d, f"boom {d.id}"))
            if self.lost and self.draw(st.booleans(), "stale?"):
                # A result of the crashed process arrives late: its attempt is stale.
                stale = self.draw(st.sampled_from(self.lost), "which stale")
                results.append(success(stale, "stale"))
            job, dispatches = self.restart(job, results)
            for d in dispatches:
                assert d.id not in inflight
                inflight[d.id] = d
        raise AssertionError("the run did not end")


def _check_outcome(job: Job) -> None:
    assert job.done
    assert job.inflight == 0
    assert (job.status is Status.SUCCESS) == reference_ok(job.root)
    for leaf in job.leaves():
        assert leaf.result is not LeafState.PENDING
        assert leaf.output != "stale", "a stale attempt's result was applied"


@settings(max_examples=1500)
@given(programs, contexts, st.data())
def test_crash_resume_retry_never_strands_a_run(
    source: str, context: dict[str, Any], data: st.DataObject
) -> None:
    job = make_job(compile_source(source), context)
    sched = Schedule(data)
    job, dispatches = sched.restart(job, [])
    job = sched.drive(job, dispatches, crashes=2, fail_rate=data.draw(st.integers(0, 60)))
    _check_outcome(job)
    for leaf in job.leaves():  # no retry yet: a non-idempotent step ran at most once
        if not leaf.idempotent:
            assert sched.dispatched.get(leaf.id, 0) <= 1, f"leaf {leaf.id} ran twice"

    if job.status is Status.SUCCESS:
        assert not can_retry(job)
        return
    assert can_retry(job)
    before = {leaf.id: leaf for leaf in job.leaves()}
    handled = handled_failures(job.root)
    causes = {n.id for n in failure_causes(job.root)}
    assert causes, "a failed run has something that made it fail"
    assert not causes & handled
    counts = dict(sched.dispatched)

    job = prepare_replay(Job.from_json(job.to_json()), retry_interrupted=True)
    assert "exec/last-error" not in job.context
    job, dispatches = sched.restart(job, [])
    job = sched.drive(job, dispatches, crashes=1, fail_rate=data.draw(st.integers(0, 30)))
    _check_outcome(job)
    for leaf_id, old in before.items():
        again = sched.dispatched.get(leaf_id, 0) - counts.get(leaf_id, 0)
        if old.result is LeafState.SUCCESS or leaf_id in handled:
            assert again == 0, f"leaf {leaf_id} ({old.result}) ran again on retry"
            assert job.node(leaf_id) == old
        if old.result is LeafState.SKIPPED:
            assert job.node(leaf_id).result is LeafState.SKIPPED


@settings(max_examples=300)
@given(programs, contexts, st.data())
def test_retry_with_everything_succeeding_ends_in_success(
    source: str, context: dict[str, Any], data: st.DataObject
) -> None:
    job = make_job(compile_source(source), context)
    sched = Schedule(data)
    job, dispatches = sched.restart(job, [])
    job = sched.drive(job, dispatches, crashes=1, fail_rate=50)
    _check_outcome(job)
    for _ in range(3):  # a person retries until it works; the actions now all succeed
        if job.status is Status.SUCCESS:
            break
        job = prepare_replay(job, retry_interrupted=True)
        job, dispatches = sched.restart(job, [])
        job = sched.drive(job, dispatches, crashes=0, fail_rate=0)
        _check_outcome(job)
    assert job.status is Status.SUCCESS
