"""The Kafka runner beside the PostgreSQL workers: step latency and fan-out throughput.

    python bench/bench_kafka.py            # 1,000 steps, a 10,000-way fan-out (about 12 min)
    python bench/bench_kafka.py --quick    # 10 steps, a 500-way fan-out (under a minute)
    python bench/bench_kafka.py --profile  # also cProfile a role=all worker in this process

Every Kafka figure is measured with ablauf's client settings and, unless --quick, again
with `fetch.wait.max.ms=10` (`--also K=V,...` chooses): Tansu answers a fetch only when
its wait ends, so that setting is most of a step's latency (docs/performance.md, "Kafka").

Starts its own throwaway PostgreSQL server (`tests/pg.py`) and Kafka-protocol broker
(Tansu, `tests/kafka.py`), then measures, in the same run:

- floors: one produce + consume round trip on that broker through confluent-kafka with the
  producer and consumer settings ablauf uses (`KafkaSettings.producer()/consumer()`),
  median of many; one PostgreSQL commit; one SQLite commit (WAL, synchronous=normal, as
  the store). The floors are measured at the start and again at the end;
- W1: a `do!!` of N no-op idempotent actions, one after another: the median time between
  two consecutive leaves' finished times (one step), on Kafka role=all with a SQLite store
  (one process), Kafka with a PostgreSQL store (1 restarter + 1 action worker process) and
  the PostgreSQL workers (1 worker). A Kafka step is two round trips: the dispatch to the
  action topic and the result back to the restarter topic;
- W2: a `dopar!!` of M no-op idempotent actions: actions per second from submitting to the
  run being done, with 1, 2 and 4 action-worker processes (+1 restarter) on PostgreSQL,
  and with 1, 2 and 4 PostgreSQL workers.

The workers are real `python -m ablauf_lang worker` processes; this file is their
`--actions` module (ACTIONS below). Speed here is a figure, never a test.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import os
import pstats
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def noop(payload: Any, context: Any) -> Any:
    """The benchmark's action: nothing but its payload back."""
    return payload


ACTIONS = {"bench/noop": noop}

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
# Tansu holds a JoinGroup for half the session timeout: short, as in the tests.
GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
SETTLE = 4.5  # seconds for a consumer group to settle after a member joins (> 6 s / 2)


def sequence(n: int) -> str:
    return "(do!! " + " ".join(f"(idempotent-action!! :bench/noop {i})" for i in range(n)) + ")"


def fanout(n: int) -> str:
    return "(dopar!! " + " ".join(f"(idempotent-action!! :bench/noop {i})" for i in range(n)) + ")"


def wait_until(ok: Callable[[], bool], seconds: float, what: str) -> None:
    ends = time.monotonic() + seconds
    while not ok():
        if time.monotonic() > ends:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------- floors


def settings_for(bootstrap: str, prefix: str, options: dict[str, str]) -> Any:
    """ablauf's Kafka settings with the tests' group timings and `options` on top."""
    from ablauf_lang import api

    return api.kafka_settings(
        bootstrap, prefix=prefix, options={**GROUP, **options}, session_timeout=6.0
    )


def kafka_floor(settings: Any, n: int) -> list[float]:
    """Seconds of one produce + flush + consume round trip, `n` times (after a warm-up)."""
    from confluent_kafka import Consumer, Producer

    from ablauf_lang.kafka.client import Admin

    topic = f"{settings.prefix}.floor"
    Admin(settings).ensure([topic], 1)
    producer = Producer(settings.producer())
    consumer = Consumer(settings.consumer(f"{settings.prefix}.floor"))
    consumer.subscribe([topic])

    def trip() -> float:
        start = time.perf_counter()
        producer.produce(topic, b"x", partition=0)
        producer.flush(30)
        ends = time.monotonic() + 30
        while time.monotonic() < ends:
            msg = consumer.poll(1.0)
            if msg is not None and msg.error() is None:
                return time.perf_counter() - start
        raise SystemExit("bench: the floor's message did not come back in 30 s")

    try:
        for _ in range(2):
            trip()  # the first one waits for the group join
        return [trip() for _ in range(n)]
    finally:
        consumer.close()


def pg_floor(url: str, n: int) -> list[float]:
    """Seconds of one PostgreSQL commit (BEGIN; INSERT one row; COMMIT), `n` times."""
    import psycopg

    out = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_floor (x integer)")
        for i in range(n):
            start = time.perf_counter()
            with conn.transaction():
                conn.execute("INSERT INTO bench_floor VALUES (%s)", (i,))
            out.append(time.perf_counter() - start)
    return out


def sqlite_floor(path: str, n: int) -> list[float]:
    """Seconds of one SQLite commit (WAL, synchronous=normal, as the store), `n` times."""
    out = []
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("CREATE TABLE IF NOT EXISTS floor (x integer)")
        for i in range(n):
            start = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO floor VALUES (?)", (i,))
            conn.execute("COMMIT")
            out.append(time.perf_counter() - start)
    finally:
        conn.close()
    return out


# ---------------------------------------------------------------- workers


class Worker:
    """One `python -m ablauf_lang worker` process, its log in a file."""

    def __init__(self, args: list[str], log: str, actions: bool = True) -> None:
        self.log_path = log
        self.signalled = False
        self._log: IO[bytes] = open(log, "wb")  # noqa: SIM115 (closed in stop)
        cmd = [sys.executable, "-m", "ablauf_lang", "worker"]
        cmd += ["--actions", str(HERE)] if actions else []
        self.process = subprocess.Popen(
            cmd + args + ["--log-level", "info"],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_for(self, line: str, seconds: float = 60) -> None:
        def seen() -> bool:
            if self.process.poll() is not None:
                raise SystemExit(f"bench: a worker exited:\n{self.text()[-2000:]}")
            return line in self.text()

        wait_until(seen, seconds, f"{line!r} in {self.log_path}")

    def terminate(self) -> None:
        if self.process.poll() is None and not self.signalled:
            self.process.terminate()
            self.signalled = True

    def stop(self) -> None:
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class Setup:
    """A set of workers and how to submit to them and wait for a run."""

    def __init__(self, name: str, store: str, folder: str) -> None:
        self.name = name
        self.store = store
        self.folder = folder
        self.workers: list[Worker] = []

    def log(self, what: str) -> str:
        return os.path.join(self.folder, f"{self.name}-{what}-{len(self.workers)}.log")

    def submit(self, source: str) -> str:
        raise NotImplementedError

    def wait(self, run_id: str) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        for w in self.workers:
            w.terminate()  # all at once: they stop together
        for w in self.workers:
            w.stop()
        self.workers = []


class KafkaSetup(Setup):
    """Kafka workers on one topic prefix of their own."""

    def __init__(
        self,
        name: str,
        store: str,
        folder: str,
        bootstrap: str,
        concurrency: int,
        options: dict[str, str],
    ) -> None:
        super().__init__(name, store, folder)
        from ablauf_lang import api

        self.api = api
        self.prefix = f"b{uuid.uuid4().hex[:8]}"
        self.settings = settings_for(bootstrap, self.prefix, options)
        self.concurrency = concurrency
        self.args = ["--kafka", bootstrap, "--kafka-prefix", self.prefix, "--store", store]
        for k, v in {**GROUP, **options}.items():
            self.args += ["--kafka-option", f"{k}={v}"]
        self.backend: Any = None

    def add(self, role: str, count: int = 1) -> None:
        """Start `count` workers of `role` together; return once each has subscribed."""
        extra = ["--role", role, "--concurrency", str(self.concurrency)]
        new = []
        for _ in range(count):
            new.append(Worker(self.args + extra, self.log(role), actions=role != "restarter"))
            self.workers.append(new[-1])
        line = "restarter: partitions" if role in ("restarter", "all") else "ablauf worker"
        for w in new:
            w.wait_for(line)

    def submit(self, source: str) -> str:
        from ablauf_lang.stores.backend import open_store

        if self.backend is None:
            self.backend = open_store(self.store)
        run_id: str = self.api.submit_kafka(source, self.backend, self.settings)
        return run_id

    def wait(self, run_id: str) -> Any:
        return self.api.wait_any(run_id, self.store, timeout=900, poll=0.02)

    def stop(self) -> None:
        super().stop()
        if self.backend is not None:
            self.backend.close()
            self.backend = None


class PgSetup(Setup):
    """PostgreSQL workers (`ablauf worker --store postgresql://...`)."""

    def __init__(self, name: str, store: str, folder: str, concurrency: int):
        super().__init__(name, store, folder)
        self.concurrency = concurrency

    def listening(self) -> int:
        import psycopg

        with psycopg.connect(self.store) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'ablauf-listen'"
            ).fetchone()
        return int(row[0]) if row else 0

    def add(self) -> None:
        args = ["--store", self.store, "--concurrency", str(self.concurrency), "--poll", "1"]
        self.workers.append(Worker(args, self.log("worker")))
        n = len(self.workers)
        wait_until(lambda: self.listening() >= n, 60, "the PostgreSQL workers to listen")

    def submit(self, source: str) -> str:
        from ablauf_lang.runners import worker

        return worker.submit(source, self.store)

    def wait(self, run_id: str) -> Any:
        from ablauf_lang.runners import worker

        return worker.wait(run_id, self.store, timeout=900)


# ---------------------------------------------------------------- workloads


def run_once(setup: Setup, source: str) -> tuple[Any, float, float]:
    """(the finished run, seconds submitting took, seconds from submit to done)."""
    start = time.perf_counter()
    run_id = setup.submit(source)
    submitted = time.perf_counter() - start
    run = setup.wait(run_id)
    took = time.perf_counter() - start
    status = str(getattr(run, "status", "?"))
    if status.lower().rsplit(".", 1)[-1] != "success":
        raise SystemExit(f"bench: {setup.name}: run {run_id} ended {status}")
    return run, submitted, took


def step_times(run: Any) -> list[float]:
    """Seconds between consecutive leaves' finished times (a sequence's steps)."""
    ends = sorted(leaf.finished_at for leaf in run.job.leaves() if leaf.finished_at)
    return [b - a for a, b in itertools.pairwise(ends)]


def w1(
    setup: Setup, n: int, rows: list[dict[str, Any]], label: str, floor: float, variant: int
) -> None:
    run, _, took = run_once(setup, sequence(n))
    med = statistics.median(step_times(run))
    rows.append({"on": label, "per": med, "mean": took / n, "variant": variant})
    print(f"  W1 {label}: {med * 1e6:,.0f} us/step median, {took / n * 1e6:,.0f} mean")


def w2(setup: Setup, m: int, rows: list[dict[str, Any]], label: str, variant: int) -> None:
    _, submitted, took = run_once(setup, fanout(m))
    rows.append(
        {"on": label, "rate": m / took, "took": took, "submit": submitted, "variant": variant}
    )
    print(f"  W2 {label}: {m / took:,.0f} actions/s ({took:.2f} s, submit {submitted:.2f} s)")


# ---------------------------------------------------------------- profiling


def profile_all(
    bootstrap: str, folder: str, n: int, m: int, concurrency: int, options: dict[str, str]
) -> str:
    """cProfile a role=all worker (restarter and action worker threads) in this process on
    a SQLite store, through W1 and W2; the top functions by cumulative and own time."""
    from ablauf_lang import api

    prefix = f"p{uuid.uuid4().hex[:8]}"
    settings = settings_for(bootstrap, prefix, options)
    url = f"sqlite:///{folder}/profile.db"
    stop = threading.Event()
    profiles: list[cProfile.Profile] = []
    import ablauf_lang.kafka.actions as ka
    import ablauf_lang.kafka.restarter as kr

    def profiled(fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*a: Any, **kw: Any) -> Any:
            p = cProfile.Profile()
            profiles.append(p)
            return p.runcall(fn, *a, **kw)

        return inner

    saved = (kr.serve, ka.serve)
    kr.serve = profiled(kr.serve)
    ka.serve = profiled(ka.serve)
    # kafka.runs calls restarter.serve and action_worker.serve through these modules.
    thread = threading.Thread(
        target=api.serve_kafka,
        args=(settings, url),
        kwargs={"role": "all", "actions": ACTIONS, "stop": stop, "concurrency": concurrency},
        daemon=True,
    )
    from ablauf_lang.kafka.client import Admin
    from ablauf_lang.kafka.topics import action_topic

    try:
        thread.start()
        admin = Admin(settings)
        wait_until(
            lambda: admin.partitions(action_topic(prefix, "bench/noop")) is not None, 30, "topic"
        )
        time.sleep(SETTLE)
        from ablauf_lang.stores.backend import open_store

        store = open_store(url)
        try:
            for source in (sequence(10), sequence(n), fanout(m)):
                run_id = api.submit_kafka(source, store, settings)
                api.wait_any(run_id, url, timeout=600, poll=0.02)
        finally:
            store.close()
    finally:
        stop.set()
        thread.join(60)
        kr.serve, ka.serve = saved
    out = io.StringIO()
    for p, name in zip(profiles, ("first", "second"), strict=False):
        del name
        stats = pstats.Stats(p, stream=out)
        stats.sort_stats("cumulative").print_stats(25)
        stats.sort_stats("tottime").print_stats(15)
    return out.getvalue()


# ---------------------------------------------------------------- main


def fmt_us(s: float) -> str:
    return f"{s * 1e6:,.0f}"


def parse_options(texts: list[str]) -> dict[str, str]:
    out = {}
    for text in texts:
        key, eq, value = text.partition("=")
        if not eq or not key.strip():
            print(f"bench: --also wants KEY=VALUE[,KEY=VALUE...], got {text!r}")
            sys.exit(2)
        out[key.strip()] = value.strip()
    return out


def label_of(options: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "ablauf's settings"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    parser.add_argument("--steps", type=int, default=None, help="W1 steps [1,000; quick 10]")
    parser.add_argument("--fanout", type=int, default=None, help="W2 actions [10,000; quick 500]")
    parser.add_argument(
        "--concurrency", type=int, default=256, help="Kafka action worker --concurrency [256]"
    )
    parser.add_argument(
        "--pg-concurrency", type=int, default=16, help="PostgreSQL worker --concurrency [16]"
    )
    parser.add_argument(
        "--also",
        action="append",
        default=None,
        metavar="K=V[,K=V]",
        help="measure the Kafka figures again with these librdkafka settings (repeatable) "
        "[fetch.wait.max.ms=10; none with --quick]",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile role=all in-process")
    args = parser.parse_args()
    if (
        any(v is not None and v < 2 for v in (args.steps, args.fanout))
        or min(args.concurrency, args.pg_concurrency) < 1
    ):
        print("bench: --steps and --fanout must be at least 2, concurrencies at least 1")
        sys.exit(2)
    also = args.also if args.also is not None else ([] if args.quick else ["fetch.wait.max.ms=10"])
    variants: list[dict[str, str]] = [{}] + [parse_options(a.split(",")) for a in also if a]
    n = args.steps or (10 if args.quick else 1_000)
    m = args.fanout or (500 if args.quick else 10_000)
    trips = 8 if args.quick else 200
    command = "python bench/bench_kafka.py " + " ".join(sys.argv[1:])
    print(
        f"{command}  ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {os.cpu_count()} cores)"
    )
    sys.path.insert(0, str(ROOT))
    from ablauf_lang.stores.postgres import PostgresStore
    from tests.kafka import Broker
    from tests.pg import PgServer

    began = time.monotonic()

    def stamp(what: str) -> None:
        print(f"[{time.monotonic() - began:6.1f} s] {what}", flush=True)

    folder = tempfile.mkdtemp(prefix="ablauf-bench-kafka-")
    server = PgServer().start()
    broker = Broker()
    rows: list[dict[str, Any]] = []
    floors: dict[str, list[float]] = {"pg": [], "sqlite": []}
    setups: list[Setup] = []
    profile = ""

    def measure_floors() -> None:
        for i, options in enumerate(variants):
            settings = settings_for(broker.bootstrap, f"f{uuid.uuid4().hex[:8]}", options)
            floors.setdefault(f"kafka{i}", []).extend(kafka_floor(settings, trips))
        floors["pg"] += pg_floor(url, trips * 2)
        floors["sqlite"] += sqlite_floor(os.path.join(folder, "floor.db"), trips * 2)

    try:
        url = server.create_database("bench")
        PostgresStore.from_url(url).close()
        stamp("floors")
        measure_floors()
        for i, options in enumerate(variants):
            kf = statistics.median(floors[f"kafka{i}"])
            tag = label_of(options)
            stamp(f"Kafka role=all, SQLite store (1 process; {tag})")
            store = f"sqlite:///{folder}/runs{i}.db"
            lite = KafkaSetup("all", store, folder, broker.bootstrap, args.concurrency, options)
            setups.append(lite)
            lite.add("all")
            time.sleep(SETTLE)
            run_once(lite, sequence(5))
            w1(lite, n, rows, f"Kafka role=all, SQLite ({tag})", kf, i)
            lite.stop()

            stamp(f"Kafka, PostgreSQL store: 1 restarter + action workers ({tag})")
            kpg = KafkaSetup("kpg", url, folder, broker.bootstrap, args.concurrency, options)
            setups.append(kpg)
            kpg.add("restarter")
            for count in (1, 2, 4):
                kpg.add("actions", count - (len(kpg.workers) - 1))
                time.sleep(SETTLE)
                run_once(kpg, fanout(20))
                if count == 1:
                    w1(kpg, n, rows, f"Kafka 1 restarter + 1 actions, PostgreSQL ({tag})", kf, i)
                w2(kpg, m, rows, f"Kafka 1 restarter + {count} actions, PostgreSQL ({tag})", i)
            kpg.stop()

        stamp("PostgreSQL workers")
        pf = statistics.median(floors["pg"])
        pg = PgSetup("pg", url, folder, args.pg_concurrency)
        setups.append(pg)
        for count in (1, 2, 4):
            while len(pg.workers) < count:
                pg.add()
            run_once(pg, fanout(20))
            if count == 1:
                w1(pg, n, rows, "PostgreSQL, 1 worker", pf, -1)
            w2(pg, m, rows, f"PostgreSQL, {count} worker(s)", -1)
        pg.stop()
        stamp("floors again")
        measure_floors()
        if args.profile:
            stamp("profile")
            profile = profile_all(broker.bootstrap, folder, n, m, args.concurrency, variants[-1])
    finally:
        for s in setups:
            s.stop()
        broker.stop()
        server.stop()
    report(command, began, rows, floors, variants, n, m, args, folder, profile)


def report(
    command: str,
    began: float,
    rows: list[dict[str, Any]],
    floors: dict[str, list[float]],
    variants: list[dict[str, str]],
    n: int,
    m: int,
    args: argparse.Namespace,
    folder: str,
    profile: str,
) -> None:
    """Print the floors and the two tables (Markdown, for docs/performance.md)."""
    pf = statistics.median(floors["pg"])
    print()
    print(f"{command}: {time.monotonic() - began:.0f} s in all, {os.cpu_count()} cores")
    print()
    print("| floor (median, measured at the start and the end) | us | p10 | p90 |")
    print("|---|---|---|---|")
    for i, options in enumerate(variants):
        t = floors[f"kafka{i}"]
        q = statistics.quantiles(t, n=10)
        print(
            f"| Kafka produce + flush + consume, {label_of(options)} | "
            f"{fmt_us(statistics.median(t))} | {fmt_us(q[0])} | {fmt_us(q[-1])} |"
        )
    for name, key in (("PostgreSQL commit", "pg"), ("SQLite commit (WAL, normal)", "sqlite")):
        q = statistics.quantiles(floors[key], n=10)
        med = statistics.median(floors[key])
        print(f"| {name} | {fmt_us(med)} | {fmt_us(q[0])} | {fmt_us(q[-1])} |")
    print()
    print(f"| W1: {n:,} sequential no-op steps | us/step (median) | mean | x floor |")
    print("|---|---|---|---|")
    for r in rows:
        if "per" in r:
            if r["variant"] >= 0:
                kf = statistics.median(floors[f"kafka{r['variant']}"])
                ratio = f"{r['per'] / kf:,.1f} round trips"
            else:
                ratio = f"{r['per'] / pf:,.1f} PostgreSQL commits"
            print(f"| {r['on']} | {fmt_us(r['per'])} | {fmt_us(r['mean'])} | {ratio} |")
    print()
    print(f"| W2: {m:,}-way fan-out | actions/s | submit to done | of which submit |")
    print("|---|---|---|---|")
    for r in rows:
        if "rate" in r:
            print(f"| {r['on']} | {r['rate']:,.0f} | {r['took']:.2f} s | {r['submit']:.2f} s |")
    print(
        f"\nKafka action workers --concurrency {args.concurrency}; PostgreSQL workers "
        f"--concurrency {args.pg_concurrency}. A Kafka step is two round trips (dispatch, "
        f"result). Logs: {folder}"
    )
    if profile:
        print("\ncProfile of role=all in this process (SQLite store):\n" + profile)


if __name__ == "__main__":
    main()
