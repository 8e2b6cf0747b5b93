"""Hostile traffic through the real broker (issue 3, items 4 and 6).

More than 10,000 malformed records of every kind in tests/hostile.py, mixed at random with honest updates from 40
devices and a flood of authentic updates from one device, go to ``fl.updates.raw``; one Faust worker validates
them. Afterwards: the worker is alive, every raw record ended exactly once on ``fl.updates.valid`` or
``fl.updates.rejected`` (by raw position), every honest update was accepted, every malformed record got its reason
code, the flooding device was cut off with ``rate_limited`` and reported once on ``fl.events``.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import numpy as np
import pytest
from kafka import KafkaProducer

from fedguard import registry
from fedguard.records import loads
from fedguard.stack import EmbeddedStack
from fedguard.tasks import load_task, model_spec
from fedguard.topicio import consumer_from_beginning
from fedguard.updatestore import UpdateStore
from tests.conftest import json_values, read_topic
from tests.hostile import AUTHENTIC, MALFORMED, Fleet

pytestmark = pytest.mark.integration

MALFORMED_COUNT = 10_200
HONEST = [f"h-{i:02d}" for i in range(40)]
HOSTILE = [f"x-{i:02d}" for i in range(20)]
ROUNDS = 12  # honest updates per honest device
FLOOD = 200  # authentic updates from the flooding device, as fast as the producer sends them


def consume_until(settings, total: int, timeout_s: float) -> tuple[list, list]:
    """Read the valid and rejected topics from the beginning until they hold ``total`` records together."""
    consumer = consumer_from_beginning(settings, (settings.topics.valid, settings.topics.rejected),
                                       "fedguard-tests", max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20)
    valid, rejected = [], []
    deadline = time.monotonic() + timeout_s
    try:
        while len(valid) + len(rejected) < total and time.monotonic() < deadline:
            for tp, messages in consumer.poll(timeout_ms=500).items():
                (valid if tp.topic == settings.topics.valid else rejected).extend(messages)
        return valid, rejected
    finally:
        consumer.close()


def test_ten_thousand_malformed_records_among_honest_ones(settings):
    # Honest devices send one update per base version (one seat per window), ROUNDS versions within the staleness.
    settings = settings.with_overrides(num_devices=1, window_size=40, max_update_norm=100.0, max_staleness=ROUNDS)
    n = model_spec(load_task("synthetic")).num_params
    rng = random.Random(3)
    with EmbeddedStack(settings, services=("processors",), own_broker=False, own_redis=False) as stack:
        fleet = Fleet(settings, n)
        fleet.redis.set(registry.model_version_key(settings), ROUNDS - 1)
        for device in HONEST + HOSTILE + ["flood"]:
            fleet.enroll(device)

        honest = [(d.encode(), fleet.seal(d, base=r), None) for r in range(ROUNDS) for d in HONEST]
        flood = [(b"flood", fleet.seal("flood"), "flood") for _ in range(FLOOD)]
        kinds = sorted(MALFORMED)
        hostile = []
        for i in range(MALFORMED_COUNT):
            kind = kinds[i % len(kinds)]
            key, value = MALFORMED[kind][0](fleet, HOSTILE[i % len(HOSTILE)])
            hostile.append((key, value, kind))
        # Honest and flood records keep their order per device (sequence numbers increase); the rest is shuffled
        # between them.
        ordered = honest + flood
        mixed = hostile + ordered
        slots = sorted(rng.sample(range(len(mixed)), len(ordered)))
        rng.shuffle(hostile)
        stream, h, o = [], iter(hostile), iter(ordered)
        slot_set = set(slots)
        for i in range(len(mixed)):
            stream.append(next(o) if i in slot_set else next(h))

        started = time.monotonic()
        producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=20,
                                 batch_size=1 << 20, max_request_size=8 << 20)
        futures = [(producer.send(settings.topics.raw, key=key, value=value), kind) for key, value, kind in stream]
        producer.flush(timeout=120)
        sent = {}
        for future, kind in futures:
            md = future.get(timeout=60)
            sent[(md.partition, md.offset)] = kind
        producer.close()

        valid, rejected = consume_until(settings, len(sent), timeout_s=300)
        elapsed = time.monotonic() - started
        assert stack.check_alive() == [], f"the worker died; see {stack.log_dir}"
        events = json_values(read_topic(settings, settings.topics.events, idle_s=1.0))

    assert len(sent) == len(stream) >= MALFORMED_COUNT + len(ordered)
    # Conservation: every raw record exactly once, in valid or rejected, by raw position.
    outcomes: dict[tuple[int, int], list[str]] = {}
    store = UpdateStore(settings.update_store_dir)  # where the worker wrote the valid tensors
    refs = []
    for message in valid:
        meta = loads(message.value)
        tensor = store.get(meta["tensor"], n)
        assert tensor.shape == (n,) and np.isfinite(tensor).all()
        refs.append(meta["tensor"])
        outcomes.setdefault((meta["raw"]["partition"], meta["raw"]["offset"]), []).append("ok")
    # One tensor in the store per valid record, none for the 10,000 rejected ones.
    assert len(set(refs)) == len(refs) == len(list(settings.update_store_dir.rglob("*.f32")))
    for record in json_values(rejected):
        outcomes.setdefault((record["raw"]["partition"], record["raw"]["offset"]), []).append(record["reason"])
    assert sorted(outcomes) == sorted(sent)
    assert all(len(v) == 1 for v in outcomes.values()), [v for v in outcomes.values() if len(v) > 1][:5]

    got = {pos: reasons[0] for pos, reasons in outcomes.items()}
    by_kind: dict[str | None, Counter] = {}
    for pos, kind in sent.items():
        by_kind.setdefault(kind, Counter())[got[pos]] += 1
    # Every honest update accepted.
    assert by_kind[None] == Counter({"ok": len(honest)}), by_kind[None]
    # Every malformed record with its code; authentic ones may find their device's bucket empty first.
    for kind, counts in by_kind.items():
        if kind in (None, "flood"):
            continue
        allowed = {MALFORMED[kind][1]} | ({"rate_limited"} if kind in AUTHENTIC else set())
        assert set(counts) <= allowed, (kind, counts)
    assert "internal_error" not in Counter(got.values())
    # The flood (one device, one base version): one seat in the window, the rest of a burst of capacity and a
    # trickle after it refused as window duplicates, the rest rate limited; reported once.
    assert by_kind["flood"]["ok"] == 1
    assert set(by_kind["flood"]) <= {"ok", "window_duplicate", "rate_limited"}
    admitted = by_kind["flood"]["ok"] + by_kind["flood"]["window_duplicate"]
    assert settings.rate_device_capacity <= admitted <= settings.rate_device_capacity + \
        settings.rate_device_refill_per_s * (elapsed + 5)
    flood_events = [e for e in events if e["device_id"] == "flood"]
    assert len(flood_events) == 1 and flood_events[0]["type"] == "rate_limited"
    assert {"type", "device_id", "reason", "detail", "at", "raw"} <= set(flood_events[0])
    print(f"\n{len(sent)} raw records ({len(honest)} honest, {FLOOD} flood) sent and validated in {elapsed:.1f}s; "
          f"reasons: {dict(Counter(got.values()).most_common())}")
