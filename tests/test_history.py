"""A run's history and forks (issue 16): every restart kept, the job after any restart
read back, a new run forked from any restart (with an edited program), breakpoints as data.

Real stores: memory, a SQLite file and a PostgreSQL server through the same SQL; the
commands as real subprocesses.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ablauf_lang
from ablauf_lang.engine.fork import ForkError, graft
from ablauf_lang.engine.job import Job
from ablauf_lang.engine.nodes import Dispatch, Result, failure, success
from ablauf_lang.engine.replay import abort, prepare_replay
from ablauf_lang.errors import AblaufError, RunError
from ablauf_lang.stores import sql as sqlbase
from ablauf_lang.stores.backend import open_store
from tests.commands import ablauf
from tests.strategies import workflow_sources

ENV = {k: v for k, v in os.environ.items() if k != "COLUMNS"}


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "memory":
        url = "memory:"
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/runs.db"
    else:
        url = request.getfixturevalue("pg_url")
    backend = open_store(url)
    yield backend
    backend.close()


def drive(
    store: Any, source: str, outcomes: Any = None, *, record_every: bool = True
) -> tuple[str, list[Job], list[list[Dispatch]]]:
    """Run `source` by hand with the reducer, recording every restart in `store`: the jobs
    after each restart (index = restart number) and the dispatches of each."""
    job = ablauf_lang.make_job(source)
    run_id = store.create_run(job, source=source, filename="p.abl")
    jobs, sent = [job], [[]]
    pending: list[Dispatch] = []
    while True:
        results = [_result(d, outcomes) for d in pending]
        job, pending = ablauf_lang.restart_job(job, results)
        store.record(run_id, job)
        jobs.append(job)
        sent.append(list(pending))
        if job.done or not pending:
            return run_id, jobs, sent


def _result(d: Dispatch, outcomes: Any) -> Result:
    ok = True if outcomes is None else outcomes(d)
    return success(d, {"n": d.id}) if ok else failure(d, f"boom {d.id}")


# ---------------------------------------------------------------- history


@pytest.mark.parametrize("fold", [3, 64])
def test_every_restart_is_kept_and_read_back(store: Any, fold: int, monkeypatch: Any) -> None:
    monkeypatch.setattr(sqlbase, "COMPACT_EVERY", fold)  # folds every few steps, or rarely
    source = "(do!! " + " ".join(f"(action!! :t/a {i})" for i in range(9)) + ")"
    run_id, jobs, sent = drive(store, source)
    history = store.history(run_id)
    assert [s.restart for s in history.steps] == list(range(len(jobs)))
    assert history.steps[0].kind == "start"
    assert not history.partial
    for n, job in enumerate(jobs):
        assert history.job_at(n) == job, n
        step = history.steps[n]
        assert [(d.node, d.attempt) for d in step.dispatches] == [
            (d.id, d.attempt) for d in sent[n]
        ]
        if n >= 2:
            (applied,) = step.results
            assert (applied.node, applied.state, applied.output) == (
                sent[n - 1][0].id,
                "success",
                {"n": sent[n - 1][0].id},
            )
    assert history.steps[-1].status == "success"
    with pytest.raises(RunError, match=r"restart 99 is out of range: .* has restarts 0\.\.10"):
        history.job_at(99)


def test_aborts_and_resumes_are_steps_too(store: Any) -> None:
    source = "(do!! (action!! :t/a 1) (action!! :t/b 2))"
    job = ablauf_lang.make_job(source)
    run_id = store.create_run(job, source=source)
    job, _sent = ablauf_lang.restart_job(job, [])
    store.record(run_id, job)
    job = prepare_replay(job)  # a resume: the non-idempotent leaf in flight fails
    store.record(run_id, job)
    job = abort(job, "stop it")
    store.record(run_id, job)
    kinds = [s.kind for s in store.history(run_id).steps]
    assert kinds == ["start", "restart", "replay", "abort"]
    last = store.history(run_id).steps[-1]
    assert last.aborted == "stop it"
    assert last.restart == 1
    # restart 1 is the last write with that count: the aborted job
    assert store.history(run_id).job_at(1) == job


def test_context_changes_are_described(store: Any) -> None:
    source = "(do!! (with-augment [:out [:k]] (log!! {:out 5})) (log!! 2))"
    run_id = ablauf_lang.eval(source, store=store).run_id
    steps = store.history(run_id).steps
    changed = [s.context for s in steps if s.context and s.kind == "restart"]
    assert changed == [{"k": 5}]


@settings(max_examples=40, deadline=None)
@given(source=workflow_sources, data=st.data())
def test_history_replays_every_restart_of_random_programs(
    source: str, data: st.DataObject, tmp_path_factory: Any
) -> None:
    """For any program and any outcomes of its actions, the job read back after restart
    N is the job the reducer made at N, on the memory and SQLite stores (folds every 4)."""
    fails = data.draw(st.sets(st.integers(0, 40)), label="failing node ids")
    path = tmp_path_factory.mktemp("h") / "runs.db"
    saved = sqlbase.COMPACT_EVERY
    sqlbase.COMPACT_EVERY = 4
    try:
        for url in ("memory:", f"sqlite:///{path}"):
            backend = open_store(url)
            try:
                run_id, jobs, _ = drive(backend, source, lambda d: d.id not in fails)
                history = backend.history(run_id)
                assert len(history.steps) == len(jobs)
                for n, job in enumerate(jobs):
                    assert history.job_at(n) == job
            finally:
                backend.close()
    finally:
        sqlbase.COMPACT_EVERY = saved


def test_a_run_of_an_older_store_has_its_history_from_its_snapshot(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/runs.db"
    backend = open_store(url)
    source = "(do!! " + " ".join(f"(log!! {i})" for i in range(70)) + ")"
    run_id = ablauf_lang.eval(source, store=backend).run_id
    backend.close()
    with sqlite3.connect(tmp_path / "runs.db") as conn:  # what version 4 kept: no history
        conn.execute("DELETE FROM history")
    backend = open_store(url)
    history = backend.history(run_id)
    assert history.partial
    assert history.steps[0].restart == 64
    assert history.job_at(history.restarts[1]) == backend.load(run_id).job
    with pytest.raises(RunError, match="earlier writes were not kept"):
        history.job_at(3)
    backend.close()


def test_a_version_4_file_gets_the_history_tables(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    open_store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE history")
        conn.execute("DROP TABLE forks")
        conn.execute("PRAGMA user_version = 4")
    backend = open_store(f"sqlite:///{path}")
    run_id = ablauf_lang.eval('(log!! "x")', store=backend).run_id
    assert [s.kind for s in backend.history(run_id).steps] == ["start", "restart", "restart"]
    backend.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlbase.SCHEMA_VERSION


def test_deleting_a_run_deletes_its_history(tmp_path: Path) -> None:
    backend = open_store(f"sqlite:///{tmp_path}/runs.db")
    run_id = ablauf_lang.eval('(log!! "x")', store=backend).run_id
    fork = backend.create_run(backend.load(run_id).job, parent=run_id, parent_step=1)
    backend.delete_run(run_id)
    backend.delete_run(fork)
    backend.close()
    with sqlite3.connect(tmp_path / "runs.db") as conn:
        assert conn.execute("SELECT count(*) FROM history").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM forks").fetchone()[0] == 0


# ---------------------------------------------------------------- fork

ACTIONS = {
    "t/a": lambda payload, ctx: payload,
    "t/b": lambda payload, ctx: {k: v * 10 for k, v in payload.items()},
}
STEPS = """(do!!
  (with-augment [:out [:a]] (action!! :t/a {:out 1}))
  (with-augment [:out [:b]] (action!! :t/a {:out 2}))
  (with-augment [:out [:c]] (action!! :t/a {:out 3})))"""


def test_a_fork_goes_on_from_the_restart_it_was_forked_at(store: Any) -> None:
    run = ablauf_lang.eval(STEPS, ACTIONS, store=store, filename="steps.abl")
    assert run.context == {"a": 1, "b": 2, "c": 3}
    new = ablauf_lang.fork(run.run_id, 2, store=store)
    info = store.info(new)
    assert (info.parent, info.parent_step, info.restarts) == (run.run_id, 2, 2)
    assert store.load(new).info.parent == run.run_id
    job = store.load(new).job
    assert job.context == {"a": 1}  # as it was then
    assert next(leaf.result for leaf in job.leaves()) == "success"
    again = ablauf_lang.resume(new, store=store, actions=ACTIONS)
    assert again.status == "success"
    assert again.context == {"a": 1, "b": 2, "c": 3}
    assert [i.run_id for i in store.list_runs(forks_of=run.run_id)] == [new]
    assert store.count_runs(forks_of=run.run_id) == 1
    assert store.list_runs(forks_of=new) == []
    assert store.history(run.run_id).job_at(4) == store.load(run.run_id).job  # untouched


def test_a_fork_with_an_edited_program_takes_the_part_not_started(store: Any) -> None:
    run = ablauf_lang.eval(STEPS, ACTIONS, store=store)
    edited = STEPS.replace(
        "{:out 3})))",
        "{:out 30}))\n  (with-augment [:out [:d]] (action!! :t/b {:out 4})))",
    )
    new = ablauf_lang.fork(run.run_id, 2, program=edited, filename="edited.abl", store=store)
    assert store.info(new).filename == "edited.abl"
    done = ablauf_lang.resume(new, store=store, actions=ACTIONS)
    assert done.context == {"a": 1, "b": 2, "c": 30, "d": 40}
    assert store.load(new).source == edited


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ("{:out 1}", "node 1 (action!! :t/a, line 2)"),  # the payload of a step that ran
        ("(action!! :t/a {:out 1})", "node 1"),  # its action
    ],
)
def test_an_edit_of_a_started_part_is_refused_naming_the_node(
    store: Any, edit: str, named: str
) -> None:
    run = ablauf_lang.eval(STEPS, ACTIONS, store=store)
    changed = STEPS.replace(
        edit, "{:out 100}" if edit.startswith("{") else "(action!! :t/b {:out 1})", 1
    )
    with pytest.raises(ForkError, match=rf"changes {named.replace('(', '.').replace(')', '.')}.*"):
        ablauf_lang.fork(run.run_id, 2, program=changed, store=store)
    assert store.list_runs(forks_of=run.run_id) == []


def test_removing_a_started_step_is_refused(store: Any) -> None:
    run = ablauf_lang.eval(STEPS, ACTIONS, store=store)
    shorter = "(do!! (with-augment [:out [:a]] (action!! :t/a {:out 1})))"
    with pytest.raises(ForkError, match="removes node 2"):
        ablauf_lang.fork(run.run_id, 3, program=shorter, store=store)


def test_fork_refusals(store: Any) -> None:
    run = ablauf_lang.eval(STEPS, ACTIONS, store=store)
    with pytest.raises(RunError, match="no run 'nosuch'"):
        ablauf_lang.fork("nosuch", 1, store=store)
    with pytest.raises(RunError, match="restart 17 is out of range"):
        ablauf_lang.fork(run.run_id, 17, store=store)
    with pytest.raises(RunError, match=r"had finished .success. by restart 4"):
        ablauf_lang.fork(run.run_id, store=store)
    with pytest.raises(AblaufError, match="line 1"):
        ablauf_lang.fork(run.run_id, 1, program="(do!! (log!! 1)", store=store)


def test_what_was_in_flight_is_performed_again_even_if_not_idempotent() -> None:
    store = open_store("memory:")
    source = "(dopar!! (action!! :t/a 1) (action!! :t/a 2))"
    job = ablauf_lang.make_job(source)
    run_id = store.create_run(job, source=source)
    job, sent = ablauf_lang.restart_job(job, [])
    store.record(run_id, job)
    job, _ = ablauf_lang.restart_job(job, [success(sent[0], 1)])
    store.record(run_id, job)
    performed: list[Any] = []

    def act(payload: Any, ctx: Any) -> Any:
        performed.append(payload)
        return payload

    new = ablauf_lang.fork(run_id, 2, store=store)
    run = ablauf_lang.resume(new, store=store, actions={"t/a": act})
    assert run.status == "success"
    assert performed == [2]


@settings(max_examples=40, deadline=None)
@given(source=workflow_sources, data=st.data())
def test_grafting_the_same_program_changes_nothing(source: str, data: st.DataObject) -> None:
    """The run's own program grafts onto any of its states as it is; and a fork at any
    restart, run to its end with the same outcomes, ends as the original did."""
    store = open_store("memory:")
    fails = data.draw(st.sets(st.integers(0, 40)), label="failing node ids")
    run_id, jobs, _ = drive(store, source, lambda d: d.id not in fails)
    at = data.draw(st.integers(0, len(jobs) - 1), label="fork at")
    root = ablauf_lang.make_job(source).root
    assert graft(jobs[at], root) == jobs[at]
    if jobs[at].done:
        return
    new = ablauf_lang.fork(run_id, at, store=store)
    job = store.load(new).job
    pending: list[Dispatch] = []
    for _ in range(200):
        job, pending = ablauf_lang.restart_job(
            job, [_result(d, lambda d: d.id not in fails) for d in pending]
        )
        if job.done or not pending:
            break
    assert job.status == jobs[-1].status
    assert job.context == jobs[-1].context


# ---------------------------------------------------------------- breakpoints as data


def test_a_run_parks_before_a_break_and_goes_on_when_continued(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/runs.db"
    performed: list[Any] = []

    def push(payload: Any, ctx: Any) -> Any:
        performed.append(payload)
        return payload

    source = "(do!! (log!! 1) (doseq!! [x [1 2]] (action!! :t/push x)))"
    run = ablauf_lang.eval(source, {"t/push": push}, store=url, breaks=["t/push"], detach=True)
    assert run.status == "pending"
    assert performed == []
    backend = open_store(url)
    assert backend.info(run.run_id).waiting == "waiting: ablauf/break"
    assert backend.info(run.run_id).state == "parked"
    ablauf_lang.signal(run.run_id, "ablauf/break", store=backend)
    run = ablauf_lang.resume(run.run_id, store=backend, actions={"t/push": push}, detach=True)
    assert performed == [1]
    assert run.status == "pending"
    ablauf_lang.signal(run.run_id, "ablauf/break", store=backend)
    run = ablauf_lang.resume(run.run_id, store=backend, actions={"t/push": push})
    assert performed == [1, 2]
    assert run.status == "success"
    backend.close()
    with pytest.raises(AblaufError, match="no such action"):
        ablauf_lang.eval(source, store="memory:", breaks=["t/nothing"])


# ---------------------------------------------------------------- the command line


def test_the_commands(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/runs.db"
    (tmp_path / "p.abl").write_text('(do!!\n  (log!! "a")\n  (log!! "b")\n  (log!! "c"))\n')
    first = ablauf("run", "p.abl", "--store", db, "--json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run_id = json.loads(first.stdout)["run_id"]

    text = ablauf("runs", "history", run_id[:6], "--store", db, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert "created" in lines[1]
    assert 'sent 1 :action/log "a"' in lines[2]
    assert 'ok 1 :action/log -> "a"; sent 2 :action/log "b"' in lines[3]
    assert "run success" in lines[-1]
    data = json.loads(
        ablauf("runs", "history", run_id, "--store", db, "--json", cwd=tmp_path).stdout
    )
    assert [s["restart"] for s in data["steps"]] == [0, 1, 2, 3, 4]
    assert data["steps"][2]["results"][0] == {
        "node": 1,
        "action": "action/log",
        "attempt": 1,
        "state": "success",
        "output": "a",
    }

    shown = ablauf("runs", "show", run_id, "--at", "2", "--store", db, cwd=tmp_path)
    assert shown.returncode == 0
    assert "as after restart 2" in shown.stdout
    assert "unset" in shown.stdout  # the third step had not started then
    shown = json.loads(
        ablauf("runs", "show", run_id, "--at", "2", "--store", db, "--json", cwd=tmp_path).stdout
    )
    assert shown["at"] == 2
    assert shown["status"] == "pending"

    (tmp_path / "q.abl").write_text('(do!!\n  (log!! "a")\n  (log!! "b")\n  (log!! "C"))\n')
    forked = ablauf(
        "runs", "fork", run_id, "--at", "2", "--program", "q.abl", "--store", db, cwd=tmp_path
    )
    assert forked.returncode == 0, forked.stderr
    new = forked.stdout.strip()
    listed = ablauf("runs", "list", "--forks-of", run_id[:5], "--store", db, cwd=tmp_path)
    assert new in listed.stdout
    assert f"fork of {run_id} at 2" in listed.stdout
    done = ablauf("runs", "resume", new, "--store", db, "--json", cwd=tmp_path)
    assert done.returncode == 0
    assert json.loads(done.stdout)["status"] == "success"

    for args, message in [
        (("runs", "show", run_id, "--at", "99"), "restart 99 is out of range"),
        (("runs", "history", "nosuch"), "no run"),
        (("runs", "fork", "nosuch"), "no run"),
        (("runs", "fork", run_id, "--at", "3", "--program", "p2.abl"), "p2.abl: no such file"),
    ]:
        bad = ablauf(*args, "--store", db, cwd=tmp_path)
        assert bad.returncode == 2, (args, bad.stdout, bad.stderr)
        assert message in bad.stderr
        assert "Traceback" not in bad.stderr
    (tmp_path / "r.abl").write_text('(do!!\n  (log!! "A"))\n')
    bad = ablauf(
        "runs", "fork", run_id, "--at", "3", "--program", "r.abl", "--store", db, cwd=tmp_path
    )
    assert bad.returncode == 2
    assert "changes node 1 (action!! :action/log, line 2)" in bad.stderr


def test_run_with_a_break_then_continue(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/runs.db"
    (tmp_path / "acts.py").write_text(
        "from ablauf_lang import action\n"
        "@action('t/push')\n"
        "def push(payload, ctx):\n"
        "    print('PUSHED', payload, flush=True)\n"
        "    return payload\n"
    )
    (tmp_path / "b.abl").write_text('(do!! (log!! "a") (action!! :t/push "v1"))\n')
    parked = ablauf(
        "run",
        "b.abl",
        "--actions",
        "acts.py",
        "--store",
        db,
        "--break",
        "t/push",
        "--detach",
        "--json",
        cwd=tmp_path,
    )
    assert parked.returncode == 0, parked.stderr
    run_id = json.loads(parked.stdout)["run_id"]
    assert "PUSHED" not in parked.stdout
    listed = ablauf("runs", "list", "--store", db, cwd=tmp_path)
    assert "waiting: ablauf/break" in listed.stdout
    assert "parked" in listed.stdout
    assert ablauf("runs", "continue", run_id, "--store", db, cwd=tmp_path).returncode == 0
    done = ablauf("runs", "resume", run_id, "--actions", "acts.py", "--store", db, cwd=tmp_path)
    assert done.returncode == 0
    assert "PUSHED v1" in done.stdout
    bad = ablauf(
        "run", "b.abl", "--actions", "acts.py", "--store", db, "--break", "t/none", cwd=tmp_path
    )
    assert bad.returncode == 2
    assert "--break t/none: the program has no such action" in bad.stderr
