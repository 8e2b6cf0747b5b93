"""``fedguard watch``: a live terminal view of a running stack, and the per-round status line of ``fedguard up``.

Works against any stack (the embedded one of ``fedguard up`` or the compose one) from the outside, through what a
CLI process can reach:

* ``fl.models`` (every version with its accuracy and backdoor accuracy), read incrementally by one long-lived
  group-less consumer, so the sparklines grow live and no version is missed (a metric gauge is only sampled);
* Redis: the current version key, trust (``fedguard:reputation:<id>``), the quarantined set and the registry
  status of each device, and the attack campaign (:mod:`producers.campaign`);
* the services' ``/metrics`` endpoints: rejections by reason and detector flags (processors), and whether each
  service answers at all.

A source that does not answer is shown as ``down``; nothing here raises because a part of the stack is missing.

Pure: :func:`sparkline`, :func:`render`, :func:`status_line` (and the helpers they use) work on a :class:`Snapshot`
and are tested on hand-made ones. I/O: :func:`collect` builds a snapshot, :func:`run_watch` redraws it,
:class:`RoundReporter` gives ``fedguard up`` one line per new version.
"""

from __future__ import annotations

import logging
import math
import shutil
import socket
import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Iterable, TextIO

from fedguard import records, registry
from fedguard.stack import processors_metrics_ports
from fedguard.settings import Settings
from processors.ensemble import EnsembleConfig
from processors.reputation import ReputationParams

log = logging.getLogger("fedguard.watch")

BLOCKS = "▁▂▃▄▅▆▇█"
HISTORY = 500  # versions kept between calls (the sparklines show the last ones that fit the width)
SERVICES = ("processors", "aggregator", "fleet")
SOURCES = ("broker", "redis", *SERVICES)
SOURCE_TIMEOUT_S = 1.0  # per source and call: a source that takes longer is shown as down
FIRST_READ_IDLE_S = 2.0  # the first read of fl.models goes on until it has been idle this long ...
NEXT_READ_IDLE_S = 0.2  # ... later reads only pick up what arrived since the previous one
READ_MAX_S = 5.0  # a long backlog is read over several calls rather than blocking one
MAX_REASON_LINES = 8

# Thresholds the trust line counts devices against: the ensemble down-weights below one, reputation quarantines below
# the other (the running stack uses their defaults).
TRUST_DOWNWEIGHT_BELOW = EnsembleConfig().trust_min
TRUST_QUARANTINE_BELOW = ReputationParams().quarantine_below


# -- the snapshot -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VersionPoint:
    """One global model version as ``fl.models`` carries it, reduced to what the view shows."""

    version: int
    round: int
    accuracy: float | None
    backdoor_accuracy: float | None
    members: int = 0  # window members
    accepted: int = 0  # admitted to aggregation (accepted or down-weighted)
    downweighted: int = 0
    rule: str | None = None
    note: str = ""  # "rule skipped" / "window failed": the version carries its parent's parameters

    @property
    def rejected(self) -> int:
        return max(0, self.members - self.accepted)


@dataclass(frozen=True)
class AttackView:
    kind: str
    devices: int
    fraction: float
    start_version: int
    fired: int  # rounds in which it sent updates
    rounds: int | None  # rounds it fires in (None: until stopped)
    stopped: bool

    @property
    def active(self) -> bool:
        return not self.stopped and (self.rounds is None or self.fired < self.rounds)


@dataclass(frozen=True)
class Counts:
    """A counter by label: its totals now and how much each grew since the previous snapshot (None: unknown)."""

    totals: dict[str, float]
    delta: dict[str, float] | None = None


@dataclass(frozen=True)
class Snapshot:
    model_id: str
    at: float  # wall clock
    sources: dict[str, bool]  # source -> up
    errors: dict[str, str] = field(default_factory=dict)  # source -> why it is down
    versions: tuple[VersionPoint, ...] = ()  # oldest first, bounded
    current_version: int | None = None  # Redis' version key
    configured_rule: str | None = None
    interval_s: float | None = None  # since the previous snapshot's scrape of the processors
    rejections: Counts | None = None  # None: processors down
    detector_flags: Counts | None = None
    verdicts: Counts | None = None  # window members not accepted, by verdict (downweight, reject)
    devices: int | None = None  # enrolled; None: Redis down
    trust: tuple[float, ...] | None = None  # trust of the devices that have a reputation
    quarantined: tuple[str, ...] | None = None
    revoked: int = 0
    attack: AttackView | None = None


# -- pure: formatting -------------------------------------------------------------------------------------------------
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sparkline(values: Iterable[float | None], width: int, lo: float | None = None, hi: float | None = None) -> str:
    """The last ``width`` values as Unicode blocks, scaled to [lo, hi] (default: their own min and max). A missing or
    non-finite value is a space; a constant series sits at mid height (no change is not a minimum)."""
    if width <= 0:
        return ""
    tail = list(values)[-width:]
    finite = [float(v) for v in tail if _finite(v)]
    if not finite:
        return " " * len(tail)
    low = min(finite) if lo is None else lo
    high = max(finite) if hi is None else hi
    top = len(BLOCKS) - 1
    out = []
    for v in tail:
        if not _finite(v):
            out.append(" ")
        elif high <= low:
            out.append(BLOCKS[top // 2])
        else:
            share = (min(max(float(v), low), high) - low) / (high - low)
            out.append(BLOCKS[round(share * top)])
    return "".join(out)


def fit_items(items: list[str], width: int) -> str:
    """``a, b, c, +N more`` no longer than ``width``: as many items as fit, and how many did not."""
    for n in range(min(len(items), max(0, width) // 2 + 1), -1, -1):  # an item takes at least 2 characters
        hidden = len(items) - n
        text = ", ".join([*items[:n], *([f"+{hidden} more"] if hidden else [])])
        if len(text) <= width:
            return text
    return ""


def _signed(value: float, digits: int = 3) -> str:
    return f"{value:+.{digits}f}"


def _count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def attack_text(attack: AttackView | None) -> str:
    """The status line's attack field: ``sybil(2 dev)`` while a campaign is active, else ``none``."""
    return f"{attack.kind}({attack.devices} dev)" if attack is not None and attack.active else "none"


def _attack_long(attack: AttackView | None) -> str:
    if attack is None:
        return "none"
    state = "stopped" if attack.stopped else "running" if attack.active else "done"
    rounds = f"{attack.fired}" + ("" if attack.rounds is None else f"/{attack.rounds}")
    return (f"{attack.kind} on {attack.devices} devices ({attack.fraction:.0%} of the fleet) "
            f"from v{attack.start_version}, fired in {rounds} rounds, {state}")


def version_line(point: VersionPoint, before: VersionPoint | None, quarantined: int | None,
                 attack: AttackView | None) -> str:
    """``round 12  v12  acc 0.853 (+0.004)  backdoor 0.031  members 10 (2 rejected, 1 down-weighted)  quarantined 1
    attack sybil(2 dev)``; ``before`` is the previous version (for the change in accuracy). ``quarantined`` None:
    Redis did not answer, so neither the quarantine nor the attack is known ("?")."""
    acc = "acc ?" if point.accuracy is None else f"acc {point.accuracy:.3f}"
    if point.accuracy is not None and before is not None and before.accuracy is not None:
        acc += f" ({_signed(point.accuracy - before.accuracy)})"
    parts = [f"round {point.round}", f"v{point.version}", acc]
    if point.backdoor_accuracy is not None:
        parts.append(f"backdoor {point.backdoor_accuracy:.3f}")
    parts.append(f"members {point.members} ({point.rejected} rejected, {point.downweighted} down-weighted)")
    parts.append(f"quarantined {'?' if quarantined is None else quarantined}")
    parts.append(f"attack {'?' if quarantined is None else attack_text(attack)}")
    if point.note:
        parts.append(f"[{point.note}]")
    return "  ".join(parts)


def status_lines(prev: Snapshot | None, snapshot: Snapshot) -> list[str]:
    """One line per round (version with a parent) that ``snapshot`` has and ``prev`` had not, oldest first."""
    seen = max((p.version for p in prev.versions), default=-1) if prev is not None else -1
    by_version = {p.version: p for p in snapshot.versions}
    quarantined = None if snapshot.quarantined is None else len(snapshot.quarantined)
    return [version_line(p, by_version.get(p.version - 1), quarantined, snapshot.attack)
            for p in snapshot.versions if p.version > seen and p.round >= 1]


def status_line(prev: Snapshot | None, snapshot: Snapshot) -> str | None:
    """The line of the newest version that appeared between ``prev`` and ``snapshot``; None if none did."""
    lines = status_lines(prev, snapshot)
    return lines[-1] if lines else None


def trust_text(trust: tuple[float, ...], devices: int | None) -> str:
    """``82/100 devices rated  min 0.100  median 0.900  max 0.950  below 0.3: 2  below 0.15: 1`` (the ensemble
    down-weights below 0.3, reputation quarantines below 0.15)."""
    rated = f"{len(trust)}/{devices} devices rated" if devices is not None else f"{len(trust)} devices rated"
    if not trust:
        return f"{rated} (no window judged yet)"
    low = sum(t < TRUST_DOWNWEIGHT_BELOW for t in trust)
    very_low = sum(t < TRUST_QUARANTINE_BELOW for t in trust)
    return (f"{rated}  min {min(trust):.3f}  median {statistics.median(trust):.3f}  max {max(trust):.3f}  "
            f"below {TRUST_DOWNWEIGHT_BELOW}: {low}  below {TRUST_QUARANTINE_BELOW}: {very_low}")


def _rate(delta: float, interval_s: float | None) -> str:
    return f"{delta / interval_s:.2f}/s" if interval_s else ""


def _counts_parts(counts: Counts, interval_s: float | None, with_rate: bool) -> list[tuple[str, str]]:
    """(label, "count (+delta, rate)") of the non-zero labels, largest first."""
    out = []
    for label, total in sorted(counts.totals.items(), key=lambda kv: (-kv[1], kv[0])):
        if total <= 0:
            continue
        text = _count(total)
        if counts.delta is not None:
            d = counts.delta.get(label, 0.0)
            extra = [f"+{_count(d)}"] + ([_rate(d, interval_s)] if with_rate and interval_s else [])
            text += f" ({', '.join(extra)})"
        out.append((label, text))
    return out


def _down(snapshot: Snapshot, source: str) -> str:
    why = snapshot.errors.get(source)
    return f"{source} down" + (f": {why}" if why else "")


def render(snapshot: Snapshot, width: int = 100) -> str:
    """The whole screen as text, every line at most ``width`` characters."""
    width = max(20, width)
    s = snapshot
    lines: list[str] = []
    latest = s.versions[-1] if s.versions else None
    version = (f"v{latest.version} (round {latest.round})" if latest is not None
               else f"v{s.current_version}" if s.current_version is not None else "no version yet")
    rule = latest.rule if latest is not None and latest.rule else s.configured_rule or "?"
    attack = _attack_long(s.attack) if s.sources.get("redis") else "? (redis down)"
    lines.append(f"fedguard watch  model {s.model_id}  {version}  rule {rule}  "
                 f"{time.strftime('%H:%M:%S', time.localtime(s.at))}")
    lines.append(f"attack      {attack}")
    lines.append("services    " + "  ".join(f"{name} {'up' if s.sources.get(name) else 'DOWN'}" for name in SOURCES))
    lines += [f"  {_down(s, name)}" if not s.sources.get(name) else f"  {name}: {s.errors[name]}"  # (part of a pool)
              for name in SOURCES if not s.sources.get(name) or s.errors.get(name)]
    lines.append("")
    lines += _model_lines(s, width)
    lines.append("")
    lines += _rejection_lines(s)
    lines += _detector_lines(s)
    lines.append("")
    lines += _trust_lines(s, width)
    return "\n".join(line[:width].rstrip() for line in lines)


def _model_lines(s: Snapshot, width: int) -> list[str]:
    if not s.versions:
        return ["accuracy    " + ("broker down: no versions read" if not s.sources.get("broker")
                                  else "no model version on the models topic yet")]
    latest = s.versions[-1]
    before = s.versions[-2] if len(s.versions) > 1 else None
    spark_width = max(1, width - 58)  # what the value, change, version span and range around it leave
    shown = s.versions[-spark_width:]
    accuracies = [p.accuracy for p in shown]
    backdoors = [p.backdoor_accuracy for p in shown]
    finite = [a for a in accuracies if _finite(a)]
    acc_now = "   ?  " if latest.accuracy is None else f"{latest.accuracy:.3f}"
    delta = ("" if latest.accuracy is None or before is None or before.accuracy is None
             else _signed(latest.accuracy - before.accuracy))
    span = f"v{shown[0].version}..v{shown[-1].version}"
    # Main accuracy on its own range (its changes are small), backdoor accuracy on 0..1 (a jump is what matters).
    lines = [f"accuracy    {acc_now} {delta:>7}  {sparkline(accuracies, spark_width)}  {span}"
             + (f" {min(finite):.3f}..{max(finite):.3f}" if finite else "")]
    if any(_finite(b) for b in backdoors):
        now = "   ?  " if latest.backdoor_accuracy is None else f"{latest.backdoor_accuracy:.3f}"
        lines.append(f"backdoor    {now} {'':>7}  {sparkline(backdoors, spark_width, lo=0.0, hi=1.0)}  scale 0..1")
    else:
        lines.append("backdoor    not measured (FEDGUARD_BACKDOOR_EVAL is empty)")
    window = (f"last round  v{latest.version}: {latest.members} members, {latest.rejected} rejected, "
              f"{latest.downweighted} down-weighted" + (f"  [{latest.note}]" if latest.note else ""))
    return lines + [window]


def _rejection_lines(s: Snapshot) -> list[str]:
    if s.rejections is None:
        return [f"rejections  ? ({_down(s, 'processors')})"]
    parts = _counts_parts(s.rejections, s.interval_s, with_rate=True)
    total = sum(s.rejections.totals.values())
    head = f"rejections  {_count(total)} total"
    if s.rejections.delta is not None:
        d = sum(s.rejections.delta.values())
        head += f", +{_count(d)} since the last refresh" + (f" ({_rate(d, s.interval_s)})" if s.interval_s else "")
    lines = [head]
    for label, text in parts[:MAX_REASON_LINES]:
        lines.append(f"  {label:<18} {text}")
    if len(parts) > MAX_REASON_LINES:
        lines.append(f"  +{len(parts) - MAX_REASON_LINES} more reasons (fedguard rejected)")
    return lines


def _detector_lines(s: Snapshot) -> list[str]:
    if s.detector_flags is None:
        return [f"detectors   ? ({_down(s, 'processors')})"]
    flags = _counts_parts(s.detector_flags, s.interval_s, with_rate=False)
    verdicts = dict(_counts_parts(s.verdicts or Counts({}), s.interval_s, with_rate=False))
    line = "  ".join(f"{label} {text}" for label, text in flags) or "no flags"
    members = f"members down-weighted {verdicts.get('downweight', '0')}, rejected {verdicts.get('reject', '0')}"
    return [f"detectors   {members}", f"  flags     {line}"]


def _trust_lines(s: Snapshot, width: int) -> list[str]:
    if s.trust is None:
        return [f"trust       ? ({_down(s, 'redis')})"]
    lines = [f"trust       {trust_text(s.trust, s.devices)}"]
    quarantined = list(s.quarantined or ())
    prefix = f"quarantined {len(quarantined)}" + (f" (revoked {s.revoked})" if s.revoked else "")
    if quarantined:
        prefix += ": "
        prefix += fit_items(quarantined, width - len(prefix))
    lines.append(prefix)
    return lines


def counter_changes(before: dict[str, float] | None, now: dict[str, float]) -> dict[str, float] | None:
    """How much each counter grew since ``before``; a counter that went down was reset (its process restarted), so
    all of its value is new. None when there is nothing to compare with."""
    if before is None:
        return None
    out = {}
    for label, value in now.items():
        old = before.get(label, 0.0)
        out[label] = value if value < old else value - old
    return out


def counter_by_label(text: str, sample: str, label: str) -> dict[str, float]:
    """The values of the samples named ``sample`` in a Prometheus text exposition, by their ``label``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and label in s.labels:
                out[s.labels[label]] = out.get(s.labels[label], 0.0) + float(s.value)
    return out


def version_point(meta: dict[str, Any]) -> VersionPoint | None:
    """A ``fl.models`` record as a :class:`VersionPoint`; None for a record without a usable version."""
    try:
        metrics = meta.get("metrics") or {}
        info = meta.get("rule_info") or {}
        weights = info.get("member_weights") or {}
        note = "window failed" if info.get("failed") else "rule skipped" if info.get("skipped") else ""
        version = int(meta["version"])
        return VersionPoint(
            version=version, round=int(meta.get("round", version)),
            accuracy=float(metrics["accuracy"]) if _finite(metrics.get("accuracy")) else None,
            backdoor_accuracy=(float(metrics["backdoor_accuracy"]) if _finite(metrics.get("backdoor_accuracy"))
                               else None),
            members=int(meta.get("members") or 0), accepted=int(meta.get("accepted") or 0),
            downweighted=sum(1 for w in weights.values() if _finite(w) and w < 1.0),
            rule=meta.get("rule"), note=note)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _loopback_if_wildcard(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def metrics_endpoints(settings: Settings, overrides: str = "") -> dict[str, list[str]]:
    """Each service's metrics URLs (one per processors worker): ``settings.metrics_host`` (loopback when it is a
    wildcard) and the service's port; ``overrides`` ``"processors=http://host:port/metrics,..."`` replaces a
    service's URLs (a name given twice: two URLs), e.g. from inside the compose network, whose metrics ports are not
    published on the host."""
    host = _loopback_if_wildcard(settings.metrics_host)
    ports = {"processors": processors_metrics_ports(settings), "aggregator": [settings.aggregator_metrics_port],
             "fleet": [settings.fleet_metrics_port]}
    out = {name: [f"http://{host}:{port}/metrics" for port in numbers] for name, numbers in ports.items()}
    given: dict[str, list[str]] = {}
    for item in filter(None, (part.strip() for part in overrides.split(","))):
        name, sep, url = item.partition("=")
        if not sep or name not in out or not url:
            raise ValueError(f"metrics endpoint {item!r}: expected <{'|'.join(out)}>=<url>")
        given.setdefault(name, []).append(url)
    return {**out, **given}


def summed_counter(texts: list[str], sample: str, label: str) -> dict[str, float]:
    """:func:`counter_by_label` summed over several processes' expositions (the workers of a pool)."""
    out: dict[str, float] = {}
    for text in texts:
        for key, value in counter_by_label(text, sample, label).items():
            out[key] = out.get(key, 0.0) + value
    return out


# -- I/O: the sources -------------------------------------------------------------------------------------------------
def _reachable(bootstrap: str, timeout_s: float) -> bool:
    """Whether any of the bootstrap servers accepts a TCP connection (cheap, before a Kafka client would retry)."""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
                return True
        except (OSError, ValueError):
            continue
    return False


def _short(exc: BaseException | str) -> str:
    """Why a source is down, in a few words."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    lowered = text.lower()
    if "refused" in lowered:
        return "connection refused"
    if "timed out" in lowered or "timeout" in lowered:
        return "timed out"
    return text[:40]


class ModelsFeed:
    """``fl.models`` of one model id, read from its beginning by one group-less consumer kept between reads."""

    def __init__(self, settings: Settings, history: int = HISTORY):
        self.settings = settings
        self.history = history
        self.points: dict[int, VersionPoint] = {}
        self.lineage = 0  # bumped when version 0 is published anew (a fresh model store): the history restarts
        self._v0_created: float | None = None
        self._consumer = None
        self._assigned: set[int] = set()
        self.reads = 0

    def read(self, idle_s: float, max_s: float = READ_MAX_S) -> None:
        """Read what arrived since the last read: until nothing new came for ``idle_s`` or ``max_s`` passed.
        Raises ConnectionError when the broker does not answer."""
        if not _reachable(self.settings.kafka_bootstrap, SOURCE_TIMEOUT_S):
            raise ConnectionError("not reachable")
        consumer = self._consumer or self._connect()
        self._assign_new_partitions(consumer)
        started = last_new = time.monotonic()
        while self._assigned and time.monotonic() - last_new < idle_s and time.monotonic() - started < max_s:
            for messages in consumer.poll(timeout_ms=100).values():
                for message in messages:
                    self._add(message.key, message.value)
                last_new = time.monotonic()
        self._rewind_recreated(consumer)
        self.reads += 1

    def _rewind_recreated(self, consumer) -> None:
        """A broker that restarted empty (the embedded one is recycled to bound its memory) starts the topic over
        at offset 0; it answers a fetch beyond the end with nothing rather than "out of range", so a position past
        the end the fetch reports means the topic is new: read it from its beginning."""
        from kafka import TopicPartition

        for p in self._assigned:
            tp = TopicPartition(self.settings.topics.models, p)
            end = consumer.highwater(tp)
            if end is not None and consumer.position(tp) > end:
                consumer.seek_to_beginning(tp)

    def _connect(self):
        from kafka import KafkaConsumer

        # No auto-creation: a watch started before the stack must not create the topics with the broker's own
        # partition count. Earliest: a broker that restarted empty starts the topic over at offset 0.
        self._consumer = KafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, client_id="fedguard-watch",
                                       enable_auto_commit=False, auto_offset_reset="earliest",
                                       allow_auto_create_topics=False, request_timeout_ms=5000)
        return self._consumer

    def _assign_new_partitions(self, consumer) -> None:
        from kafka import TopicPartition

        topic = self.settings.topics.models
        partitions = set(consumer.partitions_for_topic(topic) or ())
        new = partitions - self._assigned
        if not new:
            return
        self._assigned |= new
        consumer.assign([TopicPartition(topic, p) for p in sorted(self._assigned)])
        consumer.seek_to_beginning(*[TopicPartition(topic, p) for p in sorted(new)])

    def _add(self, key: bytes | None, value: bytes) -> None:
        if key is not None and key != self.settings.model_id.encode():
            return  # another model on a shared topic
        try:
            meta = records.loads(value)
        except (ValueError, TypeError):  # not JSON, or an empty record
            return
        point = version_point(meta) if isinstance(meta, dict) else None
        if point is None or meta.get("model_id", self.settings.model_id) != self.settings.model_id:
            return
        if point.version == 0:
            created = meta.get("created_at")
            if self._v0_created is not None and created != self._v0_created:
                self.points.clear()  # a new lineage (the store was started afresh); a republished v0 is the same
                self.lineage += 1
            self._v0_created = created
        self.points[point.version] = point
        while len(self.points) > self.history:
            del self.points[min(self.points)]

    def versions(self) -> tuple[VersionPoint, ...]:
        return tuple(self.points[v] for v in sorted(self.points))

    def close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()
            except Exception:  # noqa: BLE001 - closing a consumer of a dead broker
                pass
            self._consumer = None
            self._assigned = set()


def redis_client(settings: Settings):
    import redis

    return redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=SOURCE_TIMEOUT_S,
                                socket_connect_timeout=SOURCE_TIMEOUT_S)


@dataclass(frozen=True)
class RedisView:
    current_version: int | None
    devices: int
    trust: tuple[float, ...]
    quarantined: tuple[str, ...]
    revoked: int
    attack: AttackView | None


def read_redis(client, settings: Settings) -> RedisView:
    """Version key, trust, quarantine and attack from Redis (two pipelined round trips, three with a campaign)."""
    from processors.defence import quarantined_key, reputation_key
    from producers import campaign

    pipe = client.pipeline(transaction=False)
    pipe.get(registry.model_version_key(settings))
    pipe.smembers(registry.devices_key(settings))
    pipe.smembers(quarantined_key(settings))
    pipe.get(campaign.campaign_key(settings))
    version, device_ids, by_reputation, campaign_json = pipe.execute()
    ids = sorted(device_ids)
    pipe = client.pipeline(transaction=False)
    for device_id in ids:
        pipe.hget(reputation_key(settings, device_id), "trust")
        pipe.hget(registry.device_key(settings, device_id), "status")
    replies = pipe.execute()
    trust = tuple(float(t) for t in replies[::2] if t is not None)
    statuses = dict(zip(ids, replies[1::2]))
    # Quarantined by reputation (the set) or by an operator (the registry status).
    quarantined = set(by_reputation) | {d for d, st in statuses.items() if st == registry.QUARANTINED}
    attack = None
    if campaign_json:
        try:
            running = campaign.Campaign.from_json(campaign_json)
            attack = AttackView(kind=running.kind, devices=len(running.devices), fraction=running.fraction,
                                start_version=running.start_version,
                                fired=campaign.fired(client, settings, running), rounds=running.rounds,
                                stopped=running.stopped_at is not None)
        except (TypeError, ValueError) as exc:
            log.warning("unreadable attack campaign in Redis: %s", exc)
    return RedisView(current_version=int(version) if version is not None else None, devices=len(ids), trust=trust,
                     quarantined=tuple(sorted(quarantined)), revoked=sum(st == registry.REVOKED
                                                                         for st in statuses.values()),
                     attack=attack)


def scrape(url: str, timeout_s: float = SOURCE_TIMEOUT_S) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    with opener.open(url, timeout=timeout_s) as response:
        return response.read().decode("utf-8", "replace")


def scrape_all(urls: list[str]) -> tuple[list[str], list[str]]:
    """The expositions of the URLs that answered, and why each of the others did not."""
    texts, failures = [], []
    for url in urls:
        try:
            texts.append(scrape(url))
        except Exception as exc:  # noqa: BLE001 - any failure of a source is "down"
            failures.append(_short(getattr(exc, "reason", exc)))
    return texts, failures


@dataclass
class WatchState:
    """What :func:`collect` keeps between calls: the models feed, a Redis client and the last counter values."""

    endpoints: dict[str, list[str]] | None = None  # None: metrics_endpoints(settings)
    feed: ModelsFeed | None = None
    redis: Any = None
    previous: dict[str, dict[str, float]] = field(default_factory=dict)
    previous_at: float | None = None

    def close(self) -> None:
        if self.feed is not None:
            self.feed.close()
        if self.redis is not None:
            self.redis.close()


def collect(settings: Settings, state: WatchState) -> Snapshot:
    """One snapshot of the stack; a source that fails is marked down (with a short reason), never raised."""
    now = time.time()
    sources = dict.fromkeys(SOURCES, False)
    errors: dict[str, str] = {}
    if state.feed is None:
        state.feed = ModelsFeed(settings)
    try:
        state.feed.read(FIRST_READ_IDLE_S if state.feed.reads == 0 else NEXT_READ_IDLE_S)
        sources["broker"] = True
    except Exception as exc:  # noqa: BLE001 - any failure of a source is "down"
        errors["broker"] = _short(exc)
        state.feed.close()
    view = None
    try:
        if state.redis is None:
            state.redis = redis_client(settings)
        view = read_redis(state.redis, settings)
        sources["redis"] = True
    except Exception as exc:  # noqa: BLE001
        errors["redis"] = _short(exc)
    texts: dict[str, list[str]] = {}
    for name, urls in (state.endpoints or metrics_endpoints(settings)).items():
        texts[name], failures = scrape_all(urls)
        sources[name] = bool(texts[name])  # up while one of its processes answers
        if failures:
            errors[name] = failures[0] if len(failures) == len(urls) else f"{len(failures)} of {len(urls)} down"
    counts: dict[str, Counts | None] = {"rejections": None, "detector_flags": None, "verdicts": None}
    interval = None
    if texts.get("processors"):
        totals = {
            "rejections": summed_counter(texts["processors"], "fedguard_updates_rejected_total", "reason"),
            "detector_flags": summed_counter(texts["processors"], "fedguard_detector_flags_total", "detector"),
            "verdicts": summed_counter(texts["processors"], "fedguard_window_flagged_total", "verdict")}
        counts = {k: Counts(v, counter_changes(state.previous.get(k), v)) for k, v in totals.items()}
        interval = None if state.previous_at is None else now - state.previous_at
        state.previous, state.previous_at = totals, now
    return Snapshot(model_id=settings.model_id, at=now, sources=sources, errors=errors,
                    versions=state.feed.versions(), configured_rule=settings.rule, interval_s=interval,
                    current_version=view.current_version if view else None,
                    rejections=counts["rejections"], detector_flags=counts["detector_flags"],
                    verdicts=counts["verdicts"], devices=view.devices if view else None,
                    trust=view.trust if view else None, quarantined=view.quarantined if view else None,
                    revoked=view.revoked if view else 0, attack=view.attack if view else None)


# -- I/O: the loop and `up`'s reporter ---------------------------------------------------------------------------------
CLEAR = "\x1b[H\x1b[2J"


def run_watch(settings: Settings, stop: threading.Event, interval_s: float = 2.0, once: bool = False,
              out: TextIO = sys.stdout, endpoints: dict[str, list[str]] | None = None) -> Snapshot | None:
    """Redraw the view every ``interval_s`` until ``stop`` is set; ``once``: one frame, then return. On a terminal the
    screen is cleared before each frame; otherwise frames are plain text separated by a rule. Returns the last
    snapshot."""
    tty = bool(getattr(out, "isatty", lambda: False)())
    state = WatchState(endpoints=endpoints)
    snapshot = None
    try:
        frames = 0
        while True:
            snapshot = collect(settings, state)
            width = shutil.get_terminal_size((100, 40)).columns if tty else 100
            frame = render(snapshot, width)
            if tty:
                out.write(CLEAR + frame + "\n")
            else:
                out.write(("-" * width + "\n" if frames else "") + frame + "\n")
            out.flush()
            frames += 1
            if once or stop.wait(interval_s):
                return snapshot
    finally:
        state.close()


class RoundReporter:
    """``fedguard up``'s status line per round: :meth:`poll` returns the lines of the versions published since the
    previous poll (since the reporter was made, at first). Cheap (one short read of ``fl.models``, Redis only when
    there is something to report) and it never raises."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.feed = ModelsFeed(settings)
        self.redis = redis_client(settings)
        self.reported_upto: int | None = None  # the highest version reported; None until the baseline is known
        self._lineage = 0
        self._baseline()

    def _baseline(self) -> None:
        """Versions up to Redis' current version at start were published before the reporter: not reported."""
        try:
            current = self.redis.get(registry.model_version_key(self.settings))
            self.reported_upto = int(current) if current is not None else -1
        except Exception as exc:  # noqa: BLE001 - Redis down: tried again at the next poll
            log.debug("no baseline version yet: %s", exc)

    def poll(self) -> list[str]:
        try:
            return self._poll()
        except Exception as exc:  # noqa: BLE001 - a status line is never worth stopping `up` for
            log.warning("round status unavailable: %s", _short(exc))
            self.feed.close()
            return []

    def _poll(self) -> list[str]:
        if self.reported_upto is None:
            self._baseline()
            if self.reported_upto is None:
                return []
        self.feed.read(idle_s=0.05, max_s=0.5)
        if self.feed.lineage != self._lineage:  # the model started over: its versions are new again
            self._lineage, self.reported_upto = self.feed.lineage, -1
        points = self.feed.versions()
        new = [p for p in points if p.version > self.reported_upto and p.round >= 1]
        if not new:
            return []
        try:
            view = read_redis(self.redis, self.settings)
            quarantined, attack = len(view.quarantined), view.attack
        except Exception as exc:  # noqa: BLE001 - the line says "?" for what Redis would have told
            log.debug("redis unavailable for the status line: %s", exc)
            quarantined, attack = None, None
        by_version = {p.version: p for p in points}
        self.reported_upto = max(self.reported_upto, new[-1].version)
        return [version_line(p, by_version.get(p.version - 1), quarantined, attack) for p in new]

    def close(self) -> None:
        self.feed.close()
        self.redis.close()
