"""A live poisoning campaign: which enrolled devices are compromised, with which attack, from which round on.

The insider threat: a compromised device keeps its valid key; its updates are sealed and validated like everyone's.
The campaign is one JSON string per model in Redis, so every process sees it: ``fedguard attack KIND`` writes it,
the fleet reads it once per round (and crafts the compromised devices' updates with :mod:`producers.attacks`),
``fedguard attack status`` shows it, ``fedguard attack stop`` ends it.

Ground truth for scoring: every malicious update the fleet sends is appended to a ledger (a Redis list) that lives
outside the pipeline's data path. The processors and the aggregator never read it: only the demo, the evaluation
and the CLI do, to score the detectors afterwards.

| key | type | holds |
|---|---|---|
| ``fedguard:attack:<model id>`` | string | the campaign (JSON of :class:`Campaign`) |
| ``fedguard:attack:<model id>:fired:<campaign id>`` | string | rounds in which the campaign sent updates |
| ``fedguard:attack:<model id>:ledger`` | list | JSON per malicious update: campaign, kind, device, update id, base version, num_samples, norm |
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from fedguard import registry
from fedguard.settings import Settings
from producers.enroll import device_ids

LEDGER_LENGTH = 100_000
SINGLE_SHOT = {"model_replacement": 1}  # kinds that fire in one round unless --rounds says otherwise


def campaign_key(settings: Settings) -> str:
    return settings.redis_key("attack", settings.model_id)


def fired_key(settings: Settings, campaign_id: str) -> str:
    return settings.redis_key("attack", settings.model_id, "fired", campaign_id)


def ledger_key(settings: Settings) -> str:
    return settings.redis_key("attack", settings.model_id, "ledger")


@dataclass
class Campaign:
    kind: str
    params: dict[str, Any]
    fraction: float
    devices: list[str]
    start_version: int  # the first base version whose round may be attacked
    rounds: int | None  # rounds in which it fires (a round in which no compromised device is sampled does not count)
    id: str = field(default_factory=lambda: secrets.token_hex(4))
    started_at: float = field(default_factory=time.time)
    stopped_at: float | None = None

    def fires_at(self, version: int, fired: int) -> bool:
        return (self.stopped_at is None and version >= self.start_version
                and (self.rounds is None or fired < self.rounds))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Campaign":
        return cls(**json.loads(text))


def choose_devices(settings: Settings, fraction: float, client: redis.Redis) -> list[str]:
    """``round(fraction * fleet)`` (at least one) of the fleet's enrolled, active devices, drawn with OS entropy."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
    fleet = device_ids(settings.num_devices)
    pipe = client.pipeline()
    for device_id in fleet:
        pipe.hget(registry.device_key(settings, device_id), "status")
    active = [d for d, status in zip(fleet, pipe.execute()) if status == registry.ACTIVE]
    if not active:
        raise ValueError("no active enrolled device to compromise; is the stack up (fedguard up)?")
    count = max(1, min(len(active), round(fraction * settings.num_devices)))
    return sorted(secrets.SystemRandom().sample(active, count))


def start(client: redis.Redis, settings: Settings, kind: str, fraction: float, params: dict[str, Any] | None = None,
          start_version: int | None = None, rounds: int | None = None,
          devices: list[str] | None = None) -> Campaign:
    """Compromise a fraction of the fleet (or exactly ``devices``) from ``start_version`` (default: the next round)
    on; replaces any campaign."""
    from producers.attacks import validate_params

    params = validate_params(kind, params or {})
    if start_version is None:
        current = client.get(registry.model_version_key(settings))
        start_version = int(current) + 1 if current is not None else 0
    if rounds is not None and rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    if devices:
        unknown = sorted(set(devices) - set(device_ids(settings.num_devices)))
        if unknown:
            raise ValueError(f"not devices of this fleet: {', '.join(unknown)}")
        fraction = len(set(devices)) / settings.num_devices
    chosen = sorted(set(devices)) if devices else choose_devices(settings, fraction, client)
    campaign = Campaign(kind=kind, params=params, fraction=fraction, devices=chosen,
                        start_version=int(start_version), rounds=rounds if rounds is not None else SINGLE_SHOT.get(kind))
    client.set(campaign_key(settings), campaign.to_json())
    return campaign


def load(client: redis.Redis, settings: Settings) -> Campaign | None:
    text = client.get(campaign_key(settings))
    return Campaign.from_json(text) if text else None


def stop(client: redis.Redis, settings: Settings) -> Campaign | None:
    campaign = load(client, settings)
    if campaign is None or campaign.stopped_at is not None:
        return campaign
    campaign.stopped_at = time.time()
    client.set(campaign_key(settings), campaign.to_json())
    return campaign


def fired(client: redis.Redis, settings: Settings, campaign: Campaign) -> int:
    return int(client.get(fired_key(settings, campaign.id)) or 0)


def record_round(client: redis.Redis, settings: Settings, campaign: Campaign, entries: list[dict[str, Any]]) -> None:
    """One round in which the campaign fired, and the malicious updates it sent (the ground truth)."""
    pipe = client.pipeline()
    pipe.incr(fired_key(settings, campaign.id))
    for entry in entries:
        pipe.rpush(ledger_key(settings), json.dumps({"campaign": campaign.id, "kind": campaign.kind, **entry}))
    pipe.ltrim(ledger_key(settings), -LEDGER_LENGTH, -1)
    pipe.execute()


def ledger(client: redis.Redis, settings: Settings) -> list[dict[str, Any]]:
    """Every recorded malicious update, oldest first (for scoring only)."""
    return [json.loads(item) for item in client.lrange(ledger_key(settings), 0, -1)]
