"""Redis keys of the device registry, admission state (sequence numbers, token buckets) and the model version.

Every key is namespaced by ``Settings.redis_prefix`` (default ``fedguard``):

| key | type | holds |
|---|---|---|
| ``fedguard:device:<id>`` | hash | registry: ``public_key`` (X25519, hex), ``status`` (active, quarantined, revoked), ``enrolled_at``, ``key_version``, ``key_rotated_at``, ``revoked_at``, ``status_reason`` |
| ``fedguard:auth:<id>`` | string | ``<status> <public key hex>``: the two registry fields admission needs, rewritten from the hash in the same script as every change to them (:data:`UPDATE_DEVICE_LUA`), so admission reads all the devices of a call with one ``MGET`` |
| ``fedguard:seq:<id>`` | string | admission state, written only by the admission script: ``<seq>\\0<delivery>\\0<tokens>\\0<tokens_ts>\\0<window base>\\0`` (NUL-ended fields: one ``struct.unpack`` in Lua; the format is the admission protocol's, :mod:`processors.admission`, whose ``admission_state`` reads it): the sequence number of the last accepted update and its ``<update id>@<raw partition>:<offset>`` (replay protection), then the device's token bucket, then the highest base version it had an update accepted for (one update per device per window); ``-`` for a field not set yet (a state written before the last field existed has four). Kept when a device is enrolled again |
| ``fedguard:devices`` | set | every enrolled device id |
| ``fedguard:ingress`` | hash | ``tokens`` and ``ts`` of the global ingress bucket |
| ``fedguard:equivocated:<store id>:<model id>:<base version>`` | set, expires (7 days) | devices that sent a second update for a base version they already had one accepted for (written by the admission script, read by the window stage when that version's window closes: it rejects their seated update) |
| ``fedguard:noted:<kind>:<id>`` | string, expires | set when a security event of ``kind`` (rate_limited, replay) was emitted for device ``<id>``; ``fedguard:noted:ingress_limited`` for the global bucket. Bounds events to one per ``security_event_interval_s`` |
| ``fedguard:operator:credential`` | string | JSON: scrypt parameters, salt and hash of the operator token (fedguard/operator.py) |
| ``fedguard:audit`` | list | JSON records of operator actions (enroll, revoke, rotate), newest first, capped at 10,000 |
| ``fedguard:server:public_key`` | string | the server's X25519 public key (hex) that devices seal to |
| ``fedguard:model:<model id>:version`` | string | the current global model version, written by the aggregator |
| ``fedguard:quarantined`` | set | devices quarantined by *reputation*, which the probation timer releases (written by processors/defence.py); a device quarantined by an operator or by the model audit (:func:`quarantine_device`) is taken out of it: only an operator releases it |
| ``fedguard:detector:sketch_seed`` | string | the secret seed of the update sketch (fedguard/sketch.py), made once with SET NX by the first processors worker; server-side like a key, never sent to devices |
"""

from __future__ import annotations

import hashlib
import json
import time

import redis

from fedguard.settings import Settings

ACTIVE = "active"
QUARANTINED = "quarantined"
REVOKED = "revoked"
STATUSES = (ACTIVE, QUARANTINED, REVOKED)
AUDIT_LENGTH = 10_000

def device_key(settings: Settings, device_id: str) -> str:
    return settings.redis_key("device", device_id)


def auth_key(settings: Settings, device_id: str) -> str:
    return settings.redis_key("auth", device_id)


def seq_key(settings: Settings, device_id: str) -> str:
    return settings.redis_key("seq", device_id)


def devices_key(settings: Settings) -> str:
    return settings.redis_key("devices")


def ingress_key(settings: Settings) -> str:
    return settings.redis_key("ingress")


def noted_key(settings: Settings, kind: str, device_id: str | None = None) -> str:
    return settings.redis_key("noted", kind, *([device_id] if device_id is not None else []))


def operator_credential_key(settings: Settings) -> str:
    return settings.redis_key("operator", "credential")


def audit_key(settings: Settings) -> str:
    return settings.redis_key("audit")


def server_public_key(settings: Settings) -> str:
    return settings.redis_key("server", "public_key")


def model_version_key(settings: Settings) -> str:
    return settings.redis_key("model", settings.model_id, "version")


def model_store_key(settings: Settings) -> str:
    """Which model store the model's versions come from (:meth:`fedguard.modelstore.ModelStore.identity`, set by
    the aggregator and by ``init``/``up``): a store started afresh reuses version numbers, and so window ids, and the
    window stage must not take its windows for the earlier store's."""
    return settings.redis_key("model", settings.model_id, "store")


def equivocated_key(settings: Settings, store_id: str, base_version: int) -> str:
    """The devices that sent a second update for ``base_version`` while holding a seat in its window (set; written
    by admission, processors/admission.py, read by the window stage when the window closes). ``store_id``: the
    value of :func:`model_store_key` (``-`` when unset), so that a store started afresh does not inherit it."""
    return settings.redis_key("equivocated", store_id, settings.model_id, str(base_version))


def fleet_hold_key(settings: Settings) -> str:
    """Set by ``fedguard up`` before it recycles the broker: the fleet starts no new round while it exists."""
    return settings.redis_key("fleet", settings.model_id, "hold")


def fleet_held_key(settings: Settings) -> str:
    """The fleet's answer to a hold: the version it is holding on (it sent nothing for that version)."""
    return settings.redis_key("fleet", settings.model_id, "held")


def quarantined_key(settings: Settings) -> str:
    return settings.redis_key("quarantined")


def sketch_seed_key(settings: Settings) -> str:
    return settings.redis_key("detector", "sketch_seed")


def sketch_seed(client: redis.Redis, settings: Settings) -> int:
    """The deployment's secret sketch seed: read, or made from OS entropy by the first caller (SET NX)."""
    from fedguard.sketch import new_secret_seed

    client.set(sketch_seed_key(settings), str(new_secret_seed()), nx=True)
    return int(client.get(sketch_seed_key(settings)))


def fingerprint(public_key_hex: str) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its SHA-256."""
    return "sha256:" + hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()[:16]


def connect(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, decode_responses=True)


def audit(client: redis.Redis, settings: Settings, action: str, device_id: str | None, detail: str = "") -> None:
    pipe = client.pipeline()
    pipe.lpush(audit_key(settings), json.dumps({"at": round(time.time(), 3), "action": action,
                                                "device_id": device_id, "detail": detail}))
    pipe.ltrim(audit_key(settings), 0, AUDIT_LENGTH - 1)
    pipe.execute()


# Every change to a device's registry hash goes through this script, which rewrites the device's auth string
# (``<status> <public key>``, read by the admission script, processors/admission.py) from the hash in the same
# atomic step. KEYS: the hash, the auth string; ARGV: field/value pairs to set, then, if the last argument is a
# field name alone, a field to increment.
UPDATE_DEVICE_LUA = r"""
local last = #ARGV
if last % 2 == 1 then redis.call('HINCRBY', KEYS[1], ARGV[last], 1); last = last - 1 end
if last > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 1, last)) end
local v = redis.call('HMGET', KEYS[1], 'status', 'public_key')
if v[1] and v[2] then redis.call('SET', KEYS[2], v[1] .. ' ' .. v[2]) end
return 1
"""


def _update_device(target, settings: Settings, device_id: str, fields: dict, increment: str | None = None):
    """Set ``fields`` of a device's hash (and increment one) and refresh its auth string; ``target`` is a client
    or a pipeline."""
    args = [x for item in fields.items() for x in item] + ([increment] if increment else [])
    return target.eval(UPDATE_DEVICE_LUA, 2, device_key(settings, device_id), auth_key(settings, device_id), *args)


def register_device(client: redis.Redis, settings: Settings, device_id: str, public_key_hex: str) -> None:
    pipe = client.pipeline()
    _update_device(pipe, settings, device_id, {"public_key": public_key_hex, "status": ACTIVE,
                                               "enrolled_at": f"{time.time():.3f}", "key_version": 1})
    pipe.sadd(devices_key(settings), device_id)
    pipe.execute()


def get_device(client: redis.Redis, settings: Settings, device_id: str) -> dict[str, str] | None:
    return client.hgetall(device_key(settings, device_id)) or None


def set_device_status(client: redis.Redis, settings: Settings, device_id: str, status: str, reason: str = "") -> None:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    if not client.exists(device_key(settings, device_id)):
        raise KeyError(f"device {device_id!r} is not enrolled")
    fields = {"status": status, "status_reason": reason}
    if status == REVOKED:
        fields["revoked_at"] = f"{time.time():.3f}"
    _update_device(client, settings, device_id, fields)


def set_public_key(client: redis.Redis, settings: Settings, device_id: str, public_key_hex: str) -> str:
    """Replace a device's public key (rotation); returns the old one. The status is left as it is."""
    old = client.hget(device_key(settings, device_id), "public_key")
    if old is None:
        raise KeyError(f"device {device_id!r} is not enrolled")
    _update_device(client, settings, device_id, {"public_key": public_key_hex, "key_rotated_at": f"{time.time():.3f}"},
                   increment="key_version")
    return old


def quarantine_device(client: redis.Redis, settings: Settings, device_id: str, reason: str, by: str = "operator"
                      ) -> dict:
    """Quarantine a device until an operator releases it: the validator refuses its updates (the registry status
    and its auth string), the fleet stops sampling it, the reputation's probation timer does not release it (it
    leaves the timer's set), and the audit list records it. ``by``: who decided (``operator``, or ``audit``: the
    aggregator's model audit attributed a backdoored version to it). Returns the ``fl.events`` record for the
    caller to publish. ``KeyError``: not enrolled; ``ValueError``: revoked (revocation is terminal)."""
    entry = get_device(client, settings, device_id)
    if entry is None:
        raise KeyError(f"device {device_id!r} is not enrolled")
    if entry.get("status") == REVOKED:
        raise ValueError(f"device {device_id!r} is revoked; revocation is terminal")
    why = f"{by}: {reason}".strip()
    set_device_status(client, settings, device_id, QUARANTINED, why)
    client.srem(quarantined_key(settings), device_id)
    audit(client, settings, "quarantine", device_id, reason if by == "operator" else why)
    return {"type": "quarantined", "device_id": device_id, "by": by, "reason": why,
            "previous_status": entry.get("status"), "at": time.time(), "detail": why}


def list_devices(client: redis.Redis, settings: Settings) -> list[dict[str, str]]:
    """Every enrolled device with its registry fields, key fingerprint and last accepted sequence number."""
    ids = sorted(client.smembers(devices_key(settings)))
    pipe = client.pipeline()
    for device_id in ids:
        pipe.hgetall(device_key(settings, device_id))
        pipe.get(seq_key(settings, device_id))
    replies = pipe.execute()
    rows = []
    for device_id, entry, state in zip(ids, replies[::2], replies[1::2]):
        if not entry.get("public_key"):
            continue
        last_seq = state.split("\0", 1)[0] if state else "-"  # the admission state's first field
        rows.append({"device_id": device_id, **entry, "fingerprint": fingerprint(entry["public_key"]),
                     "last_seq": "" if last_seq == "-" else last_seq})
    return rows
