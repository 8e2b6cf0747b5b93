"""Reading topics from their beginning without a consumer group: what the fleet, the demo, the CLI, the attack
injector and the tests all need.

This broker reports end offsets wrongly (BROKER.md), so "read everything" means reading until nothing new arrives.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from fedguard.settings import Settings


def consumer_from_beginning(settings: Settings, topics: Iterable[str], client_id: str,
                            **config: Any) -> KafkaConsumer:
    """A group-less consumer assigned every partition of ``topics`` (partition 0 of a topic whose metadata lists
    none yet) and positioned at the beginning of each."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, client_id=client_id,
                             enable_auto_commit=False, **config)
    _assign_from_beginning(consumer, {topic: consumer.partitions_for_topic(topic) or {0} for topic in topics})
    return consumer


def _assign_from_beginning(consumer: KafkaConsumer, partitions: dict[str, Iterable[int]]) -> None:
    tps = [TopicPartition(topic, p) for topic, ps in partitions.items() for p in sorted(ps)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)


def read_until_idle(settings: Settings, topic: str, idle_s: float, *, timeout_s: float | None = None,
                    client_id: str = "fedguard-reader", **config: Any) -> list:
    """Every record of ``topic`` from the beginning, read until nothing new arrives for ``idle_s`` (or
    ``timeout_s`` passes). An unknown topic reads as empty."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, client_id=client_id,
                             enable_auto_commit=False, **config)
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return []
        _assign_from_beginning(consumer, {topic: partitions})
        out, last_new = [], time.monotonic()
        deadline = None if timeout_s is None else last_new + timeout_s
        while time.monotonic() - last_new < idle_s and (deadline is None or time.monotonic() < deadline):
            for messages in consumer.poll(timeout_ms=300).values():
                out.extend(messages)
                last_new = time.monotonic()
        return out
    finally:
        consumer.close()
