"""Time and waiting on PostgreSQL (issue 13): what parked runs cost two workers, and how
late 1,000 timers due in the same second fire.

    python bench/bench_time_postgres.py                # 10,000 + 10,000 parked (about 7 min)
    python bench/bench_time_postgres.py --parked 2000  # 2,000 + 2,000 (about 2 min)
    python bench/bench_time_postgres.py --quick        # 1,000 + 1,000, 10 s idle windows

Most of the time goes into submitting the runs (about 13 ms a run on 2 cores while the
two workers take them): a figure of its own, printed with the parking.

Starts its own throwaway PostgreSQL server (like the tests: `tests/pg.py`) and two worker
processes (`python -m ablauf_lang worker --store postgresql://...`), then:

1. idle: the two workers' CPU seconds per idle minute (`/proc/PID/stat`, all threads) and
   their resident memory with no run, with N runs parked on `(sleep!! {:days 3})`, and
   with those plus N parked on `(await!! :approval)`; the runs are submitted
   (`runners.worker.submit`) and taken by the workers until only their waits are queued.
   Then one signal is sent to an await: the time until its run has finished;
2. wake: 1,000 runs sleeping until the same instant, a few seconds ahead, with the 2N
   parked runs still there: p50, p99 and max of (the leaf's finished time - its wake time).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import psycopg  # noqa: E402
from bench_time import AWAIT, SLEEP_FAR, TICK, Worker, percentile, wait_until  # noqa: E402

import ablauf_lang  # noqa: E402
from ablauf_lang.runners import worker  # noqa: E402
from ablauf_lang.stores.postgres import PostgresStore  # noqa: E402
from tests.pg import PgServer  # noqa: E402


def scalar(url: str, sql: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def listening(url: str) -> int:
    return scalar(
        url,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'ablauf-listen'",
    )


def not_parked(url: str) -> int:
    """Tasks a worker could take now or is performing: none once every run is parked."""
    return scalar(
        url,
        "SELECT count(*) FROM ablauf.tasks WHERE error IS NULL AND "
        "(not_before IS NULL OR not_before <= now() OR lease_owner IS NOT NULL)",
    )


def submit_many(url: str, source: str, n: int) -> tuple[list[str], float, float]:
    """Submit `n` runs; return their ids, the seconds submitting took and the seconds until
    the workers had parked them all."""
    t = time.perf_counter()
    ids = [worker.submit(source, url) for _ in range(n)]
    submitted = time.perf_counter() - t
    wait_until(lambda: not_parked(url) == 0, 900, f"{n} runs to park")
    return ids, submitted, time.perf_counter() - t


def measure(workers: list[Worker], seconds: float) -> tuple[float, float]:
    """(CPU seconds per idle minute of both workers together, RSS of the larger, MiB)."""
    time.sleep(2.0)
    c0 = sum(w.cpu() for w in workers)
    t0 = time.monotonic()
    time.sleep(seconds)
    per_min = (sum(w.cpu() for w in workers) - c0) * 60 / (time.monotonic() - t0)
    return per_min, max(w.rss() for w in workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--idle", type=float, default=None, help="seconds of each idle window")
    parser.add_argument("--parked", type=int, default=None, help="runs parked of each kind")
    args = parser.parse_args()
    n = args.parked or (1_000 if args.quick else 10_000)
    window = args.idle or (10.0 if args.quick else 40.0)
    command = "python bench/bench_time_postgres.py " + " ".join(sys.argv[1:])
    print(
        f"{command}  ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {os.cpu_count()} cores)"
    )
    server = PgServer().start()
    folder = tempfile.mkdtemp(prefix="ablauf-bench-time-pg-")
    workers: list[Worker] = []
    try:
        url = server.create_database("bench")
        PostgresStore.from_url(url).close()
        workers = [
            Worker(url, os.path.join(folder, f"worker{i}.log"), args=("--concurrency", "4"))
            for i in range(2)
        ]
        wait_until(lambda: listening(url) >= 2, 60, "the workers to listen")
        print(
            f"1. two idle workers: CPU seconds per idle minute (both together) and memory "
            f"(the larger), over {window:.0f} s each"
        )
        print(f"   {'parked runs':>12} {'CPU s/idle min':>15} {'RSS':>8}   parking")
        per_min, rss = measure(workers, window)
        print(f"   {0:>12,} {per_min:>15.3f} {rss:>6.1f}MB")
        _, sub, took = submit_many(url, SLEEP_FAR, n)
        per_min, rss = measure(workers, window)
        print(
            f"   {n:>12,} {per_min:>15.3f} {rss:>6.1f}MB   {n:,} sleeps submitted in "
            f"{sub:.1f} s, parked after {took:.1f} s"
        )
        awaiting, sub, took = submit_many(url, AWAIT, n)
        per_min, rss = measure(workers, window)
        print(
            f"   {2 * n:>12,} {per_min:>15.3f} {rss:>6.1f}MB   {n:,} awaits submitted in "
            f"{sub:.1f} s, parked after {took:.1f} s"
        )
        print(f"   ({TICK} CPU ticks per second: {60 / TICK / window:.3f} s/min is one tick)")
        run_id = awaiting[len(awaiting) // 2]
        t = time.time()
        ablauf_lang.signal(run_id, "approval", True, store=url)
        sent = time.time() - t
        done = worker.wait(run_id, url, timeout=60)
        returned = time.time() - t
        with PostgresStore.from_url(url) as store:
            finished = getattr(store.load(run_id).job.root, "finished_at", None) or t
        print(
            f"   a signal to one of {2 * n:,} parked runs: written in {sent * 1e3:.1f} ms, "
            f"its leaf finished {(finished - t) * 1e3:.1f} ms after the call; "
            f"worker.wait returned {returned:.2f} s after it ({done.status})"
        )

        runs = 1_000
        print()
        print(
            f"2. wake-up lateness: {runs:,} runs sleeping until the same instant, two workers, "
            f"{2 * n - 1:,} other runs parked; lateness = leaf finished - wake time"
        )
        ahead = 10.0 + runs * 0.01
        at = time.time() + ahead
        ids, sub, took = submit_many(url, f"(sleep-until!! {at!r})", runs)
        margin = at - time.time()
        if margin < 1.0:
            raise SystemExit(f"bench: the {runs} runs parked too late ({took:.1f} s)")
        store = PostgresStore.from_url(url)
        try:
            finished_runs = "SELECT count(*) FROM ablauf.runs WHERE status <> 'pending'"
            wait_until(
                lambda: scalar(url, finished_runs) >= runs + 1, margin + 600, f"{runs} runs to wake"
            )
            all_done = time.time() - at
            late = []
            for i in ids:
                leaf = store.load(i).job.root
                finished, wake = getattr(leaf, "finished_at", None), getattr(leaf, "wake", None)
                if finished is None or wake is None:
                    raise SystemExit(f"bench: run {i} has no finished or wake time")
                late.append(finished - wake)
        finally:
            store.close()
        print(
            f"   submitted in {sub:.1f} s, parked {margin:.1f} s before they fell due; "
            f"p50 {percentile(late, 0.5) * 1e3:.1f} ms, p99 {percentile(late, 0.99) * 1e3:.1f} ms, "
            f"max {max(late) * 1e3:.1f} ms, min {min(late) * 1e3:.1f} ms; all done "
            f"{all_done:.2f} s after the instant"
        )
    finally:
        for w in workers:
            w.stop()
        server.stop()


if __name__ == "__main__":
    main()
