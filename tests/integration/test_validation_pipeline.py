"""The Faust validation and window stages on the real broker and a real Redis.

Every kind of bad record goes in between valid ones; each must come out on the dead-letter topic with its own
reason code, every valid update must come out on the valid topic (its tensor in the update store, exactly as sent),
and every raw record exactly once.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from kafka import KafkaProducer

from fedguard import cli, envelope, registry
from fedguard.codec import encode_tensor
from fedguard.envelope import UpdateHeader
from fedguard.keys import private_from_hex, public_from_hex
from fedguard.records import loads
from fedguard.settings import to_env
from fedguard.stack import EmbeddedStack
from fedguard.tasks import load_task, model_spec
from fedguard.updatestore import UpdateStore
from producers.inject import flip_bit
from producers.keystore import Keystore
from tests.conftest import json_values, read_topic, wait_until

pytestmark = pytest.mark.integration


class Sender:
    def __init__(self, settings):
        self.settings = settings
        self.redis = registry.connect(settings)
        server_public = public_from_hex(self.redis.get(registry.server_public_key(settings)))
        store = Keystore.load(settings.keystore_path)
        self.keys = {d: envelope.derive_key(private_from_hex(k.private_key), server_public, d)
                     for d, k in store.devices.items()}
        self.keys["dev-9999"] = envelope.derive_key(X25519PrivateKey.generate(), server_public, "dev-9999")
        self.producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        self.sent: list[tuple[tuple[int, int], str | None]] = []  # raw position, expected reason (None: valid)
        self.tensors: dict[tuple[int, int], np.ndarray] = {}  # raw position -> the tensor of a valid update

    def seal(self, device, seq, tensor, base=0, samples=50, codec="fgt1"):
        header = UpdateHeader.new(device_id=device, seq=seq, base_version=base, num_samples=samples,
                                  model_id=self.settings.model_id, codec=codec)
        return envelope.seal(header, encode_tensor(tensor), self.keys[device])

    def send(self, value, expected, key, tensor=None):
        md = self.producer.send(self.settings.topics.raw, key=key, value=value).get(timeout=30)
        self.sent.append(((md.partition, md.offset), expected))
        if tensor is not None:
            self.tensors[(md.partition, md.offset)] = tensor
        return value


def test_every_record_ends_valid_or_rejected_with_its_reason(settings, monkeypatch, capsys):
    settings = settings.with_overrides(num_devices=4, window_size=3, max_update_norm=1000.0)
    stack = EmbeddedStack(settings, services=("processors",), own_broker=False, own_redis=False)
    with stack:
        redis = registry.connect(settings)
        redis.set(registry.model_version_key(settings), 0)  # as the aggregator does when it publishes v0
        n = model_spec(load_task("synthetic")).num_params
        rng = np.random.default_rng(0)
        good = lambda: rng.normal(0, 0.01, n).astype(np.float32)  # noqa: E731
        s = Sender(settings)
        t0, t1, t2 = good(), good(), good()
        first = s.send(s.seal("dev-0000", 1, t0), None, b"dev-0000", t0)
        second = s.seal("dev-0001", 1, t1)
        s.send(second, None, b"dev-0001", t1)
        s.send(first, "replay", b"dev-0000")
        s.send(flip_bit(second, len(second) - 20), "auth_failed", b"dev-0001")
        s.send(b"\x00garbage" * 10, "malformed", b"x")
        s.send(b"", "malformed", None)
        s.send(s.seal("dev-9999", 1, good()), "unknown_device", b"dev-9999")
        nan = good()
        nan[3] = np.nan
        s.send(s.seal("dev-0002", 1, nan), "non_finite", b"dev-0002")
        s.send(s.seal("dev-0002", 2, good()[:-1]), "bad_shape", b"dev-0002")
        s.send(s.seal("dev-0002", 3, good().astype(np.float64)), "bad_dtype", b"dev-0002")
        s.send(s.seal("dev-0002", 4, np.full(n, 1e3, np.float32)), "norm_bound", b"dev-0002")
        s.send(s.seal("dev-0002", 5, good(), samples=0), "bad_sample_count", b"dev-0002")
        s.send(s.seal("dev-0003", 1, good(), base=5), "future_version", b"dev-0003")
        s.send(s.seal("dev-0000", 2, good()), "key_mismatch", b"dev-0001")
        wait_until(lambda: len(read_topic(settings, settings.topics.rejected, idle_s=0.5)) >= 12, 60,
                   what="the rejections before the quarantine")
        registry.set_device_status(redis, settings, "dev-0003", registry.QUARANTINED)
        s.send(s.seal("dev-0003", 2, good()), "quarantined", b"dev-0003")
        registry.set_device_status(redis, settings, "dev-0000", registry.REVOKED, "test")
        s.send(s.seal("dev-0000", 3, good()), "revoked", b"dev-0000")
        s.send(s.seal("dev-0001", 2, good(), codec="npy"), "unsupported_codec", b"dev-0001")
        s.send(s.seal("dev-0002", 6, t2), None, b"dev-0002", t2)  # bad input did not stop the pipeline

        expected = dict(s.sent)
        wait_until(lambda: len(read_topic(settings, settings.topics.windows, idle_s=0.5)) >= 1, 60,
                   what="the window to close")
        valid = read_topic(settings, settings.topics.valid)
        rejected = json_values(read_topic(settings, settings.topics.rejected))

    outcomes: dict[tuple[int, int], list[str | None]] = {}
    store = UpdateStore(settings.update_store_dir)  # the processors' (the stack runs them on this data dir)
    refs = {}
    for message in valid:
        meta = loads(message.value)  # JSON only: the tensor is in the update store
        position = (meta["raw"]["partition"], meta["raw"]["offset"])
        tensor = store.get(meta["tensor"], n)
        assert tensor.shape == (n,) and tensor.tobytes() == s.tensors[position].tobytes()
        assert meta["tensor"].startswith(f"{settings.model_id}/0/{meta['device_id']}.")
        refs[meta["update_id"]] = meta["tensor"]
        outcomes.setdefault(position, []).append(None)
    for record in rejected:
        outcomes.setdefault((record["raw"]["partition"], record["raw"]["offset"]), []).append(record["reason"])
        assert record["detail"]
    # Conservation: each raw record exactly once, in the right place, with the right reason.
    assert {pos: reasons for pos, reasons in outcomes.items()} == {pos: [r] for pos, r in expected.items()}

    windows = json_values(read_topic(settings, settings.topics.windows))
    # The CLI reads the same dead letters: counts by reason code, the last ones with their detail.
    for name, value in to_env(settings).items():
        monkeypatch.setenv(name, value)
    assert cli.main(["rejected", "--last", "3", "--idle", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{len(rejected)} rejected records" in out
    counted = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
               if line.startswith("  ") and line.split()[0] in {r["reason"] for r in rejected}}
    assert counted == dict(Counter(r["reason"] for r in rejected))
    assert len(windows) == 1 and windows[0]["base_version"] == 0 and windows[0]["closed_by"] == "count"
    assert sorted(m["device_id"] for m in windows[0]["members"]) == ["dev-0000", "dev-0001", "dev-0002"]
    # The window's members name the tensors their valid records name: what the aggregator reads.
    assert {m["update_id"]: m["tensor"] for m in windows[0]["members"]} == refs
