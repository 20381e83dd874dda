"""Distributed execution on PostgreSQL: steps per second with 1, 2 and 4 worker processes.

    python bench/bench_postgres.py [--steps 1000] [--repeat 2]

Starts its own throwaway PostgreSQL server (like the tests: `tests/pg.py`), then measures,
in the same run:

- the floor: one PostgreSQL commit per step (BEGIN; INSERT one row; COMMIT on one
  connection), the cost every durable step pays at least once;
- a 1,000-step sequence (`do!!`) and a 1,000-way `dopar!!` of no-op actions, submitted to
  1, 2 and 4 worker processes (4 slots each), from submit to the run being done;
- the same two programs run by `ablauf_lang.eval` in this process, recording into
  PostgreSQL and into the embedded SQLite store, for comparison;
- a `dopar!!` of 200 actions that each wait 20 ms (sleeping, not computing), on 1, 2 and
  4 workers: work that is bound by how many actions run at once, so it shows the workers
  adding up even where the no-op fan-out is bound by the cores;
- W3, a short run (a failure, its rescue and its finally): the median of 60 runs one after
  another, `worker.submit` to `worker.wait` returning (its row's "ms/step" is a run's).

"commits" is the time of a step divided by the time of one commit: what a step costs in
units of the floor; "cpu" is how busy the machine's cores were during a distributed run
(all of them: the server's, the workers'). Prints a table; takes a minute or two.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

import ablauf_lang  # noqa: E402
from ablauf_lang.runners import worker  # noqa: E402
from ablauf_lang.stores.postgres import PostgresStore  # noqa: E402
from tests.pg import PgServer, wait_for  # noqa: E402

WORKER = (
    "import sys, time; from ablauf_lang.runners.worker import run_worker; "
    "run_worker(sys.argv[1], {'bench/noop': lambda p, c: p, "
    "'bench/wait': lambda p, c: time.sleep(p)}, int(sys.argv[2]), poll=30)"
)
# An action that waits (for a service, a disk...) without using a core.
WAIT = 0.02
ACTIONS = {"bench/noop": lambda p, c: p}


def programs(n: int) -> dict[str, str]:
    leaves = " ".join(f"(action!! :bench/noop {i})" for i in range(n))
    return {"sequence": f"(do!! {leaves})", "dopar!!": f"(dopar!! {leaves})"}


def waiting_fanout(n: int) -> str:
    """A `dopar!!` of `n` actions that each wait WAIT seconds: bound by slots, not cores."""
    return "(dopar!! " + " ".join(f"(action!! :bench/wait {WAIT})" for _ in range(n)) + ")"


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine (Linux `/proc/stat`; zeros elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def cpu_share(before: tuple[float, float], after: tuple[float, float]) -> str:
    """How busy the machine's cores were between two `cpu_times()`, in percent."""
    total = after[1] - before[1]
    return f"{100 * (after[0] - before[0]) / total:.0f}%" if total > 0 else "-"


def commit_floor(url: str, n: int = 1000) -> float:
    """Seconds per step when a step is exactly one commit."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS floor (x integer)")
        start = time.perf_counter()
        for i in range(n):
            with conn.transaction():
                conn.execute("INSERT INTO floor VALUES (%s)", (i,))
        return (time.perf_counter() - start) / n


def listening(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'ablauf-listen'"
        ).fetchone()
    return int(row[0]) if row else 0


def start_workers(url: str, n: int, concurrency: int = 4) -> list[subprocess.Popen[bytes]]:
    """`n` worker processes of `concurrency` slots each, once all of them listen."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, str(concurrency)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(n)
    ]
    wait_for(lambda: listening(url) >= n, 30, what="workers to listen")
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(timeout=30)


def run_distributed(url: str, source: str) -> tuple[float, int, str]:
    """(seconds from submit to done, restarts the run took, how busy the cores were)."""
    cpu = cpu_times()
    start = time.perf_counter()
    run_id = worker.submit(source, url)
    run = worker.wait(run_id, url, timeout=600)
    elapsed = time.perf_counter() - start
    busy = cpu_share(cpu, cpu_times())
    assert run.status is ablauf_lang.Status.SUCCESS, run.status
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM ablauf.restarts WHERE run_id = %s", (run_id,)
        ).fetchone()
    return elapsed, int(row[0]) if row else 0, busy


# W3: a short run that fails, is rescued and runs its finally (4 restarts, 3 actions).
W3 = (
    '(try!! (fail!! "boom") (rescue!! (action!! :bench/noop 1))'
    " (finally!! (action!! :bench/noop 2)))"
)


def short_runs(url: str, n: int = 60) -> float:
    """The median seconds of a W3 run, submit to `wait` returning, one after another."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        run = worker.wait(worker.submit(W3, url), url, timeout=60)
        assert run.status is ablauf_lang.Status.SUCCESS, run.status
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 2]


def run_local(store: Any, source: str) -> float:
    start = time.perf_counter()
    run = ablauf_lang.eval(source, ACTIONS, store=store)
    assert run.status is ablauf_lang.Status.SUCCESS, run.status
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    args = parser.parse_args()
    n = args.steps
    server = PgServer().start()
    rows: list[tuple[str, str, float, str, str]] = []
    try:
        url = server.create_database("bench")
        PostgresStore.from_url(url).close()
        floor = min(commit_floor(url) for _ in range(args.repeat))
        rows.append(("floor: 1 commit per step", "-", floor, "-", "-"))
        for name, source in programs(n).items():
            best = min(run_local(url, source) for _ in range(args.repeat))
            rows.append((f"{name}, eval into PostgreSQL", "in-process", best / n, "-", "-"))
        try:
            import ablauf_lang.stores.sqlite  # noqa: F401

            with tempfile.TemporaryDirectory() as tmp:
                for name, source in programs(n).items():
                    times = []
                    for i in range(args.repeat):
                        times.append(run_local(f"sqlite:///{tmp}/bench{i}{name[0]}.db", source))
                    rows.append(
                        (f"{name}, eval into SQLite", "in-process", min(times) / n, "-", "-")
                    )
        except ImportError:
            rows.append(("SQLite store not available", "-", float("nan"), "-", "-"))
        for workers in (1, 2, 4):
            procs = start_workers(url, workers)
            try:
                for name, source in programs(n).items():
                    results = [run_distributed(url, source) for _ in range(args.repeat)]
                    elapsed, restarts, busy = min(results)
                    rows.append(
                        (f"{name}, workers", str(workers), elapsed / n, str(restarts), busy)
                    )
                m = n // 5
                results = [run_distributed(url, waiting_fanout(m)) for _ in range(args.repeat)]
                elapsed, restarts, busy = min(results)
                label = f"dopar!! of {WAIT * 1e3:.0f} ms waits (x{m})"
                rows.append((label, str(workers), elapsed / m, str(restarts), busy))
                rows.append(
                    ("W3: a short run, median of 60", str(workers), short_runs(url), "4", "-")
                )
            finally:
                stop_workers(procs)
    finally:
        server.stop()
    print(
        f"\n{n} steps per run, best of {args.repeat}; {os.cpu_count()} cores; "
        f"floor = one commit per step ({floor * 1e6:.0f} us)\n"
    )
    head = (
        f"{'scenario':36} {'workers':>10} {'steps/s':>9} {'ms/step':>8} {'commits':>8} "
        f"{'restarts':>8} {'cpu':>5}"
    )
    print(head)
    print("-" * len(head))
    for label, who, per_step, restarts, busy in rows:
        print(
            f"{label:36} {who:>10} {1 / per_step:9.0f} {per_step * 1e3:8.3f} "
            f"{per_step / floor:8.2f} {restarts:>8} {busy:>5}"
        )


if __name__ == "__main__":
    main()
