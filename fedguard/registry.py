"""Redis keys of the device registry, sequence numbers and the current model version.

Every key is namespaced by ``Settings.redis_prefix`` (default ``fedguard``):

| key | type | holds |
|---|---|---|
| ``fedguard:device:<id>`` | hash | ``public_key`` (X25519, hex), ``status`` (active, quarantined, revoked), ``enrolled_at`` |
| ``fedguard:devices`` | set | every enrolled device id |
| ``fedguard:seq:<id>`` | hash | ``seq`` of the last accepted update and ``update_id`` as ``<update id>@<raw partition>:<offset>`` (replay protection) |
| ``fedguard:server:public_key`` | string | the server's X25519 public key (hex) that devices seal to |
| ``fedguard:model:<model id>:version`` | string | the current global model version, written by the aggregator |
"""

from __future__ import annotations

import time

import redis

from fedguard.settings import Settings

ACTIVE = "active"
QUARANTINED = "quarantined"
REVOKED = "revoked"

# Accept seq only if it is above the last accepted one. The same update id at the same raw position is the same
# record processed twice (at-least-once delivery after a worker crash), not a replay, so it gets the same answer.
ADVANCE_SEQ_LUA = """
local cur = redis.call('HGET', KEYS[1], 'seq')
if cur and tonumber(ARGV[1]) <= tonumber(cur) then
  if redis.call('HGET', KEYS[1], 'update_id') == ARGV[2] then return 1 end
  return 0
end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'update_id', ARGV[2])
return 1
"""


def device_key(settings: Settings, device_id: str) -> str:
    return settings.redis_key("device", device_id)


def devices_key(settings: Settings) -> str:
    return settings.redis_key("devices")


def seq_key(settings: Settings, device_id: str) -> str:
    return settings.redis_key("seq", device_id)


def server_public_key(settings: Settings) -> str:
    return settings.redis_key("server", "public_key")


def model_version_key(settings: Settings) -> str:
    return settings.redis_key("model", settings.model_id, "version")


def connect(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, decode_responses=True)


def register_device(client: redis.Redis, settings: Settings, device_id: str, public_key_hex: str) -> None:
    pipe = client.pipeline()
    pipe.hset(device_key(settings, device_id),
              mapping={"public_key": public_key_hex, "status": ACTIVE, "enrolled_at": f"{time.time():.3f}"})
    pipe.sadd(devices_key(settings), device_id)
    pipe.execute()


def set_device_status(client: redis.Redis, settings: Settings, device_id: str, status: str) -> None:
    if not client.exists(device_key(settings, device_id)):
        raise KeyError(f"device {device_id!r} is not enrolled")
    client.hset(device_key(settings, device_id), "status", status)
