"""Redis keys of the device registry, admission state (sequence numbers, token buckets) and the model version.

Every key is namespaced by ``Settings.redis_prefix`` (default ``fedguard``):

| key | type | holds |
|---|---|---|
| ``fedguard:device:<id>`` | hash | registry: ``public_key`` (X25519, hex), ``status`` (active, quarantined, revoked), ``enrolled_at``, ``key_version``, ``key_rotated_at``, ``revoked_at``, ``status_reason`` |
| ``fedguard:auth:<id>`` | string | ``<status> <public key hex>``: the two registry fields admission needs, rewritten from the hash in the same script as every change to them (:data:`UPDATE_DEVICE_LUA`), so admission reads all the devices of a call with one ``MGET`` |
| ``fedguard:seq:<id>`` | string | admission state, written only by the admission script: ``<seq>\\0<delivery>\\0<tokens>\\0<tokens_ts>\\0<window base>\\0`` (NUL-ended fields: one ``struct.unpack`` in Lua; :func:`admission_state` reads it): the sequence number of the last accepted update and its ``<update id>@<raw partition>:<offset>`` (replay protection), then the device's token bucket, then the highest base version it had an update accepted for (one update per device per window); ``-`` for a field not set yet (a state written before the last field existed has four). Kept when a device is enrolled again |
| ``fedguard:devices`` | set | every enrolled device id |
| ``fedguard:ingress`` | hash | ``tokens`` and ``ts`` of the global ingress bucket |
| ``fedguard:noted:<kind>:<id>`` | string, expires | set when a security event of ``kind`` (rate_limited, replay) was emitted for device ``<id>``; ``fedguard:noted:ingress_limited`` for the global bucket. Bounds events to one per ``security_event_interval_s`` |
| ``fedguard:operator:credential`` | string | JSON: scrypt parameters, salt and hash of the operator token (fedguard/operator.py) |
| ``fedguard:audit`` | list | JSON records of operator actions (enroll, revoke, rotate), newest first, capped at 10,000 |
| ``fedguard:server:public_key`` | string | the server's X25519 public key (hex) that devices seal to |
| ``fedguard:model:<model id>:version`` | string | the current global model version, written by the aggregator |
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

# Admission of a batch of authenticated updates, atomically, in the order given (issue 3, items 3 and 4). For each
# record, in this order:
#   1. the registry: the public key the validator opened the record with must still be the device's key (else
#      'rekey': the validator re-reads it; a record sealed with a replaced key then fails authentication), and the
#      device must be active ('revoked', 'quarantined');
#   2. replay: the sequence number must be above the last accepted one. The same update id at the same raw position
#      is the same record delivered again after a worker crash (at-least-once), not a replay: it gets the same
#      answer and takes no token;
#   3. rate: one token from the device's bucket ('rate_limited'), then one from the global bucket
#      ('ingress_limited'); both or neither are taken. Only authentic, fresh records get here, so a forger or a
#      replayer cannot drain an honest device's bucket;
#   4. the first local check that failed (clock skew, sample count, codec, tensor), if any: its token stays spent;
#   5. the base version against the current one ('future_version', 'stale');
#   6. one update per device per window: the base version must be above the highest one this device already had an
#      update accepted for ('window_duplicate'), so a device (or a flood from it) holds at most one seat in the
#      window of a base version, across workers and restarts; then the sequence number advances.
# Security events (rate_limited, ingress_limited, replay) are flagged at most once per device (globally for
# ingress) per interval, with SET NX PX, so a flood produces one event, not one per record.
# Time comes from the Redis server (TIME), so every processors worker sees the same buckets.
#
# ARGV: prefix, device capacity, device refill/s, global capacity, global refill/s, event interval (ms), max
# staleness, model id, then the records, each six fields ended by a NUL byte: "<device id>\0<public key hex>\0<seq>\0
# <delivery>\0<local reason or ->\0<base version>\0" (ids match [A-Za-z0-9._-]+, so no NUL can occur inside a field),
# then '1', or '0' to turn step 6 off (Settings.one_update_per_window).
# Returns one line per record: "<code> <1 if an event should be emitted, else 0> <info or ->".
# Cost: the records are read with one struct.unpack each, and the registry entries and admission state of all the
# call's devices with two MGETs and written back with one MSET: a redis.call per record (an HMGET and an HSET, ~6 us
# of the ~9 per record this script took before) would cost more than all the rest. Records of one device in one call
# see each other's updates, in order. Keys are built from the prefix inside the script: a single Redis (or a
# cluster with the whole namespace in one slot via a {hash tag} prefix).
ADMIT_LUA = r"""
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local snow = string.format('%.6f', now)
local prefix = ARGV[1]
local dcap, drate = tonumber(ARGV[2]), tonumber(ARGV[3])
local gcap, grate = tonumber(ARGV[4]), tonumber(ARGV[5])
local interval, staleness = tonumber(ARGV[6]), tonumber(ARGV[7])
local one_per_window = ARGV[10] ~= '0'
local gkey = prefix .. ':ingress'
local g = redis.call('HMGET', gkey, 'tokens', 'ts')
local gtokens = tonumber(g[1]) or gcap
gtokens = math.min(gcap, gtokens + math.max(0, now - (tonumber(g[2]) or now)) * grate)
local gtaken = false
local current = redis.call('GET', prefix .. ':model:' .. ARGV[8] .. ':version')
if current then current = tonumber(current) end
local function note(key)
  if redis.call('SET', key, '1', 'NX', 'PX', interval) then return '1' end
  return '0'
end
local function chunked(command, args)  -- unpack() is bounded by the Lua C stack
  local out, i = {}, 1
  while i <= #args do
    local part = redis.call(command, unpack(args, i, math.min(#args, i + 999)))
    if type(part) == 'table' then for _, v in ipairs(part) do out[#out + 1] = v end end
    i = i + 1000
  end
  return out
end
-- the records, as columns
local data, pos, size = ARGV[9], 1, #ARGV[9]
local n, rid, rpk, rseqs, rdel, rloc, rbase = 0, {}, {}, {}, {}, {}, {}
local ids, slot = {}, {}
while pos <= size do
  n = n + 1
  local id, bases
  id, rpk[n], rseqs[n], rdel[n], rloc[n], bases, pos = struct.unpack('ssssss', data, pos)
  rbase[n] = tonumber(bases)
  local i = slot[id]
  if not i then i = #ids + 1; ids[i] = id; slot[id] = i end
  rid[n] = i
end
-- the devices: registry entry and admission state, one MGET each
local akeys, skeys = {}, {}
for i = 1, #ids do akeys[i] = prefix .. ':auth:' .. ids[i]; skeys[i] = prefix .. ':seq:' .. ids[i] end
local auth, state = chunked('MGET', akeys), chunked('MGET', skeys)
local sseqs, sseq, sdel, stok, sts, swin, dirty = {}, {}, {}, {}, {}, {}, {}
for i = 1, #ids do
  local s = state[i]
  if s then
    local tok, ts, spos
    sseqs[i], sdel[i], tok, ts, spos = struct.unpack('ssss', s)
    sseq[i], stok[i], sts[i] = tonumber(sseqs[i]), tonumber(tok), tonumber(ts)
    if spos <= #s then swin[i] = tonumber((struct.unpack('s', s, spos))) end
  else
    sseqs[i] = '-'; sdel[i] = '-'
  end
end
local out = {}
for k = 1, n do
  local i = rid[k]
  local code, ev, info = nil, '0', '-'
  local a = auth[i]
  if not a then code = 'unknown_device'
  elseif a ~= 'active ' .. rpk[k] then
    local sp = string.find(a, ' ', 1, true) or (#a + 1)
    local status = string.sub(a, 1, sp - 1)
    if string.sub(a, sp + 1) ~= rpk[k] then code = 'rekey'
    elseif status == 'revoked' then code = 'revoked'
    else code = 'quarantined'; info = status end
  end
  local redelivery = false
  if not code then
    local seq = tonumber(rseqs[k])
    if sseq[i] and seq <= sseq[i] then
      if sdel[i] == rdel[k] then redelivery = true
      else code = 'replay'; info = sseqs[i]; ev = note(prefix .. ':noted:replay:' .. ids[i]) end
    end
    if not code and not redelivery then
      local tokens = stok[i] or dcap
      tokens = math.min(dcap, tokens + math.max(0, now - (sts[i] or now)) * drate)
      if tokens < 1 then
        code = 'rate_limited'; info = string.format('%.3f', tokens)
        ev = note(prefix .. ':noted:rate_limited:' .. ids[i])
      elseif gtokens < 1 then
        code = 'ingress_limited'; info = string.format('%.3f', gtokens)
        ev = note(prefix .. ':noted:ingress_limited')
      else
        gtokens = gtokens - 1; gtaken = true
        stok[i] = tokens - 1; sts[i] = now; dirty[i] = true
      end
    end
  end
  if not code and rloc[k] ~= '-' then code = rloc[k] end
  if not code then
    local base = rbase[k]
    if not current then code = 'future_version'; info = 'none'
    elseif base > current then code = 'future_version'; info = tostring(current)
    elseif base < current - staleness then code = 'stale'; info = tostring(current)
    elseif one_per_window and not redelivery and swin[i] and base <= swin[i] then
      code = 'window_duplicate'; info = tostring(swin[i])
    else
      code = 'ok'
      if not redelivery then
        sseqs[i] = rseqs[k]; sseq[i] = tonumber(rseqs[k]); sdel[i] = rdel[k]; swin[i] = base; dirty[i] = true
      end
    end
  end
  out[k] = code .. ' ' .. ev .. ' ' .. info
end
local writes = {}
for i = 1, #ids do
  if dirty[i] then
    writes[#writes + 1] = skeys[i]
    writes[#writes + 1] = sseqs[i] .. '\0' .. sdel[i] .. '\0' .. (stok[i] or '-') .. '\0' .. (sts[i] or '-') .. '\0'
      .. (swin[i] or '-') .. '\0'
  end
end
if #writes > 0 then chunked('MSET', writes) end
if gtaken then redis.call('HSET', gkey, 'tokens', gtokens, 'ts', snow) end
return table.concat(out, '\n')
"""


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


def sketch_seed_key(settings: Settings) -> str:
    return settings.redis_key("detector", "sketch_seed")


def sketch_seed(client: redis.Redis, settings: Settings) -> int:
    """The deployment's secret sketch seed: read, or made from OS entropy by the first caller (SET NX)."""
    from fedguard.sketch import new_secret_seed

    client.set(sketch_seed_key(settings), str(new_secret_seed()), nx=True)
    return int(client.get(sketch_seed_key(settings)))


def admit_args(settings: Settings, records: list[str]) -> list[object]:
    """ARGV of :data:`ADMIT_LUA`; ``records`` are its records, each six NUL-ended fields (see there)."""
    return [settings.redis_prefix, settings.rate_device_capacity, settings.rate_device_refill_per_s,
            settings.rate_global_capacity, settings.rate_global_refill_per_s,
            max(1, int(settings.security_event_interval_s * 1000)), settings.max_staleness, settings.model_id,
            "".join(records), "1" if settings.one_update_per_window else "0"]


def admission_record(device_id: str, public_hex: str, seq: int, delivery: str, local_reason: str | None,
                     base_version: int) -> str:
    """One record of :data:`ADMIT_LUA`'s input."""
    return f"{device_id}\0{public_hex}\0{seq}\0{delivery}\0{local_reason or '-'}\0{base_version}\0"


def admission_state(client: redis.Redis, settings: Settings, device_id: str) -> dict[str, str]:
    """A device's admission state (``seq``, ``delivery``, ``tokens``, ``tokens_ts``, ``window_base``; empty before
    its first)."""
    value = client.get(seq_key(settings, device_id))
    if value is None:
        return {}
    return {k: v for k, v in zip(("seq", "delivery", "tokens", "tokens_ts", "window_base"), value.split("\0"))
            if v != "-"}


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
# (``<status> <public key>``, read by ADMIT_LUA) from the hash in the same atomic step. KEYS: the hash, the auth
# string; ARGV: field/value pairs to set, then, if the last argument is a field name alone, a field to increment.
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
        last_seq = state.split("\0", 1)[0] if state else "-"
        rows.append({"device_id": device_id, **entry, "fingerprint": fingerprint(entry["public_key"]),
                     "last_seq": "" if last_seq == "-" else last_seq})
    return rows
