"""The dashboard's run page on the server (issue 15): a 10,000-leaf run.

    python bench/bench_web.py                 # 10,000 leaves, 10 repeats
    python bench/bench_web.py --leaves 1000

Records a finished 10,000-way `pmap!!` run in a SQLite file with `ablauf_lang.eval`,
then times, through Starlette's TestClient (the whole app: routing, the store, the
picture, the template), the run page `/runs/ID`, its live fragment, its SVG and one
node's details (median and max of the repeats), beside the floor of loading the run from
the store alone. Prints the figures with the command that produced them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ablauf_lang import api  # noqa: E402


def _times(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    out = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        out.append(time.perf_counter() - began)
    return statistics.median(out), max(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leaves", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

    from ablauf_lang.web.app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/runs.db"
        source = f"(pmap!! [x (range {args.leaves})] (idempotent-action!! :bench/noop x))"
        run = api.eval(source, store=url, actions={"bench/noop": lambda p, c: p})
        client = TestClient(create_app(url), base_url="http://127.0.0.1")
        rid = run.run_id
        cases: list[tuple[str, Callable[[], object]]] = [
            ("store: load the run (floor)", lambda: api.load_run(rid, url)),
            ("GET /runs/ID (the page)", lambda: client.get(f"/runs/{rid}").raise_for_status()),
            ("GET /partials/runs/ID (live swap)", lambda: client.get(f"/partials/runs/{rid}")),
            ("GET /runs/ID/svg", lambda: client.get(f"/runs/{rid}/svg").raise_for_status()),
            ("GET /api/runs/ID/nodes/5", lambda: client.get(f"/api/runs/{rid}/nodes/5")),
        ]
        print(f"$ python bench/bench_web.py --leaves {args.leaves} --repeats {args.repeats}")
        print(f"a finished {args.leaves:,}-leaf pmap!! run on SQLite ({args.repeats} repeats)")
        print(f"{'what':40} {'median':>10} {'max':>10}")
        for name, fn in cases:
            fn()  # warm
            med, top = _times(fn, args.repeats)
            print(f"{name:40} {med * 1000:8.1f}ms {top * 1000:8.1f}ms")


if __name__ == "__main__":
    main()
