"""Record formats of the internal topics.

Control records (rejected, index, windows, models, events) are UTF-8 JSON objects. A valid update carries a tensor,
so it is framed: 4-byte big-endian length of a JSON metadata object, the JSON, then the ``fgt1`` tensor bytes.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from fedguard.codec import decode_tensor, encoded_parts

_LEN = struct.Struct(">I")


def dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def loads(raw: bytes) -> dict[str, Any]:
    return json.loads(raw)


def encode_valid(meta: dict[str, Any], tensor: np.ndarray) -> bytes:
    head = dumps(meta)
    return b"".join((_LEN.pack(len(head)), head, *encoded_parts(tensor)))  # the tensor's bytes copied once


def decode_valid(raw: bytes, max_elements: int) -> tuple[dict[str, Any], np.ndarray]:
    """Decode a record of ``fl.updates.valid`` (written by the validator, so trusted to be well formed)."""
    (head_len,) = _LEN.unpack_from(raw, 0)
    meta = json.loads(raw[_LEN.size:_LEN.size + head_len])
    return meta, decode_tensor(raw[_LEN.size + head_len:], max_elements)
