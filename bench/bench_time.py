"""Time and waiting on SQLite (issue 13): what parked runs cost, how late timers fire, and
what retries' waits add.

    python bench/bench_time.py                 # full sizes (about three minutes)
    python bench/bench_time.py --quick         # small sizes (under 30 s)
    python bench/bench_time.py --only wake     # one part: idle, wake or retry

Measures, on SQLite files in one temporary directory, with the one-host worker
(`python -m ablauf_lang worker --store sqlite:///...`) in a subprocess:

1. idle: three workers at once, on a store with no run, with 10,000 runs parked on
   `(sleep!! {:days 3})`, and with those plus 10,000 parked on `(await!! :approval)`
   (2,000 + 2,000 with --quick): the CPU seconds each worker spends in an idle minute
   (20 s with --quick; `/proc/PID/stat`, all threads) and its resident memory at the end.
   The worker on the empty store is the floor. Then one signal is sent to an await of the
   fullest store: the time until its run has finished shows the worker was serving it;
2. wake: 1,000 runs sleeping until the same instant, a few seconds ahead, woken by one
   worker: p50, p99 and max of (the leaf's finished time - its wake time), alone and with
   100,000 runs sleeping three days (10,000 with --quick);
3. retry: a 1,000-way `pmap!!` whose actions fail twice and succeed on the third attempt,
   with `{:retry {:max 3 :delay 0.2 :backoff 2}}` (waits of 0.2 s then 0.4 s: 0.6 s in
   all), in memory and on SQLite, at the default concurrency (32) and at 1,000; the floor
   is the same program with `:delay 0` (1,000 actions performed three times, no waits),
   measured in the same run. Reports (wall - floor) / 0.6 s: 1.0 means the waits add
   exactly their own length.

Parked runs are made the way a run driven by `eval(..., detach=True)` leaves them (the
run created, its lease taken, the first restart recorded, the lease given back), without
compiling the program again for each run; the rows of one such run are checked against a
run parked by `eval` first. Prints the figures with the command that produced them.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ablauf_lang  # noqa: E402
from ablauf_lang.engine.job import restart_job  # noqa: E402
from ablauf_lang.engine.waits import parked  # noqa: E402
from ablauf_lang.stores.base import JobStore, Owner  # noqa: E402

SLEEP_FAR = "(sleep!! {:days 3})"
AWAIT = "(await!! :approval)"
LEASE_TTL = 30.0
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ---------------------------------------------------------------- parked runs


class Parker:
    """Makes parked runs of one program in a store as `eval(..., detach=True)` leaves them:
    create the run, take its lease, record the first restart, give the lease back."""

    def __init__(self, store: JobStore, source: str) -> None:
        self.store = store
        self.source = source
        self.job = ablauf_lang.make_job(source)

    def park(self, now: float | None = None) -> str:
        store = self.store
        run_id = store.create_run(self.job, source=self.source)
        owner = Owner.this_process()
        store.acquire_lease(run_id, owner, LEASE_TTL)
        job, _ = restart_job(self.job, [], time.time() if now is None else now)
        if not parked(job):
            raise SystemExit(f"bench: {self.source} does not park (nothing but waits)")
        store.record(run_id, job)
        store.release_lease(run_id, owner.token, finished=False)
        return run_id

    def many(self, n: int) -> list[str]:
        return [self.park() for _ in range(n)]


def _shape(value: Any, run_id: str) -> Any:
    """A row's value with what differs between two runs of one program replaced: times
    (epoch floats), the run id, lease tokens and process ids."""
    if isinstance(value, float) and value > 1e9:
        return "<time>"
    if isinstance(value, str):
        if value.startswith("{") or value.startswith("["):
            try:
                return _shape(json.loads(value), run_id)
            except ValueError:
                pass
        return "<run>" if value == run_id else value
    if isinstance(value, dict):
        return {k: _shape(v, run_id) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_shape(v, run_id) for v in value]
    return value


# Columns that differ between any two runs: keys, ids, times, the lease's owner.
_SKIP = {
    "runs": {"id", "run_id", "created", "updated"},
    "leases": {"run", "token", "host", "pid", "started", "heartbeat"},
}


def run_rows(path: str, run_id: str) -> dict[str, list[Any]]:
    """Every row a run has in every table of a SQLite store, shaped by `_shape`."""
    conn = sqlite3.connect(path)
    try:
        key = conn.execute("SELECT id FROM runs WHERE run_id = ?", (run_id,)).fetchone()[0]
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        out: dict[str, list[Any]] = {}
        for table in sorted(tables):
            cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            where = "id" if table == "runs" else "run"
            if where not in cols:
                continue
            skip = _SKIP.get(table, {"run"})
            rows = conn.execute(f"SELECT * FROM {table} WHERE {where} = ?", (key,)).fetchall()
            out[table] = [
                {c: _shape(v, run_id) for c, v in zip(cols, row, strict=True) if c not in skip}
                for row in rows
            ]
        return out
    finally:
        conn.close()


def check_parker(folder: str) -> None:
    """A run made by `Parker` has the rows of one parked by `eval(..., detach=True)`."""
    path = os.path.join(folder, "check.db")
    with opened(path) as store:
        for source in (SLEEP_FAR, AWAIT):
            by_eval = ablauf_lang.eval(source, store=store, detach=True)
            if by_eval.status is not ablauf_lang.Status.PENDING:
                raise SystemExit(f"bench: eval(detach=True) of {source} ended {by_eval.status}")
            ours = Parker(store, source).park()
            a, b = run_rows(path, by_eval.run_id), run_rows(path, ours)
            if a != b:
                raise SystemExit(
                    f"bench: a parked run made here differs from one eval parks:\n{a}\n{b}"
                )


@contextmanager
def opened(path: str) -> Iterator[JobStore]:
    store = ablauf_lang.open_store(f"sqlite:///{path}")
    try:
        yield store
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            close()


def statuses(path: str) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall())
    finally:
        conn.close()


# ---------------------------------------------------------------- the worker process


class Worker:
    """`python -m ablauf_lang worker --store URL` in a subprocess, its log in a file."""

    def __init__(self, url: str, log: str, *, args: tuple[str, ...] = ()) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ablauf_lang", "worker", "--store", url, *args],
            cwd=ROOT,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def ready(self, timeout: float = 60.0, banner: str = "ablauf worker") -> None:
        """Wait for the banner in its log (it is serving)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"bench: the worker exited ({self.proc.returncode}):\n{self.text()}"
                )
            if banner in self.text():
                return
            time.sleep(0.05)
        raise SystemExit(f"bench: the worker did not start in {timeout:.0f} s:\n{self.text()}")

    def text(self) -> str:
        return Path(self.log).read_text(errors="replace")

    def cpu(self) -> float:
        """CPU seconds (user + system, every thread) used by the worker so far."""
        return cpu_seconds(self.proc.pid)

    def rss(self) -> float:
        """Resident memory, MiB."""
        return status_kib(self.proc.pid, "VmRSS") / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux `/proc/PID/stat`), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def status_kib(pid: int, key: str) -> float:
    """A `/proc/PID/status` figure in KiB (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return float(line.split()[1])
    return float("nan")


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `check` every 10 ms; return the seconds it took, SystemExit after `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"bench: {what} did not happen within {timeout:.0f} s")
        time.sleep(0.01)
    return time.monotonic() - start


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile `q` (0..1) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


# ---------------------------------------------------------------- 1. idle cost


def idle(folder: str, parked_each: int, seconds: float) -> None:
    print(
        f"1. idle workers: CPU seconds per idle minute and memory, by parked runs "
        f"(measured over {seconds:.0f} s, three workers at once)"
    )
    empty = os.path.join(folder, "idle-0.db")
    half = os.path.join(folder, "idle-1.db")
    full = os.path.join(folder, "idle-2.db")
    t = time.perf_counter()
    with opened(empty):
        pass
    with opened(half) as store:
        Parker(store, SLEEP_FAR).many(parked_each)
    with opened(full) as store:
        Parker(store, SLEEP_FAR).many(parked_each)
        awaiting = Parker(store, AWAIT).many(parked_each)
    made = time.perf_counter() - t
    print(
        f"   parked {3 * parked_each:,} runs in {made:.1f} s "
        f"({made / (3 * parked_each) * 1e6:.0f} us/run)"
    )
    stores = [(0, empty), (parked_each, half), (2 * parked_each, full)]
    workers = [
        Worker(f"sqlite:///{p}", os.path.join(folder, f"idle-{i}.log"))
        for i, (_, p) in enumerate(stores)
    ]
    try:
        for w in workers:
            w.ready()
        time.sleep(2.0)  # past start-up (imports, the first rounds)
        start_cpu = [w.cpu() for w in workers]
        start_rss = [w.rss() for w in workers]
        t0 = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - t0
        end_cpu = [w.cpu() for w in workers]
        end_rss = [w.rss() for w in workers]
        peak = [status_kib(w.proc.pid, "VmHWM") / 1024 for w in workers]
        print(
            f"   {'parked runs':>12} {'CPU s/idle min':>15} {'CPU %':>6} "
            f"{'RSS start':>10} {'RSS end':>9} {'peak RSS':>9}"
        )
        for (n, _), c0, c1, r0, r1, hwm in zip(
            stores, start_cpu, end_cpu, start_rss, end_rss, peak, strict=True
        ):
            per_min = (c1 - c0) * 60 / elapsed
            print(
                f"   {n:>12,} {per_min:>15.3f} {100 * (c1 - c0) / elapsed:>5.2f}% "
                f"{r0:>8.1f}MB {r1:>7.1f}MB {hwm:>7.1f}MB"
            )
        print(f"   ({TICK} CPU ticks per second: {60 / TICK / seconds:.3f} s/min is one tick)")
        # The worker serves the parked runs: a signal to one await ends its run.
        run_id = awaiting[len(awaiting) // 2]
        t = time.monotonic()
        ablauf_lang.signal(run_id, "approval", {"ok": True}, store=f"sqlite:///{full}")
        sent = time.monotonic() - t

        def finished() -> bool:
            return statuses(full).get("success", 0) >= 1

        took = wait_until(finished, 30, "the signalled run to finish")
        print(
            f"   a signal to one of {2 * parked_each:,} parked runs: sent in {sent * 1e3:.1f} ms, "
            f"its run finished {took:.2f} s later (the worker looks every 1 s)"
        )
        left = statuses(full)
        if left.get("pending", 0) != 2 * parked_each - 1:
            print(f"   !! runs of the fullest store by status: {left} (expected one finished)")
    finally:
        for w in workers:
            w.stop()


# ---------------------------------------------------------------- 2. wake-up lateness


def lateness(folder: str, name: str, runs: int, others: int, ahead: float) -> None:
    path = os.path.join(folder, f"wake-{name}.db")
    t = time.perf_counter()
    with opened(path) as store:
        far = Parker(store, SLEEP_FAR)
        for _ in range(others):
            far.park()
    made = time.perf_counter() - t
    worker = Worker(f"sqlite:///{path}", os.path.join(folder, f"wake-{name}.log"))
    try:
        worker.ready()
        with opened(path) as store:
            at = time.time() + ahead + runs * 0.0005
            source = f"(sleep-until!! {at!r})"
            parker = Parker(store, source)
            ids = parker.many(runs)
            margin = at - time.time()
            if margin < 0.5:
                raise SystemExit("bench: the due runs were not made in time; raise `ahead`")
            cpu0 = worker.cpu()

            def woken() -> bool:
                return statuses(path).get("success", 0) >= runs

            wait_until(woken, ahead + 600, f"{runs} runs to wake")
            done = time.time()
            cpu = worker.cpu() - cpu0
            late = []
            for run_id in ids:
                leaf = store.load(run_id).job.root
                finished, wake = getattr(leaf, "finished_at", None), getattr(leaf, "wake", None)
                if finished is None or wake is None:
                    raise SystemExit(f"bench: run {run_id} has no finished or wake time")
                late.append(finished - wake)
        print(
            f"   {others:>9,} {percentile(late, 0.5) * 1e3:>9.1f}ms "
            f"{percentile(late, 0.99) * 1e3:>9.1f}ms "
            f"{max(late) * 1e3:>9.1f}ms {min(late) * 1e3:>9.1f}ms {(done - at):>8.2f}s "
            f"{cpu / runs * 1e3:>8.2f}ms   (others parked in {made:.1f} s)"
        )
    finally:
        worker.stop()


def wake(folder: str, runs: int, others: int) -> None:
    print(
        f"2. wake-up lateness: {runs:,} runs sleeping until the same instant, one worker; "
        "lateness = leaf finished - wake time"
    )
    print(
        f"   {'others':>9} {'p50':>11} {'p99':>11} {'max':>11} {'min':>11} "
        f"{'all done':>9} {'CPU/run':>10}"
    )
    lateness(folder, "alone", runs, 0, 3.0)
    lateness(folder, "crowd", runs, others, 3.0)


# ---------------------------------------------------------------- 3. retries' waits


class Flaky:
    """An action that fails on its first two attempts for each payload, then succeeds."""

    def __init__(self) -> None:
        self.calls: dict[Any, int] = {}
        self.lock = threading.Lock()

    def __call__(self, payload: Any, context: Any) -> Any:
        with self.lock:
            n = self.calls[payload] = self.calls.get(payload, 0) + 1
        if n < 3:
            raise ablauf_lang.ActionFailed(f"bench/flaky: attempt {n} fails")
        return payload


def retry_fanout(n: int, delay: float, store: str | None, concurrency: int | None) -> float:
    flaky = Flaky()
    source = (
        f"(pmap!! [x (ctx :xs)] "
        f"(action!! :bench/flaky x {{:retry {{:max 3 :delay {delay} :backoff 2}}}}))"
    )
    t = time.perf_counter()
    run = ablauf_lang.eval(
        source, {"bench/flaky": flaky}, {"xs": list(range(n))}, store=store, concurrency=concurrency
    )
    took = time.perf_counter() - t
    if run.status is not ablauf_lang.Status.SUCCESS or sum(flaky.calls.values()) != 3 * n:
        raise SystemExit(
            f"bench: the retried fan-out ended {run.status}, {sum(flaky.calls.values())} calls"
        )
    return took


def retry(folder: str, n: int, rounds: int) -> None:
    waits = 0.2 + 0.4
    print(
        f"3. a {n:,}-way pmap!! failing twice then succeeding, "
        f"{{:retry {{:max 3 :delay 0.2 :backoff 2}}}}: waits {waits:.1f} s; best of {rounds}"
    )
    print(
        f"   {'store':>8} {'concurrency':>12} {'floor (delay 0)':>16} {'with waits':>11} "
        f"{'(wall-floor)/0.6':>17} {'wall/(floor+0.6)':>17}"
    )
    for where in ("memory", "sqlite"):
        for concurrency in (None, n):
            best = {0.0: float("inf"), 0.2: float("inf")}
            for r in range(rounds):
                for delay in best:  # interleaved: floor, then with waits
                    store = None
                    if where == "sqlite":
                        name = f"retry-{concurrency}-{r}-{delay}.db"
                        store = f"sqlite:///{os.path.join(folder, name)}"
                    best[delay] = min(best[delay], retry_fanout(n, delay, store, concurrency))
            floor, wall = best[0.0], best[0.2]
            label = "32 (default)" if concurrency is None else f"{concurrency:,}"
            print(
                f"   {where:>8} {label:>12} {floor:>15.2f}s {wall:>10.2f}s "
                f"{(wall - floor) / waits:>17.2f} {wall / (floor + waits):>17.2f}"
            )


# ---------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (under 30 s)")
    parser.add_argument(
        "--only",
        choices=("idle", "wake", "retry"),
        action="append",
        help="run only this part (may be given more than once)",
    )
    args = parser.parse_args()
    parts = args.only or ["idle", "wake", "retry"]
    if not Path("/proc/self/stat").exists():
        raise SystemExit("bench: this benchmark reads /proc (Linux)")
    command = "python bench/bench_time.py" + (" --quick" if args.quick else "")
    print(
        f"{command}  ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {os.cpu_count()} cores)"
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ablauf-bench-time-") as folder:
        check_parker(folder)
        if "idle" in parts:
            idle(folder, 2_000 if args.quick else 10_000, 20.0 if args.quick else 60.0)
            print()
        if "wake" in parts:
            wake(folder, 1_000, 10_000 if args.quick else 100_000)
            print()
        if "retry" in parts:
            retry(folder, 1_000, 1 if args.quick else 3)
    print(f"\n({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
