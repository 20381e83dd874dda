"""Deliveries at once (`queue.deliver`): a worker that knows a run whose only step in flight
is the one it delivers sends the delivery, the step it computed meanwhile and the COMMIT
together (a step of a sequence then takes one round trip). When the task or the run turns
out not to be its own to write (the lease lost, the run locked or written elsewhere),
nothing of that step is written and the result goes the usual way: these tests make each
of those happen, and check that runs of any shape end as they end in memory, each action
performed once."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ablauf_lang
from ablauf_lang import queue
from ablauf_lang.engine.kinds import Leaf
from ablauf_lang.engine.nodes import LeafState, Status, success
from ablauf_lang.runners import worker
from ablauf_lang.stores import postgres as pg
from ablauf_lang.stores.postgres import PostgresStore
from tests.pg import PgServer
from tests.strategies import workflow_sources

POLL = 30.0  # the safety poll: a step that waits for it shows as a slow test
ME = "test/0"


def _database(server: PgServer) -> str:
    url = server.create_database()
    PostgresStore.from_url(url).close()
    return url


@pytest.fixture
def url(pg_server: PgServer) -> str:
    return _database(pg_server)


@pytest.fixture
def store(url: str) -> Iterator[PostgresStore]:
    s = PostgresStore.from_url(url)
    try:
        yield s
    finally:
        s.close()


def _first_action(store: PostgresStore, source: str) -> tuple[str, int, Any]:
    """Submit `source` and take its first restart by hand, leasing its action to ME: the
    run's id, the action's task id and its dispatch."""
    run_id = worker.submit(source, store._dsn)
    taken = queue.claim(store, ME, 30, 1)
    assert [c.run_id for c in taken] == [run_id]
    step = queue.run_restart(store, run_id, worker.advance, worker=ME, claim=1, lease=30)
    assert step is not None
    assert len(step.claimed) == 1
    task_id, dispatch = step.claimed[0]
    return run_id, task_id, dispatch


def _deliver(store: PostgresStore, run_id: str, task_id: int, dispatch: Any) -> queue.Delivery:
    result = success(dispatch, dispatch.payload)
    return queue.deliver(
        store, run_id, [(task_id, result)], worker.advance, worker=ME, claim=1, lease=30
    )


def _head(url: str, run_id: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT head_seq FROM ablauf.runs WHERE run_id = %s", (run_id,)
        ).fetchone()
    assert row is not None
    return int(row[0])


SEQUENCE = "(do!! (action!! :t/a 1) (action!! :t/a 2) (action!! :t/a 3))"
WIDE = "(do!! (action!! :t/a 0) (pmap!! [i (range 50)] (action!! :t/a i)))"


def test_a_sequence_is_delivered_at_once_step_after_step(store: PostgresStore) -> None:
    run_id, task_id, dispatch = _first_action(store, SEQUENCE)
    for n in (2, 3):
        got = _deliver(store, run_id, task_id, dispatch)
        assert got.outcome == "restarted"
        assert got.step is not None
        ((task_id, dispatch),) = got.step.claimed
        assert dispatch.payload == n
    got = _deliver(store, run_id, task_id, dispatch)
    assert got.outcome == "restarted"
    assert got.step is not None
    assert got.step.job.done
    assert (store.at_once, store.at_once_missed) == (3, 0)
    job = store.load(run_id).job
    assert job.status is Status.SUCCESS
    assert [leaf.output for leaf in job.leaves()] == [1, 2, 3]
    # Every write is in the history, one after another, as the usual way writes them.
    history = ablauf_lang.run_history(run_id, store=store._dsn)
    assert [s.restart for s in history.steps] == list(range(job.restarts + 1))


def test_a_run_locked_elsewhere_gets_the_result_queued(url: str, store: PostgresStore) -> None:
    run_id, task_id, dispatch = _first_action(store, SEQUENCE)
    head = _head(url, run_id)
    with psycopg.connect(url) as other:
        other.execute("SELECT 1 FROM ablauf.runs WHERE run_id = %s FOR NO KEY UPDATE", (run_id,))
        got = _deliver(store, run_id, task_id, dispatch)
        assert got.outcome == "queued"
        assert (store.at_once, store.at_once_missed) == (0, 1)
    assert _head(url, run_id) == head  # nothing of the step computed at once was written
    # Whoever restarts the run next applies the queued result, once.
    step = queue.run_restart(store, run_id, worker.advance, worker=ME, claim=1, lease=30)
    assert step is not None
    assert step.results == 1
    assert [d.payload for _, d in step.claimed] == [2]


def test_a_process_that_never_saw_the_run_reads_it_only_once_it_has_the_lock(
    url: str, store: PostgresStore
) -> None:
    """A delivery from a process that does not know the run (another worker's): while
    the run is locked elsewhere its result is queued and nothing of the run is read (a
    wide run's delivery read its 100,000 nodes for nothing each time); once the lock is
    free, the run is read (once) and restarted."""
    run_id, task_id, dispatch = _first_action(store, WIDE)
    stranger = PostgresStore.from_url(url)  # a process of its own: its own SharedKnown
    reads: list[str] = []  # the run's rows asked for (read along, or a load)
    real = stranger.load_queries

    def load_queries(run: str) -> Any:
        reads.append(run)
        return real(run)

    stranger.load_queries = load_queries  # type: ignore[method-assign]
    try:
        result = success(dispatch, dispatch.payload)
        with psycopg.connect(url) as other:
            other.execute(
                "SELECT 1 FROM ablauf.runs WHERE run_id = %s FOR NO KEY UPDATE", (run_id,)
            )
            got = queue.deliver(
                stranger, run_id, [(task_id, result)], worker.advance, worker=ME, claim=1, lease=30
            )
            assert got.outcome == "queued"
            assert reads == []
        step = queue.run_restart(stranger, run_id, worker.advance, worker=ME, claim=1, lease=30)
        assert step is not None
        assert step.results == 1
        assert reads == [run_id]
    finally:
        stranger.close()


def test_threads_of_a_process_read_a_run_along_one_at_a_time(url: str) -> None:
    shared = pg.SharedKnown()
    assert shared.start_reading("r1")
    assert not shared.start_reading("r1")  # another thread reads it: not again
    assert shared.start_reading("r2")
    shared.done_reading("r1")
    assert shared.start_reading("r1")


def test_statements_skipped_with_a_failed_delivery_are_prepared_again(
    url: str, store: PostgresStore
) -> None:
    """psycopg takes a statement as prepared once it sent its PREPARE, but the server
    skips every statement of a pipeline after a failed one: after a delivery at once that
    failed, a statement prepared first in it must not be taken as prepared ("prepared
    statement _pg3_N does not exist" at its next use, which set the run's restart aside:
    found by bench/bench_short.py with two workers). psycopg forgets what it prepared at
    a ROLLBACK only the first time it meets one; here ROLLBACK is prepared itself, as on
    a connection that has run a while."""
    store.conn.prepare_threshold = 1  # statements prepared at their second use
    for _ in range(2):
        store.conn.execute("ROLLBACK")
    run_id, task_id, dispatch = _first_action(store, SEQUENCE)
    with psycopg.connect(url) as holder:
        holder.execute("SELECT 1 FROM ablauf.runs WHERE run_id = %s FOR NO KEY UPDATE", (run_id,))
        assert _deliver(store, run_id, task_id, dispatch).outcome == "queued"
    assert store.at_once_missed == 1
    # The statements of a restart, each at its second use (prepared in the failed one).
    step = queue.run_restart(store, run_id, worker.advance, worker=ME, claim=1, lease=30)
    assert step is not None
    assert [d.payload for _, d in step.claimed] == [2]


def test_a_lost_lease_drops_the_result_and_writes_nothing(url: str, store: PostgresStore) -> None:
    run_id, task_id, dispatch = _first_action(store, SEQUENCE)
    head = _head(url, run_id)
    with psycopg.connect(url) as other:
        other.execute(
            "UPDATE ablauf.tasks SET lease_owner = 'another' WHERE task_id = %s", (task_id,)
        )
    got = _deliver(store, run_id, task_id, dispatch)
    assert (got.outcome, got.lost) == ("lost", 1)
    assert (store.at_once, store.at_once_missed) == (0, 1)
    assert _head(url, run_id) == head


def test_a_run_written_elsewhere_is_caught_up_with_not_written_over(
    url: str, store: PostgresStore
) -> None:
    run_id, task_id, dispatch = _first_action(store, SEQUENCE)
    head = _head(url, run_id)
    # Another process's write after this one's (the same change again: harmless to apply).
    with psycopg.connect(url) as other:
        other.execute(
            "INSERT INTO ablauf.deltas (run, seq, updated, restarts, data) "
            "SELECT run, seq + 1, updated, restarts, data FROM ablauf.deltas d "
            "WHERE run = (SELECT id FROM ablauf.runs WHERE run_id = %s) "
            "ORDER BY seq DESC LIMIT 1",
            (run_id,),
        )
    got = _deliver(store, run_id, task_id, dispatch)
    assert got.outcome == "restarted"
    assert got.step is not None
    assert got.step.seq == head + 2  # after the other write, not in its place
    assert (store.at_once, store.at_once_missed) == (0, 1)


def test_a_fan_out_is_delivered_the_usual_way(store: PostgresStore) -> None:
    """With other steps in flight another result may come at any time: not at once."""
    run_id = worker.submit("(dopar!! (action!! :t/a 1) (action!! :t/a 2))", store._dsn)
    queue.claim(store, ME, 30, 1)
    step = queue.run_restart(store, run_id, worker.advance, worker=ME, claim=2, lease=30)
    assert step is not None
    assert len(step.claimed) == 2
    (t1, d1), (t2, d2) = step.claimed
    assert _deliver(store, run_id, t1, d1).outcome == "restarted"
    assert (store.at_once, store.at_once_missed) == (0, 0)
    got = _deliver(store, run_id, t2, d2)  # the last one in flight: at once
    assert got.outcome == "restarted"
    assert got.step is not None
    assert got.step.job.done
    assert store.at_once == 1


# ---------------------------------------------------------------- runs of any shape


@pytest.fixture(scope="module")
def served(pg_server: PgServer) -> Iterator[tuple[str, worker.Worker, Counter[Any]]]:
    """A database and a worker of 2 slots in this process, counting its actions."""
    url = _database(pg_server)
    calls: Counter[Any] = Counter()
    lock = threading.Lock()

    def act(payload: Any, context: Any) -> Any:
        with lock:
            calls[repr(payload)] += 1
        return payload

    w = worker.Worker(url, {"test/act": act}, 2, poll=POLL)
    thread = threading.Thread(target=w.run)
    thread.start()
    try:
        yield url, w, calls
    finally:
        w.stop.set()
        thread.join(timeout=30)


def test_a_worker_delivers_a_sequence_at_once(url: str) -> None:
    """One slot (nothing else of the process holds the run): each of the 20 results is
    delivered with the step it makes."""
    w = worker.Worker(url, {"test/act": lambda p, c: p}, 1, poll=POLL)
    thread = threading.Thread(target=w.run)
    thread.start()
    try:
        source = "(do!! " + " ".join(f"(action!! :test/act {i})" for i in range(20)) + ")"
        run = worker.wait(worker.submit(source, url), url, timeout=60)
        assert run.status is Status.SUCCESS
        assert [leaf.output for leaf in run.job.leaves()] == list(range(20))
        assert (w.known.at_once, w.known.at_once_missed) == (20, 0)
    finally:
        w.stop.set()
        thread.join(timeout=30)


def _outcome(job: Any) -> list[tuple[int, str, Any]]:
    """Each leaf's result and output. Never run and skipped are the same here: a program
    with nothing to do is done as submitted, and `wait` returns it before a worker's
    restart marks its untaken branches skipped."""
    return [
        (i, str(node.result or LeafState.SKIPPED), node.output)
        for i in range(len(job.paths))
        if isinstance(node := job.node(i), Leaf)
    ]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(source=workflow_sources, data=st.data())
def test_runs_of_any_shape_end_on_the_workers_as_in_memory(
    served: tuple[str, worker.Worker, Counter[Any]], source: str, data: st.DataObject
) -> None:
    url, _w, calls = served
    expected = ablauf_lang.eval(source, {"test/act": lambda p, c: p})
    calls.clear()
    run = worker.wait(worker.submit(source, url), url, timeout=60)
    assert run.status is expected.status
    if "dopar!!" not in source:  # one order of steps: every leaf ends as in memory
        assert _outcome(run.job) == _outcome(expected.job)
    # Each non-idempotent action performed once; an idempotent one at least once (it may
    # run again: performed within a step whose transaction then failed, a delivery at once
    # that found the run taken, and its result went the usual way).
    done = [
        leaf
        for leaf in run.job.leaves()
        if leaf.action == "test/act" and leaf.result is LeafState.SUCCESS
    ]
    once = sum(n for payload, n in calls.items() if payload.startswith("{"))
    again = sum(n for payload, n in calls.items() if payload.startswith("["))
    assert once == sum(1 for leaf in done if not leaf.idempotent), (source, calls)
    assert again >= sum(1 for leaf in done if leaf.idempotent), (source, calls)
