"""The window stage's defence: the detection ensemble on a closing window, and reputation in Redis.

When a window closes, :meth:`WindowDefence.judge` reads the members' per-device histories and reputations, the
previous global update's sketch and the angle baseline from Redis, runs :func:`processors.ensemble.score_window`
(pure), feeds each member's *evidence* to the beta reputation (:func:`processors.reputation.observe`, pure), and
applies everything in one atomic step (:data:`APPLY_WINDOW_LUA`):

* the window's outcome is stored under ``fedguard:window:<window id>`` with SET NX: a window closed again after a
  worker crash (at-least-once delivery) gets the stored outcome back and changes nothing, so reputation is updated
  exactly once per window, and the re-sent ``fl.windows`` record is identical;
* reputations (``fedguard:reputation:<id>``: ``trust`` = E, ``state`` = JSON) and histories are written, each
  device's bounded audit history is pushed, and a device the reputation quarantines gets ``quarantined`` in the
  registry (with its auth string, so the validator refuses its next update at once), unless it is revoked.

Events (``flagged``, ``quarantined``, ``released``) are returned for the caller to publish on ``fl.events``.

Redis keys owned here (namespaced by ``Settings.redis_prefix``):

| key | type | holds |
|---|---|---|
| ``fedguard:window:<window id>:<members digest>`` | string, expires (7 days) | the judged window (members' verdicts, stats, events) |
| ``fedguard:reputation:<id>`` | hash | ``trust`` (E of the beta reputation, read by the aggregator and the ensemble), ``state`` (JSON of :class:`Reputation`), ``updated_at`` |
| ``fedguard:reputation:<id>:history`` | list | newest first, capped at ``HISTORY_LENGTH``: JSON per window (window, verdict, evidence, weight, flags, reasons, scores, trust after) |
| ``fedguard:detector:history:<id>`` | string | the device's :class:`DeviceHistory` (sum of its sketches) |
| ``fedguard:detector:<model id>:global_sketch`` | string | sketch of the last global update (weighted mean of the last window's admitted members' sketches) |
| ``fedguard:detector:<model id>:angle_baseline`` | string | JSON list: the last 500 cosines between two non-rejected members of a window, oldest first (:func:`processors.detectors.angle_scale`) |
| ``fedguard:quarantined`` | set | devices quarantined by reputation (the release timer scans it) |
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from fedguard import registry
from fedguard import sketch as sketch_codec
from fedguard.settings import Settings
from fedguard.weighting import admitted, sample_weights, weighted_mean
from processors.detectors import DeviceHistory, extended_baseline
from processors.ensemble import EnsembleConfig, json_safe, score_window
from processors.reputation import Reputation, ReputationParams, expectation, maybe_release, observe

log = logging.getLogger("fedguard.defence")

HISTORY_LENGTH = 200
WINDOW_RECORD_TTL_S = 7 * 24 * 3600

# KEYS[1]: the window's outcome key. ARGV[1]: the outcome (JSON), ARGV[2]: its TTL in seconds, ARGV[3]: the plan,
# JSON {"hset": [[key, field, value, ...]], "set": [[key, value]], "push": [[key, value, cap]], "quarantine":
# [[device hash, auth key, reason]], "sadd": [[key, member]]}. Returns nil when applied now, else the stored outcome.
APPLY_WINDOW_LUA = r"""
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[2])) then
  return redis.call('GET', KEYS[1])
end
local plan = cjson.decode(ARGV[3])
for _, h in ipairs(plan.hset) do redis.call('HSET', unpack(h)) end
for _, kv in ipairs(plan.set) do redis.call('SET', kv[1], kv[2]) end
for _, p in ipairs(plan.push) do
  redis.call('LPUSH', p[1], p[2]); redis.call('LTRIM', p[1], 0, tonumber(p[3]) - 1)
end
for _, q in ipairs(plan.quarantine) do
  local status = redis.call('HGET', q[1], 'status')
  if status == 'active' then  -- a revoked device stays revoked
    redis.call('HSET', q[1], 'status', 'quarantined', 'status_reason', q[3])
    local pk = redis.call('HGET', q[1], 'public_key')
    if pk then redis.call('SET', q[2], 'quarantined ' .. pk) end
  end
end
for _, m in ipairs(plan.sadd) do redis.call('SADD', m[1], m[2]) end
return false
"""

# The closure of a window, durable before its record is sent (issue 12, item 6): a worker killed after it sent a
# window's record, but before its table's changelog held the closure, has the next owner of the partition re-open
# the window from the re-delivered index entries and close it again, perhaps with fewer members. The next owner finds
# the first closure here and sends that record again instead (the aggregator skips a window it applied).
# KEYS[1]: the model store's id key (fedguard/registry.py; '-' when unset). ARGV[1]: the closures' key prefix,
# ARGV[2]: the window id, ARGV[3]: the window's record (JSON), or '' only to look, ARGV[4]: the TTL in seconds.
# Returns the record of an earlier closure, or nil when there was none (and ARGV[3], if given, is stored now).
CLOSE_WINDOW_LUA = r"""
local key = ARGV[1] .. ':' .. (redis.call('GET', KEYS[1]) or '-') .. ':' .. ARGV[2]
local earlier = redis.call('GET', key)
if earlier then return earlier end
if ARGV[3] ~= '' then redis.call('SET', key, ARGV[3], 'EX', tonumber(ARGV[4])) end
return false
"""

# The devices admission recorded as equivocating for a base version (fedguard.registry.equivocated_key; written by
# processors/admission.py). KEYS[1]: the model store's id key. ARGV[1]: the sets' key prefix, ARGV[2]:
# '<model id>:<base version>'. Returns the set's members.
EQUIVOCATED_LUA = r"""
return redis.call('SMEMBERS', ARGV[1] .. ':' .. (redis.call('GET', KEYS[1]) or '-') .. ':' .. ARGV[2])
"""

# Release a device from quarantine if it is still quarantined by reputation. KEYS: reputation hash, device hash, auth
# key, quarantined set. ARGV: device id, new state JSON, trust, now. Returns 1 if released.
RELEASE_LUA = r"""
redis.call('SREM', KEYS[4], ARGV[1])
local status = redis.call('HGET', KEYS[2], 'status')
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'trust', ARGV[3], 'updated_at', ARGV[4])
if status ~= 'quarantined' then return 0 end
redis.call('HSET', KEYS[2], 'status', 'active', 'status_reason', 'released after probation')
local pk = redis.call('HGET', KEYS[2], 'public_key')
if pk then redis.call('SET', KEYS[3], 'active ' .. pk) end
return 1
"""


def reputation_key(settings: Settings, device_id: str) -> str:
    return settings.redis_key("reputation", device_id)


def reputation_history_key(settings: Settings, device_id: str) -> str:
    return settings.redis_key("reputation", device_id, "history")


def detector_history_key(settings: Settings, device_id: str) -> str:
    return settings.redis_key("detector", "history", device_id)


def global_sketch_key(settings: Settings) -> str:
    return settings.redis_key("detector", settings.model_id, "global_sketch")


def angle_baseline_key(settings: Settings) -> str:
    return settings.redis_key("detector", settings.model_id, "angle_baseline")


def load_angle_baseline(text: str | bytes | None) -> list[float]:
    """The stored angle baseline, or ``[]`` (no calibration yet: the measured thresholds, the strictest) when there
    is none or it is unreadable."""
    if not text:
        return []
    try:
        values = json.loads(text)
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values):
            raise ValueError("not a list of numbers")
        return [float(v) for v in values]
    except ValueError:  # a damaged entry must not stop the window stage
        log.error("unreadable angle baseline: starting it afresh (the measured direction thresholds)")
        return []


def window_key(settings: Settings, window_id: str, members: list[dict[str, Any]]) -> str:
    """The judged window's key: its id and a digest of its members' update ids. The same window delivered again
    (same members) finds its judgement; a window of the same id with other members (a model store started afresh
    against a Redis that kept its state) is judged as the new window it is."""
    digest = hashlib.sha256("\n".join(sorted(m["update_id"] for m in members)).encode()).hexdigest()[:16]
    return settings.redis_key("window", window_id, digest)


# The set's name lives in the core: an operator's or the model audit's quarantine takes a device out of it.
quarantined_key = registry.quarantined_key


def load_reputation(state: str | None) -> Reputation:
    if not state:
        return Reputation()
    try:
        return Reputation.from_json(state)
    except ValueError:  # a damaged entry must not stop the window stage: start the device over, and say so
        log.error("unreadable reputation state %r: starting the device afresh", state[:100])
        return Reputation()


def measured_loss(value: Any) -> float | None:
    """A member's ``loss`` (or ``base_loss``) from its index record (:func:`processors.app.index_record`): a
    non-negative number, or ``None`` (not measured, or not a loss) so that the ``behaviour`` detector abstains."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if v >= 0 and not math.isnan(v) else None


def global_update_sketch(sketches: np.ndarray, verdicts: list[str], weights: list[float], num_samples: list[float],
                         cap: float | None) -> np.ndarray | None:
    """The sketch of the global update a judged window makes (the next window's ``previous_global``): the mean of
    the admitted members' sketches weighted as FedAvg weighs them (:mod:`fedguard.weighting`), float64 ``(k,)``,
    or ``None`` when nothing was admitted. Pure; :mod:`fedguard.simulation` calls it too."""
    keep = [i for i, (v, w) in enumerate(zip(verdicts, weights)) if admitted(v, w)]
    if not keep:
        return None
    w = sample_weights([float(num_samples[i]) for i in keep], [float(weights[i]) for i in keep], cap)
    return weighted_mean(np.asarray(sketches)[keep], w)


@dataclass
class Judged:
    """A judged window: each member's outcome (``scores``, ``flags``, ``verdict``, ``weight``, ``reasons``,
    ``evidence``, ``trust``), window statistics, and the events to publish."""

    members: list[dict[str, Any]]
    stats: dict[str, Any]
    events: list[dict[str, Any]]
    replayed: bool = False  # True: the window had been judged before (a re-delivery); nothing changed now


class WindowDefence:
    def __init__(self, settings: Settings, client: aioredis.Redis, config: EnsembleConfig | None = None,
                 params: ReputationParams | None = None):
        self.settings = settings
        self.redis = client
        self.config = config or EnsembleConfig()
        self.params = params or ReputationParams(probation_s=settings.quarantine_probation_s)
        self.k = settings.detector_sketch_k
        self._apply = client.register_script(APPLY_WINDOW_LUA)
        self._release = client.register_script(RELEASE_LUA)
        self._close = client.register_script(CLOSE_WINDOW_LUA)
        self._equivocated = client.register_script(EQUIVOCATED_LUA)

    async def judge(self, window_id: str, members: list[dict[str, Any]], now: float | None = None) -> Judged:
        now = time.time() if now is None else now
        s = self.settings
        key = window_key(s, window_id, members)
        stored = await self.redis.get(key)
        if stored is not None:
            return _judged_from(stored)
        devices = [m["device_id"] for m in members]
        pipe = self.redis.pipeline(transaction=False)
        for d in devices:
            pipe.hget(reputation_key(s, d), "state")
        for d in devices:
            pipe.get(detector_history_key(s, d))
        pipe.get(global_sketch_key(s))
        pipe.get(angle_baseline_key(s))
        base = window_id.rsplit(":", 1)[-1]  # window ids are '<model id>:<base version>' (processors/windows.py)
        await self._equivocated(keys=[registry.model_store_key(s)],
                                args=[s.redis_key("equivocated"), f"{s.model_id}:{base}"], client=pipe)
        replies = await pipe.execute()
        reps = [load_reputation(state) for state in replies[:len(devices)]]
        histories = [self._history(text) for text in replies[len(devices):2 * len(devices)]]
        previous = self._decode(replies[-3])
        baseline = load_angle_baseline(replies[-2])
        equivocators = {d.decode() if isinstance(d, bytes) else d for d in replies[-1]}
        sketches = np.stack([self._decode(m.get("sketch")) if m.get("sketch") else np.zeros(self.k, np.float32)
                             for m in members]) if members else np.zeros((0, self.k), np.float32)
        norms = np.array([float(m["norm"]) for m in members])
        trust = np.array([expectation(r) for r in reps])

        if s.detection == "none":
            outcome = [{"scores": {}, "flags": [], "verdict": "accept", "weight": 1.0, "reasons": [],
                        "evidence": "accept"} for _ in members]
            stats: dict[str, Any] = {"detection": "none", "n": len(members)}
        else:
            base_losses = [measured_loss(m.get("base_loss")) for m in members]  # one base version: the same
            verdict = score_window(norms, sketches, histories, previous, trust, self.config,
                                   equivocated=[d in equivocators for d in devices], angle_baseline=baseline,
                                   losses=[measured_loss(m.get("loss")) for m in members],
                                   base_loss=next((b for b in base_losses if b is not None), None))
            outcome = [{"scores": v.scores, "flags": v.flags, "verdict": v.verdict, "weight": v.weight,
                        "reasons": v.reasons, "evidence": v.evidence} for v in verdict.members]
            stats = {"detection": "ensemble", **verdict.stats}
            baseline = extended_baseline(baseline, verdict.angle_pairs)

        plan: dict[str, list] = {"hset": [], "set": [], "push": [], "quarantine": [], "sadd": []}
        events: list[dict[str, Any]] = []
        for i, (member, out) in enumerate(zip(members, outcome)):
            device = member["device_id"]
            plan["set"].append([detector_history_key(s, device), self._updated(histories[i], sketches[i])])
            if s.detection == "none":
                out["trust"] = trust[i]
                continue
            rep, happened = observe(reps[i], out["evidence"], now, self.params)
            out["trust"] = expectation(rep)
            plan["hset"].append([reputation_key(s, device), "state", rep.to_json(), "trust", repr(out["trust"]),
                                 "updated_at", repr(now)])
            plan["push"].append([reputation_history_key(s, device), json.dumps({
                "window_id": window_id, "at": now, "verdict": out["verdict"], "evidence": out["evidence"],
                "weight": out["weight"], "flags": out["flags"], "reasons": out["reasons"], "scores": out["scores"],
                "trust": out["trust"], "status": rep.status}), HISTORY_LENGTH])
            for kind in happened:
                events.append({"type": kind, "device_id": device, "window_id": window_id,
                               "update_id": member["update_id"], "verdict": out["verdict"], "flags": out["flags"],
                               "reasons": out["reasons"], "trust": out["trust"], "at": now})
            if "quarantined" in happened:
                plan["quarantine"].append([registry.device_key(s, device), registry.auth_key(s, device),
                                           f"reputation: trust {out['trust']:.3f} after window {window_id}"])
                plan["sadd"].append([quarantined_key(s), device])
        mean = global_update_sketch(sketches, [o["verdict"] for o in outcome], [o["weight"] for o in outcome],
                                    [m["num_samples"] for m in members], s.sample_count_cap)
        if mean is not None:
            plan["set"].append([global_sketch_key(s), sketch_codec.encode(mean.astype(np.float32))])
        if s.detection != "none":  # written with the window's judgement: once per window, also on re-delivery
            plan["set"].append([angle_baseline_key(s), json.dumps(baseline)])
        judged = Judged(members=[json_safe(o) for o in outcome], stats=json_safe(stats), events=json_safe(events))
        text = json.dumps({"members": judged.members, "stats": judged.stats, "events": judged.events})
        earlier = await self._apply(keys=[key],
                                    args=[text, WINDOW_RECORD_TTL_S, json.dumps(plan)])
        return judged if earlier is None else _judged_from(earlier)

    async def earlier_closure(self, window_id: str, record: str = "") -> str | None:
        """The record of the window's earlier closure by this model store's versions, or ``None``: then ``record``
        (the window's record, JSON), if given, is stored as its closure, atomically with the look."""
        s = self.settings
        earlier = await self._close(keys=[registry.model_store_key(s)],
                                    args=[s.redis_key("window", "closed"), window_id, record, WINDOW_RECORD_TTL_S])
        return earlier.decode() if isinstance(earlier, bytes) else earlier

    async def release_due(self, now: float | None = None) -> list[dict[str, Any]]:
        """Release the devices whose quarantine probation is over; returns their ``released`` events."""
        now = time.time() if now is None else now
        s = self.settings
        devices = sorted(await self.redis.smembers(quarantined_key(s)))
        events = []
        for device in devices:
            rep = load_reputation(await self.redis.hget(reputation_key(s, device), "state"))
            released, happened = maybe_release(rep, now, self.params)
            if not happened:
                continue
            trust = expectation(released)
            done = await self._release(keys=[reputation_key(s, device), registry.device_key(s, device),
                                             registry.auth_key(s, device), quarantined_key(s)],
                                       args=[device, released.to_json(), repr(trust), repr(now)])
            if done:
                events.append({"type": "released", "device_id": device, "trust": trust, "at": now,
                               "reason": "probation over"})
        return events

    def _history(self, text: str | None) -> DeviceHistory | None:
        if not text:
            return None
        try:
            return DeviceHistory.from_json(text, self.k)
        except ValueError:
            log.error("unreadable detector history: starting the device's history afresh")
            return None

    def _updated(self, history: DeviceHistory | None, sketch: np.ndarray) -> str:
        from processors.detectors import updated

        return updated(history, sketch).to_json()

    def _decode(self, text: str | None) -> np.ndarray | None:
        if not text:
            return None
        return sketch_codec.decode(text, self.k)


def _judged_from(stored: str) -> Judged:
    obj = json.loads(stored)
    return Judged(members=obj["members"], stats=obj["stats"], events=obj["events"], replayed=True)


# -- operators ----------------------------------------------------------------------------------------------------

def device_report(client, settings: Settings, device_id: str, last: int = 10) -> dict[str, Any]:
    """What an operator needs to see why a device is trusted or not: registry entry, reputation, last windows."""
    entry = registry.get_device(client, settings, device_id)
    if entry is None:
        raise KeyError(f"device {device_id!r} is not enrolled (fedguard devices list shows the fleet)")
    rep_hash = client.hgetall(reputation_key(settings, device_id))
    rep = load_reputation(rep_hash.get("state"))
    history = [json.loads(item) for item in client.lrange(reputation_history_key(settings, device_id), 0, last - 1)]
    return {"device_id": device_id, "status": entry.get("status"), "status_reason": entry.get("status_reason", ""),
            "fingerprint": registry.fingerprint(entry["public_key"]) if entry.get("public_key") else None,
            "trust": expectation(rep), "reputation": json.loads(rep.to_json()),
            "auto_quarantined": bool(client.sismember(quarantined_key(settings), device_id)),
            "history": history}


def operator_quarantine(client, settings: Settings, device_id: str, reason: str) -> None:
    """Quarantine by hand: the validator refuses the device's updates until an operator releases it (the probation
    timer releases only devices that reputation quarantined)."""
    registry.quarantine_device(client, settings, device_id, reason, by="operator")


def operator_release(client, settings: Settings, device_id: str, params: ReputationParams | None = None) -> float:
    """Release by hand: active again, on probation (evidence restarted as after an automatic release). Returns the
    device's trust after release."""
    params = params or ReputationParams(probation_s=settings.quarantine_probation_s)
    entry = registry.get_device(client, settings, device_id)
    if entry is None:
        raise KeyError(f"device {device_id!r} is not enrolled")
    if entry.get("status") != registry.QUARANTINED:
        raise ValueError(f"device {device_id!r} is {entry.get('status')}, not quarantined")
    rep = load_reputation(client.hget(reputation_key(settings, device_id), "state"))
    # Released as the probation timer releases: from a quarantined state, whatever reputation alone had decided.
    quarantined = replace(rep, status="quarantined", quarantined_at=rep.quarantined_at or 0.0)
    released, _ = maybe_release(quarantined, float("inf"), params)
    trust = expectation(released)
    client.hset(reputation_key(settings, device_id), mapping={"state": released.to_json(), "trust": repr(trust),
                                                               "updated_at": repr(time.time())})
    client.srem(quarantined_key(settings), device_id)
    registry.set_device_status(client, settings, device_id, registry.ACTIVE, "operator: released")
    registry.audit(client, settings, "release", device_id, f"trust {trust:.3f}, on probation")
    return trust
