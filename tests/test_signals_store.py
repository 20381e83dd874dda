"""The signals mailbox and the waits of runs, in every store (memory, SQLite, PostgreSQL).

Real stores: a SQLite file reopened as another process would, the tests' PostgreSQL server.
Jobs are driven by hand (`make_job`/`restart_job` with `now`), so every wait is known.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ablauf_lang
from ablauf_lang.engine.job import Job, make_job, restart_job
from ablauf_lang.engine.nodes import Dispatch, failure, success
from ablauf_lang.engine.replay import abort
from ablauf_lang.engine.waits import Wait
from ablauf_lang.errors import AblaufError, RunError
from ablauf_lang.stores import sql as sqlbase
from ablauf_lang.stores import sqlite as sqlite_store
from ablauf_lang.stores.base import JobStore
from ablauf_lang.stores.memory import MemoryStore
from ablauf_lang.stores.sqlite import SqliteStore

APPROVAL = """
(do!!
  (sleep!! 10)
  (await!! :approval {:timeout 60})
  (log!! "approved"))
"""
T0 = 1_000_000.0


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


def started(source: str = APPROVAL, now: float = T0) -> tuple[Job, list[Dispatch]]:
    return restart_job(make_job(ablauf_lang.compile(source)), (), now=now)


def new_run(store: JobStore, source: str = APPROVAL) -> tuple[str, Job, list[Dispatch]]:
    job = make_job(ablauf_lang.compile(source))
    run_id = store.create_run(job, source=source)
    job, dispatches = restart_job(job, (), now=T0)
    store.record(run_id, job)
    return run_id, job, dispatches


def stored_waits(store: JobStore, run_id: str) -> list[tuple[int, str, str | None, float | None]]:
    """What the store keeps of a run's waits (the SQL stores: their rows)."""
    found: list[Wait]
    if isinstance(store, sqlbase.SqlStore):
        found = store.run_waits(run_id)
    else:
        from ablauf_lang.engine.waits import waits

        found = waits(store.load(run_id).job)
    return [(w.node, w.kind, w.name, w.until) for w in found]


# ---------------------------------------------------------------- the mailbox


def test_signals_are_numbered_and_taken_in_order_of_arrival(store: JobStore) -> None:
    run_id, _, _ = new_run(store)
    assert store.send_signal(run_id, "approval", {"by": "ana"}) == 1
    assert store.send_signal(run_id, "other", 7) == 2
    assert store.send_signal(run_id, "approval", [1, 2]) == 3
    assert store.take_signal(run_id, "approval", 2) == (1, {"by": "ana"})
    assert store.take_signal(run_id, "approval", 5) == (3, [1, 2])
    assert store.take_signal(run_id, "approval", 6) is None
    assert store.take_signal(run_id, "nothing", 2) is None
    box = store.signals(run_id)
    assert [(s["seq"], s["name"], s["consumed_by"]) for s in box] == [
        (1, "approval", 2),
        (2, "other", None),
        (3, "approval", 5),
    ]
    assert box[1]["value"] == 7
    assert box[0]["sent_at"] > 0
    assert box[0]["consumed_at"] is not None
    assert box[1]["consumed_at"] is None


def test_a_signal_taken_before_a_crash_goes_again_to_the_same_node_only(reopen: Any) -> None:
    first = reopen()
    run_id, _, _ = new_run(first)
    first.send_signal(run_id, "approval", "yes")
    first.send_signal(run_id, "approval", "second")
    assert first.take_signal(run_id, "approval", 2) == (1, "yes")
    first.close()  # the process dies before it records the leaf's result
    again = reopen()
    assert again.take_signal(run_id, "approval", 2) == (1, "yes")  # the same one, again
    assert again.take_signal(run_id, "approval", 9) == (2, "second")  # never seq 1
    assert again.take_signal(run_id, "approval", 10) is None
    assert [s["consumed_by"] for s in again.signals(run_id)] == [2, 9]


def test_a_signal_sent_before_the_await_waits_in_the_mailbox(store: JobStore) -> None:
    run_id, job, dispatches = new_run(store)  # still sleeping
    store.send_signal(run_id, ":approval", True)  # `:name` is the name
    job, dispatches = restart_job(job, [success(dispatches[0])], now=T0 + 10)
    store.record(run_id, job)
    (await_,) = dispatches
    assert store.take_signal(run_id, "approval", await_.id) == (1, True)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("finished", "already finished (success): signals are only delivered to a run that waits"),
        ("aborted", "already finished (aborted)"),
        ("unknown", "run nope does not exist"),
    ],
)
def test_a_signal_to_a_run_that_cannot_take_it_is_refused(
    store: JobStore, how: str, message: str
) -> None:
    job = make_job(ablauf_lang.compile('(log!! "x")'))
    run_id = store.create_run(job)
    job, dispatches = restart_job(job, (), now=T0)
    if how == "finished":
        job, _ = restart_job(job, [success(dispatches[0])], now=T0)
    elif how == "aborted":
        job = abort(job, "stop")
    store.record(run_id, job)
    target = "nope" if how == "unknown" else run_id
    with pytest.raises(RunError, match=message.replace("(", r"\(").replace(")", r"\)")):
        store.send_signal(target, "approval")
    if how != "unknown":
        assert store.signals(run_id) == []


def test_bad_names_and_values_are_refused(store: JobStore) -> None:
    run_id, _, _ = new_run(store)
    for name in ("", " ", ":", " approval"):
        with pytest.raises(RunError, match="a signal's name must be"):
            store.send_signal(run_id, name)
    with pytest.raises(AblaufError, match="cannot store"):
        store.send_signal(run_id, "approval", object())
    with pytest.raises(RunError, match="does not exist"):
        store.take_signal("nope", "approval", 1)
    with pytest.raises(RunError, match="does not exist"):
        store.signals("nope")
    assert store.signals(run_id) == []


def test_deleting_a_run_deletes_its_mailbox_and_waits(store: JobStore) -> None:
    run_id, _, _ = new_run(store)
    store.send_signal(run_id, "approval", 1)
    other, _, _ = new_run(store)
    store.delete_run(run_id)
    assert store.due_runs(T0 + 10) == [other]
    with pytest.raises(RunError):
        store.signals(run_id)


def test_senders_and_takers_at_once_number_and_deliver_each_signal_once(reopen: Any) -> None:
    first = reopen()
    run_id, _, _ = new_run(first)
    stores = [reopen() for _ in range(4)]  # the memory store: one store, four threads
    sent: list[int] = []
    taken: list[tuple[int, int]] = []

    def send(store: JobStore, who: int) -> None:
        for i in range(10):
            sent.append(store.send_signal(run_id, "go", [who, i]))

    def take(store: JobStore, node: int) -> None:
        while (got := store.take_signal(run_id, "go", node)) is not None:
            taken.append((got[0], node))
            node += 100  # the next await (a node takes one signal)

    threads = [threading.Thread(target=send, args=(s, i)) for i, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(sent) == list(range(1, 41))
    values = [s["value"] for s in first.signals(run_id)]
    for who in range(4):  # each sender's signals in the order it sent them
        assert [v[1] for v in values if v[0] == who] == list(range(10))
    threads = [threading.Thread(target=take, args=(s, n)) for n, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(seq for seq, _ in taken) == list(range(1, 41))  # each one, once
    by = {s["seq"]: s["consumed_by"] for s in first.signals(run_id)}
    assert by == dict(taken)


# ---------------------------------------------------------------- waits


def test_waits_follow_the_leaves_that_start_and_stop_waiting(reopen: Any) -> None:
    store = reopen()
    run_id, job, dispatches = new_run(store)
    assert stored_waits(store, run_id) == [(1, "sleep", None, T0 + 10)]
    info = store.info(run_id)
    assert info.waiting == "sleeping until 1970-01-12T13:46:50Z"
    assert info.to_dict()["waiting"] == info.waiting
    assert [i.run_id for i in store.list_runs(waiting=True)] == [run_id]

    job, dispatches = restart_job(job, [success(dispatches[0])], now=T0 + 10)
    store.record(run_id, job)
    assert stored_waits(store, run_id) == [(2, "signal", "approval", T0 + 70)]
    assert store.info(run_id).waiting == "waiting: approval (until 1970-01-12T13:47:50Z)"
    assert store.load(run_id).info.waiting == store.info(run_id).waiting

    # Another process (a store object that never read the run) writes the next step whole.
    other = reopen()
    job, dispatches = restart_job(job, [success(dispatches[0], "ok")], now=T0 + 20)
    other.record(run_id, job)
    assert stored_waits(store, run_id) == []
    assert store.info(run_id).waiting is None
    assert store.list_runs(waiting=True) == []
    assert store.count_runs(waiting=True) == 0
    assert store.count_runs() == 1

    job, _ = restart_job(job, [success(dispatches[0])], now=T0 + 21)
    other.record(run_id, job)
    assert job.status == "success"
    assert stored_waits(store, run_id) == []


def test_a_run_that_finishes_while_it_waits_keeps_no_waits(store: JobStore) -> None:
    source = "(dopar!! (sleep!! 100) (await!! :go))"
    job = make_job(ablauf_lang.compile(source))
    run_id = store.create_run(job, source=source)
    job, _dispatches = restart_job(job, (), now=T0)
    store.record(run_id, job)
    assert [w[1] for w in stored_waits(store, run_id)] == ["sleep", "signal"]
    job = abort(job, "stop")
    store.record(run_id, job)
    assert stored_waits(store, run_id) == []
    assert store.due_runs(T0 + 1000) == []
    assert store.next_wake() is None


def test_a_retry_waits_until_its_next_attempt(store: JobStore) -> None:
    source = "(action!! :x/flaky {} {:retry {:max 3 :delay 5}})"
    job = make_job(ablauf_lang.compile(source))
    run_id = store.create_run(job, source=source)
    job, dispatches = restart_job(job, (), now=T0)
    store.record(run_id, job)
    assert stored_waits(store, run_id) == []  # the first attempt runs at once
    job, dispatches = restart_job(job, [failure(dispatches[0], "boom")], now=T0 + 1)
    store.record(run_id, job)
    assert stored_waits(store, run_id) == [(0, "retry", "x/flaky", T0 + 6)]
    assert store.info(run_id).waiting == "retrying x/flaky (attempt 2 at 1970-01-12T13:46:46Z)"
    assert store.due_runs(T0 + 5) == []
    assert store.due_runs(T0 + 6) == [run_id]
    job, _ = restart_job(job, [success(dispatches[0])], now=T0 + 6)
    store.record(run_id, job)
    assert stored_waits(store, run_id) == []


def test_due_runs_and_the_next_wake(store: JobStore) -> None:
    assert store.due_runs(T0) == []
    assert store.next_wake() is None
    sleeper, _, _ = new_run(store)  # wakes at T0 + 10
    later, _, _ = new_run(store, "(sleep!! 100)")
    waiter, _job, dispatches = new_run(store, "(await!! :go)")  # no deadline
    assert store.next_wake() == T0 + 10
    assert store.due_runs(T0 + 9) == []
    assert store.due_runs(T0 + 10) == [sleeper]
    assert store.due_runs(T0 + 100) == [sleeper, later]
    assert store.due_runs(T0 + 100, limit=1) == [sleeper]
    store.send_signal(waiter, "other")
    assert waiter not in store.due_runs(T0)  # a signal it does not await
    store.send_signal(waiter, "go", 1)
    assert store.due_runs(T0) == [waiter]
    assert store.take_signal(waiter, "go", dispatches[0].id) == (2, 1)
    assert store.due_runs(T0) == []  # taken: the runner has it
    assert sorted(i.run_id for i in store.list_runs(waiting=True)) == sorted(
        [sleeper, later, waiter]
    )
    assert store.count_runs(waiting=True, status="pending") == 3


def test_waits_survive_compaction(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlbase, "COMPACT_EVERY", 2)
    source = "(do!! (sleep!! 1) (sleep!! 2) (sleep!! 3) (await!! :go))"
    job = make_job(ablauf_lang.compile(source))
    run_id = store.create_run(job, source=source)
    job, dispatches = restart_job(job, (), now=T0)
    store.record(run_id, job)
    now = T0
    for _ in range(3):
        assert len(stored_waits(store, run_id)) == 1
        now += 5
        job, dispatches = restart_job(job, [success(dispatches[0])], now=now)
        store.record(run_id, job)
    assert stored_waits(store, run_id) == [(4, "signal", "go", None)]
    assert store.load(run_id).job == job


# ---------------------------------------------------------------- SQLite upgrade


def test_a_version_2_sqlite_store_is_upgraded_with_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    old = sqlite_store.SCHEMA[: sqlite_store.SCHEMA.index("CREATE TABLE IF NOT EXISTS signals")]
    conn.executescript(old)
    conn.execute(f"PRAGMA application_id = {sqlite_store.APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    with SqliteStore(str(path)) as store:
        run_id, _, _ = new_run(store)
        assert store.send_signal(run_id, "approval") == 1
        assert store.due_runs(T0 + 10) == [run_id]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlbase.SCHEMA_VERSION == 5
    conn.close()
