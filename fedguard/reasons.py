"""Reason codes: why a record on ``fl.updates.raw`` was rejected (issue 3, item 5).

The one enumeration of rejection causes. It is used in the dead-letter record (``reason``), as the ``reason`` label
of ``fedguard_updates_rejected_total``, by ``fedguard rejected`` / ``fedguard reasons``, and in
``docs/reason-codes.md``, whose table is generated from :data:`MEANINGS` by :func:`markdown_table` (a unit test
keeps the two in step). Each code names one cause, so an operator can tell from the code alone what went wrong.

The order of the members is the order of the checks (``processors/validation.py``): a record that is wrong in
several ways gets the code of the first check it fails.
"""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    # The wire: is this a fedguard envelope at all?
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_HEADER = "bad_header"
    WRONG_MODEL = "wrong_model"
    # Identity and authenticity.
    UNKNOWN_DEVICE = "unknown_device"
    AUTH_FAILED = "auth_failed"
    KEY_MISMATCH = "key_mismatch"
    REVOKED = "revoked"
    QUARANTINED = "quarantined"
    # Freshness and load (per device, kept in Redis).
    REPLAY = "replay"
    RATE_LIMITED = "rate_limited"
    INGRESS_LIMITED = "ingress_limited"
    CLOCK_SKEW = "clock_skew"
    # Content of the update.
    BAD_SAMPLE_COUNT = "bad_sample_count"
    UNSUPPORTED_CODEC = "unsupported_codec"
    BAD_TENSOR = "bad_tensor"
    BAD_DTYPE = "bad_dtype"
    BAD_SHAPE = "bad_shape"
    NON_FINITE = "non_finite"
    NORM_BOUND = "norm_bound"
    # Model version.
    FUTURE_VERSION = "future_version"
    STALE = "stale"
    WINDOW_DUPLICATE = "window_duplicate"
    # Not the sender's fault.
    INTERNAL_ERROR = "internal_error"

    @property
    def meaning(self) -> str:
        return MEANINGS[self][1]

    @property
    def stage(self) -> str:
        return MEANINGS[self][0]


# code -> (stage, one-line meaning). Stages: wire (before anything is trusted), identity (registry and AEAD),
# freshness/load (Redis state per device), content (the decrypted update), version, server.
MEANINGS: dict[Reason, tuple[str, str]] = {
    Reason.OVERSIZED: ("wire", "record larger than the bound for this model, header longer than 548 bytes, or a "
                               "tensor that declares more elements than the model has"),
    Reason.MALFORMED: ("wire", "not a fedguard envelope: empty, bad magic, or truncated before its nonce and tag"),
    Reason.UNSUPPORTED_VERSION: ("wire", "envelope format version this server does not speak"),
    Reason.BAD_HEADER: ("wire", "header fields do not fill the header exactly, or one is out of range (e.g. a "
                                "non-ASCII device id, a negative sequence number, a NaN timestamp)"),
    Reason.WRONG_MODEL: ("wire", "update for a model id this pipeline does not train"),
    Reason.UNKNOWN_DEVICE: ("identity", "device id is not in the registry (never enrolled)"),
    Reason.AUTH_FAILED: ("identity", "AEAD tag does not verify: tampered bytes, altered header, or sealed with a "
                                     "key that is not the device's current one (e.g. before a rotation)"),
    Reason.KEY_MISMATCH: ("identity", "the Kafka record key differs from the authenticated device id"),
    Reason.REVOKED: ("identity", "authentic update from a device whose enrollment an operator revoked"),
    Reason.QUARANTINED: ("identity", "authentic update from a device that is quarantined (low reputation)"),
    Reason.REPLAY: ("freshness", "sequence number not above the device's last accepted one (a copy or an old "
                                 "update sent again)"),
    Reason.RATE_LIMITED: ("load", "the device's token bucket is empty: it sends faster than its rate limit"),
    Reason.INGRESS_LIMITED: ("load", "the global ingress bucket is empty: all devices together send faster than "
                                     "the pipeline admits"),
    Reason.CLOCK_SKEW: ("freshness", "header timestamp too far from the server clock"),
    Reason.BAD_SAMPLE_COUNT: ("content", "declared sample count not in [1, max_sample_count] (e.g. negative)"),
    Reason.UNSUPPORTED_CODEC: ("content", "header names a tensor codec other than fgt1"),
    Reason.BAD_TENSOR: ("content", "fgt1 tensor is malformed: bad magic, ndim or reserved field, truncated, or its "
                                   "size does not match the declared shape"),
    Reason.BAD_DTYPE: ("content", "tensor dtype is unknown or not float32"),
    Reason.BAD_SHAPE: ("content", "tensor shape differs from the model's flat parameter vector"),
    Reason.NON_FINITE: ("content", "NaN or Inf in the update"),
    Reason.NORM_BOUND: ("content", "L2 norm of the update above max_update_norm"),
    Reason.FUTURE_VERSION: ("version", "base model version not published yet (or no version published at all)"),
    Reason.STALE: ("version", "base model version older than the current one minus max_staleness"),
    Reason.WINDOW_DUPLICATE: ("version", "a second update from this device for a base version it already had an "
                                         "update accepted for: one update per device per window (for the base version of its seat it is "
                                         "equivocation, and the seated update is rejected too)"),
    Reason.INTERNAL_ERROR: ("server", "the validator failed (a bug, or Redis unreachable after retries); not the "
                                      "sender's fault, investigate the processors log"),
}


def markdown_table() -> str:
    """The reason-code table of ``docs/reason-codes.md`` (``fedguard reasons --markdown`` prints it)."""
    lines = ["| code | stage | meaning |", "|---|---|---|"]
    lines += [f"| `{r.value}` | {r.stage} | {r.meaning} |" for r in Reason]
    return "\n".join(lines) + "\n"


class RejectError(Exception):
    """A rejection: the reason code and a human-readable detail.

    Raised by the wire format and the validator. ``device_id`` is the device the record names once its header
    parsed, ``authenticated`` whether the AEAD tag verified (so the device id is proven, not only claimed), and
    ``event`` a security event for ``fl.events`` when this rejection should be reported (bounded per device).
    """

    def __init__(self, reason: Reason, detail: str, *, device_id: str | None = None, authenticated: bool = False,
                 event: dict | None = None):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.device_id = device_id
        self.authenticated = authenticated
        self.event = event
