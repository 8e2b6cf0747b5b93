"""The update envelope: authenticated encryption of a device's model update.

Layout of version 1 (integers big-endian)::

    offset   size   field
    0        3      magic b"FGE"
    3        1      format version (1)
    4        2      header length H (<= MAX_HEADER_BYTES)
    6        H      header: canonical UTF-8 JSON object (see UpdateHeader)
    6+H      12     nonce (random)
    18+H     rest   ChaCha20-Poly1305 ciphertext of the tensor payload, with its 16-byte tag

Key: X25519(device private, server public) == X25519(server private, device public), through HKDF-SHA256 with the
device id in ``info``. Associated data: bytes 0 .. 6+H, so the header (device id, sequence number, base version,
timestamp, codec, sample count, update id, model id) is authenticated: the pipeline knows who sent it and that
nobody changed it, and nobody on the wire can read the update.

Parsing checks sizes before anything proportional to them is allocated and never unpickles or evaluates: the
record's length against the bound first, then the declared header length against ``MAX_HEADER_BYTES``; the nonce
and ciphertext are views into the record, not copies. The full byte layout, limits and the order of the checks are
in docs/wire-format.md (issue 3, item 3).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import time
import uuid
from dataclasses import asdict, dataclass
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedguard.reasons import Reason, RejectError

MAGIC = b"FGE"
VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_HEADER_BYTES = 2048
_PREFIX = struct.Struct(">3sBH")
_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")  # used with fullmatch: no trailing newline slips through
_MAX_INT = 2**53  # exact in JSON doubles and in Redis Lua numbers


@dataclass(frozen=True)
class UpdateHeader:
    device_id: str
    seq: int
    base_version: int
    timestamp: float
    codec: str
    num_samples: int
    update_id: str
    model_id: str

    @classmethod
    def new(cls, *, device_id: str, seq: int, base_version: int, num_samples: int, model_id: str,
            codec: str = "fgt1") -> "UpdateHeader":
        return cls(device_id=device_id, seq=seq, base_version=base_version, timestamp=time.time(), codec=codec,
                   num_samples=num_samples, update_id=uuid.uuid4().hex, model_id=model_id)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | memoryview) -> "UpdateHeader":
        """Parse and check a header (at most ``MAX_HEADER_BYTES``: the caller bounds it before calling)."""
        raw = bytes(raw)
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise RejectError(Reason.MALFORMED, f"header is not JSON: {str(exc)[:200]}") from None
        if not isinstance(obj, dict):
            raise RejectError(Reason.BAD_HEADER, "header is not an object")
        if obj.keys() != _HEADER_FIELDS:
            missing, extra = sorted(_HEADER_FIELDS - set(obj)), sorted(set(obj) - _HEADER_FIELDS)
            raise RejectError(Reason.BAD_HEADER, f"header fields: missing {missing}, unexpected {extra}")
        for name in _ID_FIELDS:
            value = obj[name]
            if type(value) is not str or not _ID_PATTERN.fullmatch(value):
                raise RejectError(Reason.BAD_HEADER, f"{name} must match {_ID_PATTERN.pattern}")
        for name in _INT_FIELDS:
            value = obj[name]
            if type(value) is not int or not -_MAX_INT <= value <= _MAX_INT:
                raise RejectError(Reason.BAD_HEADER, f"{name} must be an integer within +-2**53")
        if obj["seq"] < 0 or obj["base_version"] < 0:
            raise RejectError(Reason.BAD_HEADER, "seq and base_version must be non-negative")
        timestamp = obj["timestamp"]
        if (type(timestamp) is not float and type(timestamp) is not int) or not math.isfinite(timestamp):
            raise RejectError(Reason.BAD_HEADER, "timestamp must be a finite number")
        # A name given twice is ambiguous (json keeps the last; another parser may keep the first). Every value
        # that survived is now a scalar without a literal comma, so the only commas are the separators of the
        # name/value pairs: more than len(fields) - 1 means a repeated name (or a dropped nested value).
        if raw.count(b",") != len(_HEADER_FIELDS) - 1:
            raise RejectError(Reason.BAD_HEADER, "header repeats a field name (or nests values)")
        header = object.__new__(cls)  # the fields are exactly the checked ones: skip the slower generated __init__
        object.__setattr__(header, "__dict__", obj)
        return header


_HEADER_FIELDS = frozenset(UpdateHeader.__dataclass_fields__)
_ID_FIELDS = ("device_id", "update_id", "model_id", "codec")
_INT_FIELDS = ("seq", "base_version", "num_samples")


class SealedEnvelope(NamedTuple):
    """A parsed record: the checked header and views into the record (parsing copies nothing proportional to
    its size)."""

    header: UpdateHeader
    associated_data: memoryview
    nonce: memoryview
    ciphertext: memoryview


def max_record_bytes(payload_bytes: int) -> int:
    """The largest envelope that can carry a payload of ``payload_bytes`` (a header of the maximum length)."""
    return _PREFIX.size + MAX_HEADER_BYTES + NONCE_BYTES + payload_bytes + TAG_BYTES


def derive_key(own_private: X25519PrivateKey, peer_public: X25519PublicKey, device_id: str) -> bytes:
    shared = own_private.exchange(peer_public)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"fedguard/v1/update|" + device_id.encode()).derive(shared)


def seal(header: UpdateHeader, payload: bytes, key: bytes) -> bytes:
    """Encrypt ``payload`` under ``key`` (from :func:`derive_key`) with the header as associated data."""
    head = header.to_bytes()
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError(f"header is {len(head)} bytes, limit {MAX_HEADER_BYTES}")
    aad = _PREFIX.pack(MAGIC, VERSION, len(head)) + head
    nonce = os.urandom(NONCE_BYTES)
    return aad + nonce + ChaCha20Poly1305(key).encrypt(nonce, payload, aad)


def parse(raw: bytes, max_bytes: int) -> SealedEnvelope:
    """Split a record into header, nonce and ciphertext; nothing is decrypted yet."""
    if raw is None:
        raise RejectError(Reason.MALFORMED, "empty record value")
    if len(raw) > max_bytes:
        raise RejectError(Reason.OVERSIZED, f"record is {len(raw)} bytes, bound is {max_bytes}")
    if len(raw) < _PREFIX.size:
        raise RejectError(Reason.MALFORMED, f"record is {len(raw)} bytes, shorter than the envelope prefix")
    magic, version, header_len = _PREFIX.unpack_from(raw, 0)
    if magic != MAGIC:
        raise RejectError(Reason.MALFORMED, f"bad magic {magic!r}")
    if version != VERSION:
        raise RejectError(Reason.UNSUPPORTED_VERSION, f"envelope version {version}, this server speaks {VERSION}")
    if header_len > MAX_HEADER_BYTES:
        raise RejectError(Reason.OVERSIZED, f"header declares {header_len} bytes, bound is {MAX_HEADER_BYTES}")
    body = _PREFIX.size + header_len
    if len(raw) < body + NONCE_BYTES + TAG_BYTES:
        raise RejectError(Reason.MALFORMED, "record truncated before nonce and tag")
    view = memoryview(raw)
    header = UpdateHeader.from_bytes(view[_PREFIX.size:body])
    return SealedEnvelope(header, view[:body], view[body:body + NONCE_BYTES], view[body + NONCE_BYTES:])


def open_sealed(sealed: SealedEnvelope, key: bytes | ChaCha20Poly1305) -> bytes:
    """Decrypt and authenticate; ``key`` is the 32-byte key or an AEAD object made from it (cheaper to reuse)."""
    aead = key if isinstance(key, ChaCha20Poly1305) else ChaCha20Poly1305(key)
    try:
        return aead.decrypt(sealed.nonce, sealed.ciphertext, sealed.associated_data)
    except InvalidTag:
        raise RejectError(Reason.AUTH_FAILED, "authentication tag does not verify (tampered or wrong key)") from None
