"""The reader and the program cache: tokens read per second, and what a cached program
costs against reading and compiling it.

    python bench/bench_reader.py            # about 30 s
    python bench/bench_reader.py --quick    # about 5 s

Each figure is the best of several rounds, next to a floor measured in the same run: a
bare Python call of a no-op function. Programs:

- `steps`: a `do!!` of N actions written out, each with a small map payload (the W1
  program of the DBOS comparison, about 12 tokens a step);
- `nested`: definitions and expressions, the shape of a hand-written program;
- `data`: a long vector of strings and numbers (a large literal).

`bench/compare.py` runs it in two checkouts to compare the reader before and after.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ablauf_lang import api
from ablauf_lang.lang import cache
from ablauf_lang.lang.reader import parser, read


def steps(n: int) -> str:
    body = "\n".join(
        f'  (action!! :test/step {{:n {i} :name "step {i}" :ok true}})' for i in range(n)
    )
    return f"(do!!\n{body})\n"


def nested(n: int) -> str:
    parts = []
    for i in range(n // 10):
        parts.append(
            f'(defn stage{i} [host] (do!! (log!! (str "stage {i} on " host))'
            f" (action!! :deploy/push {{:host host :stage {i} :tags [:a :b :c]}})))"
        )
    calls = " ".join(f'(stage{i} "h{i}")' for i in range(n // 10))
    return "\n".join(parts) + f"\n(do!! {calls})\n"


def data(n: int) -> str:
    items = " ".join(f'"item-{i}" {i} {i}.5 :k{i % 10}' for i in range(n // 4))
    return f"(log!! [{items}])\n"


def best(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def floor_ns() -> float:
    def noop() -> None:
        return None

    n = 1_000_000
    start = time.perf_counter()
    for _ in range(n):
        noop()
    return (time.perf_counter() - start) / n * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    size, rounds = (2_000, 3) if args.quick else (10_000, 5)
    bare = floor_ns()
    print(f"floor: one bare call of a no-op function = {bare:.0f} ns\n")
    head = ("program", "tokens", "read ms", "tokens/s", "ns/token", "bare calls/token")
    print("{:<10} {:>8} {:>9} {:>10} {:>9} {:>17}".format(*head))
    for name, make in (("steps", steps), ("nested", nested), ("data", data)):
        source = make(size)
        tokens = sum(1 for _ in parser().lex(source))
        seconds = best(lambda source=source: read(source, "bench.abl"), rounds)
        per = seconds / tokens * 1e9
        print(
            f"{name:<10} {tokens:>8,} {seconds * 1e3:>9.1f} {tokens / seconds:>10,.0f}"
            f" {per:>9.0f} {per / bare:>17.0f}"
        )

    print()
    with tempfile.TemporaryDirectory() as folder:
        for name, make in (("steps", steps), ("nested", nested)):
            source = make(size)
            program = Path(folder) / f"{name}.abl"
            program.write_text(source)

            def compiled(source: str = source, program: Path = program) -> object:
                return api.compile(source, str(program))

            os.environ["ABLAUF_CACHE"] = "off"
            cold = best(compiled, rounds)
            os.environ["ABLAUF_CACHE"] = os.path.join(folder, "cache")
            compiled()  # the entry is written

            def from_disk(compiled: Any = compiled) -> object:
                cache.clear_memory()  # another process: the entry in the cache directory
                return compiled()

            disk = best(from_disk, rounds)
            compiled()
            memory = best(compiled, rounds)  # this process again: the tree it kept
            print(
                f"compile {name} ({size:,}): read and compile {cold * 1e3:.1f} ms, from the"
                f" cache directory {disk * 1e3:.1f} ms ({cold / disk:.1f}x), kept in memory"
                f" {memory * 1e3:.3f} ms ({cold / memory:.0f}x)"
            )


if __name__ == "__main__":
    main()
