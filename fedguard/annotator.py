"""Grafana annotations for what happens in the pipeline (when ``GRAFANA_URL`` is set).

A small loop, run as a thread of ``fedguard up`` or as its own process, that turns happenings into annotations:

* a device quarantined or released by reputation: an ``fl.events`` record of type ``quarantined`` / ``released``;
  tags ``fedguard``, ``quarantine`` and the type;
* the aggregation rule changed: an ``fl.models`` version whose rule (or its parameters) differs from the previous
  version's; tags ``fedguard``, ``rule``;
* an attack started or stopped: the campaign in Redis (:func:`producers.campaign.load`, polled every second): a new
  campaign id, or ``stopped_at`` set; tags ``fedguard``, ``attack``, the attack kind, ``started`` / ``stopped``.

Every annotation is an organization annotation tagged ``fedguard``: the dashboards show them through their
"fedguard events" annotation query (the Grafana data source, filtered by that tag).

The decisions are pure (:func:`annotations_for_event`, :func:`rule_change`, :func:`campaign_change`); the loop only
reads, decides and sends.

What is annotated, exactly once: what happened at or after the annotator started (``since``, by the time the
happening carries: the event's ``at``, the version's ``created_at``, the campaign's ``started_at`` / ``stopped_at``).
The topics are read from their beginning, so the previous version's rule is known after a restart (and this broker's
imprecise latest offset does not matter), but nothing older than ``since`` is sent again: a restart never repeats an
annotation, and what happens while the annotator is down is not annotated. An event re-delivered by the broker is
annotated once (a bounded memory of recent events). A Grafana outage does not stop the loop: annotations wait in a
bounded queue, in order, and are retried with backoff; one line is logged when Grafana fails and one when it is
back. A request that timed out may have reached Grafana: retrying it can then duplicate that one annotation.
"""

from __future__ import annotations

import collections
import json
import logging
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
from kafka import KafkaConsumer
from kafka.errors import KafkaError

from fedguard import grafana, records, registry
from fedguard.settings import Settings
from fedguard.topicio import consumer_from_beginning
from producers import campaign as campaigns
from producers.campaign import Campaign

log = logging.getLogger("fedguard.annotator")

QUEUE_LIMIT = 10_000  # annotations waiting for Grafana; the oldest are dropped beyond this (logged)
SEEN_EVENTS = 10_000  # recent events remembered to annotate a re-delivered one once
MAX_BACKOFF_S = 30.0
CAMPAIGN_POLL_S = 1.0


@dataclass(frozen=True)
class Annotation:
    text: str
    tags: tuple[str, ...]
    at: float  # seconds since the epoch: when it happened


# -- decisions (pure) ---------------------------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def annotations_for_event(record: dict[str, Any], now: float | None = None) -> list[Annotation]:
    """The annotations of one ``fl.events`` record: a quarantine or a release by reputation; nothing for the
    others (flags, rate limits, replays: too frequent to mark on a time series)."""
    kind = record.get("type")
    if kind not in ("quarantined", "released"):
        return []
    device = record.get("device_id") or "?"
    at = _number(record.get("at"))
    at = (time.time() if now is None else now) if at is None else at
    trust = _number(record.get("trust"))
    trust_text = "" if trust is None else f"trust {trust:.3f}"
    if kind == "quarantined":
        where = f" after window {record['window_id']}" if record.get("window_id") else ""
        text = f"device {device} quarantined" + (f": {trust_text}{where}" if trust_text or where else "")
    else:
        why = record.get("reason") or ""
        text = f"device {device} released" + (f": {', '.join(p for p in (why, trust_text) if p)}"
                                               if why or trust_text else "")
    return [Annotation(text=text, tags=("fedguard", "quarantine", kind), at=at)]


def event_key(record: dict[str, Any]) -> str:
    """What identifies one event, to annotate a re-delivered copy once."""
    return json.dumps([record.get("type"), record.get("device_id"), record.get("window_id"), record.get("at")])


def _rule_text(version: dict[str, Any]) -> str:
    params = version.get("rule_params") or {}
    return f"{version.get('rule')}" + (f" {json.dumps(params, sort_keys=True)}" if params else "")


def rule_change(prev: dict[str, Any] | None, version: dict[str, Any]) -> Annotation | None:
    """The annotation for ``version`` (an ``fl.models`` record) when its rule or the rule's parameters differ from
    ``prev``'s, the model's previous version; None for the first version seen and for a version not newer than
    ``prev`` (re-delivered)."""
    if prev is None or not isinstance(version.get("version"), int) or not isinstance(prev.get("version"), int):
        return None
    if version["version"] <= prev["version"]:
        return None
    if (version.get("rule"), version.get("rule_params") or {}) == (prev.get("rule"), prev.get("rule_params") or {}):
        return None
    at = _number(version.get("created_at"))
    return Annotation(text=f"aggregation rule changed: {_rule_text(prev)} -> {_rule_text(version)} "
                           f"(version {version['version']})",
                      tags=("fedguard", "rule"), at=time.time() if at is None else at)


def _started(c: Campaign) -> Annotation:
    return Annotation(text=f"attack started: {c.kind} on {len(c.devices)} devices (campaign {c.id})",
                      tags=("fedguard", "attack", c.kind, "started"), at=c.started_at)


def _stopped(c: Campaign, at: float, why: str = "") -> Annotation:
    return Annotation(text=f"attack stopped: {c.kind} (campaign {c.id}{why})",
                      tags=("fedguard", "attack", c.kind, "stopped"), at=at)


def campaign_change(prev: Campaign | None, now: Campaign | None) -> list[Annotation]:
    """Annotations for the campaign state going from ``prev`` to ``now`` (two polls): a new campaign started (it
    replaces a running one, which is then stopped), a campaign stopped. Nothing when ``now`` is None."""
    if now is None:
        return []
    out: list[Annotation] = []
    if prev is None or prev.id != now.id:
        if prev is not None and prev.stopped_at is None:
            out.append(_stopped(prev, now.started_at, f", replaced by {now.kind}"))
        out.append(_started(now))
        if now.stopped_at is not None:
            out.append(_stopped(now, now.stopped_at))
    elif prev.stopped_at is None and now.stopped_at is not None:
        out.append(_stopped(now, now.stopped_at))
    return out


def since_start(annotations: Iterable[Annotation], since: float) -> list[Annotation]:
    """The annotations of what happened at or after ``since``: earlier ones were sent before a restart, or
    happened while the annotator was not running."""
    return [a for a in annotations if a.at >= since]


def backoff(failures: int) -> float:
    """Seconds before retrying Grafana after ``failures`` failed attempts in a row: 1, 2, 4, ... up to 30."""
    return min(MAX_BACKOFF_S, 2.0 ** max(0, failures - 1))


# -- the loop -----------------------------------------------------------------------------------------------------
class Outbox:
    """Annotations waiting for Grafana, sent in order; on failure, kept and retried after a backoff."""

    def __init__(self, client, dashboard_uid: str | None = None, limit: int = QUEUE_LIMIT) -> None:
        self.client, self.dashboard_uid = client, dashboard_uid
        self.pending: collections.deque[Annotation] = collections.deque()
        self.limit, self.failures, self.retry_at = limit, 0, 0.0
        self.sent_ids: collections.deque[int] = collections.deque(maxlen=1000)  # ids Grafana gave, newest last
        self.sent = self.dropped = 0

    def add(self, annotations: Iterable[Annotation]) -> None:
        for annotation in annotations:
            if len(self.pending) >= self.limit:
                self.pending.popleft()
                self.dropped += 1
                log.warning("annotation queue full (%d): dropped the oldest annotation", self.limit)
            self.pending.append(annotation)

    def flush(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        while self.pending and now >= self.retry_at:
            annotation = self.pending[0]
            try:
                ident = grafana.annotate(self.client, annotation.text, annotation.tags, at=annotation.at,
                                         dashboard_uid=self.dashboard_uid)
            except grafana.GrafanaError as error:
                if not error.retryable:
                    self.pending.popleft()
                    self.dropped += 1
                    log.error("annotation dropped, Grafana rejects it: %s", error)
                    continue
                self.failures += 1
                self.retry_at = now + backoff(self.failures)
                if self.failures == 1:
                    log.error("%s; %d annotation(s) wait, retrying with backoff", error, len(self.pending))
                return
            self.pending.popleft()
            self.sent_ids.append(ident)
            self.sent += 1
            if self.failures:
                log.info("Grafana answers again after %d failed attempt(s)", self.failures)
            self.failures, self.retry_at = 0, 0.0


class _Reader:
    """The pipeline state the decisions compare with: last version per model, recent events, last campaign."""

    def __init__(self, since: float) -> None:
        self.since = since
        self.last_version: dict[str, dict[str, Any]] = {}
        self.seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.campaign: Campaign | None = None

    def on_event(self, record: dict[str, Any]) -> list[Annotation]:
        key = event_key(record)
        if key in self.seen:
            return []
        self.seen[key] = None
        if len(self.seen) > SEEN_EVENTS:
            self.seen.popitem(last=False)
        return since_start(annotations_for_event(record), self.since)

    def on_version(self, version: dict[str, Any]) -> list[Annotation]:
        model = str(version.get("model_id"))
        prev = self.last_version.get(model)
        change = rule_change(prev, version)
        if prev is None or (isinstance(version.get("version"), int) and isinstance(prev.get("version"), int)
                            and version["version"] > prev["version"]):
            self.last_version[model] = version
        return since_start([change] if change else [], self.since)

    def on_campaign(self, now: Campaign | None) -> list[Annotation]:
        out = since_start(campaign_change(self.campaign, now), self.since)
        if now is not None:
            self.campaign = now
        return out


def _decode(raw: bytes | None) -> dict[str, Any] | None:
    try:
        value = records.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class _Trouble:
    """One log line when a source (Kafka, Redis) starts failing, one when it works again."""

    def __init__(self, what: str) -> None:
        self.what, self.failing = what, False

    def failed(self, error: Exception, hint: str) -> None:
        if not self.failing:
            log.error("%s unavailable (%s): %s; the annotator keeps going", self.what, grafana.one_line(str(error)),
                      hint)
        self.failing = True

    def ok(self) -> None:
        if self.failing:
            log.info("%s available again", self.what)
        self.failing = False


def _wait_for_topics(settings: Settings, topics: list[str], stop: threading.Event) -> bool:
    """Wait until the broker is up and knows ``topics`` (``fedguard up`` creates them first): a consumer assigned
    before a topic exists would read its partition 0 only. False if stopped meanwhile."""
    trouble, said = _Trouble("Kafka"), False
    while not stop.is_set():
        try:
            probe = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, client_id="fedguard-annotator")
            try:
                ready = all(probe.partitions_for_topic(t) for t in topics)
            finally:
                probe.close()
            trouble.ok()
        except KafkaError as error:
            trouble.failed(error, f"check KAFKA_BOOTSTRAP_SERVERS ({settings.kafka_bootstrap})")
            ready = False
        if ready:
            return True
        if not said and not trouble.failing:
            log.info("waiting for topics %s (fedguard up or fedguard topics creates them)", ", ".join(topics))
            said = True
        stop.wait(1.0)
    return False


def run_annotator(settings: Settings, stop: threading.Event, client, *, since: float | None = None,
                  dashboard_uid: str | None = None, poll_s: float = CAMPAIGN_POLL_S) -> Outbox:
    """Annotate the pipeline's happenings in the Grafana of ``client`` (:func:`fedguard.grafana.connect`) until
    ``stop`` is set; ``since`` (default: now) is the start of what is annotated. Returns the outbox (what was sent,
    dropped or still pending), for tests and a final log line."""
    since = time.time() if since is None else since
    topics = [settings.topics.events, settings.topics.models]
    outbox, reader = Outbox(client, dashboard_uid), _Reader(since)
    if not _wait_for_topics(settings, topics, stop):
        return outbox
    consumer = consumer_from_beginning(settings, topics, client_id="fedguard-annotator")
    redis_client = registry.connect(settings)
    kafka_trouble, redis_trouble = _Trouble("Kafka"), _Trouble("Redis")
    try:
        log.info("annotating in Grafana what happens from %s on", time.strftime("%Y-%m-%d %H:%M:%S",
                                                                              time.localtime(since)))
        next_campaign_poll = 0.0
        while not stop.is_set():
            try:
                batches = consumer.poll(timeout_ms=int(poll_s * 1000))
                kafka_trouble.ok()
            except KafkaError as error:
                kafka_trouble.failed(error, f"check KAFKA_BOOTSTRAP_SERVERS ({settings.kafka_bootstrap})")
                batches = {}
                stop.wait(poll_s)
            for tp, messages in batches.items():
                for message in messages:
                    value = _decode(message.value)
                    if value is None:
                        continue
                    outbox.add(reader.on_event(value) if tp.topic == settings.topics.events
                               else reader.on_version(value))
            if time.monotonic() >= next_campaign_poll:
                next_campaign_poll = time.monotonic() + poll_s
                try:
                    outbox.add(reader.on_campaign(campaigns.load(redis_client, settings)))
                    redis_trouble.ok()
                except (redis.RedisError, ValueError, TypeError) as error:
                    redis_trouble.failed(error, f"check REDIS_URL ({settings.redis_url})")
            outbox.flush()
        return outbox
    finally:
        consumer.close()
        redis_client.close()
        if outbox.pending:
            log.warning("annotator stopped with %d annotation(s) not sent to Grafana", len(outbox.pending))


def start_thread(settings: Settings, client=None, **kwargs: Any) -> tuple[threading.Thread, threading.Event]:
    """Run :func:`run_annotator` in a daemon thread (``client`` default: :func:`fedguard.grafana.connect` from the
    environment); set the returned event and join the thread to stop it."""
    client = grafana.connect() if client is None else client
    stop = threading.Event()
    thread = threading.Thread(target=run_annotator, args=(settings, stop, client), kwargs=kwargs,
                              name="fedguard-annotator", daemon=True)
    thread.start()
    return thread, stop


def serve(settings: Settings) -> int:
    """The annotator as its own process (``fedguard annotator``): connect from GRAFANA_* and run until SIGTERM or
    Ctrl-C. Raises :class:`fedguard.grafana.GrafanaError` (one line) when GRAFANA_URL or the credential is missing."""
    client = grafana.connect()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    outbox = run_annotator(settings, stop, client)
    log.info("annotator stopped: %d annotation(s) sent, %d dropped, %d pending", outbox.sent, outbox.dropped,
             len(outbox.pending))
    return 0
