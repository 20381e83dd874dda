"""Pictures of runs (issue 15): how long a 10,000-leaf run takes to draw as SVG.

    python bench/bench_graph.py            # 10,000 leaves, 20 repeats
    python bench/bench_graph.py --leaves 100000 --repeats 5

Measures, in one process, on jobs stepped with `restart_job` (no runner: the figure is the
picture's cost alone):

1. wide: a `(pmap!! [x (range N)] (action!! :x/y x))` with 90% of its leaves succeeded,
   0.5% failed and the rest pending: `run_states` (one walk), `graph_layout` and the whole
   `run_svg`, folded (the default, `fold=50`: the first children and one box of counts),
   median and max of the repeats; then unfolded (`fold=0`: every leaf drawn) once, for the
   record, with the SVG's size;
2. grid: N leaves as a `dopar!!` of sqrt(N) `do!!` of sqrt(N) leaves each (every branch
   folded), the same figures;
3. store: the wide run recorded in a SQLite file by `eval`, then `ablauf runs graph`'s
   work: load the run, draw it folded, write the file (median of the repeats).

Prints the figures with the command that produced them.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ablauf_lang  # noqa: E402
from ablauf_lang import api  # noqa: E402
from ablauf_lang.engine.job import Job, make_job, restart_job  # noqa: E402
from ablauf_lang.engine.nodes import failure, success  # noqa: E402
from ablauf_lang.ui.graph import graph_layout, run_states, run_svg, write_picture  # noqa: E402


def stepped(program: str, leaves: int) -> Job:
    """The program's job after its first restart and results for most leaves: 90%
    succeeded, 0.5% failed, the rest still pending."""
    job, dispatches = restart_job(make_job(api.compile(program)), [])
    assert len(dispatches) == leaves, len(dispatches)
    ok = int(leaves * 0.9)
    bad = max(1, leaves // 200)
    results = [success(d, d.id) for d in dispatches[:ok]]
    results += [failure(d, "refused") for d in dispatches[ok : ok + bad]]
    job, _ = restart_job(job, results)
    return job


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Median and max seconds of `repeats` calls, and the last result."""
    took = []
    out = None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        took.append(time.perf_counter() - started)
    return statistics.median(took), max(took), out


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f} ms"


def measure(name: str, job: Job, repeats: int) -> None:
    nodes = sum(1 for _ in job.nodes())
    print(f"{name}: {nodes:,} nodes")
    med, most, states = timed(lambda: run_states(job), repeats)
    print(f"  run_states            median {ms(med)}  max {ms(most)}")
    med, most, _ = timed(lambda: graph_layout(job.root, states), repeats)
    print(f"  graph_layout (folded) median {ms(med)}  max {ms(most)}")
    med, most, svg = timed(lambda: run_svg(job), repeats)
    drawn = svg.count('class="node ')
    print(
        f"  run_svg (folded)      median {ms(med)}  max {ms(most)}  "
        f"{drawn} nodes drawn, {len(svg):,} bytes"
    )
    med, _, svg = timed(lambda: run_svg(job, fold=0), 1)
    drawn = svg.count('class="node ')
    print(f"  run_svg (unfolded)    once   {ms(med)}  {drawn:,} nodes drawn, {len(svg):,} bytes")


def store_part(leaves: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'runs.db'}"
        started = time.perf_counter()
        run = ablauf_lang.eval(
            f"(pmap!! [x (range {leaves})] (action!! :x/y x))",
            {"x/y": lambda payload, context: payload},
            store=url,
        )
        made = time.perf_counter() - started
        out = str(Path(tmp) / "run.svg")

        def draw() -> None:
            stored = api.load_run(run.run_id, url)
            write_picture(run_svg(stored.job), out)

        print(f"store: a {leaves:,}-leaf run recorded in SQLite by eval ({made:.1f} s)")
        med, most, _ = timed(lambda: api.load_run(run.run_id, url), repeats)
        print(f"  load_run alone                      median {ms(med)}  max {ms(most)}")
        med, most, _ = timed(draw, repeats)
        print(f"  load + run_svg + write (runs graph) median {ms(med)}  max {ms(most)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--leaves", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    leaves, repeats = args.leaves, args.repeats
    print(f"$ python bench/bench_graph.py --leaves {leaves} --repeats {repeats}")
    print(f"python {sys.version.split()[0]}")
    measure("wide", stepped(f"(pmap!! [x (range {leaves})] (action!! :x/y x))", leaves), repeats)
    side = max(1, math.isqrt(leaves))
    branch = "(do!! " + " ".join(f"(action!! :x/y {i})" for i in range(side)) + ")"
    # a do!! runs one leaf at a time: every branch has its first leaf dispatched
    grid = "(dopar!! " + " ".join([branch] * side) + ")"
    job, dispatches = restart_job(make_job(api.compile(grid)), [])
    for _ in range(side // 2):  # half of each do!! done
        job, dispatches = restart_job(job, [success(d, d.id) for d in dispatches])
    measure("grid", job, repeats)
    store_part(leaves, max(3, repeats // 4))


if __name__ == "__main__":
    main()
