"""Record formats of the internal topics.

Every record of an internal topic (valid, rejected, index, windows, models, events) is a UTF-8 JSON object. A valid
update's tensor is not on the topic: its record names it in the update store (``tensor``, fedguard/updatestore.py).
"""

from __future__ import annotations

import json
from typing import Any


def dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def loads(raw: bytes) -> dict[str, Any]:
    return json.loads(raw)
