"""The engine's time: sleeps, retries with backoff, deadlines and awaits, with `now` given.

The reducer reads no clock: every test passes `now` and checks the times it records.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ablauf_lang
from ablauf_lang.engine import retry
from ablauf_lang.engine.job import Job, make_job, restart_job
from ablauf_lang.engine.nodes import LeafState, failure, success, timeout
from ablauf_lang.engine.replay import prepare_replay
from ablauf_lang.engine.waits import describe_waits, parked, waits
from ablauf_lang.stdlib.actions import AWAIT, SLEEP


def job_of(source: str) -> Job:
    return make_job(ablauf_lang.compile(source))


def policy(**kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "max": 3,
        "delay": 1.0,
        "backoff": 2.0,
        "max-delay": None,
        "jitter": False,
        "on": None,
    }
    out.update(kw)
    return out


def test_sleep_records_its_wake_time_and_ends_by_the_runner() -> None:
    job = job_of("(do!! (sleep!! {:minutes 10}) (log!! 1))")
    job, ds = restart_job(job, [], 1000.0)
    (d,) = ds
    assert d.action == SLEEP
    assert d.due == 1600.0
    assert d.payload["until"] == 1600.0
    assert [w.kind for w in waits(job)] == ["sleep"]
    assert parked(job)
    assert describe_waits(waits(job)) == "sleeping until 1970-01-01T00:26:40Z"
    job, ds = restart_job(job, [success(d)], 1600.0)
    assert ds[0].action == "action/log"


def test_sleep_until_an_instant() -> None:
    job = job_of('(sleep-until!! "2026-12-24T09:00:00Z")')
    job, (d,) = restart_job(job, [], 0.0)
    assert d.due == datetime(2026, 12, 24, 9, tzinfo=UTC).timestamp()


def test_resume_keeps_a_sleeps_recorded_wake_time() -> None:
    job = job_of("(do!! (sleep!! 3600) (log!! 1))")
    job, (d,) = restart_job(job, [], 100.0)
    resumed = prepare_replay(job, now=2000.0)
    resumed, (again,) = restart_job(resumed, [], 2000.0)
    assert again.due == 3700.0
    # A wait that never began keeps its attempt number: a hand-over uses nothing up, and
    # either wake-up (the old timer's or the new one's) ends the sleep, once.
    assert again.attempt == d.attempt
    done, ds = restart_job(resumed, [success(d)], 3700.0)
    assert done.node(1).result is LeafState.SUCCESS
    assert [x.action for x in ds] == ["action/log"]
    twice, none = restart_job(done, [success(again)], 3700.0)
    assert none == []
    assert twice.node(1) == done.node(1)


def test_retry_waits_grow_by_backoff_up_to_max_delay() -> None:
    pol = policy(max=6, delay=1.0, backoff=3.0, **{"max-delay": 20.0})
    assert [retry.delay(pol, n, 7) for n in range(1, 6)] == [1.0, 3.0, 9.0, 20.0, 20.0]
    jittered = [retry.delay({**pol, "jitter": True}, n, 7) for n in range(1, 6)]
    assert all(
        0.5 * d <= j <= d for j, d in zip(jittered, [1.0, 3.0, 9.0, 20.0, 20.0], strict=False)
    )
    assert jittered == [retry.delay({**pol, "jitter": True}, n, 7) for n in range(1, 6)]


def test_engine_retries_with_backoff_and_records_each_attempt() -> None:
    job = job_of("(action!! :x/flaky 1 {:retry {:max 3 :delay 2 :backoff 2}})")
    job, (d1,) = restart_job(job, [], 0.0)
    job, (d2,) = restart_job(job, [failure(d1, "IOError: a", started_at=0.0)], 1.0)
    assert (d2.attempt, d2.due) == (2, 3.0)
    job, (d3,) = restart_job(job, [failure(d2, "IOError: b")], 4.0)
    assert (d3.attempt, d3.due) == (3, 8.0)
    leaf = job.node(0)
    assert [a["attempt"] for a in leaf.attempts] == [1, 2]
    assert [a["error"] for a in leaf.attempts] == ["IOError: a", "IOError: b"]
    assert "exec/last-error" not in job.context  # only the last attempt's error counts
    job, ds = restart_job(job, [failure(d3, "IOError: c")], 9.0)
    assert ds == []
    assert job.status == "failure"
    assert job.context["exec/last-error"] == "IOError: c"
    assert Job.from_json(job.to_json()) == job


def test_retry_on_limits_which_errors_are_retried() -> None:
    src = '(action!! :x/y 1 {:retry {:max 5 :on ["TimeoutError" "HTTPError"]}})'
    job, (d,) = restart_job(job_of(src), [], 0.0)
    again, (d2,) = restart_job(job, [failure(d, "HTTPError: 503")], 1.0)
    assert d2.attempt == 2
    done, ds = restart_job(again, [failure(d2, "ValueError: bad")], 2.0)
    assert ds == []
    assert done.status == "failure"


def test_timed_out_attempt_of_a_non_idempotent_action_is_not_retried() -> None:
    src = "(action!! :x/pay 1 {:retry {:max 3}})"
    job, (d,) = restart_job(job_of(src), [], 0.0)
    done, ds = restart_job(job, [timeout(d)], 1.0)
    assert ds == []
    assert done.status == "failure"
    src = "(action!! :x/get 1 {:retry {:max 3} :idempotent? true})"
    job, (d,) = restart_job(job_of(src), [], 0.0)
    _, (d2,) = restart_job(job, [timeout(d)], 1.0)
    assert d2.attempt == 2


def test_a_retry_wait_survives_a_crash_without_being_called_interrupted() -> None:
    src = "(action!! :x/pay 1 {:retry {:max 3 :delay 60}})"
    job, (d,) = restart_job(job_of(src), [], 0.0)
    job, (_d2,) = restart_job(job, [failure(d, "boom")], 1.0)
    _resumed, (d3,) = restart_job(prepare_replay(job, now=30.0), [], 30.0)
    assert d3.due == 61.0  # the wait goes on: the attempt had not begun
    # After its start time the outcome is unknown: a non-idempotent action is interrupted.
    late = prepare_replay(job, now=90.0)
    assert late.node(0).error.startswith("interrupted")


def test_deadline_cuts_the_body_and_a_rescue_handles_it() -> None:
    src = """(try!! (timeout!! 5 (do!! (action!! :x/slow 1) (action!! :x/next 2)))
                    (rescue!! (log!! (ctx :exec/last-error))))"""
    job, ds = restart_job(job_of(src), [], 0.0)
    slow = next(d for d in ds if d.action == "x/slow")
    timer = next(d for d in ds if d.action == SLEEP)
    assert timer.due == 5.0
    job, ds = restart_job(job, [success(timer)], 5.0)
    assert [d.action for d in ds] == ["action/log"]
    assert ds[0].payload == "timeout: deadline of 5s passed"
    states = {leaf.action: leaf.result for leaf in job.leaves()}
    assert states["x/slow"] is LeafState.TIMEOUT
    assert states["x/next"] is LeafState.SKIPPED
    # The slow action's late result is ignored.
    job2, none = restart_job(job, [success(slow)], 6.0)
    assert none == []
    assert job2.node(slow.id).result is LeafState.TIMEOUT


def test_body_done_first_cancels_the_deadline_timer() -> None:
    job, ds = restart_job(job_of("(timeout!! 60 (action!! :x/quick 1))"), [], 0.0)
    quick = next(d for d in ds if d.action == "x/quick")
    timer = next(d for d in ds if d.action == SLEEP)
    job, none = restart_job(job, [success(quick)], 1.0)
    assert none == []
    assert job.status == "success"
    assert job.node(timer.id).result is LeafState.SKIPPED


def test_retry_of_a_run_whose_deadline_passed_runs_the_subtree_again() -> None:
    job, ds = restart_job(job_of("(timeout!! 5 (do!! (action!! :x/a 1) (action!! :x/b 2)))"), [], 0)
    timer = next(d for d in ds if d.action == SLEEP)
    job, _ = restart_job(job, [success(timer)], 5.0)
    assert job.status == "failure"
    _again, ds = restart_job(prepare_replay(job, retry_interrupted=True), [], 10.0)
    assert sorted(d.action for d in ds) == [SLEEP, "x/a"]
    assert next(d for d in ds if d.action == SLEEP).due == 15.0


def test_await_dispatch_carries_its_deadline() -> None:
    job = job_of("(await!! :approval {:timeout {:hours 24}})")
    job, (d,) = restart_job(job, [], 0.0)
    assert d.action == AWAIT
    assert d.payload == {"signal": "approval", "until": 86400.0}
    assert d.due is None
    (w,) = waits(job)
    assert (w.kind, w.name, w.until) == ("signal", "approval", 86400.0)
    assert w.describe() == "waiting: approval (until 1970-01-02T00:00:00Z)"
    done, _ = restart_job(job, [success(d, {"ok": True})], 5.0)
    assert done.node(0).output == {"ok": True}


def test_run_time_durations_are_checked_when_reached() -> None:
    job = make_job(ablauf_lang.compile("(sleep!! (ctx :wait))"), {"wait": -3})
    job, ds = restart_job(job, [], 0.0)
    assert ds == []
    assert job.status == "failure"
    assert "sleep!!" in job.context["exec/last-error"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from(["fail", "timeout", "ok"]), min_size=1, max_size=8),
    st.integers(1, 6),
    st.booleans(),
)
def test_attempts_never_exceed_the_policy(outcomes: list[str], most: int, idem: bool) -> None:
    """Whatever the attempts return, a leaf makes at most :max attempts, numbered 1..n,
    each earlier one recorded; the wait before each is its backoff delay."""
    flag = str(idem).lower()
    src = f"(action!! :x/y 1 {{:retry {{:max {most} :delay 1 :backoff 2}} :idempotent? {flag}}})"
    job, ds = restart_job(job_of(src), [], 0.0)
    now = 0.0
    made = 1
    for outcome in outcomes:
        if not ds:
            break
        (d,) = ds
        assert d.attempt == made
        if d.due is not None:
            assert d.due == pytest.approx(now + 2 ** (made - 2))  # now: when it failed
            now = d.due
        now += 0.5
        result = {"fail": failure, "timeout": timeout, "ok": success}[outcome](d)
        job, ds = restart_job(job, [result], now)
        made += bool(ds)
    leaf = job.node(0)
    assert leaf.attempt <= most
    assert [a["attempt"] for a in leaf.attempts] == list(range(1, leaf.attempt))
