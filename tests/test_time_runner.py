"""Time on the in-process runner: durable sleeps, retries' waits, per-attempt timeouts and
heartbeats, deadlines, awaits and signals; the virtual clock; crashes during waits; the
one-host worker that wakes parked runs. Real SQLite files and real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ablauf_lang
from ablauf_lang.engine.nodes import LeafState
from ablauf_lang.engine.waits import waits
from ablauf_lang.runners.clock import VirtualClock, heartbeat
from ablauf_lang.runners.sleeper import Sleeper
from ablauf_lang.stdlib.actions import AWAIT, SLEEP
from ablauf_lang.stores.backend import open_store

DAY = 86400.0


def test_thirty_days_of_sleep_take_milliseconds_on_a_virtual_clock() -> None:
    clock = VirtualClock(start=1_000_000.0, frozen=True)
    began = time.monotonic()
    run = ablauf_lang.eval(
        '(do!! (sleep!! {:days 30}) (log!! "a") (sleep!! {:hours 1}) (log!! "b"))', clock=clock
    )
    assert run.status == "success"
    assert time.monotonic() - began < 2.0
    assert clock.now() == pytest.approx(1_000_000.0 + 30 * DAY + 3600)
    sleeps = [leaf for leaf in run.job.leaves() if leaf.action == SLEEP]
    assert [s.wake for s in sleeps] == [1_000_000.0 + 30 * DAY, 1_000_000.0 + 30 * DAY + 3600]


def test_retries_wait_their_backoff_on_the_virtual_clock() -> None:
    calls: list[float] = []
    clock = VirtualClock(start=0.0, frozen=True)

    def flaky(payload: Any, context: Any) -> str:
        calls.append(clock.now())
        if len(calls) < 4:
            raise ConnectionError("refused")
        return "ok"

    src = "(action!! :x/flaky 1 {:retry {:max 5 :delay 10 :backoff 3 :max-delay 60}})"
    run = ablauf_lang.eval(src, actions={"x/flaky": flaky}, clock=clock)
    assert run.status == "success"
    assert calls == [0.0, 10.0, 40.0, 100.0]  # waits 10, 30, min(90, 60)
    leaf = run.job.node(0)
    assert [a["error"] for a in leaf.attempts] == ["ConnectionError: refused"] * 3
    assert leaf.attempt == 4


def test_a_short_real_sleep_waits_its_time() -> None:
    began = time.monotonic()
    run = ablauf_lang.eval('(do!! (sleep!! 0.3) (log!! "after"))')
    assert run.status == "success"
    assert time.monotonic() - began >= 0.29


def test_attempt_timeout_cancels_an_async_action_and_ignores_a_late_thread() -> None:
    cancelled = threading.Event()
    late = threading.Event()

    async def hangs(payload: Any, context: Any) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def blocks(payload: Any, context: Any) -> str:
        time.sleep(0.6)
        late.set()
        return "too late"

    actions = {"x/hangs": hangs, "x/blocks": blocks}
    run = ablauf_lang.eval(
        "(dopar!! (action!! :x/hangs 1 {:timeout 0.2}) (action!! :x/blocks 2 {:timeout 0.2}))",
        actions=actions,
    )
    assert run.status == "failure"
    states = {s["action"]: (s["state"], s["error"]) for s in run.failed_steps()}
    assert states["x/hangs"] == ("timeout", "timeout: no result within 0.2s")
    assert states["x/blocks"][0] == "timeout"
    assert cancelled.is_set()
    late.wait(2)
    assert run.job.node(2).output is None  # the thread's late result was not taken


def test_heartbeats_keep_a_long_action_alive_and_silence_ends_it() -> None:
    def beats(payload: Any, context: Any) -> str:
        for _ in range(8):
            time.sleep(0.05)
            heartbeat({"done": _})
        return "finished"

    def silent(payload: Any, context: Any) -> str:
        time.sleep(1.0)
        return "never seen"

    run = ablauf_lang.eval(
        "(do!! (action!! :x/beats 1 {:heartbeat 0.2}) (action!! :x/silent 2 {:heartbeat 0.2}))",
        actions={"x/beats": beats, "x/silent": silent},
    )
    assert run.job.node(1).output == "finished"
    assert run.job.node(2).result is LeafState.TIMEOUT
    assert run.job.node(2).error == "heartbeat: none for 0.2s"


def test_retry_after_a_timeout_for_an_idempotent_action() -> None:
    calls = []

    def slow_once(payload: Any, context: Any) -> str:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.5)
        return "ok"

    src = "(idempotent-action!! :x/s 1 {:timeout 0.1 :retry {:max 2 :delay 0.05}})"
    run = ablauf_lang.eval(src, actions={"x/s": slow_once})
    assert run.status == "success"
    assert run.job.node(0).attempts[0]["state"] == "timeout"


def test_run_deadline_fails_the_run_and_a_subtree_deadline_is_rescued() -> None:
    run = ablauf_lang.eval("(action!! :action/sleep 5)", timeout=0.2)
    assert run.status == "failure"
    assert run.failed_steps()[0]["error"] == "timeout: deadline of 0.2s passed"
    run = ablauf_lang.eval(
        """(try!! (timeout!! {:seconds 0.2} (action!! :action/sleep 5) (log!! "never"))
                  (rescue!! (log!! (ctx :exec/last-error))))"""
    )
    assert run.status == "success"
    assert run.context["exec/last-error"].startswith("timeout: deadline")


def _pending(store: Any) -> str:
    for _ in range(200):
        pending = [r.run_id for r in store.list_runs() if str(r.status) == "pending"]
        if pending:
            return pending[0]
        time.sleep(0.02)
    raise AssertionError("no pending run")


def test_await_takes_signals_in_order_of_arrival_exactly_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    src = """(do!! (with-augment [[] [:first]] (await!! :go))
                   (with-augment [[] [:second]] (await!! :go)))"""

    def send() -> None:
        with open_store(url) as other:
            run_id = _pending(other)
            ablauf_lang.signal(run_id, "go", 1, store=other)
            ablauf_lang.signal(run_id, "go", 2, store=other)

    sender = threading.Thread(target=send)
    sender.start()
    run = ablauf_lang.eval(src, store=url)
    sender.join()
    assert run.status == "success"
    assert (run.context["first"], run.context["second"]) == (1, 2)
    with open_store(url) as store:
        taken = [s["consumed_by"] for s in store.signals(run.run_id)]
    assert sorted(taken) == [1, 2]


def test_await_times_out_when_no_signal_comes() -> None:
    clock = VirtualClock(start=0.0, frozen=True)
    run = ablauf_lang.eval(
        "(try!! (await!! :approval {:timeout {:hours 24}}) (rescue!! (log!! :timed-out)))",
        clock=clock,
    )
    assert run.status == "success"
    leaf = next(leaf for leaf in run.job.leaves() if leaf.action == AWAIT)
    assert leaf.result is LeafState.TIMEOUT
    assert clock.now() == pytest.approx(DAY)


def test_a_signal_to_a_finished_or_unknown_run_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    run = ablauf_lang.eval('(log!! "x")', store=url)
    with pytest.raises(ablauf_lang.RunError, match="finished"):
        ablauf_lang.signal(run.run_id, "go", store=url)
    with pytest.raises(ablauf_lang.RunError):
        ablauf_lang.signal("nope", "go", store=url)


CHILD = """
import sys, ablauf_lang
ablauf_lang.eval('(do!! (log!! "before") (sleep!! 2) (log!! "after"))',
                 store=sys.argv[1], run_id="sleepy")
"""


def test_sigkill_during_a_sleep_resumes_with_the_time_left(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    began = time.time()
    child = subprocess.Popen([sys.executable, "-c", CHILD, url])
    try:
        with open_store(url) as store:
            for _ in range(300):
                if store.exists("sleepy") and waits(store.load("sleepy").job):
                    break
                time.sleep(0.02)
            wake = waits(store.load("sleepy").job)[0].until
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert wake is not None
    run = ablauf_lang.resume("sleepy", store=url, force=True)
    assert run.status == "success"
    ended = time.time()
    assert ended >= wake - 0.05
    assert ended - began < 2.0 + 1.5  # the time left, not a fresh two seconds after the kill
    logs = [leaf for leaf in run.job.leaves() if leaf.action == "action/log"]
    assert [leaf.attempt for leaf in logs] == [1, 1]  # nothing ran twice


def test_detached_run_is_woken_by_the_one_host_worker(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    clock = VirtualClock(start=0.0, frozen=True)
    run = ablauf_lang.eval(
        '(do!! (sleep!! {:hours 1}) (with-augment [[] [:ok]] (await!! :approval)) (log!! "x"))',
        store=url,
        detach=True,
        clock=clock,
    )
    assert run.status == "pending"
    with open_store(url) as store:
        sleeper = Sleeper(store, clock=clock)
        assert asyncio.run(sleeper.round()) == 0  # not due yet
        clock.advance(3600)
        assert asyncio.run(sleeper.round()) == 1  # the sleep ends; now it awaits
        assert store.load(run.run_id).job.status == "pending"
        assert asyncio.run(sleeper.round()) == 0
        ablauf_lang.signal(run.run_id, "approval", "yes", store=store)
        assert asyncio.run(sleeper.round()) == 1
        final = store.load(run.run_id).job
    assert final.status == "success"
    assert final.context["ok"] == "yes"


# ---------------------------------------------------------------- property: random programs

LEAVES = st.sampled_from(
    [
        "(sleep!! {d})",
        "(log!! :x)",
        "(action!! :t/flaky @N@ {{:retry {{:max 3 :delay {d}}}}})",
        "(action!! :t/flaky @N@ {{:retry {{:max 2 :delay {d}}}}})",
        "(with-augment [[] [:sig]] (await!! :s {{:timeout {d}}}))",
    ]
)


@st.composite
def programs(draw: Any, depth: int = 0) -> str:
    if depth >= 2 or draw(st.booleans()):
        template = draw(LEAVES)
        return str(template.format(d=draw(st.integers(0, 5000))))
    kids = draw(st.lists(programs(depth + 1), min_size=1, max_size=3))
    head = draw(st.sampled_from(["do!!", "dopar!!", "timeout!! {d}", "try!!"]))
    head = head.format(d=draw(st.integers(1, 8000)))
    if head == "try!!":
        return f"(try!! {' '.join(kids)} (rescue!! (log!! :rescued)))"
    return f"({head} {' '.join(kids)})"


def _numbered(source: str) -> str:
    """Give every flaky action its own payload (its calls are counted by payload)."""
    parts = source.split("@N@")
    return "".join(p + (str(i) if i < len(parts) - 1 else "") for i, p in enumerate(parts))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(programs().map(_numbered), st.integers(1, 12), st.booleans())
def test_random_timed_programs_survive_a_crash_at_any_restart(
    tmp_path: Path, source: str, crash_at: int, signal_first: bool
) -> None:
    """Crash (an exception after the k-th recorded restart) and resume: the run finishes;
    no attempt of a non-idempotent action runs twice; every sleep ended at or after the
    wake time it recorded first; each signal went to at most one await."""
    url = f"sqlite:///{tmp_path / f'{uuid.uuid4().hex}.db'}"
    clock = VirtualClock(start=0.0, frozen=True)
    calls: dict[int, int] = {}
    first_wake: dict[int, float] = {}
    restarts = [0]

    def flaky(payload: Any, context: Any) -> str:
        calls[payload] = calls.get(payload, 0) + 1
        if calls[payload] % 2:
            raise RuntimeError("odd call")
        return "even call"

    class Crash(Exception):
        pass

    def on_restart(job: Any, dispatches: Any, results: Any) -> None:
        for d in dispatches:
            if d.action == SLEEP:
                first_wake.setdefault(d.id, d.due)
        restarts[0] += 1
        if restarts[0] == crash_at:
            raise Crash

    actions = {"t/flaky": flaky}
    with open_store(url) as store:
        run_id = "prop"
        if signal_first:  # a signal that arrives before the run reaches its await
            store.create_run(ablauf_lang.make_job(ablauf_lang.compile(source)), run_id=run_id)
            store.send_signal(run_id, "s", "early")
        with contextlib.suppress(Crash):
            asyncio.run(
                ablauf_lang.eval_async(
                    source, actions, store=store, run_id=run_id, on_restart=on_restart, clock=clock
                )
            )
        stored = store.load(run_id).job
        if not stored.done:
            run = ablauf_lang.resume(run_id, store=store, actions=actions, clock=clock)
            final = run.job
        else:
            final = stored
        assert final.done
        for leaf in final.leaves():
            if leaf.action == SLEEP and leaf.result is LeafState.SUCCESS:
                assert leaf.finished_at is not None
                assert leaf.finished_at >= first_wake.get(leaf.id, leaf.wake or 0) - 1e-6
                assert leaf.wake == first_wake.get(leaf.id, leaf.wake)
        consumers = [s["consumed_by"] for s in store.signals(run_id) if s["consumed_by"]]
        assert len(consumers) == len(set(consumers))
        for leaf in final.leaves():
            if leaf.action == "t/flaky":  # not idempotent: at most one call per attempt
                assert calls.get(leaf.payload, 0) <= leaf.attempt


@pytest.mark.parametrize("kind", ["sqlite", "memory", "postgres"])
def test_a_worker_that_starts_wakes_a_signal_taken_but_not_recorded(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """A process that died after taking a signal and before recording the await's result
    leaves the signal taken by the await, which still waits (nothing unconsumed: no round
    finds it): the one-host worker finds such runs when it starts, and the await gets the
    same signal again."""
    urls = {"sqlite": f"sqlite:///{tmp_path / 'runs.db'}", "memory": "memory:"}
    url = urls[kind] if kind in urls else request.getfixturevalue("pg_url")
    store = open_store(url)
    try:
        run = ablauf_lang.eval("(with-augment [[] [:got]] (await!! :go))", store=store, detach=True)
        (leaf,) = run.job.leaves()
        ablauf_lang.signal(run.run_id, "go", "first", store=store)
        assert store.take_signal(run.run_id, "go", leaf.id) == (1, "first")  # then "died"
        assert store.due_runs(time.time()) == []
        assert store.taken_unrecorded() == [run.run_id]
        assert asyncio.run(Sleeper(store).recover()) == 1
        final = store.load(run.run_id).job
        assert final.status == "success"
        assert final.context["got"] == "first"
        assert store.taken_unrecorded() == []
        assert [s["consumed_by"] for s in store.signals(run.run_id)] == [leaf.id]
    finally:
        store.close()


def test_detach_keeps_a_non_idempotent_retry_and_hands_over_an_idempotent_one(
    tmp_path: Path,
) -> None:
    """A run is handed over only as it can be taken over: a retry's next attempt of an
    action that is not idempotent is performed by the process that scheduled it (a later
    taker could not tell it from an attempt begun before a crash: it would be
    `interrupted`); an idempotent one is handed over in its wait and finished by the
    worker."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    calls: list[int] = []

    def flaky(payload: Any, context: Any) -> str:
        calls.append(payload)
        if calls.count(payload) == 1:
            raise ConnectionError("once")
        return "ok"

    clock = VirtualClock(start=0.0, frozen=True)
    for head, payload in (("action!!", 1), ("idempotent-action!!", 2)):
        src = f"(do!! ({head} :t/flaky {payload} {{:retry {{:max 3 :delay 60}}}}) (await!! :go))"
        run = ablauf_lang.eval(src, {"t/flaky": flaky}, store=url, detach=True, clock=clock)
        assert run.status == "pending"
        (wait,) = waits(run.job)
        assert wait.kind == ("signal" if payload == 1 else "retry")
        with open_store(url) as store:
            if payload == 2:
                clock.advance(60)
                assert asyncio.run(Sleeper(store, {"t/flaky": flaky}, clock=clock).round()) == 1
            ablauf_lang.signal(run.run_id, "go", store=store)
            asyncio.run(Sleeper(store, {"t/flaky": flaky}, clock=clock).round())
            final = store.load(run.run_id).job
        assert final.status == "success"
        assert final.node(1).attempts[0]["error"] == "ConnectionError: once"
    assert calls == [1, 1, 2, 2]  # nothing ran twice, nothing was called interrupted
