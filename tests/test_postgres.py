"""The PostgreSQL store against a real server started by the tests (`tests/pg.py`).

Covers: the schema it creates, migrates and refuses; one-line errors; the JobStore protocol
(`ablauf_lang.eval` and the runs operations on a `postgresql://` URL); and the queue
operations the workers build on (SKIP LOCKED, batching, leases, at-most-once results).
"""

from __future__ import annotations

import psycopg
import pytest

import ablauf_lang
from ablauf_lang import serde
from ablauf_lang.errors import RunError, StoreError
from ablauf_lang.job import INTERRUPTED, restart_job
from ablauf_lang.nodes import LeafState, Status, success
from ablauf_lang.stores import postgres as pg
from ablauf_lang.stores.base import open_store

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

PROGRAM = """
(do!! (log!! "start")
      (with-augment [identity :first] (log!! {:a 1}))
      (dopar!! (log!! 1) (log!! 2) (idempotent-action!! :action/log 3))
      (try!! (fail!! "boom")
             (rescue!! (log!! "rescued"))
             (finally!! (log!! "done"))))
"""


def same(a: ablauf_lang.Job, b: ablauf_lang.Job) -> bool:
    data_a, data_b = serde.to_data(a), serde.to_data(b)
    data_a.pop("touched")
    data_b.pop("touched")
    return data_a == data_b


@pytest.fixture
def store(pg_url: str) -> pg.PostgresStore:
    s = pg.PostgresStore.from_url(pg_url)
    yield s
    s.close()


# ---------------------------------------------------------------- schema


def test_the_store_creates_a_readable_schema_once(pg_url: str) -> None:
    pg.PostgresStore.from_url(pg_url).close()
    pg.PostgresStore.from_url(pg_url).close()  # a second open migrates nothing
    with psycopg.connect(pg_url) as conn:
        versions = conn.execute("SELECT version FROM ablauf.schema_version").fetchall()
        assert versions == [(len(pg.migrations()),)]
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'ablauf'"
            )
        }
    assert {
        "runs",
        "nodes",
        "deltas",
        "context",
        "tasks",
        "restarts",
        "run_list",
        "queue",
    } <= tables


def test_a_newer_schema_is_refused_in_one_line(pg_url: str) -> None:
    pg.PostgresStore.from_url(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO ablauf.schema_version (version) VALUES (99)")
    with pytest.raises(StoreError) as err:
        open_store(pg_url)
    assert "schema version 99" in err.value.message
    assert "upgrade" in err.value.message
    assert "\n" not in err.value.message


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("postgresql://postgres@127.0.0.1:1/nothing", "cannot connect"),
        ("postgresql://postgres@127.0.0.1:1/x?sslmode=nonsense", "sslmode"),
        ("postgresql:///x?nosuchoption=1", "bad PostgreSQL URL"),
    ],
)
def test_unusable_urls_give_one_line_store_errors(url: str, words: str) -> None:
    with pytest.raises(StoreError) as err:
        open_store(url)
    assert words in err.value.message
    assert "\n" not in err.value.message


def test_a_password_never_shows_in_messages() -> None:
    with pytest.raises(StoreError) as err:
        open_store("postgresql://me:s3cret@127.0.0.1:1/x")
    assert "s3cret" not in str(err.value)


def test_a_server_that_went_away_is_a_one_line_store_error(pg_url: str) -> None:
    store = pg.PostgresStore.from_url(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'ablauf-store'"
        )
    with pytest.raises(pg.ConnectionLost) as err:
        store.list_runs()
    assert "\n" not in err.value.message
    store.close()


# ---------------------------------------------------------------- the JobStore protocol


def test_eval_records_into_postgres_and_loads_back(pg_url: str, store: pg.PostgresStore) -> None:
    run = ablauf_lang.eval(PROGRAM, store=pg_url, context={"who": "me"})
    assert run.status is Status.SUCCESS
    assert run.context["first"] == {"a": 1}
    loaded = store.load(run.run_id)
    assert same(loaded.job, run.job)
    assert loaded.initial_context == {"who": "me"}
    assert loaded.source == PROGRAM
    assert [i.run_id for i in store.list_runs()] == [run.run_id]
    assert store.info(run.run_id).status is Status.SUCCESS
    with psycopg.connect(pg_url) as conn:
        listed = conn.execute("SELECT run_id, status, restarts FROM ablauf.run_list").fetchall()
    assert listed == [(run.run_id, "success", run.job.restarts)]


def test_every_step_loads_back_exactly_past_compaction(store: pg.PostgresStore) -> None:
    # 150 steps: more than one compaction of the deltas into the node rows.
    source = (
        "(do!! "
        + " ".join(f"(with-augment [identity :k{i % 7}] (log!! {i}))" for i in range(150))
        + ")"
    )
    job = ablauf_lang.make_job(source)
    run_id = store.create_run(job, source=source)
    job, dispatches = restart_job(job, [])
    store.record(run_id, job)
    reader = pg.PostgresStore(pg.connect(store.conn.info.dsn), store.url)
    try:
        pg.prepare(reader.conn, reader.conn.info.dsn)
        step = 0
        while dispatches:
            job, dispatches = restart_job(job, [success(d, d.payload) for d in dispatches])
            store.record(run_id, job)
            step += 1
            if step % 10 == 0 or not dispatches:
                assert same(reader.load(run_id).job, job), f"step {step}"
        assert job.status is Status.SUCCESS
        assert step == 150
        assert store.compactions >= 2
    finally:
        reader.close()


def test_runs_operations_work_on_the_same_database(pg_url: str, store: pg.PostgresStore) -> None:
    calls: list[str] = []

    def flaky(payload: object, context: object) -> object:
        calls.append("x")
        if len(calls) == 1:
            raise RuntimeError("first time fails")
        return "ok"

    actions = {"t/flaky": flaky}
    run = ablauf_lang.eval(
        "(do!! (idempotent-action!! :t/flaky 1) (log!! 2))", actions, store=pg_url
    )
    assert run.status is Status.FAILURE
    again = ablauf_lang.retry(run.run_id, store=pg_url, actions=actions)
    assert again.status is Status.SUCCESS
    assert len(calls) == 2
    assert store.info(run.run_id).status is Status.SUCCESS

    # A run left with an action in flight (its process died): resume finishes it.
    job = ablauf_lang.make_job("(do!! (idempotent-action!! :action/log 1) (log!! 2))")
    run_id = store.create_run(job)
    job, _ = restart_job(job, [])
    store.record(run_id, job)
    resumed = ablauf_lang.resume(run_id, store=pg_url)
    assert resumed.status is Status.SUCCESS

    # Abort: the pending step fails with the reason, nothing new starts.
    job = ablauf_lang.make_job("(do!! (log!! 1) (log!! 2))")
    run_id = store.create_run(job)
    job, _ = restart_job(job, [])
    store.record(run_id, job)
    aborted = ablauf_lang.abort_run(run_id, store=pg_url, reason="stop it")
    assert aborted.status is Status.FAILURE
    assert store.load(run_id).job.node(1).error == "stop it"

    with pytest.raises(RunError):
        store.load("no-such-run")


def test_a_stale_writer_is_refused(pg_url: str, store: pg.PostgresStore) -> None:
    job = ablauf_lang.make_job("(do!! (log!! 1) (log!! 2))")
    run_id = store.create_run(job)
    other = pg.PostgresStore.from_url(pg_url)
    try:
        stale = other.load(run_id).job
        job, _ = restart_job(job, [])
        store.record(run_id, job)
        with pytest.raises(StoreError) as err:
            other.record(run_id, restart_job(stale, [])[0])
        assert "another process" in err.value.message
    finally:
        other.close()


# ---------------------------------------------------------------- the queue


def _queued_run(store: pg.PostgresStore, source: str) -> str:
    return store.create_run(ablauf_lang.make_job(source), source=source, enqueue=True)


def test_tasks_are_taken_with_skip_locked(store: pg.PostgresStore, pg_url: str) -> None:
    first = _queued_run(store, "(log!! 1)")
    second = _queued_run(store, "(log!! 2)")
    other = pg.PostgresStore.from_url(pg_url)
    third = pg.PostgresStore.from_url(pg_url)
    try:
        with store.transaction() as a, other.transaction() as b, third.transaction() as c:
            ta = pg.take_task(a)
            tb = pg.take_task(b)  # does not wait for `a`: it skips the locked row
            assert ta is not None
            assert tb is not None
            assert (ta.run_id, tb.run_id) == (first, second)
            assert pg.take_task(c) is None
    finally:
        other.close()
        third.close()


def test_results_queued_together_are_applied_at_once_and_only_once(
    store: pg.PostgresStore,
) -> None:
    run_id = _queued_run(store, "(dopar!! (log!! 1) (log!! 2) (log!! 3))")
    with store.transaction() as conn:
        key = pg.lock_run(conn, run_id)
        step = store.restart(run_id, key, [], worker="test")
    assert len(step.job.pending()) == 3
    with store.transaction() as conn:
        actions = conn.execute(
            "SELECT node, attempt FROM ablauf.tasks WHERE kind = 'action' ORDER BY node"
        ).fetchall()
        conn.execute("DELETE FROM ablauf.tasks WHERE kind = 'action'")
    assert actions == [(1, 1), (2, 1), (3, 1)]
    with store.transaction() as conn:
        for node, attempt in actions:
            pg.enqueue_restart(conn, run_id, success(node, node * 10, attempt=attempt))
        pg.enqueue_restart(conn, run_id, success(1, 999, attempt=1))  # delivered twice
    with store.transaction() as conn:
        key = pg.lock_run(conn, run_id)
        step = store.restart(run_id, key, [], worker="test")
    assert step.results == 4  # one restart took every queued result
    assert step.job.status is Status.SUCCESS
    assert step.job.node(1).output == 10  # the duplicate was not applied
    assert store.queue_counts() == {"ready": 0, "leased": 0, "broken": 0}
    with store.transaction() as conn:
        log = conn.execute(
            "SELECT results, dispatches FROM ablauf.restarts WHERE run_id = %s ORDER BY seq",
            (run_id,),
        ).fetchall()
    assert log == [(0, 3), (4, 0)]


def test_expired_leases_are_recovered_by_the_rules(store: pg.PostgresStore) -> None:
    run_id = _queued_run(store, "(dopar!! (idempotent-action!! :t/a 1) (action!! :t/b 2))")
    with store.transaction() as conn:
        key = pg.lock_run(conn, run_id)
        step = store.restart(run_id, key, [], worker="dead:1", claim=2, lease=30)
    assert len(step.claimed) == 2
    with store.transaction() as conn:
        assert pg.recover_leases(conn) == (0, 0)  # leases still valid
        conn.execute("UPDATE ablauf.tasks SET lease_until = now() - interval '1 second'")
        assert pg.recover_leases(conn) == (1, 1)
        ready = conn.execute(
            "SELECT kind, node, lease_owner FROM ablauf.tasks ORDER BY task_id"
        ).fetchall()
    assert ready == [("action", 1, None), ("restart", None, None)]
    with store.transaction() as conn:
        key = pg.lock_run(conn, run_id)
        step = store.restart(run_id, key, [], worker="test")
    leaf = step.job.node(2)
    assert leaf.result is LeafState.FAILURE
    assert leaf.error.startswith(INTERRUPTED)
    assert "dead:1" in leaf.error
    assert step.job.node(1).result is LeafState.PENDING  # queued to run again
    # A late result from the worker whose lease was recovered is dropped, not applied.
    with store.transaction() as conn:
        task_id = conn.execute("SELECT task_id FROM ablauf.tasks WHERE node = 1").fetchone()[0]
    late = store.deliver(
        run_id, [(task_id, success(1, "late", attempt=1))], worker="dead:1", claim=0, lease=30
    )
    assert late.outcome == "lost"
    assert store.load(run_id).job.node(1).result is LeafState.PENDING


def test_a_submitted_run_is_queued_in_the_same_transaction(store: pg.PostgresStore) -> None:
    run_id = _queued_run(store, "(log!! 1)")
    assert store.queue_counts() == {"ready": 1, "leased": 0, "broken": 0}
    with pytest.raises(RunError):
        _queued_run_with_id(store, run_id)
    assert store.queue_counts()["ready"] == 1  # the refused duplicate queued nothing


def _queued_run_with_id(store: pg.PostgresStore, run_id: str) -> str:
    return store.create_run(ablauf_lang.make_job("(log!! 2)"), run_id=run_id, enqueue=True)


def test_a_rolled_back_write_is_never_shared_with_other_threads(pg_url: str) -> None:
    shared = pg.SharedKnown()
    a = pg.PostgresStore.from_url(pg_url, known=shared)
    b = pg.PostgresStore.from_url(pg_url, known=shared)
    try:
        job = ablauf_lang.make_job("(do!! (log!! 1) (log!! 2))")
        run_id = a.create_run(job)
        before = shared[run_id].seq
        seen: list[int] = []

        def write_then_fail() -> None:
            with a.transaction():
                a.record(run_id, restart_job(job, [])[0])
                seen.append(shared[run_id].seq)  # learned, but not shared before COMMIT
                raise RuntimeError("roll back")

        with pytest.raises(RuntimeError):
            write_then_fail()
        assert seen == [before]
        assert run_id not in shared  # the write never happened: nothing of it is kept
        b.record(run_id, restart_job(b.load(run_id).job, [])[0])
        assert shared[run_id].seq == before + 1
    finally:
        a.close()
        b.close()


def test_a_delta_sent_with_the_commit_must_be_this_transactions(store: pg.PostgresStore) -> None:
    job = ablauf_lang.make_job("(do!! (log!! 1) (log!! 2))")
    run_id = store.create_run(job)
    store.record(run_id, restart_job(job, [])[0])  # write 1, an earlier transaction
    with store.transaction() as conn:
        key = pg.lock_run(conn, run_id)
    with pytest.raises(pg.WriteConflict), store.transaction() as conn:
        conn.execute("SELECT ablauf.check_delta(%s, 1)", (key,))


def test_claimed_actions_are_delivered_together(store: pg.PostgresStore) -> None:
    run_id = _queued_run(store, "(dopar!! (log!! 1) (log!! 2) (log!! 3))")
    (first,) = store.claim("w/0", 30, limit=5)
    assert first.dispatch is None  # the submitted run's first restart: named, not leased
    step = store.run_restart(run_id, worker="w/0", claim=0, lease=30)
    assert step is not None
    assert len(step.job.pending()) == 3
    taken = store.claim("w/1", 30, limit=5)
    assert [c.dispatch.id for c in taken] == [1, 2, 3]
    assert store.queue_counts() == {"ready": 0, "leased": 3, "broken": 0}
    got = store.deliver(
        run_id,
        [(c.task_id, success(c.dispatch, c.dispatch.payload)) for c in taken],
        worker="w/1",
        claim=0,
        lease=30,
    )
    assert got.outcome == "restarted"
    assert got.step.results == 3  # one restart for the three results
    assert got.step.job.status is Status.SUCCESS
    assert store.queue_counts() == {"ready": 0, "leased": 0, "broken": 0}
    assert store.info(run_id).status is Status.SUCCESS
