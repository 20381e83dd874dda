"""The Kafka runner under faults, in many processes: real `ablauf worker --kafka`
processes (each in its own process group, SIGKILLed with `os.killpg`), a real broker
(Tansu), a real store (PostgreSQL, or a SQLite file).

The actions (`tests/kafka_actions_faults.py`) append one line per effect to a file, so the
tests count what really ran, not what the logs say:

- a 500-way `dopar!!` of non-idempotent actions over 3 action workers and 2 restarters:
  every effect exactly once (PostgreSQL; a smaller one on SQLite);
- the same while workers are SIGKILLed and started again at random (seeded): the run ends,
  no effect twice, a step whose effect may be missing failed `interrupted: ...`, and a
  person's `ablauf runs retry` makes it succeed with one more effect per retried step;
- a rebalance mid-run (workers added, one stopped with SIGTERM): exactly once; and the
  smallest case of a rebalance while an action worker is full (it paused its partitions);
- the broker SIGKILLed and started again mid-run (S3 storage): the run finishes, exactly once;
- bad input: malformed messages set aside, unknown actions, an unreachable broker, a
  worker started before its broker.

On failure the tails of the workers' logs are printed. A run that stops moving fails at
once (`wait_or_stall`) with the cause found so far, instead of waiting out its timeout.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer

from ablauf_lang import api
from ablauf_lang.engine.job import INTERRUPTED, make_job
from ablauf_lang.engine.nodes import LeafState, Status
from ablauf_lang.kafka import runs
from ablauf_lang.kafka.topics import action_topic, dead_letter_topic, restarter_topic
from ablauf_lang.lang.compiler import compile_source
from ablauf_lang.runners.local import Run
from ablauf_lang.stores.backend import open_store
from tests import kafka_actions_faults as fx
from tests.kafka import FAST_GROUP, Broker

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parent.parent
GROUP_OPTIONS = [f"--kafka-option={k}={v}" for k, v in FAST_GROUP.items()]


class Worker:
    """One `ablauf worker --kafka` process, in a process group of its own."""

    def __init__(self, name: str, role: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.role = role
        self.popen = popen
        self.log = log

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)


class Cluster:
    """A broker, a store, an effects file, and worker processes started on demand, all
    under one topic prefix of their own (so tests can share the session's broker)."""

    def __init__(self, bootstrap: str, store: str, tmp: Path) -> None:
        self.bootstrap = bootstrap
        self.store = store
        self.tmp = tmp
        self.prefix = f"f{uuid.uuid4().hex[:8]}"
        self.effects_file = tmp / "effects.txt"
        self.workers: list[Worker] = []
        self.settings = api.kafka_settings(
            bootstrap, prefix=self.prefix, options=FAST_GROUP, session_timeout=6.0
        )
        self.env = {
            **os.environ,
            fx.EFFECTS_VAR: str(self.effects_file),
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
            ),
        }
        self.env.pop("ABLAUF_STORE", None)

    # ------------------------------------------------------------ context

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            print(self.output())
        self.close()

    def kafka_args(self) -> list[str]:
        return ["--kafka", self.bootstrap, "--kafka-prefix", self.prefix, *GROUP_OPTIONS]

    # ------------------------------------------------------------ workers

    def start(
        self, role: str, *, concurrency: int = 16, lease: float = 5.0, wait: bool = True
    ) -> Worker:
        """Start one worker of `role` ("actions" serves the fault actions)."""
        name = f"{role}-{len(self.workers)}"
        log = self.tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "ablauf_lang", "worker", *self.kafka_args()]
        cmd += ["--store", self.store, "--role", role, "--log-level", "info"]
        if role != "restarter":
            cmd += ["--actions", "tests.kafka_actions_faults"]
            cmd += ["--concurrency", str(concurrency), "--lease", str(lease)]
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killpg reaches it all
            )
        worker = Worker(name, role, popen, log)
        self.workers.append(worker)
        if wait:
            self.ready(worker)
        return worker

    def ready(self, worker: Worker, seconds: float = 40) -> None:
        """Wait until the worker serves: an action worker has made its topics and says so,
        a restarter was given partitions."""
        text = "restarter: partitions" if worker.role == "restarter" else "ablauf worker: actions"
        self.wait_log(worker, text, seconds)

    def wait_log(self, worker: Worker, text: str, seconds: float) -> None:
        ends = time.monotonic() + seconds
        while text not in worker.text():
            if not worker.alive:
                raise AssertionError(f"{worker.name} exited ({worker.popen.returncode})")
            if time.monotonic() > ends:
                raise AssertionError(f"{worker.name} did not log {text!r} in {seconds}s")
            time.sleep(0.1)

    def kill(self, worker: Worker) -> None:
        """SIGKILL the worker's process group (a crash: nothing flushed, nothing left)."""
        worker.signal(signal.SIGKILL)
        worker.popen.wait(10)

    def terminate(self, worker: Worker, seconds: float = 40) -> int:
        """SIGTERM: the worker finishes what it has in hand and leaves; its exit code."""
        worker.signal(signal.SIGTERM)
        return worker.popen.wait(seconds)

    def live(self, role: str) -> list[Worker]:
        return [w for w in self.workers if w.role == role and w.alive]

    def close(self) -> None:
        for w in self.workers:
            w.signal(signal.SIGTERM)
        for w in self.workers:
            try:
                w.popen.wait(20)
            except subprocess.TimeoutExpired:
                w.signal(signal.SIGKILL)
                w.popen.wait(10)

    def output(self, chars: int = 3000) -> str:
        return "\n".join(
            f"--- {w.name} (pid {w.popen.pid}, rc {w.popen.poll()})\n{w.text()[-chars:]}"
            for w in self.workers
        )

    # ------------------------------------------------------------ runs

    def cli(self, *args: str, seconds: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ablauf_lang", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=seconds,
            check=False,
        )

    def submit(self, source: str) -> str:
        """`ablauf submit FILE --kafka ...`: the run's id."""
        path = self.tmp / f"p{uuid.uuid4().hex[:6]}.abl"
        path.write_text(source)
        done = self.cli("submit", str(path), *self.kafka_args(), "--store", self.store)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def wait(self, run_id: str, seconds: float) -> Run:
        run = api.wait_any(run_id, self.store, timeout=seconds)
        assert run.status is not Status.PENDING, f"run {run_id} did not end in {seconds}s"
        return run

    def effects(self) -> dict[tuple[str, int], list[int]]:
        return fx.read_effects(str(self.effects_file))


def dopar(leaves: list[str]) -> str:
    return "(dopar!! " + " ".join(leaves) + ")"


def effect(n: int, **extra: float) -> str:
    opts = "".join(f" :{k} {v}" for k, v in extra.items())
    return f"(action!! :faults/effect {{:n {n}{opts}}})"


def idem(n: int, **extra: float) -> str:
    opts = "".join(f" :{k} {v}" for k, v in extra.items())
    return f"(idempotent-action!! :faults/idem {{:n {n}{opts}}})"


def leaves_by_n(run: Run, action: str) -> dict[int, Any]:
    """The run's leaves of `action`, by the `:n` of their payload."""
    out = {}
    for leaf in run.job.leaves():
        if leaf.action == action:
            sent = leaf.sent if isinstance(leaf.sent, dict) else {}
            n = sent.get("n", sent.get(":n"))
            if n is None:
                n = leaf.payload.get("n") if isinstance(leaf.payload, dict) else None
            assert n is not None, f"leaf {leaf.id}: no :n in {leaf.sent!r} / {leaf.payload!r}"
            out[int(n)] = leaf
    return out


def wait_until(what: str, predicate: Callable[[], Any], seconds: float) -> Any:
    ends = time.monotonic() + seconds
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > ends:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        time.sleep(0.1)


def exactly_once(c: Cluster, ns: range, kind: str = "effect") -> None:
    effects = c.effects()
    twice = {n: effects[(kind, n)] for n in ns if len(effects.get((kind, n), [])) > 1}
    missing = [n for n in ns if (kind, n) not in effects]
    assert not twice, (
        f"{len(twice)} effect(s) more than once (n: pids): {dict(list(twice.items())[:5])}"
    )
    assert not missing, f"{len(missing)} effect(s) missing: {missing[:10]}"


STALLED = (
    "the run stalled: leaves pending with no progress (an action worker whose partitions "
    "are never read again? A pause kept across a rebalance was such a bug: action workers "
    "now never pause, they keep what they read in a backlog)"
)


def wait_or_stall(c: Cluster, run_id: str, seconds: float, stall: float) -> Run:
    """The run once it ended; pytest.fail
    when nothing moves for `stall` seconds: no leaf ended, no effect happened."""
    ends = time.monotonic() + seconds
    last: tuple[int, int] | None = None
    since = time.monotonic()
    while True:
        run = api.load_run(run_id, c.store)
        if run.job.status is not Status.PENDING:
            return Run(run_id, run.job)
        pending = [x for x in run.job.leaves() if x.result is LeafState.PENDING]
        now = (len(pending), sum(len(v) for v in c.effects().values()))
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall:
            never = [
                x.id
                for x in pending
                if isinstance(x.payload, dict)
                and (x.action.rsplit("/", 1)[1], x.payload["n"]) not in c.effects()
            ]
            pytest.fail(
                f"{STALLED}\nrun {run_id}: {len(pending)} leaves pending for {stall:g}s "
                f"with no progress, {len(never)} of them never performed (ids {never[:10]})"
            )
        if time.monotonic() > ends:
            raise AssertionError(f"run {run_id} did not end in {seconds}s")
        time.sleep(0.5)


@pytest.fixture
def pg_store(pg_url: str) -> str:
    """A fresh PostgreSQL database, its schema made before the workers start."""
    open_store(pg_url).close()
    return pg_url


# ---------------------------------------------------------------- 1. exactly once


@pytest.mark.postgres
def test_500_way_dopar_over_three_action_workers_and_two_restarters_once_each(
    kafka_bootstrap: str, pg_store: str, tmp_path: Path
) -> None:
    with Cluster(kafka_bootstrap, pg_store, tmp_path) as c:
        for _ in range(3):
            c.start("actions", wait=False)
        for _ in range(2):
            c.start("restarter", wait=False)
        for w in c.workers:
            c.ready(w)
        run_id = c.submit(dopar([effect(n) for n in range(500)]))
        run = wait_or_stall(c, run_id, 120, stall=30)
        assert run.status is Status.SUCCESS, run.failed_steps()[:3]
        exactly_once(c, range(500))
        pids = {p for ps in c.effects().values() for p in ps}
        assert len(pids) >= 2, f"every action ran in one worker: {pids}"
        assert all(leaf.result is LeafState.SUCCESS for leaf in run.job.leaves())


def test_a_dopar_on_a_sqlite_file_store_runs_each_action_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    with Cluster(kafka_bootstrap, f"sqlite:///{tmp_path / 'runs.db'}", tmp_path) as c:
        open_store(c.store).close()
        for role in ("actions", "actions", "restarter"):
            c.start(role, wait=False)
        for w in c.workers:
            c.ready(w)
        run_id = c.submit(dopar([effect(n) for n in range(120)] + [idem(n) for n in range(30)]))
        run = wait_or_stall(c, run_id, 90, stall=30)
        assert run.status is Status.SUCCESS, run.failed_steps()[:3]
        exactly_once(c, range(120))
        exactly_once(c, range(30), "idem")  # nothing failed: nothing ran again


# ---------------------------------------------------------------- 2. kills


def chaos(
    c: Cluster,
    rng: random.Random,
    *,
    kills: int,
    every: float,
    running: Callable[[], bool],
    **start: Any,
) -> list[str]:
    """SIGKILL a random worker (action worker or restarter) every `every` s (jittered),
    `kills` times or until `running()` says the run ended; start a new one of the same
    role each time (with `start`'s options). Returns what was killed."""
    killed: list[str] = []
    while len(killed) < kills and running():
        time.sleep(every * rng.uniform(0.5, 1.5))
        if not running():
            break
        victims = [w for w in c.workers if w.alive]
        victim = rng.choice(sorted(victims, key=lambda w: w.name))
        c.kill(victim)
        killed.append(victim.name)
        c.start(victim.role, wait=False, **start)
    return killed


def check_at_most_once(c: Cluster, run: Run, n_effects: int, n_idem: int) -> dict[int, int]:
    """With no person's retry: each non-idempotent step's effect at most once; a step
    whose effect is missing failed `interrupted: ...`; idempotent steps succeeded.
    Returns the effect counts by n."""
    effects = c.effects()
    leaves = leaves_by_n(run, "faults/effect")
    assert sorted(leaves) == list(range(n_effects))
    counts = {n: len(effects.get(("effect", n), [])) for n in range(n_effects)}
    twice = {n: effects[("effect", n)] for n, k in counts.items() if k > 1}
    assert not twice, f"effects twice with no retry asked (n: pids): {twice}"
    for n, leaf in leaves.items():
        if leaf.result is LeafState.SUCCESS:
            assert counts[n] == 1, f"step n={n} succeeded with {counts[n]} effect(s)"
        else:
            assert leaf.result is LeafState.FAILURE, (n, leaf.result, leaf.error)
            assert str(leaf.error).startswith(INTERRUPTED), (n, leaf.error)
    idems = leaves_by_n(run, "faults/idem")
    assert sorted(idems) == list(range(n_idem))
    for n, leaf in idems.items():
        assert leaf.result is LeafState.SUCCESS, (n, leaf.result, leaf.error)
        assert effects.get(("idem", n)), f"idempotent step n={n} succeeded without its effect"
    return counts


def _kills_then_retry(
    c: Cluster,
    seed: int,
    n_effects: int,
    n_idem: int,
    kills: int,
    concurrency: int,
    before: float = 0.5,
) -> None:
    rng = random.Random(seed)
    options: dict[str, Any] = {"lease": 3.0, "concurrency": concurrency}
    for role in ("actions", "actions", "actions", "restarter", "restarter"):
        c.start(role, wait=False, **options)
    for w in c.workers:
        c.ready(w)
    leaves = [effect(n, before=before) for n in range(n_effects)]
    leaves += [idem(n, before=before) for n in range(n_idem)]
    rng.shuffle(leaves)
    run_id = c.submit(dopar(leaves))
    with api.opened(c.store) as store:

        def pending() -> bool:
            return store.info(run_id).status is Status.PENDING

        killed = chaos(c, rng, kills=kills, every=2.0, running=pending, **options)
    assert killed, "the run ended before any worker was killed: make it longer"
    # Every role still has a live worker (the last kill was replaced).
    assert c.live("actions")
    assert c.live("restarter")
    run = wait_or_stall(c, run_id, 150, stall=20)
    counts = check_at_most_once(c, run, n_effects, n_idem)
    print(f"killed {killed}; the run ended {run.status}, {len(run.failed_steps())} failed")
    if run.status is Status.SUCCESS:
        return
    failed = {
        n
        for n, leaf in leaves_by_n(run, "faults/effect").items()
        if leaf.result is not LeafState.SUCCESS
    }
    assert failed, run.failed_steps()[:3]
    # A person's retry: the interrupted steps run again, once each.
    done = c.cli("runs", "retry", run_id, *c.kafka_args(), "--store", c.store)
    assert done.returncode == 0, done.stderr
    again = wait_or_stall(c, run_id, 90, stall=20)
    assert again.status is Status.SUCCESS, again.failed_steps()[:3]
    effects = c.effects()
    for n in range(n_effects):
        now = len(effects.get(("effect", n), []))
        want = counts[n] + (1 if n in failed else 0)
        assert now == want, f"n={n}: {now} effect(s) after one retry, expected {want}"
    for n in range(n_idem):
        assert effects.get(("idem", n)), n


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("concurrency", "before"),
    [
        pytest.param(16, 0.5, id="workers-fill-up-and-pause"),
        # 40 s of 8-second actions: with the stress and soak runs (`pytest -m slow`).
        pytest.param(400, 8.0, id="workers-never-full", marks=pytest.mark.slow),
    ],
)
def test_random_kills_of_action_workers_and_restarters_no_effect_twice(
    kafka_bootstrap: str, tmp_path: Path, pg_store: str, concurrency: int, before: float
) -> None:
    with Cluster(kafka_bootstrap, pg_store, tmp_path) as c:
        _kills_then_retry(
            c, seed=14, n_effects=300, n_idem=60, kills=5, concurrency=concurrency, before=before
        )


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_soak_many_random_kills(
    kafka_bootstrap: str, tmp_path: Path, pg_store: str, seed: int
) -> None:
    with Cluster(kafka_bootstrap, pg_store, tmp_path) as c:
        _kills_then_retry(c, seed=seed, n_effects=500, n_idem=100, kills=14, concurrency=16)


# ---------------------------------------------------------------- 3. rebalance


@pytest.mark.postgres
def test_rebalance_mid_run_workers_added_then_one_stopped_exactly_once(
    kafka_bootstrap: str, pg_store: str, tmp_path: Path
) -> None:
    with Cluster(kafka_bootstrap, pg_store, tmp_path) as c:
        first = c.start("actions", concurrency=8, lease=10.0)
        c.start("restarter")
        run_id = c.submit(dopar([effect(n, before=0.2) for n in range(500)]))
        wait_until("the first effects", lambda: len(c.effects()) >= 10, 30)
        added = [c.start("actions", concurrency=8, lease=10.0, wait=False) for _ in range(2)]
        for w in added:
            c.ready(w)
        pids = {w.popen.pid for w in added}

        def added_working() -> bool:
            return bool(pids & {p for ps in c.effects().values() for p in ps})

        wait_until("an added worker to perform actions", added_working, 40)
        with api.opened(c.store) as store:
            assert store.info(run_id).status is Status.PENDING, "the run ended too soon"
        assert c.terminate(first) == 0, first.text()[-2000:]
        run = wait_or_stall(c, run_id, 120, stall=30)
        assert run.status is Status.SUCCESS, run.failed_steps()[:3]
        exactly_once(c, range(500))


def test_a_full_action_worker_goes_on_after_a_rebalance(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The smallest case of the pause bug: one action worker at full concurrency (it
    pauses its partitions) when a second one joins; every step must still run."""
    with Cluster(kafka_bootstrap, f"sqlite:///{tmp_path / 'runs.db'}", tmp_path) as c:
        open_store(c.store).close()
        c.start("actions", concurrency=1, lease=10.0)
        c.start("restarter")
        # Each step long enough that the first worker is full whenever the group rebalances
        # (the second worker's join takes a few seconds), the run long enough to span it.
        run_id = c.submit(dopar([idem(n, before=0.6) for n in range(24)]))
        wait_until("the first effect", lambda: len(c.effects()) >= 1, 30)
        c.start("actions", concurrency=1, lease=10.0)
        run = wait_or_stall(c, run_id, 90, stall=20)
        assert run.status is Status.SUCCESS, run.failed_steps()[:3]
        assert all(("idem", n) in c.effects() for n in range(24))


# ---------------------------------------------------------------- 4. broker restart


def test_broker_killed_and_started_again_mid_run_effects_once(
    kafka_s3_broker: Broker, tmp_path: Path
) -> None:
    broker = kafka_s3_broker
    with Cluster(broker.bootstrap, f"sqlite:///{tmp_path / 'runs.db'}", tmp_path) as c:
        open_store(c.store).close()
        for role in ("actions", "actions", "restarter"):
            c.start(role, wait=False, lease=10.0)
        for w in c.workers:
            c.ready(w)
        pairs = [f"(do!! (sleep!! {1 + n % 4}) {effect(n, before=0.05)})" for n in range(100)]
        run_id = c.submit(dopar(pairs))
        wait_until("the first effects", lambda: len(c.effects()) >= 5, 30)
        broker.kill()
        time.sleep(3)
        broker.start()
        run = wait_or_stall(c, run_id, 150, stall=20)
        assert run.status is Status.SUCCESS, run.failed_steps()[:3]
        exactly_once(c, range(100))
        logs = "\n".join(w.text() for w in c.workers)
        phrases = ("trying again", "reading the batch again", "cannot reach", "not delivered")
        said = [x for x in logs.splitlines() if any(t in x for t in phrases)]
        print("what the workers said while the broker was down:", *said[:6], sep="\n  ")
        if not said:
            pytest.fail(
                "BUG in ablauf_lang/kafka (client.py / actions.py / restarter.py): the broker "
                "was down for 3+ s mid-run and no worker's log says so (nor that it tries "
                "again): librdkafka's connection errors go to the muted `ablauf.kafka.librdkafka` "
                "logger (no error_cb), and Outbox.flush waits silently up to "
                "message.timeout.ms (60 s). The run itself recovered, effects exactly once."
            )


# ---------------------------------------------------------------- 5. bad input


def _dead_letters(c: Cluster, want: int, seconds: float = 20) -> list[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": c.bootstrap,
            "group.id": f"dl-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            **FAST_GROUP,
        }
    )
    consumer.subscribe([dead_letter_topic(c.prefix)])
    got: list[Any] = []
    ends = time.monotonic() + seconds
    try:
        while len(got) < want and time.monotonic() < ends:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                got.append(msg)
    finally:
        consumer.close()
    return got


def test_malformed_messages_are_set_aside_and_the_run_is_unharmed(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    with Cluster(kafka_bootstrap, f"sqlite:///{tmp_path / 'runs.db'}", tmp_path) as c:
        open_store(c.store).close()
        actions = c.start("actions")
        restarter = c.start("restarter")
        run_id = c.submit(dopar([effect(n, before=0.3) for n in range(20)]))
        producer = Producer({"bootstrap.servers": c.bootstrap})
        producer.produce(restarter_topic(c.prefix), b"\x00not a message", key=run_id.encode())
        producer.produce(action_topic(c.prefix, "faults/effect"), b"{broken", key=b"x")
        assert producer.flush(10) == 0
        run = c.wait(run_id, 60)
        assert run.status is Status.SUCCESS, run.failed_steps()[:3]
        exactly_once(c, range(20))
        letters = _dead_letters(c, 2)
        froms = sorted(dict(m.headers() or [])["ablauf-from"].decode() for m in letters)
        assert len(letters) == 2, froms
        assert froms[0].startswith(action_topic(c.prefix, "faults/effect") + "[")
        assert froms[1].startswith(restarter_topic(c.prefix) + "[")
        assert {m.value() for m in letters} == {b"\x00not a message", b"{broken"}
        for w in (actions, restarter):
            assert "set aside a malformed message at" in w.text(), w.name


def test_unknown_actions_are_refused_at_submit_and_fail_the_leaf_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    with Cluster(kafka_bootstrap, f"sqlite:///{tmp_path / 'runs.db'}", tmp_path) as c:
        open_store(c.store).close()
        c.start("actions")
        restarter = c.start("restarter")
        source = dopar([effect(1), "(action!! :nobody/serves-this {:n 2})"])
        path = tmp_path / "unknown.abl"
        path.write_text(source)
        done = c.cli("submit", str(path), *c.kafka_args(), "--store", c.store)
        assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
        assert "nobody/serves-this" in done.stderr
        assert "Traceback" not in done.stderr
        assert not c.effects(), "a refused run performed an action"
        # Straight through runs.submit (no check): the leaf fails, naming the action, once.
        with api.opened(c.store) as store:
            job = make_job(compile_source(source, None), None)
            run_id = runs.submit(c.settings, store, job)
        run = c.wait(run_id, 60)
        assert run.status is Status.FAILURE
        (leaf,) = [x for x in run.job.leaves() if x.action == "nobody/serves-this"]
        assert leaf.result is LeafState.FAILURE
        assert "unknown action nobody/serves-this" in str(leaf.error)
        assert leaf.attempt == 1
        assert c.effects() == {("effect", 1): c.effects()[("effect", 1)]}
        assert len(c.effects()[("effect", 1)]) == 1
        time.sleep(1.5)  # nothing more happens to it
        assert api.load_run(run_id, c.store).job.restarts == run.job.restarts
        assert f"run {run_id} finished: failure" in restarter.text()


def test_unreachable_broker_submit_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "p.abl"
    path.write_text("(log!! 1)")
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ablauf_lang",
            "submit",
            str(path),
            "--kafka",
            "127.0.0.1:1",
            "--store",
            store,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    took = time.monotonic() - started
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "127.0.0.1:1" in lines[0]
    assert "Traceback" not in done.stderr
    assert took < 30, f"took {took:.1f}s to say the broker is unreachable"
    assert done.stdout == ""


def test_a_worker_started_before_its_broker_tries_again_then_serves(tmp_path: Path) -> None:
    broker = Broker()  # memory storage, of this test's own: down, then up on its port
    try:
        broker.kill()
        with Cluster(broker.bootstrap, f"sqlite:///{tmp_path / 'runs.db'}", tmp_path) as c:
            open_store(c.store).close()
            worker = c.start("all", wait=False)
            c.wait_log(worker, "trying again", 30)
            assert worker.alive
            broker.start()
            c.ready(worker, 60)
            c.wait_log(worker, "restarter: partitions", 60)
            run_id = c.submit(dopar([effect(n) for n in range(10)]))
            run = c.wait(run_id, 60)
            assert run.status is Status.SUCCESS, run.failed_steps()[:3]
            exactly_once(c, range(10))
            assert "Traceback" not in worker.text()
    finally:
        broker.stop()
