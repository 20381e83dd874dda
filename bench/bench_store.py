"""Store benchmark: what a durable step writes and costs, against one SQLite commit.

    python bench/bench_store.py            # full sizes (about a minute)
    python bench/bench_store.py --quick    # small sizes, for a smoke test

Reports, all measured in this run on files in one temporary directory:

1. bytes written per step of a sequential run of 1,000 / 10,000 / 100,000 leaves: the JSON
   the store writes (deltas plus their periodic folding into the node rows), the bytes
   SQLite appends to its write-ahead log, and, for comparison, the size of the whole job
   (what a store that rewrites the tree after every step would write); plus the time to
   create the run and to load it back;
2. time per step of a sequential run driven by `LocalRunner`: in memory, and durable in
   SQLite (WAL) at synchronous NORMAL and FULL, next to the floor of one SQLite commit
   per step at the same setting (a one-row UPDATE in its own transaction);
3. commits made by a 1,000-way `dopar!!` (results that arrive together are one restart).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sqlite3
import tempfile
import time
from typing import Any

from pyrsistent import pvector

from ablauf_lang.engine.job import Job, make_job, restart_job
from ablauf_lang.engine.kinds import Leaf, Par, Seq
from ablauf_lang.engine.nodes import success
from ablauf_lang.runners.local import LocalRunner
from ablauf_lang.stores.sqlite import SqliteStore


def noop(payload: Any, context: Any) -> Any:
    """The action every step performs: return the payload."""
    return payload


def seq_job(n: int) -> Job:
    return make_job(Seq(0, pvector(Leaf(i + 1, "t/noop", i) for i in range(n))))


def par_job(n: int) -> Job:
    return make_job(Par(0, pvector(Leaf(i + 1, "t/noop", i) for i in range(n))))


def fresh(folder: str, name: str, synchronous: str = "normal") -> SqliteStore:
    path = os.path.join(folder, name)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    return SqliteStore(path, synchronous=synchronous)


# ---------------------------------------------------------------- 1. bytes per step


def bytes_per_step(folder: str, n: int, steps: int) -> dict[str, float]:
    store = fresh(folder, f"bytes{n}.db")
    job = seq_job(n)
    t = time.perf_counter()
    run_id = store.create_run(job)
    create = time.perf_counter() - t
    job, dispatches = restart_job(job)
    store.record(run_id, job)
    for _ in range(steps):  # warm up past the first folding
        job, dispatches = restart_job(job, [success(d, d.payload) for d in dispatches])
        store.record(run_id, job)
    conn = store._conn
    conn.execute("PRAGMA wal_autocheckpoint = 0")  # let the log grow: its size is the I/O
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = store.path + "-wal"
    wal_before = os.path.getsize(wal)
    json_before = store.bytes_written
    for _ in range(steps):
        job, dispatches = restart_job(job, [success(d, d.payload) for d in dispatches])
        store.record(run_id, job)
    out = {
        "json": (store.bytes_written - json_before) / steps,
        "wal": (os.path.getsize(wal) - wal_before) / steps,
        "whole": float(len(job.to_json())),
        "create": create,
    }
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    reader = SqliteStore(store.path)
    t = time.perf_counter()
    loaded = reader.load(run_id).job
    out["load"] = time.perf_counter() - t
    assert loaded == job
    reader.close()
    return out


# ---------------------------------------------------------------- 2. time per step


def floor_commit(folder: str, synchronous: str, n: int) -> float:
    """Seconds per commit of a one-row UPDATE in its own transaction (WAL, same setting)."""
    path = os.path.join(folder, f"floor-{synchronous}.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, n INTEGER)")
    conn.execute("INSERT OR REPLACE INTO t VALUES (1, 0)")
    t = time.perf_counter()
    for _ in range(n):
        conn.execute("UPDATE t SET n = n + 1 WHERE id = 1")
    per = (time.perf_counter() - t) / n
    conn.close()
    return per


def run_steps(job: Job, store: SqliteStore | None) -> float:
    """Seconds per step of `job` driven to its end by the local runner."""
    run_id = store.create_run(job) if store is not None else None
    gc.collect()
    t = time.perf_counter()
    final = asyncio.run(LocalRunner({"t/noop": noop}, store=store, run_id=run_id).run(job))
    per = (time.perf_counter() - t) / final.restarts
    assert final.status == "success"
    return per


def step_times(folder: str, n: int, rounds: int) -> list[tuple[str, float, float, float]]:
    """(setting, memory, durable, floor) seconds per step, best of `rounds` interleaved."""
    rows = []
    for sync in ("normal", "full"):
        steps = n if sync == "normal" else max(200, n // 5)
        best = {"memory": float("inf"), "durable": float("inf"), "floor": float("inf")}
        for r in range(rounds):
            best["floor"] = min(best["floor"], floor_commit(folder, sync, steps))
            best["memory"] = min(best["memory"], run_steps(seq_job(steps), None))
            store = fresh(folder, f"steps-{sync}-{r}.db", sync)
            best["durable"] = min(best["durable"], run_steps(seq_job(steps), store))
            store.close()
        rows.append((sync.upper(), best["memory"], best["durable"], best["floor"]))
    return rows


# ---------------------------------------------------------------- 3. commits of a dopar!!


async def async_noop(payload: Any, context: Any) -> Any:
    await asyncio.sleep(0)
    return payload


def dopar_commits(folder: str, n: int) -> list[tuple[str, int, int]]:
    rows = []
    for label, action in (("sync action (threads)", noop), ("async action", async_noop)):
        store = fresh(folder, f"dopar-{label[:4]}.db")
        job = par_job(n)
        run_id = store.create_run(job)
        before = store.commits
        final = asyncio.run(LocalRunner({"t/noop": action}, store=store, run_id=run_id).run(job))
        assert final.status == "success"
        rows.append((label, store.commits - before, final.restarts))
        store.close()
    return rows


# ---------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = parser.parse_args()
    sizes = (1_000, 10_000) if args.quick else (1_000, 10_000, 100_000)
    steps = 200 if args.quick else 500
    seq_steps = 500 if args.quick else 3_000
    rounds = 1 if args.quick else 3

    with tempfile.TemporaryDirectory(prefix="ablauf-bench-") as folder:
        print("1. bytes written per step, sequential run (SQLite, WAL, synchronous NORMAL)")
        print(
            f"{'leaves':>8} {'JSON/step':>10} {'WAL/step':>10} {'whole job':>11} "
            f"{'whole/JSON':>11} {'create':>8} {'load':>8}"
        )
        for n in sizes:
            r = bytes_per_step(folder, n, steps)
            print(
                f"{n:>8,} {r['json']:>9.0f}B {r['wal']:>9.0f}B {r['whole']:>10.0f}B "
                f"{r['whole'] / r['json']:>10.0f}x {r['create']:>7.2f}s {r['load']:>7.2f}s"
            )

        print()
        print(
            f"2. time per step, sequential run of {seq_steps:,} steps (FULL: a fifth), "
            f"best of {rounds}"
        )
        print(
            f"{'setting':>8} {'memory':>9} {'durable':>9} {'1 commit':>9} "
            f"{'durable-memory':>15} {'(d-m)/commit':>13} {'durable/commit':>15}"
        )
        for sync, mem, dur, floor in step_times(folder, seq_steps, rounds):
            print(
                f"{sync:>8} {mem * 1e6:>7.1f}us {dur * 1e6:>7.1f}us {floor * 1e6:>7.1f}us "
                f"{(dur - mem) * 1e6:>13.1f}us {(dur - mem) / floor:>12.2f}x "
                f"{dur / floor:>14.2f}x"
            )

        print()
        n = 200 if args.quick else 1_000
        print(f"3. commits of a {n:,}-way dopar!! (SQLite)")
        for label, commits, restarts in dopar_commits(folder, n):
            print(f"{label:>24}: {commits:>5} commits, {restarts:>5} restarts")


if __name__ == "__main__":
    main()
