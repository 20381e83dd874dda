"""Time and signals on the PostgreSQL workers: tasks with a due time (sleeps, retries'
waits, awaits' deadlines), awaits woken by a signal through NOTIFY, the limits of one
attempt (`:timeout`, `:heartbeat`), and a worker killed while a run sleeps.

Real PostgreSQL (`tests/pg.py`), real worker processes (`tests/pg_worker.py`, which poll
only every 30 s: anything that waited for a poll shows) and in-process workers for actions
defined here.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

import ablauf_lang
from ablauf_lang import queue
from ablauf_lang.engine.nodes import LeafState, Status
from ablauf_lang.runners import worker
from ablauf_lang.stores.postgres import PostgresStore
from tests import pg_actions
from tests.pg import PgServer, wait_for
from tests.test_worker import POLL, database, query, running

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]


@pytest.fixture
def dsn(monkeypatch: pytest.MonkeyPatch, pg_server: PgServer) -> str:
    """A fresh database; the test actions of this process write to it."""
    url = database(pg_server)
    monkeypatch.setenv(pg_actions.DSN_VAR, url)
    return url


@contextmanager
def in_process(
    url: str, actions: dict[str, Callable[..., Any]], concurrency: int = 2, **kw: float
) -> Iterator[worker.Worker]:
    """A worker running in a thread of this process (for actions defined in the test)."""
    stop = threading.Event()
    w = worker.Worker(url, actions, concurrency, stop=stop, poll=POLL, **kw)
    thread = threading.Thread(target=w.run, name="test-worker")
    thread.start()
    try:
        wait_for(
            lambda: (
                query(
                    url,
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'ablauf-listen'",
                )[0][0]
                >= 1
            ),
            30,
            what="the worker to listen",
        )
        yield w
    finally:
        stop.set()
        thread.join(timeout=30)


def send(url: str, run_id: str, name: str, value: Any = None) -> int:
    """Send a signal as `ablauf signal` does: into the mailbox, then wake the awaits."""
    return int(ablauf_lang.signal(run_id, name, value, store=url))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tasks_of(url: str, run_id: str) -> list[tuple[Any, ...]]:
    return query(
        url,
        "SELECT action, lease_owner IS NOT NULL, not_before = 'infinity', "
        "not_before > now() FROM ablauf.tasks WHERE run_id = %s ORDER BY task_id",
        run_id,
    )


# ---------------------------------------------------------------- the queue itself


def test_a_task_due_later_is_not_taken_before_its_time(dsn: str) -> None:
    url = dsn
    store = PostgresStore.from_url(url)
    try:
        run_id = worker.submit("(do!! (sleep!! 1.5) (action!! :test/noop 1))", url)
        step = queue.claim(store, "t/0", 30.0, 4, None)
        assert [c.kind for c in step] == ["restart"]
        done = queue.run_restart(store, run_id, worker.advance, worker="t/0", claim=1, lease=30)
        assert done is not None
        assert done.claimed == []  # a sleep is never leased at once
        assert tasks_of(url, run_id) == [("ablauf/sleep", False, False, True)]
        assert queue.claim(store, "t/0", 30.0, 4, None) == []
        with store.session() as conn:
            left = queue.next_due(conn)
            assert left is not None
            assert 1.0 < left <= 1.5
            assert queue.next_due(conn, ["test/noop"]) is None  # not among these actions
        time.sleep(left + 0.05)
        taken = queue.claim(store, "t/0", 30.0, 4, None)
        assert [(c.kind, c.dispatch and c.dispatch.action) for c in taken] == [
            ("action", "ablauf/sleep")
        ]
    finally:
        store.close()


def test_the_claim_and_the_idle_wait_use_the_indexes(dsn: str) -> None:
    url = dsn
    run_id = worker.submit("(action!! :test/noop 1)", url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(  # 5,000 parked tasks, and the planner told so
            "INSERT INTO ablauf.tasks (run_id, kind, node, attempt, action, idempotent, "
            "payload, context, not_before) SELECT %s, 'action', 1, g, 'ablauf/sleep', true, "
            "'{}', '{}', now() + g * interval '1 minute' FROM generate_series(1, 5000) g",
            (run_id,),
        )
        conn.execute("ANALYZE ablauf.tasks")

        def plan(sql: str, *params: Any) -> str:
            rows = conn.execute("EXPLAIN " + sql, params).fetchall()
            return "\n".join(r[0] for r in rows)

        due = plan(queue.tasks.Q["next_due"], ["ablauf/sleep"], ["ablauf/sleep"])
        assert "tasks_due" in due
        assert "Seq Scan" not in due
        claim = plan(queue.tasks.Q["claim"], None, None, 4, None, None, 4, 4, "x", 30.0)
        assert "tasks_ready" in claim, claim
        assert "tasks_due" in claim, claim


# ---------------------------------------------------------------- sleeps on workers


def test_a_sleep_wakes_on_time_with_two_workers(dsn: str) -> None:
    url = dsn
    with running(url, 2, concurrency=2) as group:
        start = time.time()
        run_id = worker.submit("(do!! (action!! :test/noop 1) (sleep!! 2) (log!! :after))", url)
        wait_for(lambda: tasks_of(url, run_id), 10, what="the sleep to be queued")
        run = worker.wait(run_id, url, timeout=20)
        elapsed = time.time() - start
        assert run.status is Status.SUCCESS, run.to_dict()
        sleep = run.job.node(2)
        assert sleep.result is LeafState.SUCCESS
        assert sleep.wake is not None
        late = sleep.finished_at - sleep.wake if sleep.finished_at else None
        assert 2.0 <= elapsed < 5.0, elapsed
        assert late is not None
        assert -0.05 <= late < 1.5, late
        assert query(url, "SELECT count(*) FROM ablauf.tasks") == [(0,)]
        assert all(p.poll() is None for p in group.procs)


def test_a_retry_waits_its_backoff_on_a_worker(dsn: str) -> None:
    url = dsn
    source = (
        '(action!! :test/fail-once {:name "flaky"} '
        "{:retry {:max 3 :delay 1 :backoff 2} :idempotent? true})"
    )
    with running(url, 1, concurrency=2):
        run_id = worker.submit(source, url)
        run = worker.wait(run_id, url, timeout=30)
    assert run.status is Status.SUCCESS, run.to_dict()
    leaf = run.job.node(0)
    assert leaf.attempt == 2
    assert len(leaf.attempts) == 1
    assert "transient failure" in str(leaf.attempts[0]["error"])
    times = [r[0] for r in query(url, "SELECT at FROM calls WHERE name = 'flaky' ORDER BY at")]
    assert len(times) == 2
    gap = (times[1] - times[0]).total_seconds()
    assert 1.0 <= gap < 2.5, gap  # the delay, not at once and not a 30 s poll


def test_a_deadline_drops_the_parked_tasks_it_cut_and_its_own_timer(dsn: str) -> None:
    url = dsn
    cut = (
        "(try!! (timeout!! 1 (sleep!! 30) (action!! :test/insert {:n 1})) (rescue!! (log!! :cut)))"
    )
    kept = "(timeout!! 60 (action!! :test/noop 1))"
    with running(url, 1, concurrency=2):
        start = time.time()
        cut_id = worker.submit(cut, url)
        run = worker.wait(cut_id, url, timeout=15)
        assert time.time() - start < 5.0
        assert run.status is Status.SUCCESS, run.to_dict()
        assert run.job.node(4).result is LeafState.TIMEOUT  # the sleep the deadline cut
        kept_id = worker.submit(kept, url)
        assert worker.wait(kept_id, url, timeout=15).status is Status.SUCCESS
        # Neither the 30 s sleep nor the 60 s timer is left in the queue.
        assert query(url, "SELECT count(*) FROM ablauf.tasks") == [(0,)]
    assert query(url, "SELECT count(*) FROM hits") == [(0,)]


# ---------------------------------------------------------------- awaits and signals


def test_an_await_is_woken_by_a_signal_and_costs_nothing_while_parked(dsn: str) -> None:
    url = dsn
    source = "(do!! (await!! :approval) (action!! :test/noop (get ctx :approval)))"
    with running(url, 2, concurrency=2) as group:
        run_id = worker.submit(source, url)
        wait_for(
            lambda: tasks_of(url, run_id) == [("ablauf/await", False, True, True)],
            10,
            what="the await to be parked",
        )
        pids = [p.pid for p in group.procs]
        before = [cpu_seconds(pid) for pid in pids]
        time.sleep(3.0)
        used = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
        assert all(u < 0.15 for u in used), used  # parked: no polling, no work
        start = time.perf_counter()
        send(url, run_id, "approval", {"by": "ops"})
        run = worker.wait(run_id, url, timeout=10)
        woke = time.perf_counter() - start
    assert run.status is Status.SUCCESS, run.to_dict()
    assert run.job.node(1).output == {"by": "ops"}
    assert woke < 2.0, woke  # NOTIFY, not the 30 s poll
    assert query(url, "SELECT consumed_by FROM ablauf.signals") == [(1,)]


def test_a_run_submitted_with_a_break_parks_on_the_workers_until_continued(dsn: str) -> None:
    url = dsn
    calls: list[Any] = []

    def push(payload: Any, context: Any) -> Any:
        calls.append(payload)
        return payload

    source = "(do!! (action!! :t/push 1) (action!! :t/other 2) (action!! :t/push 3))"
    actions = {"t/push": push, "t/other": push}
    with in_process(url, actions):
        run_id = worker.submit(source, url, breaks=["t/push"])
        with PostgresStore.from_url(url) as store:

            def waiting() -> str | None:
                return store.info(run_id).waiting

            wait_for(lambda: waiting() == "waiting: ablauf/break", 10, what="the break")
            assert calls == []
            send(url, run_id, "ablauf/break")
            wait_for(lambda: calls == [1, 2] and waiting() is not None, 10, what="the 2nd")
            assert waiting() == "waiting: ablauf/break"
            send(url, run_id, "ablauf/break")
            run = worker.wait(run_id, url, timeout=10)
    assert run.status is Status.SUCCESS, run.to_dict()
    assert calls == [1, 2, 3]


def test_a_signal_sent_before_the_await_is_waiting_in_the_mailbox(dsn: str) -> None:
    url = dsn
    source = '(do!! (action!! :test/slow {:seconds 1}) (await!! :go) (log!! "went"))'
    with running(url, 1, concurrency=2):
        run_id = worker.submit(source, url)
        send(url, run_id, "go", 7)  # the run is still in its first step
        run = worker.wait(run_id, url, timeout=10)
    assert run.status is Status.SUCCESS, run.to_dict()
    assert run.job.node(2).output == 7


def test_an_await_times_out_at_its_deadline(dsn: str) -> None:
    url = dsn
    source = "(try!! (await!! :never {:timeout 1.5}) (rescue!! (log!! :gave-up)))"
    with running(url, 1, concurrency=2):
        start = time.time()
        run_id = worker.submit(source, url)
        run = worker.wait(run_id, url, timeout=15)
        elapsed = time.time() - start
    leaf = next(leaf for leaf in run.job.leaves() if leaf.action == "ablauf/await")
    assert leaf.result is LeafState.TIMEOUT
    assert "no signal never" in str(leaf.error)
    assert 1.5 <= elapsed < 5.0, elapsed


def test_each_signal_is_delivered_once_to_one_await(dsn: str) -> None:
    url = dsn
    source = "(dopar!! (await!! :vote) (await!! :vote) (await!! :vote))"
    with running(url, 2, concurrency=2):
        run_id = worker.submit(source, url)
        wait_for(lambda: len(tasks_of(url, run_id)) == 3, 10, what="three awaits")
        for i in range(3):
            send(url, run_id, "vote", i)
        run = worker.wait(run_id, url, timeout=15)
    assert run.status is Status.SUCCESS, run.to_dict()
    assert sorted(leaf.output for leaf in run.job.leaves()) == [0, 1, 2]
    taken = query(url, "SELECT seq, consumed_by FROM ablauf.signals ORDER BY seq")
    assert sorted(node for _, node in taken) == [1, 2, 3]


def test_a_signal_taken_by_a_worker_that_died_goes_to_the_same_await_once(dsn: str) -> None:
    url = dsn
    store = PostgresStore.from_url(url)
    try:
        run_id = worker.submit("(do!! (await!! :go) (log!! :done))", url)
        # A worker (played here) takes the run's first step and the await, leased for 1 s,
        # takes the first signal out of the mailbox, and dies before delivering it.
        assert [c.kind for c in queue.claim(store, "dead/0", 1.0, 1, None)] == ["restart"]
        step = queue.run_restart(store, run_id, worker.advance, worker="dead/0", claim=1, lease=1)
        assert step is not None
        assert [d.action for _, d in step.claimed] == ["ablauf/await"]
        node = step.claimed[0][1].id
        store.send_signal(run_id, "go", "first")
        store.send_signal(run_id, "go", "second")
        assert store.take_signal(run_id, "go", node) == (1, "first")
    finally:
        store.close()
    with running(url, 1, concurrency=2, lease=2.0):  # its janitor recovers the lease
        run = worker.wait(run_id, url, timeout=20)
    assert run.status is Status.SUCCESS, run.to_dict()
    assert run.job.node(node).output == "first"
    taken = query(url, "SELECT seq, consumed_by FROM ablauf.signals ORDER BY seq")
    assert taken == [(1, node), (2, None)]  # the second one stays in the mailbox


# ---------------------------------------------------------------- a worker killed


def test_a_worker_killed_during_a_sleep_or_a_retry_wait_the_other_wakes_the_run_once(
    dsn: str,
) -> None:
    url = dsn
    sleeper = "(do!! (action!! :test/noop 1) (sleep!! 3) (action!! :test/insert {:n 1}))"
    retrier = (
        '(do!! (action!! :test/fail-once {:name "k"} {:retry {:max 2 :delay 3}})'
        " (action!! :test/insert {:n 2}))"
    )
    with running(url, 2, concurrency=2) as group:
        ids = [worker.submit(sleeper, url), worker.submit(retrier, url)]
        wait_for(
            lambda: [[t[3] for t in tasks_of(url, i)] for i in ids] == [[True], [True]],
            10,
            what="the sleep and the retry to be parked",
        )
        victim = group.procs[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        runs = [worker.wait(i, url, timeout=20) for i in ids]
    for run in runs:
        assert run.status is Status.SUCCESS, run.to_dict()
    assert query(url, "SELECT n, count(*) FROM hits GROUP BY n ORDER BY n") == [(1, 1), (2, 1)]
    assert query(url, "SELECT count(*) FROM calls WHERE name = 'k'") == [(2,)]
    for run_id in ids:
        seqs = query(url, "SELECT seq FROM ablauf.restarts WHERE run_id = %s", run_id)
        assert len(seqs) == len(set(seqs))


# ---------------------------------------------------------------- limits of an attempt


def _hang(payload: Any, context: Any) -> Any:
    time.sleep(float(payload))
    return "late"


async def _hang_async(payload: Any, context: Any) -> Any:
    import asyncio

    await asyncio.sleep(float(payload))
    return "late"


def _beating(payload: Any, context: Any) -> Any:
    for _ in range(int(payload)):
        ablauf_lang.heartbeat()
        time.sleep(0.1)
    return "alive"


LIMITED = {"t/hang": _hang, "t/hang-async": _hang_async, "t/beating": _beating}


def test_an_attempt_past_its_timeout_or_heartbeat_is_a_timeout(dsn: str) -> None:
    url = dsn
    source = (
        "(dopar!! (try!! (action!! :t/hang 30 {:timeout 0.5}) (rescue!! (log!! :cut)))"
        " (try!! (action!! :t/hang-async 30 {:timeout 0.5}) (rescue!! (log!! :cut)))"
        " (try!! (action!! :t/hang 30 {:heartbeat 0.5}) (rescue!! (log!! :silent)))"
        " (action!! :t/beating 15 {:heartbeat 0.5}))"
    )
    with in_process(url, LIMITED, concurrency=4):
        start = time.time()
        run_id = worker.submit(source, url)
        run = worker.wait(run_id, url, timeout=20)
        elapsed = time.time() - start
    assert run.status is Status.SUCCESS, run.to_dict()
    by_action: dict[str, list[Any]] = {}
    for leaf in run.job.leaves():
        by_action.setdefault(leaf.action, []).append(leaf)
    hung = sorted(str(leaf.error) for leaf in by_action["t/hang"])
    assert [leaf.result for leaf in by_action["t/hang"]] == [LeafState.TIMEOUT] * 2
    assert hung[0].startswith("heartbeat: none for"), hung
    assert hung[1].startswith("timeout:"), hung
    assert by_action["t/hang-async"][0].result is LeafState.TIMEOUT
    assert by_action["t/beating"][0].output == "alive"
    assert elapsed < 10, elapsed
