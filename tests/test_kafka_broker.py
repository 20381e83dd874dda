"""The test broker is a real Kafka-protocol broker: topics, keyed partitions, consumer
groups with committed offsets, seen through confluent-kafka (the client the Kafka runner
uses). The ground the Kafka runner (issue 14) stands on."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from tests.kafka import FAST_GROUP


def _topic(bootstrap: str, partitions: int) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, num_partitions=partitions)]).values():
        future.result(10)
    return name


def _consume(consumer: Consumer, want: int, seconds: float = 30) -> list[tuple[str, str]]:
    got: list[tuple[str, str]] = []
    deadline = time.monotonic() + seconds
    while len(got) < want and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None or message.error():
            continue
        got.append((message.key().decode(), message.value().decode()))
        consumer.commit(message, asynchronous=False)
    return got


def test_keyed_messages_stay_in_order_and_committed_offsets_hold(kafka_bootstrap: str) -> None:
    topic = _topic(kafka_bootstrap, 3)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(60):
        producer.produce(topic, key=f"run-{i % 4}", value=str(i))
    assert producer.flush(10) == 0
    settings = {
        "bootstrap.servers": kafka_bootstrap,
        "group.id": f"g-{topic}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        **FAST_GROUP,
    }
    first = Consumer(settings)
    first.subscribe([topic])
    got = _consume(first, 40)
    first.close()  # leaves the group: the rest goes to the next member
    second = Consumer(settings)
    second.subscribe([topic])
    rest = _consume(second, 60 - len(got))
    second.close()
    seen = got + rest
    assert sorted(int(v) for _, v in seen) == list(range(60))  # each once: offsets held
    for key in {k for k, _ in seen}:
        values = [int(v) for k, v in seen if k == key]
        assert values == sorted(values)  # one key, one partition, in order
