"""The aggregation service's failure paths on the real broker and Redis (issue 13, item 4).

A window whose tensors cannot be read from ``fl.updates.valid`` is retried with backoff; if the records appear in
the meantime the window is applied as usual, otherwise it is *failed*: version N+1 carries version N's parameters
and says why, the failure is counted, the window's offset is committed and the service goes on with the next window
(see the docstring of ``aggregator/service.py``).
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import REGISTRY

from aggregator.service import AggregatorService
from fedguard import records
from fedguard.stack import create_topics
from tests.conftest import wait_until

pytestmark = pytest.mark.integration


def failed_count() -> float:
    return REGISTRY.get_sample_value("fedguard_aggregator_windows_total", {"outcome": "failed"}) or 0.0


def valid_end(settings) -> int:
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, client_id="fedguard-tests")
    try:
        tp = TopicPartition(settings.topics.valid, 0)
        return consumer.end_offsets([tp])[tp]
    finally:
        consumer.close()


def send_valid(settings, deltas, base_version: int, tag: str) -> list[dict]:
    """Write the deltas to partition 0 of fl.updates.valid; returns the window members naming them."""
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", max_request_size=64 << 20)
    members = []
    try:
        for i, delta in enumerate(deltas):
            meta = {"update_id": f"{tag}-{i}", "device_id": f"dev-{i:04d}", "base_version": base_version,
                    "num_samples": 50, "norm": float(np.linalg.norm(delta))}
            md = producer.send(settings.topics.valid, key=meta["device_id"].encode(), partition=0,
                               value=records.encode_valid(meta, delta.astype(np.float32))).get(timeout=30)
            members.append({**meta, "valid": {"partition": md.partition, "offset": md.offset}, "verdict": "accept",
                            "weight": 50.0})
    finally:
        producer.close()
    return members


def window(settings, base_version: int, members: list[dict], tag: str) -> dict:
    return {"window_id": f"{settings.model_id}:{base_version}:{tag}", "model_id": settings.model_id,
            "base_version": base_version, "opened_at": 0.0, "closed_at": 0.0, "closed_by": "count",
            "members": members}


def send_windows(settings, *windows: dict) -> TopicPartition:
    """Publish the windows (keyed by model id, as the processors do); returns the partition and the next offset."""
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    try:
        for w in windows:
            md = producer.send(settings.topics.windows, key=settings.model_id.encode(), value=records.dumps(w)).get(30)
    finally:
        producer.close()
    return TopicPartition(md.topic, md.partition), md.offset + 1


class Running:
    """The service's own loop (``run``) in a thread, as ``fedguard aggregator`` runs it."""

    def __init__(self, settings, attempts: int = 3, backoff_s: float = 0.05):
        self.service = AggregatorService(settings)
        self.service.FETCH_ATTEMPTS = attempts
        self.service.FETCH_BACKOFF_S = backoff_s
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.service.run(self.stop)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def __enter__(self) -> "Running":
        self.thread.start()
        wait_until(lambda: self.service.current is not None or self.errors, 60, what="version 0")
        assert not self.errors, self.errors
        return self

    def until_version(self, version: int, timeout_s: float = 120) -> None:
        wait_until(lambda: self.service.current.version >= version or self.errors, timeout_s,
                   what=f"version {version}")
        assert not self.errors, f"the service stopped: {self.errors!r}"
        assert self.thread.is_alive()

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)
        self.service.close()


def test_unreadable_windows_fail_and_the_service_applies_the_next_one(settings, caplog):
    caplog.set_level(logging.WARNING, logger="fedguard.aggregator")
    settings = settings.with_overrides(rule="fedavg")  # the expected versions below are plain means
    create_topics(settings)
    before = failed_count()
    with Running(settings) as running:
        service = running.service
        v0 = service.current
        d = v0.params.size
        rng = np.random.default_rng(1)
        good = [rng.normal(0, 0.01, d) for _ in range(3)]
        # Window A names an offset that was never written (past the end of the partition).
        members = send_valid(settings, good, 0, "a")
        members[1] = {**members[1], "valid": {"partition": 0, "offset": members[-1]["valid"]["offset"] + 10_000}}
        # Window B names a partition fl.updates.valid does not have.
        members_b = send_valid(settings, good, 1, "b")
        members_b[0] = {**members_b[0], "valid": {"partition": 97, "offset": 0}}
        # Window C is fine.
        members_c = send_valid(settings, good, 2, "c")
        tp, next_offset = send_windows(settings, window(settings, 0, members, "a"), window(settings, 1, members_b, "b"),
                                       window(settings, 2, members_c, "c"))
        running.until_version(3)

    v1, v2, v3 = (service.store.load(v) for v in (1, 2, 3))
    # A and B failed: their versions carry the parameters unchanged and say why.
    for version, words in ((v1, "past the end"), (v2, "no partition [97]")):
        info = version.meta["rule_info"]
        assert words in info["failed"] and "after 3 attempts" in info["failed"], info
        assert info["selected"] == [] and info["params_from"] == version.version - 1
        np.testing.assert_array_equal(version.params, v0.params)
    # C was applied on top: FedAvg of three equal-count deltas.
    assert "failed" not in v3.meta["rule_info"]
    expected = (v0.params.astype(np.float64) + np.mean([g.astype(np.float32) for g in good], axis=0, dtype=np.float64))
    np.testing.assert_allclose(v3.params, expected.astype(np.float32), rtol=0, atol=1e-7)
    assert failed_count() - before == 2
    # retried with backoff before giving up: attempts 1 and 2 of 3 logged for each failed window
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 4, retries
    # every window's offset was committed: a new consumer of the group starts after window C
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, client_id="fedguard-tests",
                             group_id=f"fedguard-aggregator-{settings.model_id}", enable_auto_commit=False)
    try:
        assert consumer.committed(tp) == next_offset
    finally:
        consumer.close()


def test_a_record_that_appears_during_the_backoff_is_read_on_retry(settings, caplog):
    caplog.set_level(logging.WARNING, logger="fedguard.aggregator")
    settings = settings.with_overrides(rule="fedavg")  # the expected version below is a plain mean
    create_topics(settings)
    before = failed_count()
    with Running(settings, attempts=5, backoff_s=0.5) as running:
        service = running.service
        v0 = service.current
        rng = np.random.default_rng(2)
        deltas = [rng.normal(0, 0.01, v0.params.size) for _ in range(3)]
        end = valid_end(settings)
        # The window arrives before its records (as if the broker were slow to make them visible).
        members = [{"update_id": f"late-{i}", "device_id": f"dev-{i:04d}", "base_version": 0, "num_samples": 50,
                    "norm": 0.0, "valid": {"partition": 0, "offset": end + i}, "verdict": "accept", "weight": 50.0}
                   for i in range(3)]
        send_windows(settings, window(settings, 0, members, "late"))
        wait_until(lambda: any("retrying in" in r.getMessage() for r in caplog.records), 60, what="a retry")
        written = send_valid(settings, deltas, 0, "late")
        assert [m["valid"]["offset"] for m in written] == [end, end + 1, end + 2]
        running.until_version(1, 60)
    v1 = service.store.load(1)
    assert "failed" not in v1.meta["rule_info"], v1.meta["rule_info"]
    expected = v0.params.astype(np.float64) + np.mean([x.astype(np.float32) for x in deltas], axis=0, dtype=np.float64)
    np.testing.assert_allclose(v1.params, expected.astype(np.float32), rtol=0, atol=1e-7)
    assert failed_count() == before
