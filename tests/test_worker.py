"""Workers on a real PostgreSQL server: real worker processes (`python -m tests.pg_worker`),
killed with SIGKILL, cut off from the database, stopped with SIGTERM.

The actions (`tests/pg_actions.py`) leave traces in the test database, so the tests count
what really ran.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

import ablauf_lang
from ablauf_lang.errors import AblaufError, RunError, StoreError
from ablauf_lang.job import INTERRUPTED
from ablauf_lang.nodes import LeafState, Status
from ablauf_lang.runners import worker
from ablauf_lang.stores.postgres import PostgresStore
from tests import pg_actions
from tests.pg import PgServer, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
POLL = 30.0  # the safety poll of the test workers: any step waiting for it shows


class Workers:
    """Worker processes on one database; their logs go to files shown on failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.dir = tempfile.mkdtemp(prefix="ablauf-workers-")

    def start(self, n: int = 1, *, concurrency: int = 4, lease: float = 30.0) -> list[int]:
        """Start `n` workers and wait until each live one listens; return their indexes."""
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
            ]
            env = {**os.environ, pg_actions.DSN_VAR: self.url}
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
        victim.send_signal(signal.SIGKILL)
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
