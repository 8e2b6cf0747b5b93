"""The aggregation service's failure paths on the real broker and Redis (issue 13, item 4).

A window whose tensors cannot be read from the update store (fedguard/updatestore.py: a file deleted by retention or
never written, a file of the wrong size, a reference that is not one) is retried with backoff; if the file appears in
the meantime the window is applied as usual, otherwise it is *failed*: version N+1 carries version N's parameters
and says why, the failure is counted, the window's offset is committed and the service goes on with the next window
(see the docstring of ``aggregator/service.py``).

Nothing is written on ``fl.updates.valid`` here and the members' ``valid`` positions name no record: the aggregator
reads only the store.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import REGISTRY

from aggregator.auditing import LOOKBACK_WINDOWS
from aggregator.service import AggregatorService
from fedguard import records
from fedguard.stack import create_topics
from fedguard.updatestore import UpdateStore, keep_from
from tests.conftest import wait_until

pytestmark = pytest.mark.integration


def failed_count() -> float:
    return REGISTRY.get_sample_value("fedguard_aggregator_windows_total", {"outcome": "failed"}) or 0.0


def store_updates(settings, deltas, base_version: int, tag: str) -> list[dict]:
    """Write the deltas to the update store the services share, as the validator does; returns the window members
    naming them (their ``valid`` position is past anything on the topic: it must not be read)."""
    store = UpdateStore(settings.update_store_dir)
    members = []
    for i, delta in enumerate(deltas):
        meta = {"update_id": f"{tag}-{i}", "device_id": f"dev-{i:04d}", "base_version": base_version,
                "num_samples": 50, "norm": float(np.linalg.norm(delta))}
        ref = store.put(settings.model_id, base_version, meta["device_id"], delta.astype(np.float32))
        members.append({**meta, "valid": {"partition": 0, "offset": 10_000_000 + i}, "tensor": ref,
                        "verdict": "accept", "weight": 50.0})
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
    settings = settings.with_overrides(rule="fedavg", max_staleness=0)  # plain means; retention keeps v - 2 on
    create_topics(settings)
    store = UpdateStore(settings.update_store_dir)
    before = failed_count()
    with Running(settings) as running:
        service = running.service
        v0 = service.current
        d = v0.params.size
        rng = np.random.default_rng(1)
        good = [rng.normal(0, 0.01, d) for _ in range(3)]
        # Window A names a tensor that was never written.
        members_a = store_updates(settings, good, 0, "a")
        never = f"{settings.model_id}/0/dev-0001.0123456789abcdef.f32"
        members_a[1] = {**members_a[1], "tensor": never}
        # Window B names a tensor that was written, then deleted (as retention does).
        members_b = store_updates(settings, good, 1, "b")
        deleted = members_b[2]["tensor"]
        os.remove(settings.update_store_dir / deleted)
        # Window C names a tensor of another size than the model's.
        members_c = store_updates(settings, good, 2, "c")
        short = store.put(settings.model_id, 2, "dev-0000", np.zeros(d - 1, np.float32))
        members_c[0] = {**members_c[0], "tensor": short}
        # Window D has a member that names no tensor at all (the format before the update store).
        members_d = store_updates(settings, good, 3, "d")
        members_d[0] = {k: v for k, v in members_d[0].items() if k != "tensor"}
        # Window E names a reference that would leave the store.
        members_e = store_updates(settings, good, 4, "e")
        members_e[1] = {**members_e[1], "tensor": f"{settings.model_id}/4/../../../x.f32"}
        # Window F is fine.
        members_f = store_updates(settings, good, 5, "f")
        tp, next_offset = send_windows(settings, *(window(settings, base, members, tag) for base, members, tag in (
            (0, members_a, "a"), (1, members_b, "b"), (2, members_c, "c"), (3, members_d, "d"), (4, members_e, "e"),
            (5, members_f, "f"))))
        running.until_version(6)

    versions = [service.store.load(v) for v in range(1, 7)]
    # A to E failed: their versions carry the parameters unchanged and say why.
    for version, words in zip(versions, (f"no update tensor {never!r}", f"no update tensor {deleted!r}",
                                         f"update tensor {short!r} holds {4 * (d - 1)} bytes",
                                         "member 'd-0' names no tensor", "is not an update store reference")):
        info = version.meta["rule_info"]
        assert words in info["failed"] and "after 3 attempts" in info["failed"], info
        assert info["selected"] == [] and info["params_from"] == version.version - 1
        np.testing.assert_array_equal(version.params, v0.params)
    # F was applied on top: FedAvg of three equal-count deltas, read from the store.
    v6 = versions[-1]
    assert "failed" not in v6.meta["rule_info"] and v6.meta["window_id"].endswith(":f")
    expected = (v0.params.astype(np.float64) + np.mean([g.astype(np.float32) for g in good], axis=0, dtype=np.float64))
    np.testing.assert_allclose(v6.params, expected.astype(np.float32), rtol=0, atol=1e-7)
    assert failed_count() - before == 5
    # retried with backoff before giving up: attempts 1 and 2 of 3 logged for each failed window
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 10, retries
    # every window's offset was committed: a new consumer of the group starts after window F
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, client_id="fedguard-tests",
                             group_id=f"fedguard-aggregator-{settings.model_id}", enable_auto_commit=False)
    try:
        assert consumer.committed(tp) == next_offset
    finally:
        consumer.close()
    # Retention after version 6: the tensors of base versions below keep_from(6, 0 + LOOKBACK_WINDOWS) are deleted
    # (the audit's look-back reads the last LOOKBACK_WINDOWS served windows), the rest kept.
    first = keep_from(6, 0 + LOOKBACK_WINDOWS)
    assert first == max(0, 6 - LOOKBACK_WINDOWS - 2)
    assert sorted(os.listdir(settings.update_store_dir / settings.model_id)) == [str(v) for v in range(first, 6)]
    np.testing.assert_array_equal(store.get(members_f[0]["tensor"], d), good[0].astype(np.float32))


def test_a_tensor_that_appears_during_the_backoff_is_read_on_retry(settings, caplog):
    caplog.set_level(logging.WARNING, logger="fedguard.aggregator")
    settings = settings.with_overrides(rule="fedavg")  # the expected version below is a plain mean
    create_topics(settings)
    before = failed_count()
    with Running(settings, attempts=5, backoff_s=0.5) as running:
        service = running.service
        v0 = service.current
        rng = np.random.default_rng(2)
        deltas = [rng.normal(0, 0.01, v0.params.size) for _ in range(3)]
        members = store_updates(settings, deltas, 0, "late")
        # The window arrives before its tensors are visible (as on shared storage slow to show a new file).
        paths = [settings.update_store_dir / m["tensor"] for m in members]
        for path in paths:
            os.replace(path, path.with_name(path.name + ".hidden"))
        send_windows(settings, window(settings, 0, members, "late"))
        wait_until(lambda: any("retrying in" in r.getMessage() for r in caplog.records), 60, what="a retry")
        assert service.current.version == 0
        for path in paths:
            os.replace(path.with_name(path.name + ".hidden"), path)
        running.until_version(1, 60)
    v1 = service.store.load(1)
    assert "failed" not in v1.meta["rule_info"], v1.meta["rule_info"]
    expected = v0.params.astype(np.float64) + np.mean([x.astype(np.float32) for x in deltas], axis=0, dtype=np.float64)
    np.testing.assert_allclose(v1.params, expected.astype(np.float32), rtol=0, atol=1e-7)
    assert failed_count() == before
