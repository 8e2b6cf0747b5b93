"""Wire-level attack traffic for a running pipeline: what a hostile network or participant puts on the raw topic.

* ``garbage``: random bytes, and truncated or mangled envelopes.
* ``tamper``: a real update captured from the raw topic with one ciphertext bit flipped.
* ``replay``: a real update captured from the raw topic, sent again unchanged.
* ``flood``: an enrolled device (its key from the fleet's key store) sends ``count`` authentic, well-formed updates
  as fast as it can: after its bucket's capacity they are rejected ``rate_limited``, one security event is
  published on ``fl.events``, and the other devices' updates keep flowing.

Each returns how many records it sent; the validator must reject every one with its reason code while honest
traffic keeps flowing. (Model-poisoning attacks by enrolled devices live in the attack library.)
"""

from __future__ import annotations

import os
import time

import numpy as np
from kafka import KafkaProducer

from fedguard import envelope, registry
from fedguard.codec import encode_tensor
from fedguard.envelope import UpdateHeader
from fedguard.keys import private_from_hex, public_from_hex
from fedguard.settings import Settings
from fedguard.topicio import consumer_from_beginning
from producers.keystore import Keystore

KINDS = ("garbage", "tamper", "replay", "flood")


def capture_raw(settings: Settings, count: int, timeout_s: float = 10.0) -> list[tuple[bytes, bytes]]:
    """The last ``count`` well-formed envelopes on the raw topic, as (key, value); reads until the topic is idle."""
    consumer = consumer_from_beginning(settings, [settings.topics.raw], "fedguard-inject",
                                       max_partition_fetch_bytes=settings.max_payload_bytes,
                                       fetch_max_bytes=settings.max_payload_bytes)
    try:
        captured: list[tuple[float, bytes, bytes]] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=1000)
            if not batch and captured:
                break  # idle: counting what we read, not trusting end offsets (BROKER.md)
            for messages in batch.values():
                for m in messages:
                    try:
                        envelope.parse(m.value, settings.max_payload_bytes)
                    except Exception:
                        continue
                    captured.append((m.timestamp, m.key, m.value))
        captured.sort(key=lambda item: item[0])
        return [(k, v) for _, k, v in captured[-count:]]
    finally:
        consumer.close()


def flip_bit(value: bytes, position: int) -> bytes:
    mutable = bytearray(value)
    mutable[position] ^= 0x01
    return bytes(mutable)


def flood_records(settings: Settings, device_id: str, count: int, num_params: int | None = None) -> list[tuple[bytes, bytes]]:
    """``count`` authentic zero updates from ``device_id`` on the current version, with fresh sequence numbers."""
    if num_params is None:
        from fedguard.tasks import load_task, model_spec

        num_params = model_spec(load_task(settings.task, seed=settings.seed), settings.hidden_widths()).num_params
    client = registry.connect(settings)
    server_hex = client.get(registry.server_public_key(settings))
    if not server_hex:
        raise RuntimeError("the server public key is not in Redis; is the pipeline running?")
    version = int(client.get(registry.model_version_key(settings)) or 0)
    payload = encode_tensor(np.zeros(num_params, np.float32))
    with Keystore.editing(settings.keystore_path) as store:
        keys = store.devices.get(device_id)
        if keys is None:
            raise KeyError(f"device {device_id!r} is not in the key store {settings.keystore_path}")
        key = envelope.derive_key(private_from_hex(keys.private_key), public_from_hex(server_hex), device_id)
        out = []
        for _ in range(count):
            keys.seq = max(keys.seq + 1, time.time_ns() // 1000)
            header = UpdateHeader.new(device_id=device_id, seq=keys.seq, base_version=version, num_samples=1,
                                      model_id=settings.model_id)
            out.append((device_id.encode(), envelope.seal(header, payload, key)))
    return out


def make_records(settings: Settings, kind: str, count: int, seed: int | None = None,
                 device_id: str = "dev-0000") -> list[tuple[bytes | None, bytes]]:
    if kind == "flood":
        return flood_records(settings, device_id, count)
    if kind == "garbage":
        return [(b"garbage-%d" % i, os.urandom(64 + i % 512)) for i in range(count)]
    captured = capture_raw(settings, count)
    if not captured:
        raise RuntimeError(f"no update on {settings.topics.raw} to {kind}; is the fleet running?")
    if kind == "replay":
        return captured
    if kind == "tamper":
        return [(k, flip_bit(v, len(v) - envelope.TAG_BYTES - 1)) for k, v in captured]
    raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")


def inject(settings: Settings, kind: str, count: int, device_id: str = "dev-0000") -> int:
    records = make_records(settings, kind, count, device_id=device_id)
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, client_id="fedguard-inject", acks="all",
                             max_request_size=settings.max_payload_bytes)
    try:
        for key, value in records:
            producer.send(settings.topics.raw, key=key, value=value)
        producer.flush()
    finally:
        producer.close(timeout=5)
    return len(records)
