"""Reason codes: why a record on ``fl.updates.raw`` was rejected.

One enumeration, used in the dead-letter record, as the ``reason`` label of the rejection counter and in the CLI.
"""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    MALFORMED = "malformed"  # not a fedguard envelope: bad magic, truncated, header not parseable
    UNSUPPORTED_VERSION = "unsupported_version"  # envelope format version this server does not speak
    BAD_HEADER = "bad_header"  # header parses but a field is missing, of the wrong type or out of range
    OVERSIZED = "oversized"  # record, header or declared tensor larger than the configured bound
    UNKNOWN_DEVICE = "unknown_device"  # device id not in the registry
    QUARANTINED = "quarantined"  # device is quarantined or revoked
    AUTH_FAILED = "auth_failed"  # AEAD open failed: tampered, wrong key, or header altered
    KEY_MISMATCH = "key_mismatch"  # record key does not match the authenticated device id
    REPLAY = "replay"  # sequence number not above the last accepted one
    CLOCK_SKEW = "clock_skew"  # timestamp too far from the server clock
    STALE = "stale"  # base model version older than allowed
    FUTURE_VERSION = "future_version"  # base model version the server has not published
    WRONG_MODEL = "wrong_model"  # model id this pipeline does not train
    BAD_TENSOR = "bad_tensor"  # tensor codec: bad magic, truncated, size does not match the declared shape
    BAD_DTYPE = "bad_dtype"
    BAD_SHAPE = "bad_shape"  # shape differs from the model's parameter vector
    NON_FINITE = "non_finite"  # NaN or Inf in the update
    NORM_BOUND = "norm_bound"  # L2 norm above the configured bound
    BAD_SAMPLE_COUNT = "bad_sample_count"  # sample count not in [1, max]


class RejectError(Exception):
    """Raised by the wire format and validator; carries the reason code and a human-readable detail."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
