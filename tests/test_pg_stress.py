"""Stress: many wide fan-outs on several worker processes while their step transactions are
rolled back, their connections dropped just before or just after a COMMIT and killed with
`pg_terminate_backend`, with pauses where a step is most exposed to races
(`ABLAUF_PG_FAULTS`, see `ablauf_lang.stores.postgres.Faults`).

What must hold: every run finishes and succeeds; every action's effect happened exactly
once (the actions insert a row each); every committed step is a restart of the step before
it (the run's restart count equals the steps the workers logged: a write built on a stale
base - the lost 10,000-way fan-out - breaks this); no task is left over. A CI-sized round
runs by default; a bigger one is marked slow.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from ablauf_lang.engine.nodes import LeafState, Status
from ablauf_lang.runners import worker
from tests.pg import PgServer
from tests.test_worker import Workers, database, query

pytestmark = [pytest.mark.postgres]


def fanout(first: int, width: int) -> str:
    return (
        "(dopar!! "
        + " ".join(f"(action!! :test/insert {{:n {first + i}}})" for i in range(width))
        + ")"
    )


def kill_connections(url: str) -> None:
    query(
        url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name LIKE 'ablauf-%%'",
    )


def stress(
    server: PgServer,
    *,
    workers: int,
    concurrency: int,
    runs: int,
    width: int,
    faults: str,
    kills: int,
    timeout: float,
    sequences: int = 2,
) -> None:
    url = database(server)
    group = Workers(url, env={"ABLAUF_PG_FAULTS": faults})
    run_ids = [worker.submit(fanout(k * width, width), url) for k in range(runs)]
    # Sequences whose quick idempotent steps run within the steps that dispatched them
    # (local actions), between non-idempotent ones that must still happen exactly once
    # (their results delivered at once with the step they make, or the usual way when
    # that fails: a rollback, a lost connection, another worker holding the run).
    pairs = 20
    for k in range(sequences):
        first = runs * width + k * pairs
        steps = (
            f"(idempotent-action!! :test/noop {i}) (action!! :test/insert {{:n {first + i}}})"
            for i in range(pairs)
        )
        run_ids.append(worker.submit("(do!! " + " ".join(steps) + ")", url))
    stop = threading.Event()

    def killer() -> None:
        rng = random.Random(1)
        for _ in range(kills):
            if stop.wait(rng.uniform(0.3, 1.2)):
                return
            kill_connections(url)

    try:
        group.start(workers, concurrency=concurrency)
        chaos = threading.Thread(target=killer)
        chaos.start()
        deadline = time.monotonic() + timeout
        finished = [
            worker.wait(r, url, timeout=max(1.0, deadline - time.monotonic())) for r in run_ids
        ]
        stop.set()
        chaos.join()
        statuses = [r.status for r in finished]
        assert statuses == [Status.SUCCESS] * len(run_ids), group.output()
        for run in finished[:runs]:
            leaves = list(run.job.leaves())
            assert all(leaf.result is LeafState.SUCCESS for leaf in leaves)
            assert [leaf.output for leaf in leaves] == [leaf.payload["n"] for leaf in leaves]
        total = runs * width + sequences * pairs
        assert query(url, "SELECT count(*), count(DISTINCT n) FROM hits") == [(total, total)]
        for run in finished:
            logged = query(
                url,
                "SELECT count(*), min(seq), max(seq) FROM ablauf.restarts WHERE run_id = %s",
                run.run_id,
            )
            # Every committed step was a restart of the one before: none built on a stale base.
            assert logged == [(run.job.restarts, 1, run.job.restarts)], run.run_id
        assert query(url, "SELECT count(*) FROM ablauf.tasks") == [(0,)]
        assert query(url, "SELECT count(*) FROM ablauf.runs WHERE error IS NOT NULL") == [(0,)]
        assert [p.poll() for p in group.procs] == [None] * workers
        log = group.output()
        assert "unexpected error" not in log
        assert "reconnecting" in log  # the faults did happen
    except BaseException:
        print(group.output())
        raise
    finally:
        stop.set()
        group.stop()


@pytest.mark.timeout(120)
def test_wide_fanouts_survive_rollbacks_disconnects_and_kills(pg_server: PgServer) -> None:
    stress(
        pg_server,
        workers=3,
        concurrency=3,
        runs=6,
        width=300,
        faults="delay=0.002,rollback=0.05,drop=0.03,seed=11",
        kills=3,
        timeout=90,
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_many_wide_fanouts_survive_a_long_storm(pg_server: PgServer) -> None:
    stress(
        pg_server,
        workers=4,
        concurrency=4,
        runs=10,
        width=2000,
        faults="delay=0.003,rollback=0.05,drop=0.02,seed=23",
        kills=12,
        timeout=800,
    )
