"""The Kafka runner in one process: a restarter and an action worker (threads) on a real
broker (Tansu) and a real SQLite file store. Runs end as they do in process; a dispatch
delivered twice performs a non-idempotent action once; a claim whose worker died reports
the attempt interrupted; timers, signals and retries' waits work; bad messages are set
aside. The many-process fault tests are in test_kafka_faults.py."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer

from ablauf_lang import api
from ablauf_lang.codec.records import encode_dispatch_message
from ablauf_lang.engine.job import make_job
from ablauf_lang.engine.nodes import Dispatch
from ablauf_lang.errors import AblaufError
from ablauf_lang.kafka import runs
from ablauf_lang.kafka.client import KafkaError
from ablauf_lang.kafka.topics import action_topic, partition_of, restarter_topic
from ablauf_lang.lang.compiler import compile_source
from ablauf_lang.stores.backend import open_store
from tests.kafka import FAST_GROUP

pytestmark = pytest.mark.timeout(120)


class Effects:
    """What the actions did, in order (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[Any] = []
        self.fail: set[Any] = set()

    def act(self, payload: Any, context: Any) -> Any:
        with self.lock:
            self.calls.append(payload)
        if payload in self.fail:
            raise RuntimeError(f"failing on {payload}")
        return {"got": payload}

    def count(self, payload: Any) -> int:
        with self.lock:
            return self.calls.count(payload)


class Cluster:
    """A broker, a store file, and workers started on demand (each its own prefix)."""

    def __init__(self, bootstrap: str, tmp: Path) -> None:
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        self.settings = api.kafka_settings(
            bootstrap, prefix=self.prefix, options=FAST_GROUP, session_timeout=6.0
        )
        self.url = f"sqlite:///{tmp / 'runs.db'}"
        self.store = open_store(self.url)
        self.effects = Effects()
        self.stops: list[threading.Event] = []
        self.threads: list[threading.Thread] = []

    def start(self, role: str = "all", **kw: Any) -> threading.Event:
        stop = threading.Event()
        actions = {"t/act": self.effects.act}
        thread = threading.Thread(
            target=api.serve_kafka,
            args=(self.settings, self.url),
            kwargs={"role": role, "actions": actions, "stop": stop, "poll": 0.2, **kw},
            daemon=True,
        )
        thread.start()
        self.stops.append(stop)
        self.threads.append(thread)
        self.wait_for_topic(action_topic(self.prefix, "t/act") if role != "restarter" else None)
        return stop

    def wait_for_topic(self, topic: str | None) -> None:
        from ablauf_lang.kafka.client import Admin

        admin = Admin(self.settings)
        ends = time.monotonic() + 20
        while topic is not None and admin.partitions(topic) is None:
            assert time.monotonic() < ends, f"no topic {topic}"
            time.sleep(0.1)

    def submit(self, source: str, context: dict[str, Any] | None = None) -> str:
        return api.submit_kafka(source, self.store, self.settings, context=context)

    def wait(self, run_id: str, seconds: float = 60) -> Any:
        run = api.wait_any(run_id, self.url, timeout=seconds, poll=0.05)
        assert run.status != "pending", f"run {run_id} did not end in {seconds}s"
        return run

    def close(self) -> None:
        for stop in self.stops:
            stop.set()
        for thread in self.threads:
            thread.join(30)
        self.store.close()


@pytest.fixture
def cluster(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(kafka_bootstrap, tmp_path)
    try:
        yield c
    finally:
        c.close()


def _consume_all(bootstrap: str, topic: str, seconds: float = 10) -> list[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"check-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
            **FAST_GROUP,
        }
    )
    consumer.subscribe([topic])
    got = []
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            got.append(msg)
        elif got:
            break
    consumer.close()
    return got


def test_a_run_ends_with_every_effect_once(cluster: Cluster) -> None:
    cluster.start()
    source = """
    (do!! (action!! :t/act 1)
          (dopar!! (action!! :t/act 2) (idempotent-action!! :t/act 3)
                   (with-augment [[:got] [:four]] (action!! :t/act 4)))
          (log!! (ctx :four)))
    """
    run = cluster.wait(cluster.submit(source))
    assert run.status == "success"
    assert sorted(cluster.effects.calls) == [1, 2, 3, 4]
    assert run.context["four"] == 4
    info = cluster.store.info(run.run_id)
    assert info.status == "success"
    assert info.restarts >= 3


def test_failures_rescue_finally_and_a_persons_retry(cluster: Cluster) -> None:
    cluster.start()
    cluster.effects.fail.add("boom")
    source = """
    (do!! (try!! (action!! :t/act "boom")
                 (rescue!! (action!! :t/act "rescued"))
                 (finally!! (action!! :t/act "finally")))
          (action!! :t/act "boom"))
    """
    run = cluster.wait(cluster.submit(source))
    assert run.status == "failure"
    assert cluster.effects.calls == ["boom", "rescued", "finally", "boom"]
    cluster.effects.fail.clear()
    api.wake_kafka(run.run_id, cluster.store, cluster.settings, retry=True)
    again = cluster.wait(run.run_id)
    assert again.status == "success", again.failed_steps()
    assert cluster.effects.calls[-1] == "boom"
    assert cluster.effects.count("boom") == 3


def test_sleeps_retry_waits_and_signals(cluster: Cluster) -> None:
    cluster.start()
    cluster.effects.fail.add("flaky")
    source = """
    (do!! (sleep!! 0.3)
          (dopar!! (try!! (action!! :t/act "flaky" {:retry {:max 3 :delay 0.2}})
                          (rescue!! (action!! :t/act "gave up")))
                   (with-augment [[] [:approved]] (await!! :approve)))
          (await!! :never {:timeout 0.5}))
    """
    started = time.monotonic()
    run_id = cluster.submit(source)
    time.sleep(0.5)
    api.signal(run_id, "approve", {"by": "ann"}, cluster.store)
    run = cluster.wait(run_id)
    assert run.status == "failure"  # the last await ran out of time
    assert "no signal never" in str(run.context.get("exec/last-error"))
    assert cluster.effects.count("flaky") == 3
    assert cluster.effects.count("gave up") == 1
    assert run.context["approved"] == {"by": "ann"}
    assert time.monotonic() - started >= 0.3 + 0.2 + 0.4


def test_a_dispatch_delivered_twice_runs_a_non_idempotent_action_once(cluster: Cluster) -> None:
    # Only a restarter at first: its dispatch waits on the action topic.
    cluster.start("restarter")
    worker_topic = action_topic(cluster.prefix, "t/act")
    from ablauf_lang.kafka.client import Admin

    Admin(cluster.settings).ensure([worker_topic])
    run_id = cluster.submit("(action!! :t/act 7)")
    time.sleep(1.0)
    # A second copy of the same dispatch (a redelivery or a restarter's duplicate).
    producer = Producer({"bootstrap.servers": cluster.settings.bootstrap})
    d = Dispatch(0, "t/act", 7, False, 1)
    for _ in range(2):
        producer.produce(worker_topic, encode_dispatch_message(run_id, d), key=run_id)
    producer.flush(10)
    cluster.start("actions")
    run = cluster.wait(run_id)
    assert run.status == "success"
    time.sleep(1.0)  # the copies are handled too
    assert cluster.effects.count(7) == 1


def test_an_attempt_claimed_by_a_dead_worker_is_reported_interrupted(cluster: Cluster) -> None:
    cluster.start("restarter")
    from ablauf_lang.kafka.client import Admin

    Admin(cluster.settings).ensure([action_topic(cluster.prefix, "t/act")])
    run_id = cluster.submit("(do!! (action!! :t/act 8) (action!! :t/act 9))")
    time.sleep(0.5)
    # A worker that died after claiming node 1's first attempt: its lease runs out.
    node = next(leaf.id for leaf in cluster.store.load(run_id).job.leaves() if leaf.payload == 8)
    claim = cluster.store.begin_attempts([(run_id, node, 1)], "dead-worker", 0.05)
    assert claim[0].state == "new"
    time.sleep(0.2)
    cluster.start("actions")
    run = cluster.wait(run_id)
    assert run.status == "failure"
    assert str(run.failed_steps()[0]["error"]).startswith("interrupted: ")
    assert cluster.effects.count(8) == 0
    assert cluster.effects.count(9) == 0


def test_an_action_no_worker_serves(cluster: Cluster) -> None:
    cluster.start()
    with pytest.raises(KafkaError, match="no worker serves t/missing"):
        cluster.submit("(action!! :t/missing 1)")
    # Started anyway (bypassing the check): the leaf fails naming the action, once.
    job = make_job(compile_source("(try!! (action!! :t/missing 1) (rescue!! (log!! 1)))"))
    run_id = runs.submit(cluster.settings, cluster.store, job)
    run = cluster.wait(run_id)
    assert run.status == "success"
    failed = [leaf for leaf in run.job.leaves() if leaf.action == "t/missing"]
    assert "unknown action t/missing" in str(failed[0].error)


def test_malformed_messages_are_set_aside(cluster: Cluster) -> None:
    cluster.start()
    producer = Producer({"bootstrap.servers": cluster.settings.bootstrap})
    rtopic = restarter_topic(cluster.prefix)
    producer.produce(rtopic, b"{not json", key=b"x", partition=0)
    producer.produce(rtopic, b'{"v": 99, "type": "result", "run_id": "r"}', partition=1)
    producer.produce(action_topic(cluster.prefix, "t/act"), b"[1, 2]")
    producer.flush(10)
    run = cluster.wait(cluster.submit("(dopar!! (action!! :t/act 1) (action!! :t/act 2))"))
    assert run.status == "success"
    dead = _consume_all(cluster.settings.bootstrap, f"{cluster.prefix}.dead-letters")
    assert sorted(m.value() for m in dead) == sorted(
        [b"{not json", b'{"v": 99, "type": "result", "run_id": "r"}', b"[1, 2]"]
    )
    errors = [dict(m.headers())["ablauf-error"].decode() for m in dead]
    assert any("not JSON" in e for e in errors)
    assert any("version" in e for e in errors)


def test_topic_names_and_partitions() -> None:
    assert action_topic("ablauf", "git/push") == "ablauf.action.git.push"
    assert action_topic("ablauf", "a.b/c") != action_topic("ablauf", "a/b.c")
    odd = action_topic("p", "weird name/with*stars?")
    assert odd.startswith("p.action.weird_name.with_stars_-")
    assert len(action_topic("p", "x/" + "y" * 400)) <= 249
    assert {partition_of(f"run-{i}", 8) for i in range(100)} == set(range(8))
    assert partition_of("abc", 8) == partition_of("abc", 8)
    with pytest.raises(AblaufError, match="bad Kafka topic prefix"):
        api.kafka_settings("127.0.0.1:9092", prefix="bad prefix")


def test_an_unreachable_broker_is_one_clear_error(tmp_path: Path) -> None:
    settings = api.kafka_settings("127.0.0.1:1")
    started = time.monotonic()
    with pytest.raises(KafkaError, match=r"cannot reach the Kafka broker at 127\.0\.0\.1:1"):
        api.submit_kafka("(log!! 1)", f"sqlite:///{tmp_path / 'r.db'}", settings)
    assert time.monotonic() - started < 15
    assert not open_store(f"sqlite:///{tmp_path / 'r.db'}").list_runs()  # nothing recorded


def _cli(*args: str, without_client: bool = False) -> subprocess.CompletedProcess[str]:
    prelude = "import sys; sys.modules['confluent_kafka'] = None; " if without_client else ""
    code = prelude + "from ablauf_lang.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )


def test_the_command_line_says_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'r.db'}"
    cases = [
        (
            ["worker", "--kafka", "127.0.0.1:1", "--store", store],
            True,
            "needs the confluent-kafka client: pip install 'ablauf_lang[kafka]'",
        ),
        (
            ["submit", "examples/hello.abl", "--kafka", "127.0.0.1:1", "--store", store],
            True,
            "pip install 'ablauf_lang[kafka]'",
        ),
        (["worker", "--role", "actions", "--store", store], False, "need --kafka"),
        (
            ["worker", "--kafka", "127.0.0.1:1", "--only", "nope/x", "--store", store],
            False,
            "--only nope/x: no such action",
        ),
        (
            ["submit", "examples/hello.abl", "--kafka", "127.0.0.1:1", "--store", store],
            False,
            "cannot reach the Kafka broker at 127.0.0.1:1",
        ),
        (
            ["worker", "--kafka", "x:1", "--kafka-option", "nokey", "--store", store],
            False,
            "expected KEY=VALUE",
        ),
        (["submit", "examples/hello.abl", "--kafka-prefix", "p"], False, "need --kafka"),
    ]
    for args, without, words in cases:
        done = _cli(*args, without_client=without)
        assert done.returncode == 2, (args, done.stderr)
        assert words in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert done.stderr.count("\n") == 1, done.stderr


def test_submit_and_wait_on_the_command_line(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start()
    program = tmp_path / "p.abl"
    program.write_text("(do!! (action!! :t/act 1) (log!! (ctx :x)))")
    args = ["--kafka", cluster.settings.bootstrap, "--kafka-prefix", cluster.prefix]
    done = _cli(
        "submit", str(program), "--store", cluster.url, *args, "--context", '{"x": 5}', "--wait"
    )
    assert done.returncode == 0, done.stderr
    assert "success" in done.stdout
    missing = tmp_path / "m.abl"
    missing.write_text("(action!! :t/other 1)")
    refused = _cli("submit", str(missing), "--store", cluster.url, *args)
    assert refused.returncode == 2
    assert "no worker serves t/other" in refused.stderr
