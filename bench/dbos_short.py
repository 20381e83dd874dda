"""The DBOS side of bench/bench_short.py (run by it with the DBOS environment's Python): W3,
a short workflow whose first step fails, is rescued and runs its finally, run one after
another in this process; prints one JSON line with each run's seconds."""

from __future__ import annotations

import json
import sys
import time

from dbos import DBOS, DBOSConfig


def main() -> None:
    url, n = sys.argv[1], int(sys.argv[2])
    config: DBOSConfig = {"name": "bench-short", "system_database_url": url}
    DBOS(config=config)

    @DBOS.step()
    def fail(reason: str) -> None:
        raise RuntimeError(reason)

    @DBOS.step()
    def noop(i: int) -> int:
        return i

    @DBOS.workflow()
    def w3() -> int:
        try:
            fail("boom")
        except RuntimeError:
            noop(1)
        finally:
            noop(2)
        return 0

    DBOS.launch()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        DBOS.start_workflow(w3).get_result()
        times.append(time.perf_counter() - start)
    print(json.dumps({"runs": n, "times": times}))
    DBOS.destroy()


if __name__ == "__main__":
    main()
