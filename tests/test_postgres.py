"""The PostgreSQL store against a real server started by the tests (`tests/pg.py`).

Covers: the schema it creates, migrates and refuses; one-line errors; the JobStore protocol
(`ablauf_lang.eval` and the runs operations on a `postgresql://` URL); and the queue
operations the workers build on (SKIP LOCKED, batching, leases, at-most-once results).
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ablauf_lang
from ablauf_lang import queue
from ablauf_lang.codec import job as serde
from ablauf_lang.codec.records import text_value
from ablauf_lang.engine.job import INTERRUPTED, restart_job
from ablauf_lang.engine.nodes import Dispatch, LeafState, Status, success
from ablauf_lang.errors import RunError, StoreError
from ablauf_lang.names import AWAIT
from ablauf_lang.queue import tasks
from ablauf_lang.runners.worker import advance, hand_back, requeue_run
from ablauf_lang.stores import postgres as pg
from ablauf_lang.stores import sql as sqlbase
from ablauf_lang.stores.backend import open_store
from tests.pg import CutAfterCommit, PgServer

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
        versions = conn.execute(
            "SELECT version FROM ablauf.schema_version ORDER BY version"
        ).fetchall()
        assert versions == [(v,) for v, _, _ in pg.migrations()]
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
        "workers",
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


def _terminate(url: str, application: str = "ablauf-store") -> None:
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s AND datname = current_database()",
            (application,),
        )


def test_a_client_store_reconnects_and_a_worker_store_says_so_in_one_line(pg_url: str) -> None:
    client = pg.PostgresStore.from_url(pg_url)
    slot = pg.PostgresStore.from_url(pg_url, reconnect=False)  # the worker's slots
    try:
        run = ablauf_lang.eval("(log!! 1)", store=pg_url)
        _terminate(pg_url)
        assert client.info(run.run_id).status is Status.SUCCESS  # reconnected, asked again
        assert client.reconnects == 1
        with pytest.raises(pg.ConnectionLost) as err:
            slot.list_runs()
        assert "\n" not in err.value.message
    finally:
        client.close()
        slot.close()


def test_a_server_that_stays_away_is_a_one_line_store_error(pg_url: str) -> None:
    store = pg.PostgresStore.from_url(pg_url)
    store.reconnect_for = 0.5
    name = pg_url.rsplit("/", 1)[1]
    admin_url = pg_url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
    try:
        start = time.monotonic()
        with pytest.raises(pg.ConnectionLost) as err:
            store.list_runs()
        assert time.monotonic() - start < 10
        assert "could not reconnect within 0.5s" in err.value.message
        assert "\n" not in err.value.message
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
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
    return queue.submit(store, ablauf_lang.make_job(source), source=source)


def test_tasks_are_taken_with_skip_locked(store: pg.PostgresStore, pg_url: str) -> None:
    first = _queued_run(store, "(log!! 1)")
    second = _queued_run(store, "(log!! 2)")
    other = pg.PostgresStore.from_url(pg_url)
    third = pg.PostgresStore.from_url(pg_url)
    try:
        with store.transaction() as a, other.transaction() as b, third.transaction() as c:
            ta = queue.take_task(a)
            tb = queue.take_task(b)  # does not wait for `a`: it skips the locked row
            assert ta is not None
            assert tb is not None
            assert (ta.run_id, tb.run_id) == (first, second)
            assert queue.take_task(c) is None
    finally:
        other.close()
        third.close()


def test_results_queued_together_are_applied_at_once_and_only_once(
    store: pg.PostgresStore,
) -> None:
    run_id = _queued_run(store, "(dopar!! (log!! 1) (log!! 2) (log!! 3))")
    step = queue.run_restart(store, run_id, advance, worker="test", claim=0, lease=30)
    assert len(step.job.pending()) == 3
    with store.transaction() as conn:
        actions = conn.execute(
            "SELECT node, attempt FROM ablauf.tasks WHERE kind = 'action' ORDER BY node"
        ).fetchall()
        conn.execute("DELETE FROM ablauf.tasks WHERE kind = 'action'")
    assert actions == [(1, 1), (2, 1), (3, 1)]
    with store.transaction() as conn:
        for node, attempt in actions:
            queue.enqueue_restart(conn, run_id, success(node, node * 10, attempt=attempt))
        queue.enqueue_restart(conn, run_id, success(1, 999, attempt=1))  # delivered twice
    step = queue.run_restart(store, run_id, advance, worker="test", claim=0, lease=30)
    assert step.results == 4  # one restart took every queued result
    assert step.job.status is Status.SUCCESS
    assert step.job.node(1).output == 10  # the duplicate was not applied
    assert queue.queue_counts(store) == {"ready": 0, "leased": 0, "broken": 0}
    with store.transaction() as conn:
        log = conn.execute(
            "SELECT results, dispatches FROM ablauf.restarts WHERE run_id = %s ORDER BY seq",
            (run_id,),
        ).fetchall()
    assert log == [(0, 3), (4, 0)]


def test_expired_leases_are_recovered_by_the_rules(store: pg.PostgresStore) -> None:
    run_id = _queued_run(store, "(dopar!! (idempotent-action!! :t/a 1) (action!! :t/b 2))")
    step = queue.run_restart(store, run_id, advance, worker="dead:1", claim=2, lease=30)
    assert len(step.claimed) == 2
    with store.transaction() as conn:
        assert queue.recover_leases(conn) == (0, 0)  # leases still valid
        conn.execute("UPDATE ablauf.tasks SET lease_until = now() - interval '1 second'")
        assert queue.recover_leases(conn) == (1, 1)
        ready = conn.execute(
            "SELECT kind, node, lease_owner FROM ablauf.tasks ORDER BY task_id"
        ).fetchall()
    assert ready == [("action", 1, None), ("restart", None, None)]
    step = queue.run_restart(store, run_id, advance, worker="test", claim=0, lease=30)
    leaf = step.job.node(2)
    assert leaf.result is LeafState.FAILURE
    assert leaf.error.startswith(INTERRUPTED)
    assert "dead:1" in leaf.error
    assert step.job.node(1).result is LeafState.PENDING  # queued to run again
    # A late result from the worker whose lease was recovered is dropped, not applied.
    with store.transaction() as conn:
        task_id = conn.execute("SELECT task_id FROM ablauf.tasks WHERE node = 1").fetchone()[0]
    late = queue.deliver(
        store,
        run_id,
        [(task_id, success(1, "late", attempt=1))],
        advance,
        worker="dead:1",
        claim=0,
        lease=30,
    )
    assert late.outcome == "lost"
    assert store.load(run_id).job.node(1).result is LeafState.PENDING


def test_a_submitted_run_is_queued_in_the_same_transaction(store: pg.PostgresStore) -> None:
    run_id = _queued_run(store, "(log!! 1)")
    assert queue.queue_counts(store) == {"ready": 1, "leased": 0, "broken": 0}
    with pytest.raises(RunError):
        _queued_run_with_id(store, run_id)
    assert queue.queue_counts(store)["ready"] == 1  # the refused duplicate queued nothing


def test_a_submit_is_one_round_trip(
    store: pg.PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its BEGIN, statements and COMMIT in one pipeline block, synced once (psycopg's
    `transaction()` in pipeline mode nests two blocks around its BEGIN: three syncs)."""
    syncs: list[str] = []
    for name in ("sync", "__exit__"):
        real = getattr(psycopg.Pipeline, name)

        def counted(
            self: psycopg.Pipeline, *args: object, _real: object = real, _n: str = name
        ) -> object:
            syncs.append(_n)
            return _real(self, *args)  # type: ignore[operator]

        monkeypatch.setattr(psycopg.Pipeline, name, counted)
    program = "(do!! (log!! 1) (dopar!! (log!! 2) (log!! 3)))"
    queue.submit(store, ablauf_lang.make_job(program))  # the run keys taken (a read of its own)
    syncs.clear()
    run_id = queue.submit(store, ablauf_lang.make_job(program))
    assert syncs == ["__exit__"]
    assert store.load(run_id).job.restarts == 0
    assert queue.queue_counts(store)["ready"] == 2  # each with its restart task


_PG_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(st.tuples(_PG_TEXT, _PG_TEXT, st.none() | _PG_TEXT), min_size=2, max_size=12),
    key_texts=st.lists(_PG_TEXT, min_size=2, max_size=6, unique=True),
)
def test_many_rows_in_one_statement_are_the_rows_one_at_a_time(
    store: pg.PostgresStore,
    rows: list[tuple[str, str, str | None]],
    key_texts: list[str],
) -> None:
    """`Dialect.bulk` (rows as one JSON array) writes what `executemany` writes, whatever
    the text: quotes, backslashes, escapes, any character PostgreSQL text holds."""
    keys = []
    for _ in range(2):
        run_id = store.create_run(ablauf_lang.make_job("(log!! 1)"))
        keys.append(
            store.conn.execute(
                "SELECT id FROM ablauf.runs WHERE run_id = %s", (run_id,)
            ).fetchone()[0]
        )
    bulk, single = keys

    def write(key: int, many: bool) -> None:
        nodes = [(key, 100 + i, spec, state, kids) for i, (spec, state, kids) in enumerate(rows)]
        states = [(state[::-1], key, 100 + i) for i, (_, state, _) in enumerate(rows)]
        ctx = [(key, text, pos, text + "'") for pos, text in enumerate(key_texts)]
        with store.transaction() as conn:
            cur = conn.cursor()
            for name, params in (
                ("upsert_node", nodes),
                ("update_state", states),
                ("upsert_context", ctx),
            ):
                if many:
                    store.dialect.many(cur, name, params)
                else:
                    cur.executemany(store.dialect.q(sqlbase.Q[name]), params)

    def read(key: int) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
        nodes = store.conn.execute(
            "SELECT node, spec, state, children FROM ablauf.nodes WHERE run = %s AND node >= 100"
            " ORDER BY node",
            (key,),
        ).fetchall()
        ctx = store.conn.execute(
            "SELECT key, pos, value FROM ablauf.context WHERE run = %s ORDER BY pos", (key,)
        ).fetchall()
        return nodes, ctx

    write(bulk, True)
    write(single, False)
    assert read(bulk) == read(single)
    assert [r[1:] for r in read(bulk)[0]] == [
        (spec, state[::-1], kids) for spec, state, kids in rows
    ]


def test_many_action_tasks_are_queued_as_they_were_asked_for(store: pg.PostgresStore) -> None:
    """`send_actions` of several dispatches (one statement, its rows as JSON): each task
    holds its dispatch, whatever its payload's text; the first `claim` due now are
    leased; a due time, an infinite timeout and a heartbeat are kept."""

    run_id = store.create_run(ablauf_lang.make_job("(log!! 1)"))
    later = time.time() + 3600
    asked = [
        Dispatch(1, "a/one", {"q": 'say "hi"\\ \u00e9'}, False, 1, {"k": [1]}),
        Dispatch(2, "a/two", [1.5, None], True, 3, None, due=later, timeout=float("inf")),
        Dispatch(3, AWAIT, {"signal": "go"}, False, 1, None, timeout=2.5, heartbeat=0.5),
    ]
    with store.transaction() as conn:
        cur, leased = tasks.send_actions(conn, run_id, asked, claim=2, owner="me", lease=60)
        rows = cur.fetchall() if cur is not None else []
    assert leased == 2  # not the second: it is due later
    assert [(int(node), bool(mine)) for _, node, mine in rows] == [(1, True), (3, True)]
    got = store.conn.execute(
        "SELECT node, attempt, action, idempotent, payload, context, lease_owner, tries,"
        " extract(epoch FROM not_before), signal, timeout, heartbeat"
        " FROM ablauf.tasks WHERE run_id = %s AND kind = 'action' ORDER BY node",
        (run_id,),
    ).fetchall()
    assert [(r[0], r[1], r[2], r[3]) for r in got] == [
        (d.id, d.attempt, d.action, d.idempotent) for d in asked
    ]
    assert [text_value(r[4]) for r in got] == [d.payload for d in asked]
    assert text_value(got[0][5]) == {"k": [1]}
    assert [(r[6], r[7]) for r in got] == [("me", 1), (None, 0), ("me", 1)]
    assert got[0][8] is None
    assert abs(float(got[1][8]) - later) < 1e-3
    assert got[2][8] is None
    assert [r[9] for r in got] == [None, None, "go"]
    assert [r[10] for r in got] == [None, float("inf"), 2.5]
    assert [r[11] for r in got] == [None, None, 0.5]


def test_a_client_reads_the_run_a_worker_wrote_by_its_writes_since(pg_url: str) -> None:
    """`load_job` (what `worker.wait` returns) of a run the client submitted: caught up
    with the workers' writes, in one snapshot: what a load builds; a run deleted since,
    and one another store made anew with the same id, are read as they are."""
    client, other = pg.PostgresStore.from_url(pg_url), pg.PostgresStore.from_url(pg_url)
    try:
        job = ablauf_lang.make_job(PROGRAM)
        run_id = client.create_run(job)  # as a submit writes it (the queue aside)
        other.load(run_id)
        job, dispatches = restart_job(job)
        while dispatches:
            other.record(run_id, job)
            job, dispatches = restart_job(job, [success(d, d.payload) for d in dispatches])
        other.record(run_id, job)
        loads = []
        real = client.load
        monkey = pytest.MonkeyPatch()
        monkey.setattr(client, "load", lambda run: loads.append(run) or real(run))
        try:
            got = client.load_job(run_id)
        finally:
            monkey.undo()
        assert same(got, job)
        assert got.status == "success"
        assert loads == []
        other.delete_run(run_id)
        with pytest.raises(RunError):
            client.load_job(run_id)
        again = other.create_run(ablauf_lang.make_job("(log!! 2)"), run_id=run_id)
        assert same(client.load_job(again), other.load(again).job)
    finally:
        client.close()
        other.close()


def _queued_run_with_id(store: pg.PostgresStore, run_id: str) -> str:
    return queue.submit(store, ablauf_lang.make_job("(log!! 2)"), run_id=run_id)


def test_a_rolled_back_write_is_never_shared_with_other_threads(pg_url: str) -> None:
    shared = pg.SharedKnown()
    a = pg.PostgresStore.from_url(pg_url, known=shared)
    b = pg.PostgresStore.from_url(pg_url, known=shared)
    try:
        job = ablauf_lang.make_job("(do!! (log!! 1) (log!! 2))")
        run_id = a.create_run(job)
        before = shared.get(run_id).seq
        seen: list[int] = []

        def write_then_fail() -> None:
            with a.transaction():
                a.record(run_id, restart_job(job, [])[0])
                seen.append(shared.get(run_id).seq)  # learned, but not shared before COMMIT
                raise RuntimeError("roll back")

        with pytest.raises(RuntimeError):
            write_then_fail()
        assert seen == [before]
        assert shared.get(run_id).seq == before  # the write never happened: nothing of it kept
        b.record(run_id, restart_job(b.load(run_id).job, [])[0])
        assert shared.get(run_id).seq == before + 1
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
    (first,) = queue.claim(store, "w/0", 30, limit=5)
    assert first.dispatch is None  # the submitted run's first restart: named, not leased
    step = queue.run_restart(store, run_id, advance, worker="w/0", claim=0, lease=30)
    assert step is not None
    assert len(step.job.pending()) == 3
    taken = queue.claim(store, "w/1", 30, limit=5)
    assert [c.dispatch.id for c in taken] == [1, 2, 3]
    assert queue.queue_counts(store) == {"ready": 0, "leased": 3, "broken": 0}
    got = queue.deliver(
        store,
        run_id,
        [(c.task_id, success(c.dispatch, c.dispatch.payload)) for c in taken],
        advance,
        worker="w/1",
        claim=0,
        lease=30,
    )
    assert got.outcome == "restarted"
    assert got.step.results == 3  # one restart for the three results
    assert got.step.job.status is Status.SUCCESS
    assert queue.queue_counts(store) == {"ready": 0, "leased": 0, "broken": 0}
    assert store.info(run_id).status is Status.SUCCESS


# ---------------------------------------------------------------- migrations under concurrency


def test_many_connections_migrate_a_fresh_database_at_once(pg_server: PgServer) -> None:
    # The cause of `relation "schema_version" already exists`: a backend that looked for
    # the table, then waited for the migration lock in the same transaction, kept seeing
    # no table (its catalog cache), and created it again. Eight at once, three rounds.
    def open_one(url: str, barrier: threading.Barrier, errors: list[BaseException]) -> None:
        conn = pg.connect(url)
        try:
            barrier.wait(timeout=30)
            pg.prepare(conn, url)
        except BaseException as exc:  # collected, asserted below
            errors.append(exc)
        finally:
            conn.close()

    for _ in range(3):
        url = pg_server.create_database()
        barrier = threading.Barrier(8)
        errors: list[BaseException] = []
        threads = [threading.Thread(target=open_one, args=(url, barrier, errors)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT version FROM ablauf.schema_version ORDER BY 1").fetchall()
        assert rows == [(v,) for v, _, _ in pg.migrations()]


def test_a_database_missing_a_later_migration_gets_it(pg_url: str) -> None:
    conn = pg.connect(pg_url)
    try:
        first = pg.migrations()[0][2]
        conn.execute(first.encode())
        conn.execute("INSERT INTO ablauf.schema_version (version) VALUES (1)")
        assert pg.applied_versions(conn) == {1}
        assert pg.migrate(conn, pg_url) == pg.migrations()[-1][0]
        assert pg.applied_versions(conn) == {v for v, _, _ in pg.migrations()}
    finally:
        conn.close()


# ---------------------------------------------------------------- the lost fan-out


def _fanout(store: pg.PostgresStore, n: int, action: str = "t/x") -> str:
    source = "(dopar!! " + " ".join(f"(action!! :{action} {i})" for i in range(n)) + ")"
    run_id = _queued_run(store, source)
    queue.claim(store, "w/0", 30, 1)
    queue.run_restart(store, run_id, advance, worker="w/0", claim=0, lease=30)
    return run_id


def test_a_step_built_on_a_stale_snapshot_is_refused_never_written(pg_url: str) -> None:
    """The stuck 10,000-way fan-out, step by step: slot B's delivery reads the run's newest
    write in the statement that takes the run's lock; its snapshot is older than slot A's
    COMMIT, the lock is taken just after it; the process's cache still has the write
    before A's (A has not shared its own yet), so B builds on it; A shares its write
    before B records. Before the fix, B's record diffed against A's write, wrote A's
    results back to pending under a free write number, and they were lost for good."""
    setup = pg.PostgresStore.from_url(pg_url)
    run_id = _fanout(setup, 3)
    shared = pg.SharedKnown()
    a = pg.PostgresStore.from_url(pg_url, known=shared)
    b = pg.PostgresStore.from_url(pg_url, known=shared)
    blocker = psycopg.connect(pg_url)
    try:
        (ca,) = queue.claim(a, "w/a", 30, 1)
        (cb,) = queue.claim(b, "w/b", 30, 1)
        a.load(run_id)
        before = shared.get(run_id).seq
        blocker.execute("SELECT 1 FROM ablauf.tasks WHERE task_id = %s FOR UPDATE", (cb.task_id,))
        may_share = threading.Event()

        def hook(point: str, store: pg.PostgresStore, _run: str) -> None:
            if store is a and point == "committed":
                may_share.wait(10)  # A is preempted between its COMMIT and sharing it
            if store is b and point == "based":
                may_share.set()  # B chose its base: now A shares its write
                pg_wait(lambda: shared.get(run_id).seq > before)

        a.hook = b.hook = hook
        out: dict[str, object] = {}

        def deliver(name: str, store: pg.PostgresStore, c: queue.Claimed) -> None:
            try:
                out[name] = queue.deliver(
                    store,
                    run_id,
                    [(c.task_id, success(c.dispatch, name))],
                    advance,
                    worker=f"w/{name}",
                    claim=0,
                    lease=30,
                )
            except pg.WriteConflict as exc:
                out[name] = exc

        tb = threading.Thread(target=deliver, args=("b", b, cb))
        tb.start()
        time.sleep(0.3)  # B's statement waits for the task row: its snapshot is taken
        ta = threading.Thread(target=deliver, args=("a", a, ca))
        ta.start()
        pg_wait(lambda: setup.info(run_id).restarts == 2)  # A committed (not shared)
        blocker.rollback()  # B's statement goes on and takes the run's lock
        ta.join(10)
        tb.join(10)
        assert isinstance(out["a"], queue.Delivery)
        assert out["a"].outcome == "restarted"
        assert isinstance(out["b"], pg.WriteConflict)  # refused: nothing was written
        # The worker then queues B's result (its task is still leased to it).
        assert queue.queue_result(b, cb.task_id, success(cb.dispatch, "b"), worker="w/b") == run_id
        queue.claim(setup, "w/0", 30, 1)
        queue.run_restart(setup, run_id, advance, worker="w/0", claim=0, lease=30)
        job = setup.load(run_id).job
        assert job.node(ca.dispatch.id).output == "a"
        assert job.node(cb.dispatch.id).output == "b"
        with psycopg.connect(pg_url) as conn:
            logged = conn.execute(
                "SELECT count(*), sum(results) FROM ablauf.restarts WHERE run_id = %s", (run_id,)
            ).fetchone()
        assert logged == (3, 2)  # every step a restart: the stored count says the same
        assert job.restarts == 3
    finally:
        blocker.close()
        for s in (a, b, setup):
            s.close()


def pg_wait(predicate: object, timeout: float = 10) -> None:
    from tests.pg import wait_for

    wait_for(predicate, timeout)


def test_what_a_thread_shares_never_replaces_a_newer_write() -> None:
    shared = pg.SharedKnown()
    job = ablauf_lang.make_job("(log!! 1)")
    old = sqlbase.Known(1, 4, 0, 2, "pending", job)
    new = sqlbase.Known(1, 5, 0, 2, "pending", job)
    shared.publish("r", new)
    shared.publish("r", old)  # a thread preempted between its COMMIT and sharing it
    assert shared.get("r") is new
    view = pg.KnownView(shared)
    view.begin()
    view.pin("r", old)
    shared.publish("r", sqlbase.Known(1, 6, 0, 2, "pending", job))
    assert view.get("r") is old  # the transaction keeps the base it pinned


def test_pipeline_aborted_is_not_a_lost_connection() -> None:
    assert not pg.is_connection_error(psycopg.errors.PipelineAborted("pipeline aborted"))
    assert pg.is_connection_error(psycopg.OperationalError("server closed the connection"))


# ---------------------------------------------------------------- routing and notes


def test_workers_claim_only_the_actions_they_have(store: pg.PostgresStore) -> None:
    source = "(dopar!! (action!! :a/x 1) (action!! :b/y 2) (action!! :a/x 3))"
    run_id = _queued_run(store, source)
    (first,) = queue.claim(store, "w/0", 30, 5, actions={"b/y"})
    assert first.dispatch is None  # a restart task: any worker runs it
    step = queue.run_restart(
        store, run_id, advance, worker="w/0", claim=1, lease=30, serves={"b/y"}
    )
    assert step is not None
    assert [d.action for _, d in step.claimed] == ["b/y"]  # leased to itself: one it has
    assert queue.claim(store, "w/1", 30, 5, actions={"c/z"}) == []
    taken = queue.claim(store, "w/1", 30, 5, actions={"a/x"})
    assert [c.dispatch.payload for c in taken] == [1, 3]


def test_notes_say_which_action_no_live_worker_serves(store: pg.PostgresStore) -> None:
    run_id = _queued_run(store, "(dopar!! (action!! :a/x 1) (action!! :b/y 2))")
    queue.claim(store, "w/0", 30, 1)
    queue.run_restart(store, run_id, advance, worker="w/0", claim=0, lease=30)
    with store.transaction() as conn:
        queue.register_worker(conn, "host:1:abc", ["a/x", "action/log"], 4, 30)
        queue.register_worker(conn, "host:2:gone", ["b/y"], 4, -1)  # expired
    notes = queue.notes(store, run_id, after=0)
    assert len(notes) == 1
    assert "b/y" in notes[0]
    assert "no live worker" in notes[0]
    with store.transaction() as conn:
        assert queue.live_workers(conn) == [("host:1:abc", ["a/x", "action/log"])]


# ---------------------------------------------------------------- handing runs back


def test_requeue_refuses_a_live_run_and_touches_only_expired_leases(
    store: pg.PostgresStore,
) -> None:
    source = "(dopar!! (action!! :t/a 1) (idempotent-action!! :t/b 2) (action!! :t/c 3))"
    run_id = _fanout_of(store, source)
    with pytest.raises(RunError) as err:
        requeue_run(store, run_id, retry=False)
    assert "being served by the workers (3 action(s) queued)" in err.value.message
    taken = queue.claim(store, "dead:1/0", 30, 2)  # t/a and t/b: leased, running
    with pytest.raises(RunError) as err:
        requeue_run(store, run_id, retry=True)
    assert "2 action(s) running on dead:1" in err.value.message
    with store.transaction() as conn:
        conn.execute("UPDATE ablauf.tasks SET lease_until = now() - interval '1 second'")
    job = requeue_run(store, run_id, retry=False)  # only the two whose lease expired
    assert job.node(3).result is LeafState.PENDING
    with store.transaction() as conn:
        rows = conn.execute(
            "SELECT kind, node, lease_owner FROM ablauf.tasks ORDER BY task_id"
        ).fetchall()
    assert rows == [("action", 2, None), ("action", 3, None), ("restart", None, None)]
    assert len(taken) == 2


def _fanout_of(store: pg.PostgresStore, source: str) -> str:
    run_id = _queued_run(store, source)
    queue.claim(store, "w/0", 30, 1)
    queue.run_restart(store, run_id, advance, worker="w/0", claim=0, lease=30)
    return run_id


def test_an_api_write_on_a_served_run_is_refused_or_takes_it_off_the_queue(
    pg_url: str, store: pg.PostgresStore
) -> None:
    run_id = _fanout_of(store, "(dopar!! (action!! :t/a 1) (action!! :t/b 2))")
    with pytest.raises(RunError) as err:
        ablauf_lang.resume(run_id, store=pg_url)  # the workers are at it
    assert "being served by the workers" in err.value.message
    queue.claim(store, "w/1", 30, 1)  # one leased, one queued
    aborted = ablauf_lang.abort_run(run_id, store=pg_url, reason="stop")
    assert aborted.status is Status.FAILURE
    with store.transaction() as conn:
        left = conn.execute("SELECT count(*) FROM ablauf.tasks WHERE run_id = %s", (run_id,))
        assert left.fetchone() == (0,)  # no action of an aborted run is performed any more
        served = conn.execute("SELECT on_queue FROM ablauf.runs WHERE run_id = %s", (run_id,))
        assert served.fetchone() == (False,)


def test_the_janitor_hands_back_a_run_left_without_tasks(store: pg.PostgresStore) -> None:
    source = "(dopar!! (idempotent-action!! :t/a 1) (action!! :t/b 2) (log!! 3))"
    run_id = _fanout_of(store, source)
    assert queue.repair_stranded(store, hand_back, worker="j", grace=0) == []  # its tasks are there
    with store.transaction() as conn:
        conn.execute("DELETE FROM ablauf.tasks WHERE run_id = %s", (run_id,))  # lost
    assert queue.notes(store, run_id, store.load(run_id).job)[-1].startswith("3 step(s) in flight")
    (line,) = queue.repair_stranded(store, hand_back, worker="j", grace=0)
    assert line == (
        f"run {run_id}: 3 step(s) were in flight with no task to finish them (ids 1, 2, 3); "
        "handed back to the workers: 1 idempotent to run again, 2 failed as interrupted"
    )
    assert (
        queue.repair_stranded(store, hand_back, worker="j", grace=0) == []
    )  # a restart is queued now
    queue.claim(store, "w/0", 30, 1)
    step = queue.run_restart(store, run_id, advance, worker="w/0", claim=0, lease=30)
    assert step is not None
    assert step.job.node(1).result is LeafState.PENDING
    assert step.job.node(1).attempt == 2  # dispatched again
    assert step.job.node(2).error.startswith(INTERRUPTED)
    with store.transaction() as conn:
        who = conn.execute(
            "SELECT worker FROM ablauf.restarts WHERE run_id = %s ORDER BY seq", (run_id,)
        ).fetchall()
    assert [w for (w,) in who] == ["w/0", "janitor j", "w/0"]


# ---------------------------------------------------------------- writes whose COMMIT was cut


def test_a_client_write_whose_commit_answer_was_lost_is_done_once(pg_server: PgServer) -> None:
    url = pg_server.create_database()
    pg.PostgresStore.from_url(url).close()
    proxy = CutAfterCommit(pg_server.port)
    store = pg.PostgresStore.from_url(proxy.url(url.rsplit("/", 1)[1]))
    try:
        job = ablauf_lang.make_job("(do!! (log!! 1) (log!! 2))")
        proxy.arm()
        run_id = queue.submit(store, job, source="x")  # committed, then cut
        assert proxy.cuts == 1
        assert queue.queue_counts(store) == {"ready": 1, "leased": 0, "broken": 0}
        assert [i.run_id for i in store.list_runs()] == [run_id]

        job, dispatches = restart_job(job, [])
        with store.transaction() as conn:
            conn.execute("DELETE FROM ablauf.tasks")
            conn.execute("UPDATE ablauf.runs SET on_queue = false")
        proxy.arm()
        store.record(run_id, job)  # committed, then cut: found written, not written twice
        assert proxy.cuts == 2
        job2, _ = restart_job(job, [success(d, 1) for d in dispatches])
        store.record(run_id, job2)
        assert same(store.load(run_id).job, job2)

        with store.transaction() as conn:
            conn.execute("UPDATE ablauf.runs SET on_queue = true")
        proxy.arm()
        requeue_run(store, run_id, retry=False)  # committed, then cut: not refused as "live"
        assert proxy.cuts == 3
        assert queue.queue_counts(store)["ready"] == 1
        assert store.reconnects == 3
    finally:
        store.close()
        proxy.close()
