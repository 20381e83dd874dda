"""Wide work on the PostgreSQL workers: a `pmap!!` of 10,000 and 100,000 no-op actions
with 1, 2 and 4 worker processes.

    python bench/bench_wide.py                 # 10,000 and 100,000 leaves (several minutes)
    python bench/bench_wide.py --quick         # 2,000 and 20,000 leaves
    python bench/bench_wide.py --sizes 10000 --workers 2 --concurrency 16

Starts its own PostgreSQL server (`tests/pg.py`). For each size and number of workers:
actions per second from submit to done (submit included), the cost of a leaf (seconds a
leaf, and the ratio of the large size's to the small one's: flat is 1.0), the workers'
peak memory above their idle size, per leaf of the run and per leaf they held in flight
at most (their slots x batch), and a check that every leaf ran once and succeeded (the
run's job, read back). The floor is one PostgreSQL commit, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ablauf_lang  # noqa: E402
from ablauf_lang.engine.kinds import Leaf  # noqa: E402
from ablauf_lang.runners import worker  # noqa: E402
from ablauf_lang.stores.postgres import PostgresStore  # noqa: E402
from bench.bench_postgres import commit_floor, start_workers, stop_workers  # noqa: E402
from tests.pg import PgServer  # noqa: E402

BATCH = 16  # the most action tasks a slot takes at once (runners.worker.BATCH)


def program(n: int) -> str:
    return f"(pmap!! [i (range {n})] (idempotent-action!! :bench/noop i))"


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def one(url: str, n: int, workers: int, concurrency: int) -> dict[str, float]:
    procs = start_workers(url, workers, concurrency)
    try:
        idle = [rss_kib(p.pid) for p in procs]
        began = time.perf_counter()
        run_id = worker.submit(program(n), url)
        run = worker.wait(run_id, url, timeout=3600)
        seconds = time.perf_counter() - began
        peak = [rss_kib(p.pid, "VmHWM") for p in procs]
    finally:
        stop_workers(procs)
    leaves = [x for x in run.job.leaves() if isinstance(x, Leaf)]
    ok = sum(1 for x in leaves if str(x.result) == "success" and x.attempt == 1)
    assert run.status is ablauf_lang.Status.SUCCESS, run.status
    assert ok == n, f"{ok} of {n} leaves succeeded on their first attempt"
    grown = max(0, max(p - i for p, i in zip(peak, idle, strict=True)))
    return {
        "seconds": seconds,
        "per_leaf": seconds / n,
        "grown_kib": grown,
        "in_flight": concurrency * BATCH,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="+")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    sizes = args.sizes or ([2_000, 20_000] if args.quick else [10_000, 100_000])
    server = PgServer().start()
    try:
        url = server.create_database("wide")
        PostgresStore.from_url(url).close()
        floor = min(commit_floor(url) for _ in range(3))
        print(f"floor: one PostgreSQL commit = {floor * 1e6:.0f} us; {os.cpu_count()} cores")
        print(f"workers with --concurrency {args.concurrency} (slots), {BATCH} tasks a take\n")
        head = (
            f"{'leaves':>8} {'workers':>7} {'seconds':>8} {'actions/s':>10} "
            f"{'us/leaf':>8} {'commits/leaf':>12} {'x smallest':>10} "
            f"{'RSS +KiB':>9} {'B/leaf':>7} {'B/in flight':>11}"
        )
        print(head)
        print("-" * len(head))
        for w in args.workers:
            first = None
            for n in sizes:
                r = one(url, n, w, args.concurrency)
                first = first or r["per_leaf"]
                print(
                    f"{n:>8,} {w:>7} {r['seconds']:>8.2f} {n / r['seconds']:>10,.0f} "
                    f"{r['per_leaf'] * 1e6:>8.0f} {r['per_leaf'] / floor:>12.2f} "
                    f"{r['per_leaf'] / first:>10.2f} {r['grown_kib']:>9,.0f} "
                    f"{r['grown_kib'] * 1024 / n:>7.0f} "
                    f"{r['grown_kib'] * 1024 / r['in_flight']:>11,.0f}",
                    flush=True,
                )
        print("\nevery leaf ran once and succeeded (read back from the run's job)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
