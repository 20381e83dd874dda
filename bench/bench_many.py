"""Many runs at once: 1,000 runs of 10 no-op steps started together, on SQLite and on
PostgreSQL, side by side with DBOS 3.4 on the same machine, in the same session.

    python bench/bench_many.py                 # 1,000 runs (a few minutes)
    python bench/bench_many.py --runs 200      # quicker
    python bench/bench_many.py --no-dbos       # ablauf only

The cells (each a fresh database):

- SQLite, one process: ablauf runs them in one process (`ablauf_lang.eval_async` of each,
  gathered, one store: their restarts share commits, `runners/group.py`), at synchronous
  NORMAL (the default) and FULL; DBOS starts them as workflows in one process
  (`DBOS.start_workflow`, its SQLite system database);
- SQLite, the one-host worker: the runs parked on a `sleep!!` (`eval(..., detach=True)`),
  one `ablauf worker` process wakes them when it ends (latency from the wake-up time);
- PostgreSQL: ablauf submits them to 2 worker processes (`worker.submit`, then
  `worker.wait` for each); DBOS starts them in one process on the same server.

Reported: runs per second (all started to all done) and the latency of a run from the
start of the batch to its end as seen by the caller (p50, p99). DBOS comes from PyPI
(`bench/requirements-dbos.txt`) into a virtual environment of its own, made on first use
in the user's cache directory (`~/.cache/ablauf/bench-dbos`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ablauf_lang  # noqa: E402
from ablauf_lang.runners import worker  # noqa: E402
from ablauf_lang.stores.postgres import PostgresStore  # noqa: E402
from ablauf_lang.stores.sqlite import SqliteStore  # noqa: E402
from bench.bench_postgres import start_workers, stop_workers  # noqa: E402
from tests.pg import PgServer  # noqa: E402

NOOP = {"bench/noop": lambda p, c: p}


def program(steps: int) -> str:
    return "(do!! " + " ".join(f"(action!! :bench/noop {i})" for i in range(steps)) + ")"


def dbos_python() -> Path:
    """The DBOS environment's Python, made (and DBOS installed) when missing."""
    from platformdirs import user_cache_dir

    env = Path(user_cache_dir("ablauf", appauthor=False)) / "bench-dbos"
    python = env / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        requirements = ROOT / "bench" / "requirements-dbos.txt"
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-r", str(requirements)], check=True
        )
    return python


def summary(name: str, runs: int, seconds: float, latencies: list[float]) -> dict[str, Any]:
    ordered = sorted(latencies)
    return {
        "cell": name,
        "runs/s": runs / seconds,
        "p50 ms": ordered[len(ordered) // 2] * 1e3,
        "p99 ms": ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1e3,
        "seconds": seconds,
    }


def ablauf_sqlite(folder: str, runs: int, steps: int, synchronous: str) -> dict[str, Any]:
    store = SqliteStore(f"{folder}/ablauf-{synchronous}.db", synchronous=synchronous)
    root = ablauf_lang.compile(program(steps))
    done: list[float] = []

    async def main() -> float:
        start = time.perf_counter()

        async def one() -> None:
            run = await ablauf_lang.eval_async(root, NOOP, store=store)
            assert run.status == "success", run.status
            done.append(time.perf_counter() - start)

        await asyncio.gather(*(one() for _ in range(runs)))
        return time.perf_counter() - start

    try:
        seconds = asyncio.run(main())
    finally:
        store.close()
    row = summary(f"SQLite {synchronous.upper()}, one process: ablauf", runs, seconds, done)
    row["commits/run"] = store.commits / runs
    return row


ACTIONS = NOOP  # for the worker process (`--actions bench/bench_many.py`)


def ablauf_worker(folder: str, runs: int, steps: int, wait: float = 3.0) -> dict[str, Any]:
    """The one-host worker: `runs` runs parked on a `sleep!!` (`eval(..., detach=True)`),
    woken when it ends by one `ablauf worker` process on their SQLite store. Latency is
    from a run's wake-up time to its end (its `updated` time in the store)."""
    url = f"sqlite:///{folder}/worker.db"
    source = program(steps).replace("(do!! ", f'(do!! (sleep!! "{wait}s") ', 1)
    root = ablauf_lang.compile(source)
    store = SqliteStore(f"{folder}/worker.db")
    ids = [ablauf_lang.eval(root, NOOP, store=store, detach=True).run_id for _ in range(runs)]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ablauf_lang",
            "worker",
            "--store",
            url,
            "--poll",
            "0.1",
            "--actions",
            str(ROOT / "bench" / "bench_many.py"),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if all(s == "success" for s in (store.info(r).status for r in ids)):
                break
            if proc.poll() is not None:
                raise SystemExit(f"the worker stopped (exit {proc.returncode})")
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)
    infos = [store.info(r) for r in ids]
    store.close()
    assert all(i.status == "success" for i in infos)
    due = [i.created + wait for i in infos]
    ends = [i.updated for i in infos]
    seconds = max(ends) - min(due)
    return summary(
        "SQLite, the one-host worker: ablauf",
        runs,
        seconds,
        [e - d for e, d in zip(ends, due, strict=True)],
    )


def ablauf_postgres(url: str, runs: int, steps: int, workers: int) -> dict[str, Any]:
    source = program(steps)
    procs = start_workers(url, workers, 4)
    try:
        start = time.perf_counter()
        ids = [worker.submit(source, url) for _ in range(runs)]
        done = []
        for run_id in ids:
            run = worker.wait(run_id, url, timeout=600)
            assert run.status == "success", run.status
            done.append(time.perf_counter() - start)
        seconds = time.perf_counter() - start
    finally:
        stop_workers(procs)
    return summary(f"PostgreSQL, {workers} workers: ablauf", runs, seconds, done)


def dbos(name: str, url: str, runs: int, steps: int) -> dict[str, Any]:
    done = subprocess.run(
        [str(dbos_python()), str(ROOT / "bench" / "dbos_many.py"), url, str(runs), str(steps)],
        capture_output=True,
        text=True,
        timeout=3600,
        check=True,
    )
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return summary(name, data["runs"], data["seconds"], data["latencies"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-dbos", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        rows.append(ablauf_sqlite(folder, args.runs, args.steps, "normal"))
        rows.append(ablauf_sqlite(folder, args.runs, args.steps, "full"))
        rows.append(ablauf_worker(folder, args.runs, args.steps))
        if not args.no_dbos:
            url = f"sqlite:///{folder}/dbos.sqlite"
            rows.append(dbos("SQLite, one process: DBOS 3.4", url, args.runs, args.steps))
    server = PgServer().start()
    try:
        url = server.create_database("ablauf")
        PostgresStore.from_url(url).close()
        rows.append(ablauf_postgres(url, args.runs, args.steps, args.workers))
        if not args.no_dbos:
            dbos_url = server.create_database("dbos")
            rows.append(dbos("PostgreSQL, one process: DBOS 3.4", dbos_url, args.runs, args.steps))
    finally:
        server.stop()
    cores = os.cpu_count()
    print(f"\n{args.runs} runs of {args.steps} no-op steps, started together; {cores} cores\n")
    head = (
        f"{'cell':40} {'runs/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'seconds':>8} {'commits/run':>12}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['cell']:40} {r['runs/s']:>8.0f} {r['p50 ms']:>9.0f} {r['p99 ms']:>9.0f}"
            f" {r['seconds']:>8.2f}" + (f" {r['commits/run']:>12.1f}" if "commits/run" in r else "")
        )


if __name__ == "__main__":
    main()
