"""Core benchmark: restart cost against the floor of a bare Python call, in one run.

    python bench/bench_core.py            # full sizes (about a minute)
    python bench/bench_core.py --quick    # small sizes, for a smoke test

Reports, for sequential `log!!` runs of 1,000 / 10,000 / 100,000 leaves and `dopar!!` of
1,000 / 10,000 leaves (in memory, the pure reducer): time per step and its ratio to one
bare call of the same no-op action; `ablauf_lang.eval` of a 10,000-step sequence per
step; the cost of a single restart that applies one result and finds one dispatch; and
the peak memory of the 100,000-leaf run per node.
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from pyrsistent import pvector

import ablauf_lang
from ablauf_lang.engine.job import Job, make_job, restart_job
from ablauf_lang.engine.kinds import Leaf, Par, Seq
from ablauf_lang.engine.nodes import success


def noop(payload: Any, context: Any) -> Any:
    """The action every step performs: return the payload."""
    return payload


def floor_per_call(n: int) -> float:
    """Seconds per bare call of `noop` in a plain loop."""
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for i in range(n):
            noop(i, None)
        best = min(best, (time.perf_counter() - t) / n)
    return best


def seq_tree(n: int) -> Seq:
    return Seq(0, pvector(Leaf(i + 1, "action/log", i) for i in range(n)))


def par_tree(n: int) -> Par:
    return Par(0, pvector(Leaf(i + 1, "action/log", i) for i in range(n)))


def drive(job: Job, perform: Callable[[Any, Any], Any] = noop) -> tuple[Job, int, float]:
    """Run the pure reducer to completion, performing each dispatch with `perform`."""
    gc.collect()
    t = time.perf_counter()
    job, dispatches = restart_job(job)
    restarts = 1
    while dispatches:
        job, dispatches = restart_job(
            job, [success(d, perform(d.payload, d.context)) for d in dispatches]
        )
        restarts += 1
    return job, restarts, time.perf_counter() - t


def single_restart_cost(n: int) -> float:
    """Seconds for one restart applying one result and finding one dispatch (mid-run)."""
    job, [d] = restart_job(make_job(seq_tree(n)))
    samples = []
    for _ in range(2000):
        t = time.perf_counter()
        nxt, [d2] = restart_job(job, [success(d, 1)])
        samples.append(time.perf_counter() - t)
        job, d = nxt, d2
    samples.sort()
    return samples[len(samples) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    args = parser.parse_args()
    seq_sizes = (1_000, 10_000) if args.quick else (1_000, 10_000, 100_000)
    par_sizes = (1_000,) if args.quick else (1_000, 10_000)

    floor = floor_per_call(200_000)
    print(f"floor: one bare call of a no-op action = {floor * 1e9:.0f} ns\n")
    print(f"{'workload':<22}{'total s':>10}{'us/step':>10}{'bare calls/step':>17}")
    totals: dict[int, float] = {}
    for n in seq_sizes:
        job, _, dt = drive(make_job(seq_tree(n)))
        assert job.status == "success"
        totals[n] = dt
        print(
            f"{'do!! x ' + format(n, ','):<22}{dt:>10.3f}{dt / n * 1e6:>10.1f}"
            f"{dt / n / floor:>17.0f}"
        )
    for n in par_sizes:
        job, restarts, dt = drive(make_job(par_tree(n)))
        assert job.status == "success"
        print(
            f"{'dopar!! x ' + format(n, ','):<22}{dt:>10.3f}{dt / n * 1e6:>10.1f}"
            f"{dt / n / floor:>17.0f}   ({restarts} restarts)"
        )
    if 100_000 in totals:
        print(
            f"\n100k total / 10k total = {totals[100_000] / totals[10_000]:.1f}x "
            "(flat per step: 10x; target <= 12x)"
        )

    one = single_restart_cost(10_000)
    print(
        f"\none restart (1 result in, 1 dispatch out): {one * 1e6:.1f} us = "
        f"{one / floor:.0f} bare calls (target <= 500, issue 17)"
    )

    n = 10_000
    source = "(do!! " + " ".join(f"(action!! :bench/noop {i})" for i in range(n)) + ")"
    gc.collect()
    t = time.perf_counter()
    run = ablauf_lang.eval(source, actions={"bench/noop": noop})
    dt = time.perf_counter() - t
    assert run.status == "success"
    print(
        f"ablauf_lang.eval of a {n:,}-step do!! written out as {n:,} forms (reading and "
        f"compiling included): {dt / n * 1e6:.1f} us/step = {dt / n / floor:.0f} bare calls"
    )
    source = f"(do!! (for [i (range {n})] (action!! :bench/noop i)))"
    gc.collect()
    t = time.perf_counter()
    run = ablauf_lang.eval(source, actions={"bench/noop": noop})
    dt = time.perf_counter() - t
    assert run.status == "success"
    assert len(run.job.paths) == n + 1
    print(
        f"ablauf_lang.eval of the same {n:,}-step do!! made by a compile-time for: "
        f"{dt / n * 1e6:.1f} us/step = {dt / n / floor:.0f} bare calls (target <= 2,000)"
    )

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    size = 10_000 if args.quick else 100_000
    job, _, _ = drive(make_job(seq_tree(size)))
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"\npeak memory of the {size:,}-leaf run: {(peak - base) / 1e6:.1f} MB = "
        f"{(peak - base) / size:.0f} bytes/node; final job {(current - base) / size:.0f} "
        "bytes/node (target <= 1 KiB)"
    )
    del job


if __name__ == "__main__":
    main()
