"""Resume, retry, abort and inspection through the Python API, on a SQLite file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import ablauf_lang
from ablauf_lang.engine.job import restart_job
from ablauf_lang.engine.nodes import LeafState, Status
from ablauf_lang.errors import RunError

SOURCE = """
(do!! (with-augment [identity :first] (idempotent-action!! :t/flaky "x"))
      (action!! :t/once "y"))
"""


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/runs.db"


class Flaky:
    """An action that fails its first `fails` calls, then succeeds; counts every call."""

    def __init__(self, fails: int = 0) -> None:
        self.fails = fails
        self.calls: list[Any] = []

    def __call__(self, payload: Any, context: Any) -> Any:
        self.calls.append(payload)
        if len(self.calls) <= self.fails:
            raise RuntimeError(f"flake {len(self.calls)}")
        return f"{payload}!"


def started(url: str, source: str = SOURCE) -> str:
    """A run whose first step was dispatched and recorded, then its process went away."""
    store = ablauf_lang.open_store(url)
    job = ablauf_lang.make_job(source)
    run_id = store.create_run(job, source=source)
    job, dispatches = restart_job(job, now=time.time())
    store.record(run_id, job)
    assert [d.action for d in dispatches] == ["t/flaky"]
    store.close()
    return run_id


def test_eval_records_every_step_and_inspection_shows_them(url: str) -> None:
    def slow(payload: Any, context: Any) -> Any:
        time.sleep(0.02)
        return payload

    run = ablauf_lang.eval(SOURCE, {"t/flaky": slow, "t/once": slow}, store=url)
    assert run.status is Status.SUCCESS
    stored = ablauf_lang.open_store(url).load(run.run_id)
    assert stored.info.status is Status.SUCCESS
    assert stored.source == SOURCE
    assert stored.job.context == {"first": "x"}
    leaves = list(stored.job.leaves())
    assert [(leaf.result, leaf.output, leaf.attempt) for leaf in leaves] == [
        (LeafState.SUCCESS, "x", 1),
        (LeafState.SUCCESS, "y", 1),
    ]
    for leaf in leaves:
        assert leaf.finished_at - leaf.dispatched_at >= 0.02  # durations for `runs show`


def test_resume_reruns_idempotent_in_flight_work(url: str) -> None:
    run_id = started(url)
    flaky, once = Flaky(), Flaky()
    run = ablauf_lang.resume(run_id, store=url, actions={"t/flaky": flaky, "t/once": once})
    assert run.status is Status.SUCCESS
    assert (flaky.calls, once.calls) == (["x"], ["y"])
    assert run.job.node(1).attempt == 2  # dispatched before the crash, and again after
    assert ablauf_lang.open_store(url).info(run_id).status is Status.SUCCESS


def test_eval_with_a_known_run_id_finishes_that_run(url: str) -> None:
    run_id = started(url)
    flaky = Flaky()
    run = ablauf_lang.eval(SOURCE, {"t/flaky": flaky, "t/once": Flaky()}, store=url, run_id=run_id)
    assert (run.run_id, run.status, flaky.calls) == (run_id, Status.SUCCESS, ["x"])
    again = ablauf_lang.eval(SOURCE, {}, store=url, run_id=run_id)
    assert again.status is Status.SUCCESS  # already finished: nothing runs again


def test_resume_refuses_finished_and_unknown_runs(url: str) -> None:
    run = ablauf_lang.eval(SOURCE, {"t/flaky": Flaky(), "t/once": Flaky()}, store=url)
    with pytest.raises(RunError, match=r"already finished \(success\)"):
        ablauf_lang.resume(run.run_id, store=url)
    with pytest.raises(RunError, match="no run 'nope'"):
        ablauf_lang.resume("nope", store=url)


def test_retry_reruns_failed_idempotent_steps(url: str) -> None:
    flaky, once = Flaky(fails=1), Flaky()
    run = ablauf_lang.eval(SOURCE, {"t/flaky": flaky, "t/once": once}, store=url)
    assert run.status is Status.FAILURE
    assert ablauf_lang.open_store(url).info(run.run_id).error == "RuntimeError: flake 1"
    with pytest.raises(RunError, match="already finished"):
        ablauf_lang.resume(run.run_id, store=url)
    run = ablauf_lang.retry(run.run_id, store=url, actions={"t/flaky": flaky, "t/once": once})
    assert run.status is Status.SUCCESS
    assert (flaky.calls, once.calls) == (["x", "x"], ["y"])
    assert run.context == {"first": "x!"}  # the stale exec/last-error is gone
    with pytest.raises(RunError, match="succeeded: nothing to retry"):
        ablauf_lang.retry(run.run_id, store=url)


def test_retry_reruns_an_unhandled_failure_whatever_its_idempotency(url: str) -> None:
    run = ablauf_lang.eval('(do!! (log!! 1) (fail!! "no"))', store=url)
    assert run.status is Status.FAILURE
    run = ablauf_lang.retry(run.run_id, store=url)  # a person asked: fail!! runs (and fails) again
    assert run.status is Status.FAILURE
    leaf = run.job.node(2)
    assert (leaf.attempt, leaf.error) == (2, "no")


def test_retry_of_an_abandoned_run_performs_its_step_again(url: str) -> None:
    pending = started(url)
    flaky, once = Flaky(), Flaky()
    run = ablauf_lang.retry(pending, store=url, actions={"t/flaky": flaky, "t/once": once})
    assert run.status is Status.SUCCESS
    assert (flaky.calls, once.calls) == (["x"], ["y"])


def test_abort_fails_pending_steps_and_stops_the_run(url: str) -> None:
    run_id = started(url)
    run = ablauf_lang.abort_run(run_id, store=url, reason="operator said so")
    assert run.status is Status.FAILURE
    store = ablauf_lang.open_store(url)
    info = store.info(run_id)
    assert (info.status, info.error) == (Status.FAILURE, "operator said so")
    leaf = store.load(run_id).job.node(1)
    assert (leaf.result, leaf.error) == (LeafState.FAILURE, "operator said so")
    with pytest.raises(RunError, match="already finished"):
        ablauf_lang.abort_run(run_id, store=url)
    # The aborted step was idempotent: a retry runs it again and the run goes on.
    flaky = Flaky()
    run = ablauf_lang.retry(run_id, store=url, actions={"t/flaky": flaky, "t/once": Flaky()})
    assert (run.status, flaky.calls) == (Status.SUCCESS, ["x"])


def test_a_run_aborted_elsewhere_stops_its_driver(url: str) -> None:
    aborted: list[str] = []

    def step(payload: Any, context: Any) -> Any:
        if not aborted:
            aborted.append(ablauf_lang.abort_run(run_ids[0], store=url).run_id)
        return payload

    store = ablauf_lang.open_store(url)
    job = ablauf_lang.make_job(SOURCE)
    run_ids = [store.create_run(job)]
    with pytest.raises(ablauf_lang.StoreError, match="written by another process"):
        ablauf_lang.eval(SOURCE, {"t/flaky": step, "t/once": step}, store=store, run_id=run_ids[0])
    assert store.info(run_ids[0]).status is Status.FAILURE
