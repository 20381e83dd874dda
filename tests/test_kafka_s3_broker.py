"""The test broker with S3 storage survives a crash: after a SIGKILL and a start on the
same port, its topics, records and a group's committed offsets are all still there, so a
new member of the group resumes where the last commit left off. The ground the Kafka
runner's restart tests stand on."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from tests.kafka import FAST_GROUP, Broker

PARTITIONS = 3
TOTAL = 300
FIRST = 100


def _consume(consumer: Consumer, want: int, seconds: float = 20) -> list[int]:
    """Up to `want` values, each committed as soon as it is read."""
    got: list[int] = []
    deadline = time.monotonic() + seconds
    while len(got) < want and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None or message.error():
            continue
        got.append(int(message.value().decode()))
        consumer.commit(message, asynchronous=False)
    return got


def _drain(consumer: Consumer, seconds: float = 3) -> list[int]:
    """Whatever else arrives in `seconds` (nothing, when no message is read twice)."""
    extra: list[int] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = consumer.poll(0.2)
        if message is not None and not message.error():
            extra.append(int(message.value().decode()))
    return extra


def test_topics_and_committed_offsets_survive_a_broker_kill(kafka_s3_broker: Broker) -> None:
    broker = kafka_s3_broker
    topic = f"t-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS)]).values():
        future.result(10)
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(TOTAL):
        producer.produce(topic, key=f"run-{i % 7}", value=str(i))
    assert producer.flush(10) == 0
    settings = {
        "bootstrap.servers": broker.bootstrap,
        "group.id": f"g-{topic}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        **FAST_GROUP,
    }
    first = Consumer(settings)
    first.subscribe([topic])
    before = _consume(first, FIRST)
    first.close()
    assert len(before) == FIRST

    broker.kill()
    broker.start()

    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    topics = admin.list_topics(timeout=10).topics
    assert topic in topics
    assert len(topics[topic].partitions) == PARTITIONS
    second = Consumer(settings)
    second.subscribe([topic])
    after = _consume(second, TOTAL - FIRST)
    after += _drain(second)
    assert sorted(before + after) == list(range(TOTAL))  # none lost, none read twice

    producer = Producer({"bootstrap.servers": broker.bootstrap})
    producer.produce(topic, key="run-0", value=str(TOTAL))
    assert producer.flush(10) == 0
    assert _consume(second, 1) == [TOTAL]
    second.close()


def test_live_clients_carry_on_across_a_broker_kill(kafka_s3_broker: Broker) -> None:
    broker = kafka_s3_broker
    topic = f"t-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS)]).values():
        future.result(10)
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    consumer = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": f"g-{topic}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            **FAST_GROUP,
        }
    )
    consumer.subscribe([topic])
    for i in range(50):
        producer.produce(topic, key=f"run-{i % 7}", value=str(i))
    assert producer.flush(10) == 0
    before = _consume(consumer, 50)
    assert len(before) == 50

    broker.kill()
    broker.start()

    for i in range(50, 100):
        producer.produce(topic, key=f"run-{i % 7}", value=str(i))
    assert producer.flush(20) == 0
    after = _consume(consumer, 50, seconds=30)
    consumer.close()
    assert sorted(before + after) == list(range(100))


def test_storage_is_memory_or_s3() -> None:
    broker = Broker()
    try:
        assert broker.storage == "memory"
        assert broker.s3 is None
    finally:
        broker.stop()
    with pytest.raises(ValueError, match="storage must be"):
        Broker(storage="disk")
