"""Short runs on the PostgreSQL workers against DBOS 3.4 in-process, side by side.

    python bench/bench_short.py [--runs 60] [--rounds 3] [--no-dbos]

W3 (the issue's short run: a step that fails, its rescue, its finally) run one after
another: ablauf's `worker.submit` then `worker.wait`, on 1 and 2 idle worker processes
(4 slots each), and the same workflow in DBOS 3.4 (from PyPI, in a virtual environment of
its own, made on first use: see bench/bench_many.py) started and waited for in its own
process, on a database of the same server. Rounds alternate the cells so each sees the
same machine; a cell's figure is the median of its rounds' medians (the first 10 runs of
each round are warm-up). "commits" is a run's time over one commit (BEGIN, INSERT one
row, COMMIT) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ablauf_lang  # noqa: E402
from ablauf_lang.runners import worker  # noqa: E402
from ablauf_lang.stores.postgres import PostgresStore  # noqa: E402
from bench.bench_many import dbos_python  # noqa: E402
from bench.bench_postgres import W3, commit_floor, start_workers, stop_workers  # noqa: E402
from tests.pg import PgServer  # noqa: E402

WARM = 10


def ablauf_w3(url: str, n: int) -> float:
    """The median seconds of a W3 run on the workers, submit to `wait` returning."""
    times = []
    for i in range(WARM + n):
        start = time.perf_counter()
        run = worker.wait(worker.submit(W3, url), url, timeout=60)
        assert run.status is ablauf_lang.Status.SUCCESS, run.status
        if i >= WARM:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def dbos_w3(url: str, n: int) -> float:
    done = subprocess.run(
        [str(dbos_python()), str(ROOT / "bench" / "dbos_short.py"), url, str(WARM + n)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return statistics.median(data["times"][WARM:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-dbos", action="store_true")
    args = ap.parse_args()
    server = PgServer().start()
    cells: dict[str, list[float]] = {}
    floors = []
    try:
        url = server.create_database("bench")
        PostgresStore.from_url(url).close()
        dbos_url = server.create_database("dbos")
        for workers in (1, 2):
            procs = start_workers(url, workers)
            try:
                for _ in range(args.rounds):
                    floors.append(commit_floor(url))
                    cells.setdefault(f"ablauf, {workers} worker(s)", []).append(
                        ablauf_w3(url, args.runs)
                    )
                    if not args.no_dbos:
                        cells.setdefault("DBOS 3.4, in-process", []).append(
                            dbos_w3(dbos_url, args.runs)
                        )
            finally:
                stop_workers(procs)
    finally:
        server.stop()
    floor = statistics.median(floors)
    print(
        f"\nW3, median of {args.runs} runs a round, {args.rounds} rounds a cell; "
        f"floor = one commit ({floor * 1e6:.0f} us)\n"
    )
    dbos = statistics.median(cells["DBOS 3.4, in-process"]) if not args.no_dbos else None
    print(f"{'cell':28} {'ms/run':>8} {'commits':>8} {'DBOS / it':>10}")
    for name, values in cells.items():
        t = statistics.median(values)
        vs = "-" if dbos is None else f"{dbos / t:.2f}"
        print(f"{name:28} {t * 1e3:8.2f} {t / floor:8.1f} {vs:>10}")


if __name__ == "__main__":
    main()
