"""Redis keys of the device registry, admission state (sequence numbers, token buckets) and the model version.

Every key is namespaced by ``Settings.redis_prefix`` (default ``fedguard``):

| key | type | holds |
|---|---|---|
| ``fedguard:device:<id>`` | hash | registry: ``public_key`` (X25519, hex), ``status`` (active, quarantined, revoked), ``enrolled_at``, ``key_version``, ``key_rotated_at``, ``revoked_at``, ``status_reason``; admission state, written only by the admission script: ``seq`` of the last accepted update and ``delivery`` as ``<update id>@<raw partition>:<offset>`` (replay protection), ``tokens`` and ``tokens_ts`` of the device's token bucket. One hash, so admission reads a device with one command; re-enrolling keeps the sequence number |
| ``fedguard:devices`` | set | every enrolled device id |
| ``fedguard:ingress`` | hash | ``tokens`` and ``ts`` of the global ingress bucket |
| ``fedguard:noted:<kind>:<id>`` | string, expires | set when a security event of ``kind`` (rate_limited, replay) was emitted for device ``<id>``; ``fedguard:noted:ingress_limited`` for the global bucket. Bounds events to one per ``security_event_interval_s`` |
| ``fedguard:operator:credential`` | string | JSON: scrypt parameters, salt and hash of the operator token (fedguard/operator.py) |
| ``fedguard:audit`` | list | JSON records of operator actions (enroll, revoke, rotate), newest first, capped at 10,000 |
| ``fedguard:server:public_key`` | string | the server's X25519 public key (hex) that devices seal to |
| ``fedguard:model:<model id>:version`` | string | the current global model version, written by the aggregator |
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
ADMISSION_FIELDS = ("seq", "delivery", "tokens", "tokens_ts")  # in the device hash, written by ADMIT_LUA
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
#   5. the base version against the current one ('future_version', 'stale'); then the sequence number advances.
# Security events (rate_limited, ingress_limited, replay) are flagged at most once per device (globally for
# ingress) per interval, with SET NX PX, so a flood produces one event, not one per record.
# Time comes from the Redis server (TIME), so every processors worker sees the same buckets.
#
# ARGV: prefix, device capacity, device refill/s, global capacity, global refill/s, event interval (ms), max
# staleness, model id, then the records, one per line: "<device id> <public key hex> <seq> <delivery> <local
# reason or -> <base version>" (ids match [A-Za-z0-9._-]+, so spaces and newlines cannot occur inside a field).
# Returns one line per record: "<code> <1 if an event should be emitted, else 0> <info or ->". One argument in and
# one string out keep the client's per-record cost to a string join and a split. Keys are built from the prefix
# inside the script: a single Redis (or a cluster with the whole namespace in one slot via a {hash tag} prefix).
ADMIT_LUA = r"""
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local snow = string.format('%.6f', now)
local prefix = ARGV[1]
local dcap, drate = tonumber(ARGV[2]), tonumber(ARGV[3])
local gcap, grate = tonumber(ARGV[4]), tonumber(ARGV[5])
local interval, staleness = tonumber(ARGV[6]), tonumber(ARGV[7])
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
local out = {}
local data, pos = ARGV[9], 1
local size = #data
while pos <= size do
  -- plain finds and subs: a pattern match per line costs twice as much
  local e1 = string.find(data, ' ', pos, true)
  local e2 = string.find(data, ' ', e1 + 1, true)
  local e3 = string.find(data, ' ', e2 + 1, true)
  local e4 = string.find(data, ' ', e3 + 1, true)
  local e5 = string.find(data, ' ', e4 + 1, true)
  local e6 = string.find(data, '\n', e5 + 1, true) or (size + 1)
  local id, pk, seqs = string.sub(data, pos, e1 - 1), string.sub(data, e1 + 1, e2 - 1), string.sub(data, e2 + 1, e3 - 1)
  local delivery, localr = string.sub(data, e3 + 1, e4 - 1), string.sub(data, e4 + 1, e5 - 1)
  local seq, base = tonumber(seqs), tonumber(string.sub(data, e5 + 1, e6 - 1))
  pos = e6 + 1
  local code, ev, info = nil, '0', '-'
  local dkey = prefix .. ':device:' .. id
  -- one read of the registry entry and the admission state: each redis.call costs ~3 us of the ~7 per record
  local dev = redis.call('HMGET', dkey, 'public_key', 'status', 'seq', 'delivery', 'tokens', 'tokens_ts')
  if not dev[1] then code = 'unknown_device'
  elseif dev[1] ~= pk then code = 'rekey'
  elseif dev[2] == 'revoked' then code = 'revoked'
  elseif dev[2] ~= 'active' then code = 'quarantined'; info = tostring(dev[2] or 'no-status')
  end
  local redelivery = false
  local fields = {}
  if not code then
    local last = tonumber(dev[3])
    if last and seq <= last then
      if dev[4] == delivery then redelivery = true
      else code = 'replay'; info = dev[3]; ev = note(prefix .. ':noted:replay:' .. id) end
    end
    if not code and not redelivery then
      local tokens = tonumber(dev[5]) or dcap
      tokens = math.min(dcap, tokens + math.max(0, now - (tonumber(dev[6]) or now)) * drate)
      if tokens < 1 then
        code = 'rate_limited'; info = string.format('%.3f', tokens)
        ev = note(prefix .. ':noted:rate_limited:' .. id)
      elseif gtokens < 1 then
        code = 'ingress_limited'; info = string.format('%.3f', gtokens)
        ev = note(prefix .. ':noted:ingress_limited')
      else
        gtokens = gtokens - 1; gtaken = true
        fields = {'tokens', tokens - 1, 'tokens_ts', snow}
      end
    end
  end
  if not code and localr ~= '-' then code = localr end
  if not code then
    if not current then code = 'future_version'; info = 'none'
    elseif base > current then code = 'future_version'; info = tostring(current)
    elseif base < current - staleness then code = 'stale'; info = tostring(current)
    else
      code = 'ok'
      if not redelivery then
        fields[#fields+1] = 'seq'; fields[#fields+1] = seqs
        fields[#fields+1] = 'delivery'; fields[#fields+1] = delivery
      end
    end
  end
  if #fields > 0 then redis.call('HSET', dkey, unpack(fields)) end
  out[#out+1] = code .. ' ' .. ev .. ' ' .. info
end
if gtaken then redis.call('HSET', gkey, 'tokens', gtokens, 'ts', snow) end
return table.concat(out, '\n')
"""


def device_key(settings: Settings, device_id: str) -> str:
    return settings.redis_key("device", device_id)


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


def admit_args(settings: Settings, records: list[str]) -> list[object]:
    """ARGV of :data:`ADMIT_LUA`; ``records`` are its lines (see there)."""
    return [settings.redis_prefix, settings.rate_device_capacity, settings.rate_device_refill_per_s,
            settings.rate_global_capacity, settings.rate_global_refill_per_s,
            max(1, int(settings.security_event_interval_s * 1000)), settings.max_staleness, settings.model_id,
            "\n".join(records)]


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


def register_device(client: redis.Redis, settings: Settings, device_id: str, public_key_hex: str) -> None:
    pipe = client.pipeline()
    pipe.hset(device_key(settings, device_id),
              mapping={"public_key": public_key_hex, "status": ACTIVE, "enrolled_at": f"{time.time():.3f}",
                       "key_version": 1})
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
    client.hset(device_key(settings, device_id), mapping=fields)


def set_public_key(client: redis.Redis, settings: Settings, device_id: str, public_key_hex: str) -> str:
    """Replace a device's public key (rotation); returns the old one. The status is left as it is."""
    old = client.hget(device_key(settings, device_id), "public_key")
    if old is None:
        raise KeyError(f"device {device_id!r} is not enrolled")
    pipe = client.pipeline()
    pipe.hset(device_key(settings, device_id),
              mapping={"public_key": public_key_hex, "key_rotated_at": f"{time.time():.3f}"})
    pipe.hincrby(device_key(settings, device_id), "key_version", 1)
    pipe.execute()
    return old


def list_devices(client: redis.Redis, settings: Settings) -> list[dict[str, str]]:
    """Every enrolled device with its registry fields, key fingerprint and last accepted sequence number."""
    ids = sorted(client.smembers(devices_key(settings)))
    pipe = client.pipeline()
    for device_id in ids:
        pipe.hgetall(device_key(settings, device_id))
    rows = []
    for device_id, entry in zip(ids, pipe.execute()):
        if not entry.get("public_key"):
            continue
        rows.append({"device_id": device_id, **{k: v for k, v in entry.items() if k not in ADMISSION_FIELDS},
                     "fingerprint": fingerprint(entry["public_key"]), "last_seq": entry.get("seq", "")})
    return rows
