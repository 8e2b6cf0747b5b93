"""Validation of one raw record: every check of DESIGN.md, each failure mapped to its reason code.

The order matters: cheap structural checks first, then the registry, then authentication; nothing the header
claims is trusted before the AEAD tag verifies, and the replay counter only advances for an update that passed
every other check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import redis.asyncio as aioredis

from fedguard import envelope, registry
from fedguard.codec import CODEC_NAME, decode_tensor
from fedguard.envelope import UpdateHeader
from fedguard.keys import public_from_hex
from fedguard.reasons import Reason, RejectError
from fedguard.settings import Settings

CHECKS = ("envelope", "registry", "aead", "record_key", "clock", "sample_count", "codec", "dtype", "shape",
          "finite", "norm", "replay", "version")


@dataclass(frozen=True)
class ValidUpdate:
    header: UpdateHeader
    tensor: np.ndarray
    norm: float


@dataclass
class Validator:
    settings: Settings
    server_private: object  # X25519PrivateKey
    num_params: int
    redis: aioredis.Redis
    _keys: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (device id, public key) -> AEAD key

    def __post_init__(self) -> None:
        self._advance_seq = self.redis.register_script(registry.ADVANCE_SEQ_LUA)

    def _aead_key(self, device_id: str, public_hex: str) -> bytes:
        cache_key = (device_id, public_hex)
        if cache_key not in self._keys:
            if len(self._keys) > 100_000:
                self._keys.clear()
            self._keys[cache_key] = envelope.derive_key(self.server_private, public_from_hex(public_hex), device_id)
        return self._keys[cache_key]

    async def validate(self, raw: bytes | None, record_key: bytes | None, position: str = "") -> ValidUpdate:
        """Validate one raw record; ``position`` (raw partition:offset) tells a re-delivery from a replay."""
        s = self.settings
        sealed = envelope.parse(raw, s.max_payload_bytes)
        header = sealed.header
        if header.model_id != s.model_id:
            raise RejectError(Reason.WRONG_MODEL, f"model {header.model_id!r}, this pipeline trains {s.model_id!r}")

        device = await self.redis.hgetall(registry.device_key(s, header.device_id))
        if not device:
            raise RejectError(Reason.UNKNOWN_DEVICE, f"device {header.device_id!r} is not enrolled")
        if device.get("status") != registry.ACTIVE:
            raise RejectError(Reason.QUARANTINED, f"device {header.device_id!r} is {device.get('status')}")

        payload = envelope.open_sealed(sealed, self._aead_key(header.device_id, device["public_key"]))

        if record_key is not None and record_key != header.device_id.encode():
            raise RejectError(Reason.KEY_MISMATCH, f"record key {record_key[:64]!r} != device {header.device_id!r}")
        skew = abs(time.time() - header.timestamp)
        if skew > s.max_clock_skew_s:
            raise RejectError(Reason.CLOCK_SKEW, f"timestamp is {skew:.0f}s from server time")
        if not 1 <= header.num_samples <= s.max_sample_count:
            raise RejectError(Reason.BAD_SAMPLE_COUNT, f"sample count {header.num_samples} not in [1, {s.max_sample_count}]")

        # The same update id at the same raw position is this record delivered again after a crash; the same
        # update id anywhere else is a copy someone sent again.
        delivery = f"{header.update_id}@{position}"
        last = await self.redis.hmget(registry.seq_key(s, header.device_id), "seq", "update_id")
        if last[0] is not None and header.seq <= int(last[0]) and last[1] != delivery:
            raise RejectError(Reason.REPLAY, f"sequence {header.seq} not above last accepted {last[0]}")

        if header.codec != CODEC_NAME:
            raise RejectError(Reason.BAD_TENSOR, f"codec {header.codec!r}, expected {CODEC_NAME!r}")
        tensor = decode_tensor(payload, self.num_params)
        if tensor.dtype != np.float32:
            raise RejectError(Reason.BAD_DTYPE, f"dtype {tensor.dtype}, expected float32")
        if tensor.shape != (self.num_params,):
            raise RejectError(Reason.BAD_SHAPE, f"shape {tensor.shape}, expected ({self.num_params},)")
        if not np.isfinite(tensor).all():
            raise RejectError(Reason.NON_FINITE, f"{int((~np.isfinite(tensor)).sum())} NaN/Inf values")
        norm = float(np.linalg.norm(tensor.astype(np.float64)))
        if norm > s.max_update_norm:
            raise RejectError(Reason.NORM_BOUND, f"L2 norm {norm:.4g} above bound {s.max_update_norm:.4g}")

        current = await self.redis.get(registry.model_version_key(s))
        if current is None:
            raise RejectError(Reason.FUTURE_VERSION, "no global model version has been published yet")
        current = int(current)
        if header.base_version > current:
            raise RejectError(Reason.FUTURE_VERSION, f"base version {header.base_version}, current is {current}")
        if header.base_version < current - s.max_staleness:
            raise RejectError(Reason.STALE, f"base version {header.base_version}, current is {current}, "
                                            f"max staleness {s.max_staleness}")

        accepted = await self._advance_seq(keys=[registry.seq_key(s, header.device_id)],
                                           args=[header.seq, delivery])
        if not accepted:
            raise RejectError(Reason.REPLAY, f"sequence {header.seq} lost a race with a newer update")
        return ValidUpdate(header=header, tensor=tensor, norm=norm)
