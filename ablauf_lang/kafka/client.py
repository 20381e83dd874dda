"""confluent-kafka (librdkafka), as the `kafka` extra: settings, topics, reachability.

The client library is imported only here, and only when a Kafka command runs; without the
extra, `require()` raises an AblaufError naming it (the CLI prints it, exit 2).

Settings: `KafkaSettings(bootstrap, prefix=..., options={...})`; `options` are librdkafka
settings passed through unchanged (SASL, TLS, timeouts: `--kafka-option key=value` on the
command line), so a real cluster needs nothing from ablauf beyond its usual client settings.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from ablauf_lang.errors import AblaufError
from ablauf_lang.kafka.topics import DEFAULT_PREFIX, check_prefix, dead_letter_topic

log = logging.getLogger("ablauf.kafka")
# librdkafka's own log lines (a broker that does not answer is logged every few ms): kept
# out of sight, since ablauf says what matters in one line; `ABLAUF_KAFKA_DEBUG=1` shows them.
client_log = logging.getLogger("ablauf.kafka.librdkafka")
client_log.setLevel(logging.DEBUG if os.environ.get("ABLAUF_KAFKA_DEBUG") else logging.CRITICAL)

EXTRA = "pip install 'ablauf_lang[kafka]'"


class KafkaError(AblaufError):
    """The broker cannot be used: not reachable, a topic cannot be made, the extra is missing."""


def require() -> ModuleType:
    """The confluent_kafka module, or KafkaError naming the extra to install."""
    try:
        import confluent_kafka
    except ImportError:
        raise KafkaError(f"the Kafka runner needs the confluent-kafka client: {EXTRA}") from None
    return confluent_kafka


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """Where the broker is and how topics are named and made."""

    bootstrap: str
    prefix: str = DEFAULT_PREFIX
    partitions: int = 8  # of a topic this process creates
    replication: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)  # librdkafka settings
    session_timeout: float = 10.0  # seconds: a dead member's partitions move after this

    def __post_init__(self) -> None:
        if not self.bootstrap or not self.bootstrap.strip():
            raise KafkaError("--kafka needs the broker's address: HOST:PORT[,HOST:PORT...]")
        check_prefix(self.prefix)
        if self.partitions < 1:
            raise KafkaError(f"partitions must be at least 1, got {self.partitions}")

    def common(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "logger": client_log,
            "log.connection.close": False,
            "error_cb": _client_error,
        }
        out.update(self.options)
        return out

    def producer(self) -> dict[str, Any]:
        """Producer settings: every replica acknowledges, small batches, no transactions."""
        out = {"acks": "all", "linger.ms": 1, "message.timeout.ms": 60000}
        out.update(self.common())
        return out

    def consumer(self, group: str) -> dict[str, Any]:
        """Consumer settings: offsets committed by hand, only after the store write."""
        ms = int(self.session_timeout * 1000)
        out: dict[str, Any] = {
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": ms,
            "heartbeat.interval.ms": max(100, ms // 10),
            "max.poll.interval.ms": max(ms, 300000),
            "topic.metadata.refresh.interval.ms": 5000,
            # How long the broker may hold an empty fetch. A broker that answers only when
            # the wait ends (Tansu) makes this the latency of every hop; Kafka answers as
            # soon as a record arrives, so there it only sets how often an idle consumer asks.
            "fetch.wait.max.ms": 100,
        }
        out.update(self.common())
        return out


_said: dict[str, float] = {}  # a client error's text -> when it was last logged


def _client_error(err: Any) -> None:
    """librdkafka's errors (a broker that went away, all brokers down): one warning per
    kind of error every 10 s, while the client keeps trying by itself."""
    text = err.str() if hasattr(err, "str") else str(err)
    now = time.monotonic()
    if now - _said.get(text, -1e9) >= 10.0:
        _said[text] = now
        log.warning("Kafka: %s; trying again", text)


def _error_text(exc: BaseException) -> str:
    err = exc.args[0] if exc.args else exc
    text = getattr(err, "str", None)
    return str(text() if callable(text) else err)


class Admin:
    """Topic metadata and creation (AdminClient), with the names this process has seen."""

    def __init__(self, settings: KafkaSettings) -> None:
        ck = require()
        from confluent_kafka.admin import AdminClient

        self.ck = ck
        self.settings = settings
        self.client = AdminClient(settings.common())
        self.known: dict[str, int] = {}  # topic -> partitions

    def topics(self, timeout: float = 10.0) -> dict[str, int]:
        """Every topic of the cluster and its partition count (KafkaError: unreachable)."""
        try:
            meta = self.client.list_topics(timeout=timeout)
        except self.ck.KafkaException as exc:
            raise KafkaError(
                f"cannot reach the Kafka broker at {self.settings.bootstrap}: {_error_text(exc)}"
            ) from None
        found = {
            name: len(t.partitions)
            for name, t in meta.topics.items()
            if t.error is None and t.partitions
        }
        self.known.update(found)
        return found

    def partitions(self, topic: str) -> int | None:
        """The partition count of a topic, or None when it does not exist."""
        if topic not in self.known:
            self.topics()
        return self.known.get(topic)

    def ensure(self, names: Iterable[str], partitions: int | None = None) -> dict[str, int]:
        """Create the topics that are missing; return each one's partition count."""
        wanted = list(dict.fromkeys(names))
        existing = self.topics()
        missing = [n for n in wanted if n not in existing]
        if missing:
            from confluent_kafka.cimpl import NewTopic

            count = self.settings.partitions if partitions is None else partitions
            new = [NewTopic(n, count, self.settings.replication) for n in missing]
            for name, future in self.client.create_topics(new).items():
                try:
                    future.result(30)
                    log.info("created topic %s (%d partitions)", name, count)
                except self.ck.KafkaException as exc:
                    err = exc.args[0] if exc.args else None
                    code = getattr(err, "code", lambda: None)()
                    if code != self.ck.KafkaError.TOPIC_ALREADY_EXISTS:
                        raise KafkaError(
                            f"cannot create topic {name} on {self.settings.bootstrap}: "
                            f"{_error_text(exc)}"
                        ) from None
            for _ in range(50):  # metadata catches up with the creation
                existing = self.topics()
                if all(n in existing for n in missing):
                    break
                time.sleep(0.1)
        return {n: self.known.get(n, 0) for n in wanted}


def connect(
    settings: KafkaSettings,
    *,
    stop: Callable[[], bool] | None = None,
    patience: float | None = 0.0,
) -> Admin:
    """An Admin once the broker answers. `patience`: seconds to keep trying with backoff
    (None: until `stop()` says so), logging each failure; 0 fails at once (KafkaError)."""
    admin = Admin(settings)
    delay = 0.5
    started = time.monotonic()
    while True:
        try:
            admin.topics(timeout=5.0)
            return admin
        except KafkaError as exc:
            waited = time.monotonic() - started
            if patience is not None and waited >= patience:
                raise
            if stop is not None and stop():
                raise
            log.warning("%s; trying again in %.1fs", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


class Outbox:
    """A producer whose deliveries are checked: `flush()` raises KafkaError when a message
    could not be delivered (so the caller does not commit what it consumed)."""

    def __init__(self, settings: KafkaSettings) -> None:
        ck = require()
        self.settings = settings
        self.producer = ck.Producer(settings.producer())
        self.failed: list[str] = []
        self.sent = 0

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed.append(f"{msg.topic()}: {err.str() if hasattr(err, 'str') else err}")

    def send(self, topic: str, value: bytes, key: str | None = None, partition: int = -1) -> None:
        """Queue one message (delivery checked at `flush`)."""
        kwargs: dict[str, Any] = {"on_delivery": self._delivered}
        if key is not None:
            kwargs["key"] = key.encode()
        if partition >= 0:
            kwargs["partition"] = partition
        while True:
            try:
                self.producer.produce(topic, value, **kwargs)
                break
            except BufferError:  # the local queue is full: let it drain
                self.producer.poll(0.1)
        self.sent += 1
        self.producer.poll(0)

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until every queued message is acknowledged; KafkaError if any was not."""
        left = self.producer.flush(timeout)
        failed, self.failed = self.failed, []
        if left:
            raise KafkaError(f"{left} message(s) not delivered to {self.settings.bootstrap}")
        if failed:
            raise KafkaError(f"{len(failed)} message(s) not delivered: {failed[0]}")

    def set_aside(self, msg: Any, error: str) -> None:
        """Put a malformed message on the dead-letter topic, with where it came from."""
        where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
        log.error("set aside a malformed message at %s: %s", where, error)
        headers = [("ablauf-error", error.encode()), ("ablauf-from", where.encode())]
        value = msg.value() or b""
        self.producer.produce(
            dead_letter_topic(self.settings.prefix),
            value,
            key=msg.key(),
            headers=headers,
            on_delivery=self._delivered,
        )
