"""The DBOS side of bench/bench_many.py (run by it with the DBOS environment's Python):
N workflows of S no-op steps started at once, in this process; prints one JSON line."""

from __future__ import annotations

import json
import sys
import time

from dbos import DBOS, DBOSConfig


def main() -> None:
    url, n, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    config: DBOSConfig = {"name": "bench-many", "system_database_url": url}
    DBOS(config=config)

    @DBOS.step()
    def noop(i: int) -> int:
        return i

    @DBOS.workflow()
    def run(count: int) -> int:
        for i in range(count):
            noop(i)
        return count

    DBOS.launch()
    start = time.perf_counter()
    handles = [DBOS.start_workflow(run, steps) for _ in range(n)]
    done = []
    for handle in handles:  # a run's end is seen no earlier than it happened
        handle.get_result()
        done.append(time.perf_counter() - start)
    total = time.perf_counter() - start
    print(json.dumps({"runs": n, "seconds": total, "latencies": sorted(done)}))
    DBOS.destroy()


if __name__ == "__main__":
    main()
