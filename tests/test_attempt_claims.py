"""Claims of actions' attempts (`begin_attempts` and its kin) and `clear_wait`, in every
store (memory, SQLite, PostgreSQL).

Real stores: a SQLite file opened again as another process would, the tests' PostgreSQL
server. The Kafka action workers claim an attempt before performing a non-idempotent
action, so a dispatch Kafka delivers again is never performed twice.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ablauf_lang
from ablauf_lang.engine.job import Job, make_job, restart_job
from ablauf_lang.engine.nodes import Dispatch, failure, success
from ablauf_lang.engine.replay import abort
from ablauf_lang.stores import sql as sqlbase
from ablauf_lang.stores import sqlite as sqlite_store
from ablauf_lang.stores.base import Claim, JobStore
from ablauf_lang.stores.memory import MemoryStore
from ablauf_lang.stores.sqlite import SqliteStore

T0 = 1_000_000.0
SLEEPER = "(sleep!! 100)"
FLAKY = "(dopar!! (action!! :x/flaky {} {:retry {:max 5 :delay 5}}) (action!! :x/other {}))"


def _opener(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    if kind == "memory":
        shared = MemoryStore()
        return lambda: shared
    if kind == "sqlite":
        path = str(tmp_path / "runs.db")
        return lambda: SqliteStore(path)
    from ablauf_lang.stores.postgres import PostgresStore

    url = request.getfixturevalue("pg_url")
    return lambda: PostgresStore.from_url(url)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A function opening the store again (a new store object, as another process would:
    the memory store is the same object)."""
    opened: list[JobStore] = []
    make = _opener(request.param, tmp_path, request)

    def again() -> JobStore:
        store: JobStore = make()
        opened.append(store)
        return store

    yield again
    for store in opened:
        store.close()


@pytest.fixture
def store(reopen: Any) -> JobStore:
    made: JobStore = reopen()
    return made


def new_run(store: JobStore, source: str = SLEEPER) -> tuple[str, Job, list[Dispatch]]:
    job = make_job(ablauf_lang.compile(source))
    run_id = store.create_run(job, source=source)
    job, dispatches = restart_job(job, (), now=T0)
    store.record(run_id, job)
    return run_id, job, dispatches


def attempt_rows(store: JobStore) -> int:
    """How many claims the store keeps (its `attempts` rows)."""
    if isinstance(store, MemoryStore):
        return len(store._attempts)
    if isinstance(store, SqliteStore):
        return int(store._conn.execute("SELECT count(*) FROM attempts").fetchone()[0])
    from ablauf_lang.stores.postgres import PostgresStore

    assert isinstance(store, PostgresStore)
    with store.session() as conn:
        row = conn.execute("SELECT count(*) FROM ablauf.attempts").fetchone()
    assert row is not None
    return int(row[0])


def retry_waits(store: JobStore, run_id: str) -> list[tuple[int, int, float | None]]:
    """The run's retry waits as the store keeps them: (node, attempt, until)."""
    if isinstance(store, sqlbase.SqlStore):
        found = store.run_waits(run_id)
    else:
        assert isinstance(store, MemoryStore)
        found = store._waits(run_id, store._runs[run_id])
    return [(w.node, w.attempt, w.until) for w in found if w.kind == "retry"]


# ---------------------------------------------------------------- the states of a claim


def test_every_state_of_a_claim(store: JobStore) -> None:
    run_id, _, _ = new_run(store)
    a, b = (run_id, 1, 1), (run_id, 1, 2)
    assert store.begin_attempts([a], "w1", 30) == [Claim("new")]
    assert store.begin_attempts([a], "w2", 30) == [Claim("running", "w1")]
    assert store.begin_attempts([a], "w1", 30) == [Claim("running", "w1")]  # a duplicate
    assert store.begin_attempts([b], "w2", 30) == [Claim("new")]  # another attempt
    store.finish_attempts([(run_id, 1, 1, '{"ok": 1}')])
    assert store.begin_attempts([a, b], "w3", 30) == [
        Claim("finished", "w1", '{"ok": 1}'),
        Claim("running", "w2"),
    ]


def test_a_claim_of_a_finished_or_unknown_run_is_gone(store: JobStore) -> None:
    run_id, job, _ = new_run(store)
    assert store.begin_attempts([(run_id, 1, 1)], "w1", 30) == [Claim("new")]
    store.record(run_id, abort(job, "stop"))
    assert store.begin_attempts([(run_id, 1, 1), ("nosuchrun", 1, 1)], "w1", 30) == [
        Claim("gone"),
        Claim("gone"),
    ]
    done, _, dispatches = new_run(store, "(action!! :x/one {})")
    job = store.load(done).job
    job, _ = restart_job(job, [success(dispatches[0], 1)], now=T0 + 1)
    store.record(done, job)
    assert store.begin_attempts([(done, 0, 1)], "w1", 30) == [Claim("gone")]
    assert store.begin_attempts([], "w1", 30) == []


def test_a_lease_that_ran_out_is_abandoned_and_taken_over(store: JobStore) -> None:
    run_id, _, _ = new_run(store)
    item = (run_id, 3, 1)
    assert store.begin_attempts([item], "w1", 0.2) == [Claim("new")]
    assert store.begin_attempts([item], "w2", 30) == [Claim("running", "w1")]
    time.sleep(0.3)
    assert store.begin_attempts([item], "w2", 30) == [Claim("abandoned", "w1")]
    assert store.begin_attempts([item], "w3", 30) == [Claim("running", "w2")]
    assert store.renew_attempts([item], "w1", 30) == 0  # not w1's any more
    store.finish_attempts([(run_id, 3, 1, "r")])
    assert store.begin_attempts([item], "w3", 30) == [Claim("finished", "w2", "r")]


def test_an_owner_claiming_its_own_ran_out_lease_again_finds_it_abandoned(
    store: JobStore,
) -> None:
    run_id, _, _ = new_run(store)
    item = (run_id, 3, 1)
    assert store.begin_attempts([item], "w1", 0.0) == [Claim("new")]
    assert store.begin_attempts([item], "w1", 30) == [Claim("abandoned", "w1")]
    assert store.begin_attempts([item], "w2", 30) == [Claim("running", "w1")]


def test_renewing_keeps_a_claim_running(store: JobStore) -> None:
    run_id, _, _ = new_run(store)
    items = [(run_id, 1, 1), (run_id, 2, 1)]
    assert store.begin_attempts(items, "w1", 0.2) == [Claim("new"), Claim("new")]
    assert store.renew_attempts([*items, (run_id, 9, 9), ("nosuchrun", 1, 1)], "w1", 30) == 2
    assert store.renew_attempts(items, "w2", 30) == 0  # another owner's
    assert store.renew_attempts([], "w1", 30) == 0
    time.sleep(0.3)
    assert store.begin_attempts(items, "w2", 30) == [Claim("running", "w1")] * 2
    store.finish_attempts([(run_id, 1, 1, "done")])
    assert store.renew_attempts(items, "w1", 30) == 1  # a finished claim has no lease


def test_the_first_result_kept_stays(reopen: Any) -> None:
    store = reopen()
    run_id, _, _ = new_run(store)
    text = '{"v": 1, "result": "ok", "output": {"n": [1, 2, "é"]}}'
    assert store.begin_attempts([(run_id, 1, 1)], "w1", 30) == [Claim("new")]
    store.finish_attempts([(run_id, 1, 1, text)])
    store.finish_attempts([(run_id, 1, 1, "another")])  # a redelivery's result
    store.finish_attempts([(run_id, 7, 1, "never claimed"), ("nosuchrun", 1, 1, "x")])
    store.finish_attempts([])
    again = reopen()
    assert again.begin_attempts([(run_id, 1, 1), (run_id, 7, 1)], "w2", 30) == [
        Claim("finished", "w1", text),
        Claim("new"),
    ]


def test_the_same_attempt_twice_in_one_batch(store: JobStore) -> None:
    run_id, _, _ = new_run(store)
    item = (run_id, 1, 1)
    assert store.begin_attempts([item, item], "w1", 30) == [Claim("new"), Claim("running", "w1")]


# ---------------------------------------------------------------- batches and races


def test_a_batch_of_500_claims_is_one_transaction(store: JobStore) -> None:
    runs = [new_run(store)[0] for _ in range(5)]
    items = [(run_id, node, 1) for run_id in runs for node in range(100)]
    items.append(("nosuchrun", 1, 1))
    before = getattr(store, "commits", 0)
    claims = store.begin_attempts(items, "w1", 30)
    if isinstance(store, sqlbase.SqlStore):
        assert store.commits == before + 1
    assert claims == [Claim("new")] * 500 + [Claim("gone")]
    assert attempt_rows(store) == 500
    store.finish_attempts([(r, n, a, f"{r}/{n}") for r, n, a in items[:250]])
    assert store.renew_attempts(items, "w1", 30) == 250
    claims = store.begin_attempts(items[:500], "w2", 30)
    assert claims[:250] == [Claim("finished", "w1", f"{r}/{n}") for r, n, _ in items[:250]]
    assert claims[250:] == [Claim("running", "w1")] * 250


def test_two_owners_racing_get_one_new_claim_per_attempt(reopen: Any) -> None:
    first = reopen()
    runs = [new_run(first)[0] for _ in range(3)]
    items = [(run_id, node, 1) for run_id in runs for node in range(60)]
    stores = [reopen(), reopen()]
    start = threading.Barrier(2)
    found: dict[str, list[Claim]] = {}
    errors: list[BaseException] = []

    def claim(owner: str, store: JobStore) -> None:
        try:
            start.wait()
            mine: list[Claim] = []
            for chunk in range(0, len(items), 20):  # interleaved batches
                mine += store.begin_attempts(items[chunk : chunk + 20], owner, 30)
            found[owner] = mine
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(f"w{i}", s)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for mine, theirs in zip(found["w0"], found["w1"], strict=True):
        if mine == Claim("new"):
            assert theirs == Claim("running", "w0")
        else:
            assert (mine, theirs) == (Claim("running", "w1"), Claim("new"))
    assert attempt_rows(first) == len(items)


# ---------------------------------------------------------------- deleting


def test_claims_are_deleted_with_their_run(store: JobStore) -> None:
    run_id, _, _ = new_run(store)
    other, _, _ = new_run(store)
    store.begin_attempts([(run_id, 1, 1), (run_id, 2, 1), (other, 1, 1)], "w1", 30)
    assert attempt_rows(store) == 3
    store.delete_run(run_id)
    assert attempt_rows(store) == 1
    assert store.begin_attempts([(run_id, 1, 1)], "w1", 30) == [Claim("gone")]
    gone, kept = store.prune_runs(before=time.time() + 10)
    assert (gone, kept) == ([other], [])
    assert attempt_rows(store) == 0


# ---------------------------------------------------------------- a retry's wait


def flaky_run(store: JobStore) -> tuple[str, Job, list[Dispatch]]:
    """A run whose first action failed and waits to be retried (node 1, attempt 2, at
    T0 + 6), its other action still running."""
    run_id, job, dispatches = new_run(store, FLAKY)
    job, _ = restart_job(job, [failure(dispatches[0], "boom")], now=T0 + 1)
    store.record(run_id, job)
    assert retry_waits(store, run_id) == [(1, 2, T0 + 6)]
    return run_id, job, dispatches


def test_clear_wait_forgets_the_retry_wait_of_that_attempt(store: JobStore) -> None:
    run_id, job, dispatches = flaky_run(store)
    sleeper, _, _ = new_run(store, "(sleep!! 10)")  # wakes at T0 + 10
    assert store.due_runs(T0 + 6) == [run_id]
    assert store.next_wake() == T0 + 6
    store.clear_wait(run_id, 1, 3)  # another attempt: kept
    store.clear_wait(run_id, 2, 2)  # another node (not a retry's wait): kept
    store.clear_wait("nosuchrun", 1, 2)
    store.clear_wait(sleeper, 0, 1)  # a sleep: kept
    assert retry_waits(store, run_id) == [(1, 2, T0 + 6)]
    store.clear_wait(run_id, 1, 2)
    assert retry_waits(store, run_id) == []
    assert store.due_runs(T0 + 6) == []
    assert store.due_runs(T0 + 10) == [sleeper]
    assert store.next_wake() == T0 + 10
    store.clear_wait(run_id, 1, 2)  # twice: nothing more
    # A later step that leaves the retrying leaf as it is does not bring the wait back.
    job, _ = restart_job(job, [success(dispatches[1], 2)], now=T0 + 2)
    store.record(run_id, job)
    store.record(run_id, job)
    assert retry_waits(store, run_id) == []
    assert store.due_runs(T0 + 6) == []
    # The attempt fails again: the leaf changed, it waits anew.
    retried = Dispatch(1, "x/flaky", {}, False, 2)
    job, _ = restart_job(job, [failure(retried, "boom")], now=T0 + 7)
    store.record(run_id, job)
    [(node, attempt, until)] = retry_waits(store, run_id)
    assert (node, attempt) == (1, 3)
    assert until is not None
    assert until > T0 + 7
    assert run_id in store.due_runs(until)


def test_a_cleared_wait_stays_cleared_through_compaction(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlbase, "COMPACT_EVERY", 2)
    run_id, job, _ = flaky_run(store)
    store.clear_wait(run_id, 1, 2)
    before = getattr(store, "compactions", 0)
    for _ in range(3):
        store.record(run_id, job)
    if isinstance(store, sqlbase.SqlStore):
        assert store.compactions > before
    assert retry_waits(store, run_id) == []
    assert store.due_runs(T0 + 100) == []
    assert store.load(run_id).job == job


def test_a_whole_rewrite_keeps_a_cleared_wait_cleared(reopen: Any) -> None:
    """A store object that never read the run writes it whole (`_record_whole`): a retry
    wait the stored run has too, but without its row, stays cleared; a changed leaf waits
    anew."""
    store = reopen()
    run_id, job, dispatches = flaky_run(store)
    store.clear_wait(run_id, 1, 2)
    job, _ = restart_job(job, [success(dispatches[1], 2)], now=T0 + 2)
    reopen().record(run_id, job)
    assert retry_waits(reopen(), run_id) == []
    assert store.due_runs(T0 + 100) == []
    assert reopen().load(run_id).job == job
    retried = Dispatch(1, "x/flaky", {}, False, 2)
    job, _ = restart_job(job, [failure(retried, "boom")], now=T0 + 7)
    reopen().record(run_id, job)
    assert [(n, a) for n, a, _ in retry_waits(reopen(), run_id)] == [(1, 3)]


def test_a_whole_rewrite_writes_a_new_retry_wait(reopen: Any) -> None:
    store = reopen()
    run_id, job, dispatches = new_run(store, FLAKY)
    job, _ = restart_job(job, [failure(dispatches[0], "boom")], now=T0 + 1)
    reopen().record(run_id, job)  # never read the run: a whole write
    assert retry_waits(reopen(), run_id) == [(1, 2, T0 + 6)]
    assert store.due_runs(T0 + 6) == [run_id]


def test_clear_wait_on_a_finished_run_does_nothing(store: JobStore) -> None:
    run_id, job, _ = flaky_run(store)
    store.record(run_id, abort(job, "stop"))
    store.clear_wait(run_id, 1, 2)
    assert store.due_runs(T0 + 100) == []


# ---------------------------------------------------------------- SQLite upgrade


def test_a_version_3_sqlite_store_is_upgraded_with_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    schema = sqlite_store.SCHEMA
    conn.executescript(schema[: schema.index("CREATE TABLE IF NOT EXISTS attempts")])
    conn.execute(f"PRAGMA application_id = {sqlite_store.APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    with SqliteStore(str(path)) as store:
        assert store.begin_attempts([("nosuchrun", 1, 1)], "w1", 30) == [Claim("gone")]
        run_id, job, _ = flaky_run(store)
        assert store.begin_attempts([(run_id, 1, 2)], "w1", 30) == [Claim("new")]
        store.clear_wait(run_id, 1, 2)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlbase.SCHEMA_VERSION == 5
    conn.close()
    with SqliteStore(str(path)) as store:
        assert store.begin_attempts([(run_id, 1, 2)], "w2", 30) == [Claim("running", "w1")]
        assert store.load(run_id).job == job
        assert store.due_runs(T0 + 100) == []
