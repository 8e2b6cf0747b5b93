"""Builders of honest and hostile raw records, shared by the validator and pipeline tests (issue 3, item 6).

A :class:`Fleet` enrolls devices straight into the Redis registry of a test's namespace and seals updates with their
keys; :data:`MALFORMED` maps each kind of hostile record to a function that makes one and the reason code the
validator must give it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import asdict, dataclass, field

import numpy as np
import redis
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedguard import envelope, registry
from fedguard.codec import encode_tensor
from fedguard.envelope import UpdateHeader
from fedguard.keys import public_from_hex, public_to_hex
from fedguard.settings import Settings


@dataclass
class Fleet:
    """Devices enrolled in ``settings``' registry, sealing to the server key published there (or given)."""

    settings: Settings
    num_params: int
    server_public: object = None
    keys: dict[str, bytes] = field(default_factory=dict)
    seqs: dict[str, int] = field(default_factory=dict)
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))

    def __post_init__(self) -> None:
        self.redis = redis.Redis.from_url(self.settings.redis_url, decode_responses=True)
        if self.server_public is None:
            self.server_public = public_from_hex(self.redis.get(registry.server_public_key(self.settings)))

    def enroll(self, device_id: str, register: bool = True) -> bytes:
        private = X25519PrivateKey.generate()
        if register:
            registry.register_device(self.redis, self.settings, device_id, public_to_hex(private.public_key()))
        self.keys[device_id] = envelope.derive_key(private, self.server_public, device_id)
        return self.keys[device_id]

    def rotate(self, device_id: str) -> bytes:
        private = X25519PrivateKey.generate()
        registry.set_public_key(self.redis, self.settings, device_id, public_to_hex(private.public_key()))
        old, self.keys[device_id] = self.keys[device_id], envelope.derive_key(private, self.server_public, device_id)
        return old

    def good(self, n: int | None = None) -> np.ndarray:
        return self.rng.normal(0, 0.01, n or self.num_params).astype(np.float32)

    def next_seq(self, device_id: str) -> int:
        self.seqs[device_id] = self.seqs.get(device_id, 0) + 1
        return self.seqs[device_id]

    def seal(self, device_id: str, tensor: np.ndarray | None = None, *, seq: int | None = None, base: int = 0,
             samples: int = 10, key: bytes | None = None, model_id: str | None = None, codec: str = "fgt1",
             payload: bytes | None = None) -> bytes:
        header = UpdateHeader.new(device_id=device_id, seq=self.next_seq(device_id) if seq is None else seq,
                                  base_version=base, num_samples=samples, codec=codec,
                                  model_id=model_id or self.settings.model_id)
        if payload is None:
            payload = encode_tensor(self.good() if tensor is None else tensor)
        return envelope.seal(header, payload, key or self.keys[device_id])


def with_header_field(raw: bytes, name: str, value) -> bytes:
    """``raw`` with one header field replaced: the AEAD no longer verifies, or the parser refuses it first."""
    (length,) = struct.unpack_from(">H", raw, 4)
    fields = {**asdict(envelope.parse(raw, 1 << 62).header), name: value}
    head = envelope.pack_header(**fields)
    return raw[:4] + struct.pack(">H", len(head)) + head + raw[6 + length:]


def flip(raw: bytes, position: int) -> bytes:
    mutable = bytearray(raw)
    mutable[position % len(mutable)] ^= 0x01
    return bytes(mutable)


def huge_shape_tensor(dims=(2**32 - 1, 2**32 - 1)) -> bytes:
    return b"FGT1" + bytes([1, len(dims), 0, 0]) + struct.pack(f"<{len(dims)}I", *dims) + bytes(16)


def _nan(f: Fleet, d: str) -> bytes:
    t = f.good()
    t[len(t) // 2] = np.nan
    return f.seal(d, t)


def _inf(f: Fleet, d: str) -> bytes:
    t = f.good()
    t[-1] = -np.inf
    return f.seal(d, t)


# kind -> (maker(fleet, an enrolled hostile device id) -> (record key, raw value), expected reason). Records from
# an enrolled device are authentic (they consume that device's tokens); the others never reach Redis state.
MALFORMED = {
    "empty": (lambda f, d: (d.encode(), b""), "malformed"),
    "garbage": (lambda f, d: (b"x", os.urandom(1 + int(f.rng.integers(0, 300)))), "malformed"),
    "bad_magic": (lambda f, d: (d.encode(), b"XYZ" + f.seal(d)[3:]), "malformed"),
    "truncated": (lambda f, d: (d.encode(), f.seal(d)[:int(f.rng.integers(1, 40))]), "malformed"),
    "truncated_body": (lambda f, d: (d.encode(), f.seal(d)[:-int(f.rng.integers(1, 60))]), "auth_failed"),
    "extended": (lambda f, d: (d.encode(), f.seal(d) + os.urandom(int(f.rng.integers(1, 64)))), "auth_failed"),
    "bit_flip": (lambda f, d: (d.encode(), flip(f.seal(d), -1 - int(f.rng.integers(0, 200)))), "auth_failed"),
    "header_flip": (lambda f, d: (d.encode(), with_header_field(f.seal(d), "num_samples", 11)), "auth_failed"),
    "wrong_version": (lambda f, d: (d.encode(), f.seal(d)[:3] + b"\x07" + f.seal(d)[4:]), "unsupported_version"),
    "huge_header_len": (lambda f, d: (d.encode(), b"FGE" + bytes([envelope.VERSION]) + b"\xff\xff" + bytes(64)),
                        "oversized"),
    "unicode_device": (lambda f, d: (d.encode(), with_header_field(f.seal(d), "device_id", "dév-０１")),
                       "bad_header"),
    "negative_seq": (lambda f, d: (d.encode(), with_header_field(f.seal(d), "seq", -1)), "bad_header"),
    "wrong_model": (lambda f, d: (d.encode(), f.seal(d, model_id="someone-else")), "wrong_model"),
    "unknown_device": (lambda f, d: (b"ghost-1", f.seal("ghost-1", key=os.urandom(32), seq=1)), "unknown_device"),
    "wrong_key": (lambda f, d: (d.encode(), f.seal(d, key=os.urandom(32))), "auth_failed"),
    "key_mismatch": (lambda f, d: (b"someone", f.seal(d)), "key_mismatch"),
    # Authentic but wrong inside: these consume the hostile device's tokens.
    "nan": (lambda f, d: (d.encode(), _nan(f, d)), "non_finite"),
    "inf": (lambda f, d: (d.encode(), _inf(f, d)), "non_finite"),
    "negative_samples": (lambda f, d: (d.encode(), f.seal(d, samples=-3)), "bad_sample_count"),
    "huge_shape": (lambda f, d: (d.encode(), f.seal(d, payload=huge_shape_tensor())), "oversized"),
    "bad_shape": (lambda f, d: (d.encode(), f.seal(d, f.good(f.num_params - 1))), "bad_shape"),
    "float64": (lambda f, d: (d.encode(), f.seal(d, f.good().astype(np.float64))), "bad_dtype"),
    "bad_codec": (lambda f, d: (d.encode(), f.seal(d, codec="pickle")), "unsupported_codec"),
    "norm_bound": (lambda f, d: (d.encode(), f.seal(d, np.full(f.num_params, 1e3, np.float32))), "norm_bound"),
    "future_version": (lambda f, d: (d.encode(), f.seal(d, base=99)), "future_version"),
}
AUTHENTIC = {"nan", "inf", "negative_samples", "huge_shape", "bad_shape", "float64", "bad_codec", "norm_bound",
             "future_version"}
