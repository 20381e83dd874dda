"""Catching up with writes (`codec.delta.catch_up`): a process that knows an older job of
a run applies the deltas written since, instead of reading the run whole; what it builds
must be what loading the run after those writes builds."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ablauf_lang.codec.delta import catch_up, diff
from ablauf_lang.engine.job import Job, make_job, restart_job
from ablauf_lang.engine.nodes import Dispatch, failure, success
from ablauf_lang.engine.replay import abort
from ablauf_lang.lang.compiler import compile_source
from ablauf_lang.stores.sqlite import SqliteStore
from tests.strategies import workflow_sources
from tests.test_store_sqlite import same, trees


def _writes(job: Job, data: st.DataObject) -> list[Job]:
    """A run's jobs, one a write: restarts with results in any order, now and then an abort."""
    jobs = [job]
    job, dispatches = restart_job(job)
    jobs.append(job)
    inflight: dict[int, Dispatch] = {d.id: d for d in dispatches}
    for _ in range(30):
        if not inflight:
            break
        if data.draw(st.integers(0, 20), label="abort?") == 0:
            jobs.append(abort(job, "stop"))
            break
        ids = sorted(inflight)
        chosen = data.draw(st.lists(st.sampled_from(ids), min_size=1, unique=True), label="done")
        results = []
        for node_id in chosen:
            d = inflight.pop(node_id)
            ok = data.draw(st.booleans(), label="ok")
            results.append(success(d, d.id) if ok else failure(d, "no"))
        job, dispatches = restart_job(job, results)
        inflight.update((d.id, d) for d in dispatches)
        jobs.append(job)
    return jobs


def _kinds(texts: list[str]) -> set[str]:
    return {key for text in texts for key in json.loads(text)}


def _caught_up_from_any_write(jobs: list[Job], data: st.DataObject) -> None:
    """The newest write, caught up with from any write before it: what a load builds."""
    m = len(jobs) - 1
    k = data.draw(st.integers(0, m), label="known")
    texts = [diff(jobs[i], jobs[i + 1]).data(jobs[i + 1]) for i in range(k, m)]
    caught = catch_up(jobs[k], [json.loads(t) for t in texts])
    if caught is None:
        # Only a write that makes or drops nodes is refused.
        assert _kinds(texts) - {"r", "s", "c", "cd"}, texts
    else:
        assert same(caught, jobs[m])


@settings(max_examples=300, deadline=None)
@given(tree=trees, data=st.data())
def test_catching_up_builds_what_loading_after_the_writes_builds(
    tree: Any, data: st.DataObject
) -> None:
    _caught_up_from_any_write(_writes(make_job(tree, {"start": 1}), data), data)


def test_a_sequence_and_a_wide_pmap_are_caught_up() -> None:
    for source in (
        "(do!! " + " ".join(f"(log!! {i})" for i in range(12)) + ")",
        "(pmap!! [i (range 200)] (idempotent-action!! :t/x i))",
    ):
        job, dispatches = restart_job(make_job(compile_source(source)))
        jobs = [job]
        while dispatches:
            d, rest = dispatches[0], dispatches[1:]
            job, more = restart_job(job, [success(d, 1)])
            dispatches = rest + more
            jobs.append(job)
        texts = [diff(jobs[i], jobs[i + 1]).data(jobs[i + 1]) for i in range(1, len(jobs) - 1)]
        caught = catch_up(jobs[1], [json.loads(t) for t in texts])
        assert caught is not None, source
        assert same(caught, jobs[-1])
        assert caught.status == "success"


@settings(max_examples=300, deadline=None)
@given(source=workflow_sources, data=st.data())
def test_catching_up_with_compiled_workflows(source: str, data: st.DataObject) -> None:
    """Programs as people write them (context keys set by augments, rescues, finallys):
    every write is caught up with, and builds what a load builds."""
    _caught_up_from_any_write(_writes(make_job(compile_source(source)), data), data)


@settings(max_examples=60, deadline=None)
@given(tree=trees, data=st.data(), steps_first=st.integers(0, 3))
def test_a_store_reads_a_run_another_store_wrote_as_loading_it_would(
    tmp_path_factory: Any, tree: Any, data: st.DataObject, steps_first: int
) -> None:
    """`SqlStore.load_job` of a run this store knows an older write of, after another
    store object wrote on (a worker, for the client that submitted the run): what a load
    builds, and without reading the run whole when only states changed (also past a
    fold into the snapshot)."""
    path = str(tmp_path_factory.mktemp("catch") / "runs.db")
    jobs = _writes(make_job(tree, {"start": 1}), data)
    client, other = SqliteStore(path), SqliteStore(path)
    try:
        run_id = client.create_run(jobs[0])
        for job in jobs[1 : 1 + steps_first]:
            client.record(run_id, job)
        other.load(run_id)
        for job in jobs[1 + steps_first :]:
            other.record(run_id, job)
        read_whole: list[str] = []
        real = client.load

        def load(run: str) -> Any:
            read_whole.append(run)
            return real(run)

        client.load = load  # type: ignore[method-assign]
        got = client.load_job(run_id)
        assert same(got, real(run_id).job)
        assert same(got, jobs[-1])
        texts = [
            diff(jobs[i], jobs[i + 1]).data(jobs[i + 1])
            for i in range(min(steps_first, len(jobs) - 1), len(jobs) - 1)
        ]
        if not (_kinds(texts) - {"r", "s", "c", "cd"}):
            assert read_whole == []
    finally:
        client.close()
        other.close()


def test_a_long_sequence_written_elsewhere_is_caught_up_with_past_its_folds(
    tmp_path: Any,
) -> None:
    source = "(do!! " + " ".join(f"(log!! {i})" for i in range(300)) + ")"
    path = str(tmp_path / "runs.db")
    client, other = SqliteStore(path), SqliteStore(path)
    try:
        job = make_job(compile_source(source))
        run_id = client.create_run(job)
        other.load(run_id)
        job, dispatches = restart_job(job)
        while dispatches:
            other.record(run_id, job)
            job, dispatches = restart_job(job, [success(d, 1) for d in dispatches])
        other.record(run_id, job)
        assert other.compactions > 0  # folded on the way
        client.load = None  # type: ignore[assignment,method-assign]  # not read whole
        got = client.load_job(run_id)
        assert same(got, job)
        assert got.status == "success"
    finally:
        client.close()
        other.close()
