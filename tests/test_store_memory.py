"""The JobStore contract, checked on the memory store and on the SQLite store alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ablauf_lang.codec import job as serde
from ablauf_lang.engine.job import Job, make_job, restart_job
from ablauf_lang.engine.nodes import Status, failure, success
from ablauf_lang.engine.replay import abort
from ablauf_lang.errors import RunError
from ablauf_lang.stores.backend import open_store
from ablauf_lang.stores.base import JobStore, RunInfo, statuses
from ablauf_lang.stores.memory import MemoryStore
from tests.builders import Do, L, Par_, number


@pytest.fixture(params=["memory:", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    url = request.param if request.param == "memory:" else f"sqlite:///{tmp_path}/runs.db"
    backend = open_store(url)
    yield backend
    backend.close()


def a_job() -> Job:
    return make_job(number(Do(L("a", augment=((), ("a",))), Par_(L("b"), L("c")))), {"who": "me"})


def test_memory_url_opens_a_memory_store() -> None:
    store = open_store("memory:")
    assert isinstance(store, MemoryStore)
    assert isinstance(store, JobStore)
    assert not store.durable


def test_create_record_load(store: JobStore) -> None:
    job = a_job()
    run_id = store.create_run(job, source="(do!! ...)", filename="w.abl")
    assert store.exists(run_id)
    job, dispatches = restart_job(job, now=1.0)
    store.record(run_id, job)
    job, dispatches = restart_job(job, [success(dispatches[0], "A")], now=2.0)
    store.record(run_id, job)
    loaded = store.load(run_id)
    assert serde.to_data(loaded.job) == serde.to_data(job)
    assert loaded.source == "(do!! ...)"
    assert loaded.initial_context == {"who": "me"}
    assert loaded.job.context == {"who": "me", "a": "A"}
    assert loaded.info.filename == "w.abl"
    assert loaded.info.status is Status.PENDING
    leaf = loaded.job.node(1)
    assert (leaf.result, leaf.output, leaf.attempt) == ("success", "A", 1)
    assert (leaf.dispatched_at, leaf.finished_at) == (1.0, 2.0)


def test_a_given_run_id_is_kept_and_never_reused(store: JobStore) -> None:
    assert store.create_run(a_job(), run_id="mine") == "mine"
    with pytest.raises(RunError, match="already exists"):
        store.create_run(a_job(), run_id="mine")


def test_unknown_runs(store: JobStore) -> None:
    assert not store.exists("ghost")
    for call in (store.load, store.info):
        with pytest.raises(RunError, match="no run 'ghost'"):
            call("ghost")


def test_listing_newest_first_with_status(store: JobStore) -> None:
    ok, bad, running = (store.create_run(a_job()) for _ in range(3))
    for run_id, outcome in ((ok, "ok"), (bad, "bad")):
        job = store.load(run_id).job
        job, ds = restart_job(job)
        while ds:
            results = [failure(d, "broke") if outcome == "bad" else success(d) for d in ds]
            job, ds = restart_job(job, results)
        store.record(run_id, job)
    infos = store.list_runs()
    assert all(isinstance(i, RunInfo) for i in infos)
    assert [i.run_id for i in infos] == [running, bad, ok]
    assert statuses(infos) == {ok: "success", bad: "failure", running: "pending"}
    assert [i.run_id for i in store.list_runs(status="failure")] == [bad]
    assert store.info(bad).error == "broke"
    assert store.list_runs(limit=1)[0].run_id == running


def test_abort_is_recorded(store: JobStore) -> None:
    job = a_job()
    run_id = store.create_run(job)
    job, _ = restart_job(job)
    store.record(run_id, job)
    store.record(run_id, abort(job, "enough"))
    info = store.info(run_id)
    assert (info.status, info.error) == (Status.FAILURE, "enough")
    assert store.load(run_id).job.aborted == "enough"


def test_a_memory_store_without_history_keeps_only_the_current_job() -> None:
    store = MemoryStore(history=False)
    job = make_job(number(Do(L("a"), L("b"))))
    run_id = store.create_run(job)
    job, [d] = restart_job(job)
    store.record(run_id, job)
    job, _ = restart_job(job, [success(d, 1)])
    store.record(run_id, job)
    steps = store.history(run_id).steps
    assert len(steps) == 1
    assert store.load(run_id).job is job
    kept = MemoryStore()
    run_id = kept.create_run(make_job(number(Do(L("a")))))
    kept.record(run_id, restart_job(kept.load(run_id).job)[0])
    assert len(kept.history(run_id).steps) == 2


def test_eval_with_no_store_keeps_no_earlier_job_alive() -> None:
    """The store eval makes for itself is read by nobody: earlier jobs are garbage as soon
    as the next one is made (kept, each one's node vectors cost every garbage collection a
    visit of the whole tree: a 10,000-step run took five times as long)."""
    import asyncio
    import gc

    import ablauf_lang

    seen = [0]
    alive: list[int] = []

    def on_restart(job: Job, dispatches: object, results: object) -> None:
        seen[0] += 1
        if seen[0] in (5, 45):  # jobs are not weakly referable: count those alive
            gc.collect()
            alive.append(sum(isinstance(o, Job) for o in gc.get_objects()))

    source = "(do!! " + " ".join(f"(log!! {i})" for i in range(50)) + ")"
    run = asyncio.run(ablauf_lang.eval_async(source, on_restart=on_restart))
    assert run.status == "success"
    assert len(alive) == 2
    assert alive[1] - alive[0] <= 3, alive  # 40 restarts later: none of them kept
    seen[0] = 0
    alive.clear()
    kept = MemoryStore()
    asyncio.run(ablauf_lang.eval_async(source, store=kept, on_restart=on_restart))
    assert alive[1] - alive[0] >= 40, (
        alive
    )  # a store given keeps every write (time travel reads them)
