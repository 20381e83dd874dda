"""Before/after in one run: a benchmark script of two checkouts, alternated, median ratios.

    python bench/compare.py OLD_CHECKOUT [NEW_CHECKOUT] [--rounds 4] [--script bench/bench_core.py]

Each round runs the script once in each checkout (its own code, by PYTHONPATH), old first
then new, so both see the same machine; every figure a script prints as a ratio to its
floor ("bare calls", "x the floor", "x one commit") is collected and the medians are
shown side by side. Ratios, not times: the floor is measured in the same process.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

# "<label>: ... <number> bare calls" / table rows ending in a ratio column.
_ROW = re.compile(r"^(?P<label>[^\d].*?)\s+[\d.,]+\s+[\d.,]+\s+(?P<ratio>[\d,]+)(\s|$)")
_LINE = re.compile(r"^(?P<label>[^:=]+?):.*?=\s*(?P<ratio>[\d.,]+)\s*(bare calls|x)")


def ratios(output: str) -> dict[str, float]:
    """The ratios a benchmark printed, by label."""
    found: dict[str, float] = {}
    for line in output.splitlines():
        m = _LINE.match(line) or _ROW.match(line)
        if m:
            found[m.group("label").strip()] = float(m.group("ratio").replace(",", ""))
    return found


def run(checkout: Path, script: str, extra: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    cmd = [sys.executable, str(checkout / script), *extra]
    return subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path, nargs="?", default=Path(__file__).parent.parent)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--script", default="bench/bench_core.py")
    args, extra = parser.parse_known_args()
    seen: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    for _ in range(args.rounds):
        for side in ("old", "new"):
            for label, value in ratios(run(getattr(args, side), args.script, extra)).items():
                seen[side].setdefault(label, []).append(value)
    title = f"figure (ratio to its floor, median of {args.rounds})"
    print(f"{title:<60} {'old':>9} {'new':>9} {'new/old':>8}")
    for label, olds in seen["old"].items():
        news = seen["new"].get(label)
        if not news:
            continue
        a, b = statistics.median(olds), statistics.median(news)
        print(f"{label[:60]:<60} {a:>9.0f} {b:>9.0f} {b / a:>8.2f}")


if __name__ == "__main__":
    main()
