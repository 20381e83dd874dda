"""Workers on a real PostgreSQL server: real worker processes (`python -m tests.pg_worker`),
killed with SIGKILL, cut off from the database, stopped with SIGTERM.

The actions (`tests/pg_actions.py`) leave traces in the test database, so the tests count
what really ran.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

import ablauf_lang
from ablauf_lang import queue
from ablauf_lang.engine.job import INTERRUPTED
from ablauf_lang.engine.nodes import LeafState, Status
from ablauf_lang.errors import AblaufError, RunError, StoreError
from ablauf_lang.runners import worker
from ablauf_lang.stores import postgres as pg
from ablauf_lang.stores.postgres import PostgresStore
from tests import pg_actions
from tests.pg import PgServer, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
POLL = 30.0  # the safety poll of the test workers: any step waiting for it shows


class Workers:
    """Worker processes on one database; their logs go to files shown on failure."""

    def __init__(self, url: str, env: dict[str, str] | None = None) -> None:
        self.url = url
        self.env = env or {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.dir = tempfile.mkdtemp(prefix="ablauf-workers-")

    def start(
        self, n: int = 1, *, concurrency: int = 4, lease: float = 30.0, only: str | None = None
    ) -> list[int]:
        """Start `n` workers and wait until each live one listens; return their indexes.
        `only`: the (comma-separated) actions they have, else all of `tests.pg_actions`."""
        started = []
        for _ in range(n):
            log = Path(self.dir) / f"worker-{len(self.procs)}.log"
            cmd = [
                sys.executable,
                "-m",
                "tests.pg_worker",
                self.url,
                "--concurrency",
                str(concurrency),
                "--lease",
                str(lease),
                "--poll",
                str(POLL),
                *(["--only", only] if only is not None else []),
            ]
            env = {**os.environ, pg_actions.DSN_VAR: self.url, **self.env}
            with open(log, "wb") as out:
                self.procs.append(
                    subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
                )
            self.logs.append(log)
            started.append(len(self.procs) - 1)
        alive = sum(p.poll() is None for p in self.procs)
        # `==`: the connection of a worker just killed may linger for a moment.
        wait_for(lambda: self._listening() == alive, 30, what="workers to listen")
        return started

    def _listening(self) -> int:
        with psycopg.connect(self.url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'ablauf-listen'"
            ).fetchone()
        return int(row[0]) if row else 0

    def output(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.logs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@contextmanager
def running(url: str, n: int = 1, **kw: float) -> Iterator[Workers]:
    group = Workers(url)
    try:
        group.start(n, **kw)  # type: ignore[arg-type]
        yield group
    except BaseException:
        print(group.output())
        raise
    finally:
        group.stop()


def database(server: PgServer) -> str:
    url = server.create_database()
    pg_actions.setup(url)
    PostgresStore.from_url(url).close()
    return url


@pytest.fixture(scope="module")
def shared(pg_server: PgServer) -> Iterator[tuple[str, Workers]]:
    """One database with four worker processes, for the tests that only submit runs."""
    url = database(pg_server)
    with running(url, 4) as group:
        yield url, group


@pytest.fixture
def dsn(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    yield
    monkeypatch.delenv(pg_actions.DSN_VAR, raising=False)


def query(url: str, sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def restarts_of(url: str, run_id: str) -> list[tuple]:
    return query(
        url,
        "SELECT seq, results, started, finished, worker FROM ablauf.restarts "
        "WHERE run_id = %s ORDER BY seq",
        run_id,
    )


def assert_never_interleaved(rows: list[tuple]) -> None:
    """The recorded steps of one run follow each other: write numbers one apart, and each
    step's row lock taken after the previous step's writes were done."""
    seqs = [r[0] for r in rows]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    for before, after in itertools.pairwise(rows):
        assert after[2] >= before[3], f"step {after[0]} started before step {before[0]} ended"


def kill_holding_a_lease(victim: subprocess.Popen[bytes], url: str) -> None:
    """SIGKILL a worker while it holds a lease (between two tasks it holds none): stopped
    until the database shows one, then killed."""
    while True:
        victim.send_signal(signal.SIGSTOP)
        leased = query(url, "SELECT count(*) FROM ablauf.tasks WHERE lease_owner IS NOT NULL")
        if leased[0][0]:
            break
        victim.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)


# ---------------------------------------------------------------- fan-out and sequences


def test_four_workers_run_a_500_way_dopar_exactly_once(shared: tuple[str, Workers]) -> None:
    url, _ = shared
    source = "(dopar!! " + " ".join(f"(action!! :test/insert {{:n {i}}})" for i in range(500)) + ")"
    run_id = worker.submit(source, url)
    run = worker.wait(run_id, url, timeout=120)
    assert run.status is Status.SUCCESS
    assert query(url, "SELECT count(*), count(DISTINCT n) FROM hits") == [(500, 500)]
    assert query(url, "SELECT count(DISTINCT pid) FROM hits")[0][0] >= 2  # spread out
    rows = restarts_of(url, run_id)
    assert sum(r[1] for r in rows) == 500  # every result applied once
    assert_never_interleaved(rows)
    assert query(url, "SELECT count(*) FROM ablauf.tasks") == [(0,)]


def test_restarts_never_interleave_when_results_arrive_together(
    shared: tuple[str, Workers],
) -> None:
    url, _ = shared
    at = time.time() + 1.5  # every action finishes at this moment
    source = (
        "(dopar!! "
        + " ".join(f"(action!! :test/until {{:at {at} :i {i}}})" for i in range(64))
        + ")"
    )
    run_id = worker.submit(source, url)
    run = worker.wait(run_id, url, timeout=60)
    assert run.status is Status.SUCCESS
    assert sorted(leaf.output for leaf in run.job.leaves()) == list(range(64))
    rows = restarts_of(url, run_id)
    assert sum(r[1] for r in rows) == 64
    assert_never_interleaved(rows)
    # Results that arrived while a restart held the run were applied together.
    assert max(r[1] for r in rows) > 1


def _commit_cost(url: str) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE floor (x integer)")
        start = time.perf_counter()
        for i in range(50):
            with conn.transaction():
                conn.execute("INSERT INTO floor VALUES (%s)", (i,))
        return (time.perf_counter() - start) / 50


def test_a_200_step_sequence_never_waits_for_a_poll(shared: tuple[str, Workers]) -> None:
    url, _ = shared
    commit = _commit_cost(url)
    source = "(do!! " + " ".join(f"(action!! :test/noop {i})" for i in range(200)) + ")"
    start = time.perf_counter()
    run_id = worker.submit(source, url)
    run = worker.wait(run_id, url, timeout=120)
    elapsed = time.perf_counter() - start
    assert run.status is Status.SUCCESS
    # Idle workers poll every 30 s: one step waiting for a poll would exceed this bound,
    # which allows 60 commits per step (a step costs a few; see bench/bench_postgres.py).
    bound = min(POLL / 2, max(2.0, 200 * 60 * commit))
    assert elapsed < bound, f"{elapsed:.2f}s for 200 steps (commit {commit * 1e3:.2f} ms)"
    # Each new run needs an idle worker woken by NOTIFY: ten in a row, none waits for a poll.
    start = time.perf_counter()
    for i in range(10):
        one = worker.submit(f"(action!! :test/noop {i})", url)
        assert worker.wait(one, url, timeout=POLL).status is Status.SUCCESS
    assert time.perf_counter() - start < POLL / 2


def test_requeue_hands_a_failed_run_back_to_the_workers(shared: tuple[str, Workers]) -> None:
    url, _ = shared
    run_id = worker.submit(
        '(do!! (idempotent-action!! :test/fail-once {:name "requeue"}) (log!! "after"))', url
    )
    run = worker.wait(run_id, url, timeout=60)
    assert run.status is Status.FAILURE
    assert "transient failure" in run.job.node(1).error
    worker.requeue(run_id, url, retry=True)
    run = worker.wait(run_id, url, timeout=60)
    assert run.status is Status.SUCCESS
    assert run.job.node(1).output == 2
    with pytest.raises(RunError):
        worker.requeue(run_id, url, retry=True)  # succeeded: nothing to retry


def test_runs_retry_queue_hands_the_run_to_the_workers_from_the_cli(
    shared: tuple[str, Workers], tmp_path: Path
) -> None:
    url, _ = shared
    prog = tmp_path / "flaky.abl"
    prog.write_text('(do!! (idempotent-action!! :test/fail-once {:name "cli-queue"}) (log!! 2))')

    def ablauf(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "ablauf_lang", *args, "--store", url]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)

    submitted = ablauf("submit", str(prog))
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    assert worker.wait(run_id, url, timeout=60).status is Status.FAILURE

    queued = ablauf("runs", "retry", run_id, "--queue", "--json")
    assert queued.returncode == 0, queued.stderr
    assert queued.stdout.strip() == f'{{"run_id": "{run_id}", "status": "pending"}}'
    run = worker.wait(run_id, url, timeout=60)
    assert run.status is Status.SUCCESS
    assert run.job.node(1).output == 2  # the second call, made by a worker

    again = ablauf("runs", "retry", run_id, "--queue")
    assert again.returncode == 2
    assert "nothing to retry" in again.stderr
    assert "Traceback" not in again.stderr


def test_submit_and_wait_errors(shared: tuple[str, Workers], tmp_path: Path) -> None:
    url, _ = shared
    with pytest.raises(AblaufError):
        worker.submit("(do!! (log!! 1)", url)  # unbalanced: a syntax error
    with pytest.raises(StoreError) as err:
        worker.submit("(log!! 1)", f"sqlite:///{tmp_path}/runs.db")
    assert "PostgreSQL" in err.value.message
    with pytest.raises(RunError):
        worker.wait("no-such-run", url, timeout=1)
    run_id = worker.submit("(action!! :test/slow {:seconds 2})", url)
    assert worker.wait(run_id, url, timeout=0.2).status is Status.PENDING
    assert worker.wait(run_id, url, timeout=30).status is Status.SUCCESS


# ---------------------------------------------------------------- failures


def test_a_killed_worker_loses_nothing(
    pg_server: PgServer, dsn: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = database(pg_server)
    monkeypatch.setenv(pg_actions.DSN_VAR, url)
    source = (
        '(do!! (dopar!! (idempotent-action!! :test/hang-first {:name "idem"}) '
        '(action!! :test/hang-first {:name "once"})) (log!! "after"))'
    )
    with running(url, 1, concurrency=2, lease=1.5) as group:
        run_id = worker.submit(source, url)
        wait_for(
            lambda: query(url, "SELECT count(*) FROM calls")[0][0] == 2,
            30,
            what="both actions to start",
        )
        victim = group.procs[0]
        kill_holding_a_lease(victim, url)
        victim.wait(timeout=10)
        group.start(1, concurrency=2, lease=1.5)
        run = worker.wait(run_id, url, timeout=60)
    calls = dict(query(url, "SELECT name, count(*) FROM calls GROUP BY name"))
    assert calls == {"idem": 2, "once": 1}  # the idempotent action ran again, once
    assert run.status is Status.FAILURE
    idem, once = run.job.node(2), run.job.node(3)
    assert idem.result is LeafState.SUCCESS
    assert idem.output == {"name": "idem", "call": 2}
    assert once.result is LeafState.FAILURE
    assert once.error.startswith(INTERRUPTED)
    # `runs retry` (the API's retry) runs the interrupted action again and completes it.
    again = ablauf_lang.retry(run_id, store=url, actions=pg_actions.ACTIONS)
    assert again.status is Status.SUCCESS
    assert dict(query(url, "SELECT name, count(*) FROM calls GROUP BY name"))["once"] == 2


def test_a_worker_cut_off_from_the_database_reconnects(pg_server: PgServer) -> None:
    url = database(pg_server)
    steps = 30
    source = (
        "(do!! "
        + " ".join(
            f"(idempotent-action!! :test/slow {{:seconds 0.05 :i {i}}})" for i in range(steps)
        )
        + ")"
    )
    with running(url, 1, concurrency=2, lease=5) as group:
        run_id = worker.submit(source, url)
        for _ in range(3):
            time.sleep(0.3)
            query(
                url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE 'ablauf-%%'",
            )
        run = worker.wait(run_id, url, timeout=90)
        assert group.procs[0].poll() is None  # it did not die
        log = group.output()
    assert run.status is Status.SUCCESS, log
    assert [leaf.output["i"] for leaf in run.job.leaves()] == list(range(steps))
    assert "reconnecting" in log


def test_sigterm_finishes_the_action_in_hand(pg_server: PgServer) -> None:
    url = database(pg_server)
    with running(url, 1, concurrency=1) as group:
        run_id = worker.submit(
            '(do!! (action!! :test/hang-first {:name "term" :hang 1.5}) (log!! "next"))', url
        )
        wait_for(
            lambda: query(url, "SELECT count(*) FROM calls")[0][0] == 1,
            30,
            what="the action to start",
        )
        proc = group.procs[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        job = PostgresStore.from_url(url).load(run_id).job
        assert job.node(1).result is LeafState.SUCCESS  # delivered before exiting
        group.start(1)
        run = worker.wait(run_id, url, timeout=30)
    assert run.status is Status.SUCCESS
    assert query(url, "SELECT count(*) FROM calls") == [(1,)]  # never run twice


def test_the_ablauf_worker_command_runs_the_deploy_example(pg_server: PgServer) -> None:
    url = database(pg_server)
    argv = [sys.executable, "-m", "ablauf_lang"]
    cmd = [*argv, "worker", "--store", url, "--actions", "examples/actions.py"]
    cmd += ["--concurrency", "2", "--lease", "5", "--poll", "30"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    context = ["--context", '{"env": "prod"}']
    try:
        submitted = subprocess.run(
            [*argv, "submit", "examples/deploy.abl", "--store", url, "--json", *context],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert submitted.returncode == 0, submitted.stderr
        run_id = json.loads(submitted.stdout)["run_id"]
        run = worker.wait(run_id, url, timeout=60)
        assert run.status is Status.SUCCESS
        assert run.context["sentry/dsn"].startswith("https://")
        assert run.context["env"] == "prod"
        assert json.loads(submitted.stdout) == {"run_id": run_id, "status": "pending"}
        assert run.job.node(5).result is LeafState.SUCCESS  # the chat message, last
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err


# ---------------------------------------------------------------- starting, routing, logging


def test_workers_started_together_on_a_fresh_database_all_run(pg_server: PgServer) -> None:
    url = pg_server.create_database()  # no ablauf schema yet: every worker migrates
    pg_actions.setup(url)
    group = Workers(url)
    try:
        group.start(6, concurrency=1)
        assert [p.poll() for p in group.procs] == [None] * 6, group.output()
        assert "already exists" not in group.output()
        run_id = worker.submit("(dopar!! (log!! 1) (log!! 2) (log!! 3))", url)
        assert worker.wait(run_id, url, timeout=30).status is Status.SUCCESS
        versions = query(url, "SELECT count(*) FROM ablauf.schema_version")[0][0]
        assert versions == len(pg.migrations())
    finally:
        group.stop()


def test_runs_wait_for_a_worker_that_has_their_action(pg_server: PgServer) -> None:
    url = database(pg_server)
    group = Workers(url)
    try:
        group.start(1, concurrency=2, only="test/noop")
        run_id = worker.submit(
            "(do!! (action!! :test/noop 1) (action!! :test/insert {:n 7}) (log!! 3))", url
        )
        store = PostgresStore.from_url(url)
        try:
            notes = wait_for(
                lambda: queue.notes(store, run_id, after=0.3),
                30,
                what="a note on the unserved action",
            )
            assert "waiting for a worker that serves test/insert" in notes[0]
            assert store.info(run_id).status is Status.PENDING
            assert query(url, "SELECT count(*) FROM hits") == [(0,)]
            group.start(1, concurrency=1, only="test/insert")
            run = worker.wait(run_id, url, timeout=30)
            assert run.status is Status.SUCCESS
            assert queue.notes(store, run_id, after=0) == []
        finally:
            store.close()
        assert query(url, "SELECT pid FROM hits") == [(group.procs[1].pid,)]
    except BaseException:
        print(group.output())
        raise
    finally:
        group.stop()


def _ablauf_worker(url: str, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "ablauf_lang", "worker", "--store", url]
    cmd += ["--actions", "tests/pg_actions.py", "--concurrency", "1", "--poll", "30", *extra]
    env = {**os.environ, pg_actions.DSN_VAR: url}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return err


def test_the_worker_command_logs_what_it_does(pg_server: PgServer) -> None:
    url = database(pg_server)
    proc = _ablauf_worker(url)
    try:
        run_id = worker.submit(
            '(do!! (log!! "hello from a run") (action!! :test/noop 1) (fail!! "boom"))', url
        )
        assert worker.wait(run_id, url, timeout=30).status is Status.FAILURE
    finally:
        err = _stop(proc)
    lines = err.splitlines()
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
    assert all(re.match(stamp, line) for line in lines), err
    banner = lines[0]
    assert " INFO ablauf.worker: worker " in banner
    assert "started: store postgresql://" in banner
    assert "concurrency 1" in banner
    assert "test/insert, test/noop" in banner  # the module's actions
    assert f"run {run_id} started" in err
    assert f"run {run_id}: log!! hello from a run" in err
    assert f"run {run_id}: step 3 (action/fail) failed: boom" in err
    assert f"run {run_id} finished: failure: boom" in err
    assert "DEBUG" not in err
    assert "Traceback" not in err

    proc = _ablauf_worker(url, "-v")
    try:
        run_id = worker.submit("(action!! :test/noop 1)", url)
        assert worker.wait(run_id, url, timeout=30).status is Status.SUCCESS
    finally:
        err = _stop(proc)
    assert f"run {run_id}: step 0 (test/noop) done in" in err
    assert f"run {run_id} finished: success" in err


def test_the_worker_command_needs_a_postgres_store_first(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "ablauf_lang"]
    env = {k: v for k, v in os.environ.items() if k != "ABLAUF_STORE"}
    # (`ablauf worker` on a SQLite file, the default one included, wakes its parked runs:
    # tests/test_time_cli_run.py; only a memory: store has nothing to serve.)
    for args, words in [
        (["worker", "--store", "memory:"], "need a PostgreSQL store"),
        (["submit", "examples/hello.abl"], "ablauf submit needs a PostgreSQL store"),
        (
            ["submit", "examples/hello.abl", "--store", f"sqlite:///{tmp_path}/x.db"],
            "need a PostgreSQL store",
        ),
        (["submit", "examples/hello.abl", "--store", "memory:"], "need a PostgreSQL store"),
    ]:
        done = subprocess.run([*argv, *args], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        assert words in done.stderr
        assert done.stderr.count("\n") == 1
    for command in ("worker", "submit"):
        helped = subprocess.run(
            [*argv, command, "--help"], cwd=ROOT, capture_output=True, text=True
        )
        assert "postgresql://" in helped.stdout
        assert ("SQLite" in helped.stdout) == (command == "worker")
        assert "memory:" not in helped.stdout


# ---------------------------------------------------------------- handing runs back


def test_requeueing_a_live_run_is_refused_and_each_effect_happens_once(
    pg_server: PgServer, dsn: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = database(pg_server)
    monkeypatch.setenv(pg_actions.DSN_VAR, url)
    n = 300
    source = (
        "(dopar!! "
        + " ".join(f"(action!! :test/insert {{:n {i} :sleep 0.02}})" for i in range(n))
        + ")"
    )

    def ablauf(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "ablauf_lang", *args, "--store", url]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)

    def hits() -> int:
        return int(query(url, "SELECT count(*) FROM hits")[0][0])

    with running(url, 1, concurrency=2, lease=1.5) as group:
        run_id = worker.submit(source, url)
        wait_for(lambda: hits() >= 20, 30, what="the fan-out to be under way")
        with pytest.raises(RunError) as err:
            worker.requeue(run_id, url)
        assert "being served by the workers" in err.value.message
        for command in ("resume", "retry"):
            refused = ablauf("runs", command, run_id, "--queue")
            assert refused.returncode == 2
            assert "being served by the workers" in refused.stderr
            assert "Traceback" not in refused.stderr
        victim = group.procs[0]
        kill_holding_a_lease(victim, url)
        victim.wait(timeout=10)
        time.sleep(2.0)  # the dead worker's leases expire
        worker.requeue(run_id, url)  # touches only the tasks whose lease expired
        queued = query(
            url, "SELECT count(*) FROM ablauf.tasks WHERE kind = 'action' AND lease_owner IS NULL"
        )[0][0]
        assert queued > 100  # the never-started ones are left to the workers, untouched
        with pytest.raises(RunError):
            worker.requeue(run_id, url)  # queued: the run goes on when a worker comes
        group.start(1, concurrency=4, lease=1.5)
        run = worker.wait(run_id, url, timeout=120)
        interrupted = [leaf.id for leaf in run.job.leaves() if leaf.result is LeafState.FAILURE]
        assert len(interrupted) <= 2  # at most what was in flight on the killed worker
        assert all(run.job.node(i).error.startswith(INTERRUPTED) for i in interrupted)
        if interrupted:
            assert run.status is Status.FAILURE
            again = ablauf("runs", "retry", run_id, "--queue")
            assert again.returncode == 0, again.stderr
            run = worker.wait(run_id, url, timeout=60)
        assert run.status is Status.SUCCESS
    counts = dict(query(url, "SELECT n, count(*) FROM hits GROUP BY n"))
    assert sorted(counts) == list(range(n))
    ran_twice = [i for i, c in counts.items() if c > 1]
    assert all(c <= 2 for c in counts.values())
    assert len(ran_twice) <= len(interrupted)  # only an interrupted step can run twice
    assert sum(counts.values()) <= n + len(interrupted)


def test_the_janitor_hands_back_a_run_whose_tasks_vanished(pg_server: PgServer) -> None:
    url = database(pg_server)
    source = (
        "(dopar!! (idempotent-action!! :test/noop 1) (action!! :test/noop 2) "
        "(action!! :test/noop 3))"
    )
    run_id = worker.submit(source, url)
    store = PostgresStore.from_url(url)
    try:
        queue.claim(store, "test/0", 30, 1)
        queue.run_restart(store, run_id, worker.advance, worker="test/0", claim=0, lease=30)
        query(url, "DELETE FROM ablauf.tasks RETURNING task_id")  # lost, as in the fan-out
    finally:
        store.close()
    with running(url, 1, concurrency=2, lease=2) as group:
        run = worker.wait(run_id, url, timeout=60)
        log = group.output()
    assert run.status is Status.FAILURE
    assert run.job.node(1).result is LeafState.SUCCESS
    assert run.job.node(1).attempt == 2
    assert run.job.node(2).error.startswith(INTERRUPTED)
    assert f"run {run_id}: 3 step(s) were in flight with no task to finish them" in log


# ---------------------------------------------------------------- a server that restarts


@pytest.fixture
def own_server() -> Iterator[PgServer]:
    """A server of this test's own, to restart."""
    server = PgServer().start()
    try:
        yield server
    finally:
        server.stop()


def test_wait_and_every_client_path_reconnect_after_a_server_restart(
    own_server: PgServer,
) -> None:
    url = database(own_server)
    steps = 30
    source = (
        "(do!! "
        + " ".join(
            f"(idempotent-action!! :test/slow {{:seconds 0.1 :i {i}}})" for i in range(steps)
        )
        + ")"
    )
    with running(url, 1, concurrency=2, lease=10) as group:
        client = PostgresStore.from_url(url)  # like `runs show` and `runs list`
        try:
            run_id = worker.submit(source, url)
            waited: list[object] = []
            waiter = threading.Thread(
                target=lambda: waited.append(_caught(worker.wait, run_id, url, timeout=120))
            )
            waiter.start()
            time.sleep(1.0)
            own_server.restart(down=1.0)
            waiter.join(timeout=150)
            run = waited[0]
            assert not isinstance(run, BaseException), run
            assert run.status is Status.SUCCESS, group.output()
            assert [leaf.output["i"] for leaf in run.job.leaves()] == list(range(steps))
            own_server.restart()
            assert client.info(run_id).status is Status.SUCCESS  # reconnected
            assert client.load(run_id).job.restarts == run.job.restarts
            own_server.restart()
            with pytest.raises(RunError) as err:
                worker.requeue_run(client, run_id, retry=True)
            assert "nothing to retry" in err.value.message
            own_server.restart()
            again = worker.submit("(log!! 1)", url)
            assert worker.wait(again, url, timeout=30).status is Status.SUCCESS
            assert client.reconnects >= 2
        finally:
            client.close()
        assert group.procs[0].poll() is None  # the worker reconnected too


def _caught(fn: object, *args: object, **kw: object) -> object:
    try:
        return fn(*args, **kw)  # type: ignore[operator]
    except BaseException as exc:  # handed to the test's thread
        return exc


def test_submit_and_wait_keep_one_connection_each_for_the_process(
    shared: tuple[str, Workers],
) -> None:
    url, _ = shared

    def ours(name: str) -> int:
        rows = query(
            url,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND pid <> "
            "pg_backend_pid() AND backend_type = 'client backend' AND client_port IS NOT NULL "
            "AND backend_start < now()",
            name,
        )
        return int(rows[0][0])

    first = worker.submit('(action!! :test/noop "a")', url)
    assert worker.wait(first, url, timeout=POLL).status is Status.SUCCESS
    stores, waits = ours("ablauf-store"), ours("ablauf-wait")
    for i in range(5):
        run_id = worker.submit(f"(action!! :test/noop {i})", url)
        assert worker.wait(run_id, url, timeout=POLL).status is Status.SUCCESS
    # No connection more for five more runs (the four workers' own are counted in both).
    assert ours("ablauf-store") == stores
    assert ours("ablauf-wait") == waits


def test_wait_looks_first_only_when_its_listener_may_have_missed_the_end(
    shared: tuple[str, Workers], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run this thread submitted while its listener LISTENed is waited for without a
    first status read (its end is announced to that listener); a run whose end the
    listener announced during an earlier wait is looked at first and found done at once
    (not after a second's safety look)."""
    url, _ = shared
    looks: list[str] = []
    real = PostgresStore.status

    def status(self: PostgresStore, run_id: str) -> str:
        looks.append(run_id)
        return real(self, run_id)

    monkeypatch.setattr(PostgresStore, "status", status)

    def done(run_id: str) -> bool:
        rows = query(url, "SELECT status FROM ablauf.runs WHERE run_id = %s", run_id)
        return rows[0][0] != "pending"

    worker.wait(worker.submit('(action!! :test/noop "listen")', url), url, timeout=POLL)
    looks.clear()
    first = worker.submit('(action!! :test/noop "a")', url)
    assert worker.wait(first, url, timeout=POLL).status is Status.SUCCESS
    assert looks == []
    early = worker.submit('(action!! :test/noop "b")', url)
    wait_for(lambda: done(early), 30, what="the first run")  # announced, not yet read
    late = worker.submit('(action!! :test/noop "c")', url)
    assert worker.wait(late, url, timeout=POLL).status is Status.SUCCESS  # hears both
    began = time.monotonic()
    assert worker.wait(early, url, timeout=POLL).status is Status.SUCCESS
    assert time.monotonic() - began < 0.5
    assert looks == [early]


def test_run_worker_sets_the_switch_interval_while_it_runs(pg_server: PgServer) -> None:
    url = database(pg_server)
    stop = threading.Event()
    seen: list[float] = []
    before = sys.getswitchinterval()

    def look(payload: object, context: object) -> str:
        seen.append(sys.getswitchinterval())
        return "ok"

    thread = threading.Thread(
        target=worker.run_worker, args=(url, {"test/look": look}, 1), kwargs={"stop": stop}
    )
    thread.start()
    try:
        run_id = worker.submit('(action!! :test/look "x")', url)
        assert worker.wait(run_id, url, timeout=30).status is Status.SUCCESS
    finally:
        stop.set()
        thread.join(timeout=30)
    assert seen == [worker.SWITCH_INTERVAL]
    assert sys.getswitchinterval() == before


# ------------------------------------------------ short runs: wake-ups, local actions


def test_a_notify_for_one_task_wakes_one_idle_slot_and_none_is_missed() -> None:
    wake = worker._Wake()
    stop = threading.Event()
    woken: list[int] = []
    lock = threading.Lock()

    def slot(i: int) -> None:
        wake.wait(wake.generation, 5.0, stop)
        with lock:
            woken.append(i)

    threads = [threading.Thread(target=slot, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while len(wake._cond._waiters) < 4 and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.001)
    wake.bump(1)
    time.sleep(0.2)
    assert len(woken) == 1  # one task: one slot claims it, the others sleep on
    wake.bump(2)
    time.sleep(0.2)
    assert len(woken) == 3
    wake.bump()  # not a count (a due time, reconnection, stopping): every slot
    for t in threads:
        t.join(timeout=5)
    assert sorted(woken) == [0, 1, 2, 3]
    # A slot busy when the generation moved does not wait for the next bump.
    seen = wake.generation
    wake.bump(1)
    started = time.monotonic()
    wake.wait(seen, 5.0, stop)
    assert time.monotonic() - started < 1.0
    assert worker._count("3") == (3, None)
    assert worker._count("due") == (None, None)
    assert worker._count("1 0a1b2c") == (1, "0a1b2c")  # a restart task of that run


def test_a_submitted_run_is_restarted_from_its_notify_without_a_claim(
    pg_server: PgServer,
) -> None:
    """The NOTIFY of a submit names the run: a woken slot restarts it at once (one round
    trip less). A hint for a run with nothing queued, or one another transaction holds,
    does nothing: the slot looks at the queue as usual."""
    url = database(pg_server)
    w = worker.Worker(url, {"test/echo": lambda p, c: p}, 1, poll=POLL)  # idle when woken
    thread = threading.Thread(target=w.run)
    thread.start()
    try:
        # Submitted once its listener LISTENs (before, its slot finds the tasks by a claim).
        listening = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'ablauf-listen'"
        )
        wait_for(lambda: query(url, listening)[0][0] >= 1, 30, what="the listener")
        time.sleep(0.2)  # its first look at the queue done
        runs = [worker.submit("(action!! :test/echo 1)", url) for _ in range(3)]
        for run_id in runs:
            assert worker.wait(run_id, url, timeout=30).status is Status.SUCCESS
        assert w.stats["hinted"] >= 1
        before = w.stats["hinted"]
        w.wake.bump(1, runs[0])  # done: nothing queued for it
        run = worker.wait(worker.submit("(action!! :test/echo 2)", url), url, timeout=30)
        assert run.status is Status.SUCCESS
        assert w.stats["hinted"] <= before + 1
    finally:
        w.stop.set()
        thread.join(timeout=30)


def _in_process_worker(
    url: str, actions: dict[str, object]
) -> tuple[worker.Worker, threading.Thread]:
    w = worker.Worker(url, actions, 2, poll=POLL)  # type: ignore[arg-type]
    thread = threading.Thread(target=w.run)
    thread.start()
    return w, thread


def test_quick_idempotent_actions_run_within_the_step_that_dispatched_them(
    pg_server: PgServer,
) -> None:
    url = database(pg_server)
    calls: list[int] = []

    def count(payload: object, context: object) -> object:
        calls.append(int(payload))  # type: ignore[call-overload]
        return payload

    w, thread = _in_process_worker(url, {"test/count": count})
    try:
        steps = 40
        source = "(do!! " + " ".join(f"(idempotent-action!! :test/count {i})" for i in range(steps))
        run_id = worker.submit(source + ")", url)
        run = worker.wait(run_id, url, timeout=60)
        assert run.status is Status.SUCCESS
        assert [leaf.output for leaf in run.job.leaves()] == list(range(steps))
        assert calls == list(range(steps))  # each once: no crash, no conflict here
        # After the first few (timed), the rest ran in the steps that dispatched them ...
        assert w.stats["local"] >= steps - worker.LOCAL_SEEN - 4
        # ... yet every write is a restart of its own, logged, in order.
        rows = restarts_of(url, run_id)
        assert [r[0] for r in rows] == list(range(1, run.job.restarts + 1))
        assert run.job.restarts == steps + 1
        assert_never_interleaved(rows)
        history = ablauf_lang.run_history(run_id, store=url)
        assert [s.restart for s in history.steps] == list(range(run.job.restarts + 1))
        assert query(url, "SELECT count(*) FROM ablauf.tasks") == [(0,)]

        # Never a non-idempotent action, however quick; fail!! always (it does nothing else).
        before = w.stats["local"]
        calls.clear()
        source = "(do!! " + " ".join(f"(action!! :test/count {i})" for i in range(10)) + ")"
        run = worker.wait(worker.submit(source, url), url, timeout=60)
        assert run.status is Status.SUCCESS
        assert calls == list(range(10))
        assert w.stats["local"] == before
        w3 = '(try!! (fail!! "boom") (rescue!! (action!! :test/count 1)))'
        run = worker.wait(worker.submit(w3, url), url, timeout=60)
        assert run.status is Status.SUCCESS
        assert w.stats["local"] == before + 1
        # A slow one is not local: the step that dispatched it does not hold the run.
        w.timing["test/count"] = (10, 0.5)
        run = worker.wait(
            worker.submit("(idempotent-action!! :test/count 7)", url), url, timeout=60
        )
        assert run.status is Status.SUCCESS
        assert w.stats["local"] == before + 1
    finally:
        w.stop.set()
        thread.join(timeout=30)


def _wide_run(url: str, workers: list[worker.Worker], n: int = 600) -> ablauf_lang.Run:
    """A `pmap!!` of `n` echoes run by `workers` (in this process) to its end, checked."""
    threads = [threading.Thread(target=w.run) for w in workers]
    for t in threads:
        t.start()
    try:
        run_id = worker.submit(f"(pmap!! [i (range {n})] (idempotent-action!! :test/echo i))", url)
        run = worker.wait(run_id, url, timeout=120)
        assert run.status is Status.SUCCESS
        assert [leaf.output for leaf in run.job.leaves()][:n] == list(range(n))
        history = ablauf_lang.run_history(run_id, store=url)
        assert [s.restart for s in history.steps] == list(range(run.job.restarts + 1))
        return run
    finally:
        for w in workers:
            w.stop.set()
        for t in threads:
            t.join(timeout=30)


def test_a_wide_run_is_read_once_by_a_workers_slots(pg_server: PgServer) -> None:
    """The slots of a worker share what they know of a run: a step finds the run's newest
    write known, even when the slot that committed it has not said so yet (it let go of
    the lock with its COMMIT), and when the step's statement saw an older snapshot than
    its lock (a delivery's). Read again, a 100,000-leaf run cost a worker 340 MB and
    seconds a time (found by bench/bench_wide.py)."""
    url = database(pg_server)
    w = worker.Worker(url, {"test/echo": lambda p, c: p}, 8, poll=POLL)
    run = _wide_run(url, [w])
    assert run.job.restarts > 10  # many steps, by several slots
    # The first step's, of a run the worker never saw (and one after a refused write,
    # which forgets the run: another step of the run was written first).
    assert w.known.loads <= 1 + w.stats["conflicts"], (w.known.loads, w.stats)


def test_a_worker_catches_up_with_what_another_worker_wrote(pg_server: PgServer) -> None:
    """Two workers (each its own memory of runs, as two processes) share a wide run: a
    step that finds the run written by the other since catches up with those writes
    (O(what they changed)) instead of reading the run whole, and the run ends right."""
    url = database(pg_server)
    workers = [worker.Worker(url, {"test/echo": lambda p, c: p}, 3, poll=POLL) for _ in range(2)]
    _wide_run(url, workers)
    caught = sum(w.known.catch_ups for w in workers)
    loads = sum(w.known.loads for w in workers)
    conflicts = sum(w.stats["conflicts"] for w in workers)
    assert caught > 0
    assert loads <= 2 + conflicts, (loads, caught, conflicts)
