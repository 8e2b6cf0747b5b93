"""The admission protocol, end to end: the one Redis call that decides, atomically and across every processors
worker, whether an authenticated record is admitted (issue 3, items 3 and 4; issue 13, item 7: one owner).

This module owns

* the script, :data:`ADMIT_LUA`, and how it is called: :class:`AdmissionChannel` (its own connection, send now,
  read later), with the Redis outage policy (:func:`redis_outage`, :class:`Outage`) the validator's other Redis
  reads follow too;
* its input: :func:`admit_args` (ARGV) and :func:`admission_record` (one record of it);
* the state it keeps per device, under ``fedguard:seq:<id>``: written only by the script, read by
  :func:`admission_state`;
* its reply: one line per record, :data:`ACCEPTED` or ``<code> <event> <info>`` (:func:`reply_lines`,
  :func:`parse_line`), and what a code means: :func:`rejection`.

The Redis keys the script reads and writes (``auth``, ``seq``, ``ingress``, ``noted``, the model version) are named and
documented with every other key in :mod:`fedguard.registry`, which also keeps the registry's own script
(:data:`fedguard.registry.UPDATE_DEVICE_LUA`, which writes the ``auth`` strings this one reads). The validator
(:mod:`processors.validation`) is the protocol's runtime user: it builds the records, sends the calls, and turns the
replies into outcomes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time

import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (ClusterDownError, MasterDownError, NoScriptError, OutOfMemoryError, ReadOnlyError,
                              ResponseError, TryAgainError)
from redis.exceptions import TimeoutError as RedisTimeoutError

from fedguard import registry
from fedguard.envelope import UpdateHeader
from fedguard.reasons import Reason, RejectError
from fedguard.settings import Settings

log = logging.getLogger("fedguard.validation")

# Redis outages (a stall, a restart, a full disk or memory): the Redis call is retried, forever, after a back-off that
# doubles from the first value up to the cap; the batch waits, so validation pauses and no record is dead-lettered
# for it. internal_error is left for bugs. One warning when an outage starts, then at most one per REDIS_LOG_EVERY_S
# (per process), and one when Redis answers again.
REDIS_BACKOFF = (0.2, 5.0)  # seconds: first back-off, cap
REDIS_LOG_EVERY_S = 5.0
# The admission call's reply is awaited on its connection (a stalled Redis answers when it resumes: the call runs
# once); after this long without a reply the connection is dropped and the call sent again on a new one.
REDIS_RESEND_AFTER_S = 60.0
REDIS_READ_SLICE_S = 5.0  # the admission reply is read in slices of this long (logging a stall between them)
_OUTAGE_ERRORS = (RedisConnectionError, RedisTimeoutError, OutOfMemoryError, ReadOnlyError, TryAgainError,
                  MasterDownError, ClusterDownError)  # ConnectionError covers LOADING (BusyLoadingError)
_OUTAGE_REPLIES = ("BUSY", "MISCONF", "NOREPLICAS")  # error replies redis-py has no class for

# Admission of a batch of authenticated updates, atomically, in the order given (issue 3, items 3 and 4). For each
# record, in this order:
#   1. the registry: the public key the validator opened the record with must still be the device's key (else
#      'rekey': the validator re-reads it; a record sealed with a replaced key then fails authentication), and the
#      device must be active ('revoked', 'quarantined'), unless the record is a re-delivery (2);
#   2. replay: the sequence number must be above the last accepted one. The same update id at the same raw position
#      as one of the device's last KEEP_DELIVERIES accepted records is that record delivered again after a worker
#      crash (at-least-once), not a replay: it is accepted again whatever the version, the device's seat and its
#      status are now (quarantined or revoked since: the first answer stands, and the window stage, which saw the
#      record, de-duplicates it by update id), and takes no token;
#   3. rate: one token from the device's bucket ('rate_limited'), then one from the global bucket
#      ('ingress_limited'); both or neither are taken. Only authentic, fresh records get here, so a forger or a
#      replayer cannot drain an honest device's bucket;
#   4. the first local check that failed (clock skew, sample count, codec, tensor), if any: its token stays spent;
#   5. the base version against the current one ('future_version', 'stale');
#   6. one update per device per window: the base version must be above the highest one this device already had an
#      update accepted for ('window_duplicate'), so a device (or a flood from it) holds at most one seat in the
#      window of a base version, across workers and restarts; then the sequence number advances.
# An authentic, fresh record (past steps 1 and 2) for the very base version the device already has a seat for is
# also recorded as equivocation (fedguard.registry.equivocated_key), even if its bucket is empty (3) or its content
# is bad (4), so that the window stage rejects the seated one as well.
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
-- A device's last accepted deliveries ('<update id>@<raw position>'), newest first, joined by ',': a worker that
-- dies before committing its offsets has the next owner re-deliver every record it processed since its last commit,
-- which may include a device's earlier accepted record, not only its last one (~50 bytes each per device; one
-- update per device per version keeps the records of one device in an uncommitted span few).
local KEEP_DELIVERIES = 8
local function delivered(list, delivery)
  return string.find(',' .. list .. ',', ',' .. delivery .. ',', 1, true) ~= nil
end
local function remember(list, delivery)
  local kept = {delivery}
  for d in string.gmatch(list, '[^,]+') do
    if #kept >= KEEP_DELIVERIES then break end
    if d ~= '-' then kept[#kept + 1] = d end
  end
  return table.concat(kept, ',')
end
-- A second signed update for the base version a device already has a seat for: equivocation. The window stage
-- rejects the seated one too (processors/defence.py), so sending copies costs the device its seat. The set is kept
-- per model store (a store started afresh restarts its versions at 0), one per base version, for a week.
local store, noted_eq = nil, {}
local function equivocated(i, id, base)
  if noted_eq[i] == base then return end  -- once per device and call: a flood of copies costs one SADD
  noted_eq[i] = base
  if not store then store = redis.call('GET', prefix .. ':model:' .. ARGV[8] .. ':store') or '-' end
  local key = prefix .. ':equivocated:' .. store .. ':' .. ARGV[8] .. ':' .. base
  redis.call('SADD', key, id)
  redis.call('EXPIRE', key, 604800)
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
  local seen = sseq[i] ~= nil and tonumber(rseqs[k]) <= sseq[i]
  local redelivery = seen and delivered(sdel[i], rdel[k])
  if redelivery and (code == 'quarantined' or code == 'revoked') then code = nil; info = '-' end
  if not code then
    if seen and not redelivery then
      code = 'replay'; info = sseqs[i]; ev = note(prefix .. ':noted:replay:' .. ids[i])
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
  -- An authentic, fresh record for the base version of the device's seat is equivocation whatever else is wrong
  -- with it (a stuffer's bucket runs dry: its copies are rate limited, and still signed by it).
  if one_per_window and not redelivery and swin[i] and rbase[k] == swin[i]
      and (not code or code == 'rate_limited' or code == 'ingress_limited') then
    equivocated(i, ids[i], rbase[k])
  end
  if not code and rloc[k] ~= '-' then code = rloc[k] end
  if not code then
    local base = rbase[k]
    if redelivery then code = 'ok'  -- accepted before: the same answer, whatever the version is now
    elseif not current then code = 'future_version'; info = 'none'
    elseif base > current then code = 'future_version'; info = tostring(current)
    elseif base < current - staleness then code = 'stale'; info = tostring(current)
    elseif one_per_window and not redelivery and swin[i] and base <= swin[i] then
      code = 'window_duplicate'; info = tostring(swin[i])
    else
      code = 'ok'
      if not redelivery then
        sseqs[i] = rseqs[k]; sseq[i] = tonumber(rseqs[k]); sdel[i] = remember(sdel[i], rdel[k]); swin[i] = base
        dirty[i] = true
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

RECORD_FIELDS = 6  # NUL-ended fields per record of the script's input
ACCEPTED = "ok 0 -"  # the script's line for an accepted record
REKEY = "rekey"  # the script's code for a record opened with a key that is no longer the device's
_RECORDS_ARG = 8  # the records' place in ARGV (admit_args)


def admit_args(settings: Settings, records: list[str]) -> list[object]:
    """ARGV of :data:`ADMIT_LUA`; ``records`` are its records, each six NUL-ended fields (see there)."""
    return [settings.redis_prefix, settings.rate_device_capacity, settings.rate_device_refill_per_s,
            settings.rate_global_capacity, settings.rate_global_refill_per_s,
            max(1, int(settings.security_event_interval_s * 1000)), settings.max_staleness, settings.model_id,
            "".join(records), "1" if settings.one_update_per_window else "0"]


def record_count(args: list[object]) -> int:
    """How many records the ARGV ``args`` (from :func:`admit_args`) carries: how many lines its reply has."""
    return str(args[_RECORDS_ARG]).count("\0") // RECORD_FIELDS


def admission_record(device_id: str, public_hex: str, seq: int, delivery: str, local_reason: str | None,
                     base_version: int) -> str:
    """One record of :data:`ADMIT_LUA`'s input."""
    return f"{device_id}\0{public_hex}\0{seq}\0{delivery}\0{local_reason or '-'}\0{base_version}\0"


def admission_state(client: redis.Redis, settings: Settings, device_id: str) -> dict[str, str]:
    """A device's admission state (``seq``, ``delivery``, ``tokens``, ``tokens_ts``, ``window_base``; empty before
    its first), as :data:`ADMIT_LUA` keeps it under :func:`fedguard.registry.seq_key`."""
    value = client.get(registry.seq_key(settings, device_id))
    if value is None:
        return {}
    return {k: v for k, v in zip(("seq", "delivery", "tokens", "tokens_ts", "window_base"), value.split("\0"))
            if v != "-"}


def reply_lines(reply: str) -> list[str]:
    """The reply of one call, one line per record in the order sent: :data:`ACCEPTED` or see :func:`parse_line`."""
    return reply.split("\n")


def parse_line(line: str) -> tuple[str, bool, str]:
    """``(code, emit, info)`` of a reply line: the reason code (``ok``, :data:`REKEY` or a :class:`Reason` value),
    whether this record should emit a security event (the script flags at most one per device per interval), and
    the code's detail (a status, a sequence number, a bucket's tokens, a version; ``""`` when none)."""
    code, event, info = line.split(" ", 2)
    return code, event == "1", "" if info == "-" else info


def rejection(code: str, info: str, emit: bool, header: UpdateHeader, settings: Settings) -> RejectError:
    """What a reply code other than ``ok`` and :data:`REKEY` means for the authenticated record of ``header``: its
    :class:`RejectError`, with a security event if ``emit``; a code the validator does not know is an
    ``internal_error``."""
    s, h = settings, header
    details = {
        "unknown_device": f"device {h.device_id!r} is no longer enrolled",
        "revoked": f"device {h.device_id!r} is revoked",
        "quarantined": f"device {h.device_id!r} is {info}",
        "replay": f"sequence {h.seq} not above last accepted {info}",
        "rate_limited": f"device bucket has {info} tokens (capacity {s.rate_device_capacity:g}, "
                        f"refill {s.rate_device_refill_per_s:g}/s)",
        "ingress_limited": f"global ingress bucket has {info} tokens (capacity {s.rate_global_capacity:g}, "
                           f"refill {s.rate_global_refill_per_s:g}/s)",
        "future_version": ("no global model version has been published yet" if info == "none"
                           else f"base version {h.base_version}, current is {info}"),
        "stale": f"base version {h.base_version}, current is {info}, max staleness {s.max_staleness}",
        "window_duplicate": f"device {h.device_id!r} already has an update accepted for base version {info}: "
                            f"one per device per window",
    }
    try:
        reason = Reason(code)
    except ValueError:
        return RejectError(Reason.INTERNAL_ERROR, f"admission returned {code!r}", device_id=h.device_id)
    err = RejectError(reason, details.get(code, code), device_id=h.device_id, authenticated=True)
    if emit:
        err.event = {"type": code, "device_id": h.device_id, "reason": code, "detail": err.detail,
                     "at": time.time()}
    return err


def redis_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis is unreachable or cannot serve right now (worth waiting for), not a bug."""
    if isinstance(exc, _OUTAGE_ERRORS):
        return True
    return isinstance(exc, ResponseError) and str(exc).split(" ", 1)[0] in _OUTAGE_REPLIES


class Outage:
    """The retries of one Redis call: the back-off step, and warnings limited to one per ``REDIS_LOG_EVERY_S``
    across the process (every call waiting on the same outage would otherwise log its own)."""

    _last_logged = -math.inf  # monotonic time of the last warning, process-wide

    def __init__(self, what: str) -> None:
        self.what = what
        self.retries = 0
        self.since: float | None = None

    def delay(self) -> float:
        first, cap = REDIS_BACKOFF
        return min(cap, first * 2 ** min(self.retries, 30))

    async def wait(self, exc: BaseException) -> None:
        now = time.monotonic()
        delay = self.delay()
        if self.since is None:
            self.since = now
            log.warning("Redis unavailable for the %s (%r): validation paused, retrying until it answers",
                        self.what, exc)
            Outage._last_logged = now
        elif now - Outage._last_logged >= REDIS_LOG_EVERY_S:
            log.warning("Redis still unavailable for the %s after %.0fs and %d retries (%r); next retry in %.1fs",
                        self.what, now - self.since, self.retries, exc, delay)
            Outage._last_logged = now
        self.retries += 1
        await asyncio.sleep(delay)

    def stalled(self, waited_s: float) -> None:
        """The reply has not come for ``waited_s`` seconds (Redis stalled or very slow): log, rate-limited."""
        now = time.monotonic()
        if self.since is None:
            self.since = now - waited_s
        if now - Outage._last_logged >= REDIS_LOG_EVERY_S:
            log.warning("Redis has not answered the %s for %.0fs: validation paused, waiting", self.what, waited_s)
            Outage._last_logged = now

    def over(self) -> None:
        if self.since is not None:
            log.warning("Redis answers the %s again after %.1fs (%d retries): validation resumes", self.what,
                        time.monotonic() - self.since, self.retries)
            self.since, self.retries = None, 0


class AdmissionChannel:
    """The admission script (:data:`ADMIT_LUA`) over one connection of its own, split in two: send
    the call now, read its reply later, with this process opening the next records in between.

    redis-py's ``Script`` call goes through ``execute_command``, the pool and the retry layer and must run in a task
    of its own to overlap with anything; on the benchmark machine that cost ~0.4 ms of client time per call. Here a
    call is one ``send_packed_command`` (the bytes are on the socket when it returns) and one ``read_response``:
    the connection is redis-py's (URL, auth, TLS, database and reconnects as configured), only the layers are
    skipped. At most one call is outstanding. A script missing from the server (a restart or ``SCRIPT FLUSH``) is
    loaded and the call sent again. A Redis outage (:func:`redis_outage`) in either half resends the whole call on a
    new connection after a back-off (:data:`REDIS_BACKOFF`), forever: the caller waits (a call that ran before the
    connection broke is then answered again: re-deliveries of the same records, by the script's rule). A reply that
    is only late (a stalled Redis) is awaited on the same connection for :data:`REDIS_RESEND_AFTER_S`, so the call
    runs once.
    """

    def __init__(self, client: aioredis.Redis, script: str = ADMIT_LUA) -> None:
        self._pool = client.connection_pool
        self._script = script
        self._sha = hashlib.sha1(script.encode()).hexdigest()
        self._conn = None
        self._args: list | None = None

    async def send(self, args: list) -> None:
        self._args = args
        outage = Outage("admission call")
        while True:
            try:
                await self._send()
                return outage.over()
            except Exception as exc:
                if not redis_outage(exc):
                    raise
                await self._back_off(exc, outage)

    async def receive(self) -> str:
        outage = Outage("admission call")
        waited = 0.0
        while True:
            try:
                try:
                    reply = await self._conn.read_response(timeout=REDIS_READ_SLICE_S)
                except NoScriptError:
                    await self._conn.send_command("SCRIPT", "LOAD", self._script)
                    await self._conn.read_response()
                    await self._send()
                    continue
                if reply is None:  # no reply yet: the call waits in Redis' queue (a stall), or Redis is gone silently
                    waited += REDIS_READ_SLICE_S
                    if waited < REDIS_RESEND_AFTER_S:
                        outage.stalled(waited)
                        continue
                    raise RedisTimeoutError(f"no reply to the admission call for {waited:.0f}s")
                outage.over()
                return reply
            except Exception as exc:
                if not redis_outage(exc):
                    raise
                await self._back_off(exc, outage)
                waited = 0.0
                try:
                    await self._send()
                except Exception as again:
                    if not redis_outage(again):
                        raise
                    # the next read fails too and takes the next back-off step

    async def _send(self) -> None:
        if self._conn is None:
            self._conn = await self._pool.get_connection()
        conn = self._conn
        await conn.send_packed_command(conn.pack_command("EVALSHA", self._sha, 0, *self._args), check_health=False)

    async def abandon(self) -> None:
        """Drop the call that is out (its reply unread) with the connection it is on."""
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)

    async def _back_off(self, exc: Exception, outage: Outage) -> None:
        """Drop the connection (the reply of a call out on it cannot be paired any more) and wait a back-off step."""
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)
        await outage.wait(exc)
