"""The aggregation service: one new global model version per closed window, exactly once, across restarts.

Loop: read a window from ``fl.windows``; read the accepted members' tensors from the update store
(fedguard/updatestore.py) at the references the window names; apply the configured rule to the deltas; evaluate;
persist the version (the commit point); publish it to ``fl.models`` and Redis; only then commit the window's
offset. A crash between persisting and committing re-delivers the window, which is then recognised as applied (its
id is on the current version).

A window whose tensors cannot be read from the update store (deleted by retention, never written, a store that
cannot be read) does not stop the service.
The read is retried ``FETCH_ATTEMPTS`` times with exponential backoff (``FETCH_BACKOFF_S``, doubled each time);
if it still fails the window is *failed*: version N+1 is published with version N's parameters unchanged and
``rule_info = {"selected": [], "failed": <reason>, "params_from": N}``, the window is counted as
``fedguard_aggregator_windows_total{outcome="failed"}`` (not ``applied``) and logged with the reason, and its
offset is committed, so the service goes on with the next window. Publishing N+1 rather than nothing is what
keeps the pipeline moving: the processors close exactly one window per base version (processors/windows.py), so
no second window for version N would ever come, and the devices would keep training on a version nobody
aggregates. The window's updates are lost to aggregation; the version's record says so and why.

Model audit (issue 14, :mod:`aggregator.auditing`, docs/audit.md): every candidate the rule makes is audited
before it is saved. Clean: saved and served as usual. Flagged: version N+1 carries version N's parameters (the last
served ones; ``rule_info.params_from = N``, ``rule_info.withheld`` says why) and its ``audit`` metadata holds the
verdict, the scores, the candidate's sha256 and metrics, and the members the candidate is attributed to; those
devices are quarantined (:func:`fedguard.registry.quarantine_device`, by ``audit``: released only by an operator),
each with a ``quarantined`` event on ``fl.events``, plus one ``audit_flagged`` event for the version. The quarantine
happens before the version is saved, so a crash in between re-does it (idempotent) when the window is re-delivered.
Every version's ``audit`` says its verdict (``clean``, ``flagged`` or ``skipped`` with ``why``).

Operator rollback (:mod:`fedguard.lineage`): before each window, and every poll (0.5 s) when idle, a pending request
is applied: version N+1 with the parameters of the requested version (``rule_info.rollback``); a request already
applied before a crash (its id on the current version) is only removed.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any

import numpy as np
import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from aggregator.audit import ReversedTrigger, ScreenResult
from aggregator.auditing import (FLAGGED, LOOKBACK_WINDOWS, REMEMBERED_TRIGGERS, VERDICTS, AuditOutcome, Auditor,
                                 PastWindow, carried_over, reference_norms, served_audits, unconfirmed)
from aggregator.combine import ConfiguredRule, WindowInputs, noise_generator, server_update
from aggregator.evaluation import Evaluator, declare_backdoors, observe_backdoors, parse_backdoors
from aggregator.evaluation import export as export_metrics
from aggregator.rules import PreconditionError
from fedguard import lineage, records, registry
from fedguard.modelstore import ModelStore, ModelVersion, WeightsPruned
from fedguard.settings import Settings
from fedguard.tasks import build_model, get_flat_params, load_task, model_spec, set_flat_params
from fedguard.updatestore import UpdateMissing, UpdateStore, keep_from
from fedguard.weighting import admitted, sample_weights

log = logging.getLogger("fedguard.aggregator")

# The latest version's gauges carry the model id: a labelled gauge has no sample until it is set, so a restarted
# aggregator exports nothing (not 0) until it has read its latest version from the store (at construction).
MODEL_VERSION = Gauge("fedguard_model_version", "Current global model version", ["model_id"])
ACCURACY = Gauge("fedguard_model_accuracy", "Test accuracy of the current global model", ["model_id"])
LOSS = Gauge("fedguard_model_loss", "Test loss of the current global model", ["model_id"])
RULE_INFO = Gauge("fedguard_model_rule_info", "1 for the aggregation rule of the latest version", ["rule"])
# Every published version, observed once when it is made (not sampled by scrapes: versions can come faster than
# scrapes, and a bad one between two scrapes must still count).
VERSIONS = Counter("fedguard_model_versions_total", "Global model versions published, by how their parameters "
                   "were made: applied (the rule aggregated the window), rule_skipped or failed (the parent's "
                   "parameters carried over), initial (version 0)", ["outcome"])
ACCURACY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.82, 0.84, 0.86, 0.88, 0.9, 0.92, 0.94, 0.96,
                    0.98, 1.0)  # fine near the top, where a trained model lives
VERSION_ACCURACY = Histogram("fedguard_version_accuracy", "Main-task test accuracy of every published version",
                             buckets=ACCURACY_BUCKETS)
# Not clipped at 0: an improving version is a negative drop, so _sum over an interval is the net accuracy lost, and
# "versions that dropped more than x" is still _count minus the bucket le=x.
ACCURACY_DROP_BUCKETS = (-0.2, -0.1, -0.05, -0.02, -0.01, 0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
VERSION_ACCURACY_DROP = Histogram("fedguard_version_accuracy_drop", "Parent's accuracy minus the new version's, per "
                                  "published version (negative: it improved)", buckets=ACCURACY_DROP_BUCKETS)
WINDOWS = Counter("fedguard_aggregator_windows_total", "Windows read", ["outcome"])
ROUND_SECONDS = Histogram("fedguard_round_latency_seconds", "From a window's first update to its published version",
                          buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300))
AGGREGATE_SECONDS = Histogram("fedguard_aggregate_seconds", "Fetch + aggregate + evaluate + persist one window",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
UPDATES_AGGREGATED = Counter("fedguard_updates_aggregated_total", "Updates that entered an aggregate")
AUDIT_SECONDS = Histogram("fedguard_audit_seconds", "Wall time of the model audit of one candidate version (Neural "
                          "Cleanse, and the attribution when flagged)",
                          buckets=(0.1, 0.25, 0.5, 1, 1.5, 2, 2.5, 3, 5, 10))
AUDIT_VERDICTS = Counter("fedguard_audit_verdicts_total", "Candidate versions by audit verdict: clean (served), "
                         "flagged (not served: the version carries the last served parameters), skipped (warm-up, "
                         "parameters carried over, audit off or not applicable to the task)", ["verdict"])
AUDIT_ATTRIBUTED = Counter("fedguard_audit_attributed_total", "Window members a flagged version was attributed to "
                           "(each one quarantined)")
AUDIT_SCREENED = Counter("fedguard_audit_screened_total", "Window members the audit found pushing the reversed "
                         "trigger of a flagged version: screened (left out of a window before aggregation) or "
                         "look_back (in a served window before the flagged one); each is quarantined", ["how"])
for _how in ("screened", "look_back"):
    AUDIT_SCREENED.labels(_how)  # exported as 0 from the start: a panel shows 0, not "no data"
AUDIT_ANOMALY = Histogram("fedguard_audit_anomaly_index", "Largest Neural Cleanse anomaly index of every audited "
                          "candidate (a class above 2 whose trigger norm is at most 0.7 of the median is flagged)",
                          buckets=(0.5, 1, 1.5, 2, 2.5, 3, 4, 6, 10))


class ConsumerLag(Collector):
    """``fedguard_consumer_lag_records{topic, partition}`` of fl.windows: the partition's end from the last fetch
    response (right on the embedded broker, unlike its ListOffsets answer: ../shared/BROKER.md) minus the next offset
    to process. It replaces the windows topic's offset (a position, not a lag).

    The processors define the same family, as a Gauge, for the topics they read. A collector whose ``describe()`` is
    empty (prometheus_client's documented way to skip the duplicate check) lets one interpreter import both
    services, as a test session does, without a DuplicateTimeseries error; each service process exports only its
    own."""

    def __init__(self) -> None:
        self.lag: dict[tuple[str, int], int] = {}

    def set(self, topic: str, partition: int, value: int) -> None:
        self.lag[(topic, partition)] = value

    def keep_only(self, assigned: set[tuple[str, int]]) -> None:
        """Drop the partitions another group member reads now: their lag is that member's to export."""
        for key in [key for key in self.lag if key not in assigned]:
            self.lag.pop(key, None)

    def describe(self):
        return []

    def collect(self):
        family = GaugeMetricFamily("fedguard_consumer_lag_records", "Records on a partition this consumer reads that "
                                   "it has not processed yet (fetch high watermark minus next offset to process)",
                                   labels=["topic", "partition"])
        for (topic, partition), value in sorted(self.lag.items()):
            family.add_metric([topic, str(partition)], value)
        yield family


CONSUMER_LAG = ConsumerLag()
REGISTRY.register(CONSUMER_LAG)

# Create every labelled series at zero, so the first increase of each is visible to rate() and increase().
for _outcome in ("applied", "already_applied", "out_of_order", "rule_skipped", "failed", "audit_flagged"):
    WINDOWS.labels(_outcome)
for _outcome in ("applied", "rule_skipped", "failed", "initial", "audit_flagged", "rollback"):
    VERSIONS.labels(_outcome)
for _verdict in VERDICTS:
    AUDIT_VERDICTS.labels(_verdict)


def accuracy_drop(parent_metrics: dict[str, Any], metrics: dict[str, Any]) -> float:
    """How much main-task accuracy a version lost against its parent (negative if it gained)."""
    return float(parent_metrics["accuracy"]) - float(metrics["accuracy"])


def export_latest(model_id: str, meta: dict[str, Any]) -> None:
    """The gauges of the latest version: number, accuracy, loss, backdoor accuracy and rule."""
    MODEL_VERSION.labels(model_id).set(meta["version"])
    ACCURACY.labels(model_id).set(meta["metrics"]["accuracy"])
    LOSS.labels(model_id).set(meta["metrics"]["loss"])
    export_metrics(meta["metrics"])
    export_rule(meta["rule"])


def export_rule(rule: str) -> None:
    """``fedguard_model_rule_info{rule}`` = 1 for ``rule``; the series of an earlier rule is removed, not left at 1."""
    RULE_INFO.labels(rule).set(1)
    for labels in [sample.labels for family in RULE_INFO.collect() for sample in family.samples]:
        if labels["rule"] != rule:
            RULE_INFO.remove(labels["rule"])


def observe_version(meta: dict[str, Any], parent_meta: dict[str, Any] | None, outcome: str) -> None:
    """Count a version that was just published and observe its accuracy, drop and backdoor accuracy."""
    VERSIONS.labels(outcome).inc()
    VERSION_ACCURACY.observe(meta["metrics"]["accuracy"])
    if parent_meta is not None:
        VERSION_ACCURACY_DROP.observe(accuracy_drop(parent_meta["metrics"], meta["metrics"]))
    observe_backdoors(meta["metrics"])


def unconfirmed_note(audit: AuditOutcome) -> str:
    """What an event says of a flag's suspects (:func:`aggregator.auditing.unconfirmed`), or nothing."""
    if not audit.suspected:
        return ""
    return (f" (suspected {', '.join(map(str, audit.suspected))}, not quarantined: weak attribution, and the "
            f"look-back found no update pushing the trigger beyond clean training)")


def observe_audit(audit: AuditOutcome) -> None:
    """Count a published version's audit verdict and observe its time, anomaly index and attributed members."""
    AUDIT_VERDICTS.labels(audit.verdict).inc()
    if audit.scores is not None:
        AUDIT_SECONDS.observe(audit.seconds)
        if audit.scores.get("max_anomaly_index") is not None:
            AUDIT_ANOMALY.observe(audit.scores["max_anomaly_index"])
    AUDIT_ATTRIBUTED.inc(len(audit.attributed))


def params_sha256(params: np.ndarray) -> str:
    """sha256 of the parameters as little-endian float32 (a withheld candidate's fingerprint)."""
    return hashlib.sha256(np.ascontiguousarray(params, dtype="<f4").tobytes()).hexdigest()


class WindowFetchError(RuntimeError):
    """The tensors a window names cannot be read from the update store; the message says which and why."""


class AggregatorService:
    # Reading a window's tensors: attempts and the first back-off (doubled after each failed attempt).
    FETCH_ATTEMPTS = 4
    FETCH_BACKOFF_S = 0.5

    def __init__(self, settings: Settings):
        self.settings = settings
        self.rule = ConfiguredRule(settings.rule, settings.rule_params, settings.sample_count_cap)
        self.store = ModelStore(settings.models_dir)
        self._restore_metrics()  # before the slow set-up below: the metrics endpoint already serves
        self.redis = registry.connect(settings)
        self.task = load_task(settings.task, seed=settings.seed)
        self.spec = model_spec(self.task, settings.hidden_widths())
        self.model = build_model(self.spec, seed=settings.seed)
        self.evaluator = Evaluator(self.task, build_model(self.spec), parse_backdoors(settings.backdoor_eval, self.task))
        self.auditor = Auditor(self.task, self.spec, settings.audit, settings.audit_time_budget_s,
                               seed=settings.seed)
        for version, target, mask, pattern in self.store.triggers(REMEMBERED_TRIGGERS):  # survive a restart
            self.auditor.remember(version, ReversedTrigger(target, mask, pattern))
        declare_backdoors(self.evaluator.triggers)
        big = settings.max_payload_bytes + 1024 * 1024
        common = dict(bootstrap_servers=settings.kafka_bootstrap, client_id="fedguard-aggregator")
        self.producer = KafkaProducer(acks="all", max_request_size=big, **common)
        self.windows = KafkaConsumer(
            group_id=f"fedguard-aggregator-{settings.model_id}", enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=2000,
            max_partition_fetch_bytes=big, fetch_max_bytes=big, **common)
        self.updates = UpdateStore(settings.update_store_dir, settings.update_store_spare_bytes)
        self.current: ModelVersion | None = None
        self._rollback_unreadable = False

    # -- start-up ---------------------------------------------------------------------------------------------
    def start(self) -> ModelVersion:
        current = self.store.latest()
        if current is None:
            params = get_flat_params(self.model)
            metrics = self._evaluate(params)
            initial = AuditOutcome("skipped", why="version 0 (the initial model) is not audited")
            meta = self.store.save(0, params, self._meta(parent=None, window=None, metrics=metrics,
                                                         accepted=0, members=0, audit=initial))
            current = ModelVersion(meta=meta, params=params)
            log.info("initialised version 0 (accuracy %.4f)", metrics["accuracy"])
            observe_version(meta, None, "initial")
        else:
            log.info("resuming from persisted version %d", current.version)
        self.redis.set(registry.model_store_key(self.settings), self.store.identity())
        self._publish(current)
        self.windows.subscribe([self.settings.topics.windows])
        return current

    # -- main loop --------------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self.start()
        while not stop.is_set():
            self.apply_pending_rollback()
            batch = self.windows.poll(timeout_ms=500)
            for tp, messages in batch.items():
                for message in messages:
                    self.apply_pending_rollback()
                    self.handle_window(records.loads(message.value))
                    self.windows.commit({tp: OffsetAndMetadata(message.offset + 1, "", -1)})
                    self._export_lag(tp, message.offset + 1)
            if not batch:
                self._export_idle_lag()

    def handle_window(self, window: dict[str, Any]) -> ModelVersion | None:
        current = self.current
        assert current is not None
        if window["window_id"] == current.meta.get("window_id") or window["base_version"] < current.version:
            WINDOWS.labels("already_applied").inc()
            after = self._version_after(window["base_version"])
            if (after.get("rule_info") or {}).get("rollback"):
                log.warning("window %s for version %d superseded by the rollback of version %d: skipped",
                            window["window_id"], window["base_version"], after["version"])
            else:
                log.info("window %s already applied (current version %d): skipped", window["window_id"],
                         current.version)
            return None
        if window["base_version"] != current.version:
            # Cannot happen while the validator rejects future base versions; refuse rather than guess.
            WINDOWS.labels("out_of_order").inc()
            log.error("window %s is for base %d but current is %d", window["window_id"], window["base_version"],
                      current.version)
            return None
        started = time.perf_counter()
        # Members the window stage admitted (accept, or downweight with a weight in (0, 1)); rejected ones never count.
        accepted = [m for m in window["members"] if admitted(m["verdict"], m.get("weight", 1.0))]
        try:
            deltas = self.fetch_updates(accepted)
        except WindowFetchError as exc:
            return self._fail_window(window, current, accepted, str(exc))
        screen = self._screen(current, accepted, deltas)
        if screen is not None and screen.screened:
            # They pushed the trigger of an earlier flagged version: left out of the aggregate, quarantined.
            self._quarantine_by_audit({d: f"model audit: screened out of window {window['window_id']}: "
                                          f"{'; '.join(screen.reasons[d])}" for d in screen.screened},
                                      window, current.version + 1, "screened")
            out = set(screen.screened)
            kept = [i for i, m in enumerate(accepted) if m["device_id"] not in out]
            accepted, deltas = [accepted[i] for i in kept], deltas[kept]
        params, result_info = current.params, {"selected": []}
        # A window the rule cannot aggregate still makes a version (one per window, or the pipeline stalls: the
        # processors close one window per base version), carrying the parameters over; its record says so.
        carried = f"parameters of version {current.version} carried into version {current.version + 1}"
        if len(accepted) < self.rule.min_updates:
            result_info["skipped"] = (f"{len(accepted)} accepted updates, rule {self.rule.name} needs "
                                      f"{self.rule.min_updates}: {carried}")
            result_info["params_from"] = current.version
        else:
            try:
                result = self.rule(deltas, self._inputs(accepted, current))
            except PreconditionError as exc:
                result_info["skipped"] = f"{exc}: {carried}"
                result_info["params_from"] = current.version
            else:
                params = (current.params.astype(np.float64) + result.vector).astype(np.float32)
                result_info = {"selected": [accepted[i]["device_id"] for i in result.selected], **result.info}
        # What was applied to each admitted member (the window stage's weight; FedAvg multiplies it by the capped
        # sample count, the other rules use it to admit, not to weight).
        result_info["member_weights"] = {m["device_id"]: float(m.get("weight", 1.0)) for m in accepted}
        # Where the aggregated tensors are, for the audit's look-back when a later version is flagged.
        result_info["member_tensors"] = {m["device_id"]: m["tensor"] for m in accepted}
        if "skipped" in result_info:
            WINDOWS.labels("rule_skipped").inc()
            log.warning("window %s: %s", window["window_id"], result_info["skipped"])
            audit = carried_over(current.version)
        else:
            audit = self._audit(params, current, accepted, deltas)
        audit_meta = audit.to_meta()
        if screen is not None:
            audit_meta["screened"] = screen.to_dict()
        if audit.verdict == FLAGGED:
            # Not served: the version carries the last served parameters (or, when the look-back finds the backdoor
            # in earlier windows, those of the oldest one's base); the candidate is kept as evidence only by its
            # fingerprint and metrics.
            audit_meta["candidate"] = {"sha256": params_sha256(params), "metrics": self._evaluate(params)}
            served = current
            if audit.trigger is not None:
                flagged = PastWindow(current.version + 1, current.params,
                                     {m["device_id"]: deltas[i] for i, m in enumerate(accepted)})
                served, look_back = self._look_back(audit, window, current, flagged)
                if look_back.get("screened"):  # confirmed (Auditor.look_back): remember it
                    self.store.save_trigger(current.version + 1, audit.trigger.target, audit.trigger.mask,
                                            audit.trigger.pattern)
                    self.auditor.remember(current.version + 1, audit.trigger)
                else:  # nobody pushes it beyond clean training: only strong attributions stand
                    audit = unconfirmed(audit)
                audit_meta = {**audit_meta, **audit.to_meta(), "look_back": look_back}
            result_info["params_from"] = served.version
            result_info["withheld"] = (f"the audit flagged class {audit.flagged_class} of the candidate: parameters "
                                       f"of version {served.version} carried into version {current.version + 1}")
            params = served.params
            self._respond_to_flag(audit, window, current.version + 1, served.version)
        metrics = self._evaluate(params)
        meta = self._meta(parent=current.version, window=window, metrics=metrics,
                          accepted=len(accepted), members=len(window["members"]), info=result_info)
        meta["audit"] = audit_meta
        meta = self.store.save(current.version + 1, params, meta)
        new = ModelVersion(meta=meta, params=params)
        self._publish(new)
        outcome = "audit_flagged" if audit.verdict == FLAGGED else "rule_skipped" if "skipped" in result_info \
            else "applied"
        observe_version(meta, current.meta, outcome)
        observe_audit(audit)
        if audit.verdict != FLAGGED:  # a withheld candidate's updates entered no served aggregate
            UPDATES_AGGREGATED.inc(len(accepted))
        WINDOWS.labels("audit_flagged" if audit.verdict == FLAGGED else "applied").inc()
        AGGREGATE_SECONDS.observe(time.perf_counter() - started)
        ROUND_SECONDS.observe(max(0.0, time.time() - window["opened_at"]))
        log.info("version %d from window %s: %d/%d accepted, accuracy %.4f, audit %s%s", new.version,
                 window["window_id"], len(accepted), len(window["members"]), metrics["accuracy"], audit.verdict,
                 f" ({audit.why})" if audit.why else "")
        return new

    def _version_after(self, version: int) -> dict[str, Any]:
        try:
            return self.store.meta(version + 1)
        except FileNotFoundError:
            return {}

    # -- the model audit ----------------------------------------------------------------------------------------
    def _audit(self, candidate: np.ndarray, current: ModelVersion, accepted: list[dict[str, Any]],
               deltas: np.ndarray) -> AuditOutcome:
        """The audit of the candidate made from ``current``'s window (see :mod:`aggregator.auditing`)."""
        if self.auditor.skipped is not None:
            return self.auditor.audit_candidate(candidate, current.params, {})
        s = self.settings
        history = served_audits(self.store.meta, current.version,
                                max(s.audit_reference_versions, s.audit_warmup_versions))
        reference = reference_norms(history[:s.audit_reference_versions], self.task.num_classes)
        members = {m["device_id"]: deltas[i] for i, m in enumerate(accepted)}
        try:
            return self.auditor.audit_candidate(candidate, current.params, members, reference,
                                                warmup=len(history) < s.audit_warmup_versions)
        except Exception as exc:  # noqa: BLE001 - a bug in the audit must not stop the pipeline: served, logged
            log.exception("audit of the candidate of version %d failed", current.version + 1)
            return AuditOutcome("skipped", why=f"audit error: {type(exc).__name__}: {exc}")

    def _screen(self, current: ModelVersion, accepted: list[dict[str, Any]], deltas: np.ndarray
                ) -> ScreenResult | None:
        """The admitted members screened against the remembered triggers (:meth:`Auditor.screen`)."""
        if not accepted:
            return None
        try:
            result = self.auditor.screen(current.params, {m["device_id"]: deltas[i] for i, m in enumerate(accepted)})
        except Exception:  # noqa: BLE001 - like the audit: a bug here must not stop the pipeline; logged
            log.exception("screening the window for version %d failed; its members are not screened",
                          current.version + 1)
            return None
        if result is not None:
            AUDIT_SCREENED.labels("screened").inc(len(result.screened))
        return result

    def _past_windows(self, current: ModelVersion) -> list[PastWindow]:
        """The last served windows of the lineage up to ``current`` (newest first, at most LOOKBACK_WINDOWS): the
        versions a window made, skipping versions whose parameters came from elsewhere, while their base's
        weights and their members' tensors are still stored."""
        out: list[PastWindow] = []
        version: int | None = current.version
        seen: set[int] = set()
        while len(out) < LOOKBACK_WINDOWS and version is not None and version not in seen and len(seen) < 50:
            seen.add(version)
            meta = self.store.meta(version)
            info = meta.get("rule_info") or {}
            if info.get("params_from") is not None:
                version = int(info["params_from"])
                continue
            tensors, parent = info.get("member_tensors"), meta.get("parent")
            if parent is None or not tensors:
                break
            try:
                base = self.store.load(int(parent)).params
                members = {d: self.updates.get(ref, self.spec.num_params) for d, ref in tensors.items()}
            except (UpdateMissing, WeightsPruned, FileNotFoundError, ValueError, OSError) as exc:
                log.info("audit look-back stops at version %d: %s", version, exc)
                break
            out.append(PastWindow(version, base, members))
            version = int(parent)
        return out

    def _look_back(self, audit: AuditOutcome, window: dict[str, Any], current: ModelVersion, flagged: PastWindow
                   ) -> tuple[ModelVersion, dict[str, Any]]:
        """Screen the flagged window and the served windows before it with its trigger (:meth:`Auditor.look_back`);
        quarantine whom it finds. Returns the version whose parameters to serve (the base of the oldest served
        window holding a screened member, else ``current``) and what it did, for the version's metadata."""
        version = current.version + 1
        try:
            windows = self._past_windows(current)
            oldest, culprits = self.auditor.look_back(audit.trigger, windows, flagged)
            served = current if oldest is None else self.store.load(oldest.version - 1)
        except Exception as exc:  # noqa: BLE001 - the flag itself still holds: serve the parent, say why
            log.exception("audit look-back for version %d failed", version)
            return current, {"error": f"{type(exc).__name__}: {exc}"}
        # (a device the flag also attributes is quarantined and counted once, as attributed)
        attributed = set(audit.attributed)
        found = {d: vs for d, vs in culprits.items() if d not in attributed}
        AUDIT_SCREENED.labels("look_back").inc(len(found))
        self._quarantine_by_audit({d: f"model audit: version {version} (window {window['window_id']}) backdoored "
                                      f"class {audit.flagged_class}; the look-back found this device's update in "
                                      f"the window of version {', '.join(map(str, vs))} pushing its trigger"
                                   for d, vs in found.items()}, window, version, "look_back")
        return served, {"windows": [w.version for w in windows],
                        "screened": {str(d): vs for d, vs in culprits.items()}, "served_from": served.version}

    def _quarantine_by_audit(self, reasons: dict[Any, str], window: dict[str, Any], version: int, how: str) -> None:
        """Quarantine each device (by ``audit``, released only by an operator) and publish the events."""
        events = []
        for device, reason in reasons.items():
            try:
                event = registry.quarantine_device(self.redis, self.settings, str(device), reason, by="audit")
            except (KeyError, ValueError) as exc:  # not enrolled any more, or revoked: nothing to quarantine
                log.warning("audit: device %s not quarantined: %s", device, exc)
                continue
            events.append({**event, "version": version, "window_id": window["window_id"], "how": how})
        self._send_events(events)
        if reasons:
            log.warning("audit (%s) for version %d: quarantined %s", how, version, ", ".join(map(str, reasons)))

    def _send_events(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            key = (event["device_id"] or self.settings.model_id).encode()
            self.producer.send(self.settings.topics.events, key=key, value=records.dumps(event))
        if events:
            self.producer.flush(timeout=30)

    def _respond_to_flag(self, audit: AuditOutcome, window: dict[str, Any], version: int, served_from: int) -> None:
        """Quarantine the devices a flagged version is attributed to and publish the events on ``fl.events``."""
        self._quarantine_by_audit({d: f"model audit: version {version} (window {window['window_id']}) backdoored "
                                      f"class {audit.flagged_class}; this device's update alone pushed it"
                                   for d in audit.attributed}, window, version, "attributed")
        scores = audit.scores or {}
        self._send_events([{
            "type": "audit_flagged", "device_id": None, "model_id": self.settings.model_id,
            "version": version, "window_id": window["window_id"], "flagged_class": audit.flagged_class,
            "reasons": scores.get("reasons", []), "max_anomaly_index": scores.get("max_anomaly_index"),
            "attributed": [str(d) for d in audit.attributed], "suspected": [str(d) for d in audit.suspected],
            "params_from": served_from,
            "at": time.time(), "detail": f"version {version} not served: the audit flagged class "
            f"{audit.flagged_class} ({', '.join(scores.get('reasons', []))}); attributed to "
            f"{', '.join(map(str, audit.attributed)) or 'nobody'}"
            f"{unconfirmed_note(audit)}; parameters of version {served_from}"}])
        log.warning("audit flagged the candidate of version %d (class %s, %s): not served (parameters of version "
                    "%d)", version, audit.flagged_class, ", ".join(scores.get("reasons", [])), served_from)

    # -- operator rollback --------------------------------------------------------------------------------------
    def apply_pending_rollback(self) -> ModelVersion | None:
        """Apply the pending rollback request, if any (see :mod:`fedguard.lineage`); returns the new version."""
        try:
            request = lineage.pending_rollback(self.redis, self.settings)
        except redis.RedisError as exc:  # an outage must not stop the service: the request waits in Redis
            if not self._rollback_unreadable:
                log.warning("rollback requests cannot be read from Redis (%s); trying again every poll", exc)
            self._rollback_unreadable = True
            return None
        self._rollback_unreadable = False
        if request is None:
            return None
        current = self.current
        assert current is not None
        if (current.meta.get("rule_info") or {}).get("rollback", {}).get("request_id") == request.get("id"):
            lineage.clear_rollback(self.redis, self.settings, request)  # applied before a restart
            return None
        try:
            if "invalid" in request:
                raise lineage.RollbackError(f"unreadable request {request['invalid']!r}")
            target = self.store.load(lineage.rollback_target(self.store, request["to"]))
        except (lineage.RollbackError, WeightsPruned, FileNotFoundError) as exc:
            log.error("rollback request refused: %s", exc)
            lineage.clear_rollback(self.redis, self.settings, request)
            return None
        rollback = {"to": target.version, "by": request.get("by", "operator"), "reason": request.get("reason", ""),
                    "request_id": request.get("id"), "requested_at": request.get("requested_at")}
        info = {"selected": [], "params_from": target.version, "rollback": rollback}
        meta = self._meta(parent=current.version, window=None, metrics=target.meta["metrics"], accepted=0, members=0,
                          info=info, audit=carried_over(target.version))
        meta = self.store.save(current.version + 1, target.params, meta)
        new = ModelVersion(meta=meta, params=target.params)
        self._publish(new)
        observe_version(meta, current.meta, "rollback")
        lineage.clear_rollback(self.redis, self.settings, request)
        self.producer.send(self.settings.topics.events, key=self.settings.model_id.encode(), value=records.dumps({
            "type": "rollback", "device_id": None, "model_id": self.settings.model_id, "version": new.version,
            "to": target.version, "by": rollback["by"], "reason": rollback["reason"], "at": time.time(),
            "detail": f"version {new.version} has the parameters of version {target.version} ({rollback['by']}"
                      f"{': ' + rollback['reason'] if rollback['reason'] else ''})"})).get(timeout=30)
        log.warning("rollback: version %d has the parameters of version %d (%s%s)", new.version, target.version,
                    rollback["by"], f": {rollback['reason']}" if rollback["reason"] else "")
        return new

    def fetch_updates(self, members: list[dict[str, Any]]) -> np.ndarray:
        """The members' tensors, read from the update store at the references the window names (``tensor``).

        Retried ``FETCH_ATTEMPTS`` times with exponential backoff; raises :class:`WindowFetchError` when every
        attempt failed (see the module docstring for what the service then does)."""
        delay = self.FETCH_BACKOFF_S
        for attempt in range(1, self.FETCH_ATTEMPTS + 1):
            try:
                return self._fetch_once(members)
            except (WindowFetchError, OSError) as exc:
                reason = str(exc) if isinstance(exc, WindowFetchError) else f"{type(exc).__name__}: {exc}"
                if attempt == self.FETCH_ATTEMPTS:
                    raise WindowFetchError(f"{reason} (after {attempt} attempts)") from exc
                log.warning("reading a window's updates failed (attempt %d of %d): %s; retrying in %.1f s", attempt,
                            self.FETCH_ATTEMPTS, reason, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _fetch_once(self, members: list[dict[str, Any]]) -> np.ndarray:
        out = np.empty((len(members), self.spec.num_params), dtype=np.float32)
        for i, m in enumerate(members):
            ref = m.get("tensor")
            if not isinstance(ref, str):
                raise WindowFetchError(f"member {m.get('update_id')!r} names no tensor in the update store")
            try:
                out[i] = self.updates.get(ref, self.spec.num_params)
            except (UpdateMissing, ValueError) as exc:
                raise WindowFetchError(str(exc)) from exc
        return out

    def _fail_window(self, window: dict[str, Any], current: ModelVersion, accepted: list[dict[str, Any]],
                     reason: str) -> ModelVersion:
        """A window whose updates cannot be read: version N+1 carries version N's parameters and says why."""
        WINDOWS.labels("failed").inc()
        log.error("window %s failed: %s; version %d carries version %d's parameters", window["window_id"], reason,
                  current.version + 1, current.version)
        info = {"selected": [], "failed": reason, "params_from": current.version}
        meta = self._meta(parent=current.version, window=window, metrics=current.meta["metrics"],
                          accepted=len(accepted), members=len(window["members"]), info=info,
                          audit=carried_over(current.version))
        meta = self.store.save(current.version + 1, current.params, meta)
        new = ModelVersion(meta=meta, params=current.params)
        self._publish(new)
        observe_version(meta, current.meta, "failed")
        observe_audit(carried_over(current.version))
        return new

    # -- per-window inputs of the rules ---------------------------------------------------------------------
    def _inputs(self, accepted: list[dict[str, Any]], current: ModelVersion) -> WindowInputs:
        # Noise from OS entropy unless an experiment fixes the seed (then the version says it is not private).
        rng, noise_seed = noise_generator(self.settings.aggregation_experiment_seed, current.version)
        return WindowInputs(
            sample_counts=self._sample_weights(accepted),
            rng=rng, noise_seed=noise_seed,
            center=lambda: self._previous_aggregate(current),
            server_update=lambda: self._server_update(current),
            trust_scores=lambda: self._trust_scores(accepted))

    def _sample_weights(self, members: list[dict[str, Any]]) -> np.ndarray:
        """FedAvg's weights: the claimed sample count, capped (a device chooses it), times the ensemble's weight."""
        return sample_weights([float(m["num_samples"]) for m in members],
                              [float(m.get("weight", 1.0)) for m in members], self.settings.sample_count_cap)

    def _previous_aggregate(self, current: ModelVersion) -> np.ndarray:
        """The last applied aggregate (centered clipping's starting point): v - parent(v), zero at version 0."""
        if current.meta.get("parent") is None:
            return np.zeros_like(current.params, dtype=np.float64)
        parent = self.store.load(int(current.meta["parent"]))
        return current.params.astype(np.float64) - parent.params

    def _server_update(self, current: ModelVersion, root_size: int = 100) -> np.ndarray:
        """FLTrust's server update (Cao et al. 2021, Alg. 1): the same local training on a small root dataset."""
        return server_update(self.task, self.model, current.params, self.settings.seed, current.version, root_size)

    def _trust_scores(self, accepted: list[dict[str, Any]]) -> np.ndarray:
        """Trust per member from the Redis reputation hash (``trust``, in [0, 1]; 1.0 while a device has none)."""
        pipe = self.redis.pipeline()
        for m in accepted:
            pipe.hget(self.settings.redis_key("reputation", m["device_id"]), "trust")
        return np.array([1.0 if t is None else float(t) for t in pipe.execute()], dtype=np.float64)

    # -- helpers ----------------------------------------------------------------------------------------------
    def _evaluate(self, params: np.ndarray) -> dict[str, Any]:
        return self.evaluator(set_flat_params, params)

    def _meta(self, *, parent, window, metrics, accepted, members, info=None, audit=None) -> dict[str, Any]:
        return {
            "model_id": self.settings.model_id, "parent": parent,
            "round": 0 if parent is None else parent + 1,
            "rule": self.rule.name, "rule_params": self.rule.config,
            "rule_info": info or {},
            "window_id": window["window_id"] if window else None,
            "window_closed_by": window["closed_by"] if window else None,
            "members": members, "accepted": accepted,
            "task": self.task.name, "metrics": metrics,
            "created_at": time.time(),
            **({"audit": audit.to_meta()} if audit is not None else {}),
        }

    def _publish(self, version: ModelVersion) -> None:
        self.redis.set(registry.model_version_key(self.settings), version.version)
        self.producer.send(self.settings.topics.models, key=self.settings.model_id.encode(),
                           value=records.dumps(version.meta)).get(timeout=30)
        self.current = version
        export_latest(self.settings.model_id, version.meta)
        # Retention (fedguard/modelstore.py): after publishing, so the weights of the version devices now train
        # from and of its recent ancestors are never the ones deleted.
        pruned = self.store.prune(self.settings.model_store_keep_last, self.settings.model_store_keep_every)
        if pruned:
            log.debug("model store retention: weights of versions %s deleted (metadata kept)", pruned)
        # (LOOKBACK_WINDOWS more: the audit's look-back reads the tensors of the last served windows)
        gone = self.updates.prune(self.settings.model_id,
                                  keep_from(version.version, self.settings.max_staleness + LOOKBACK_WINDOWS))
        if gone:
            log.debug("update store retention: tensors of base versions %s deleted", gone)

    # -- metrics ----------------------------------------------------------------------------------------------
    def _restore_metrics(self) -> None:
        """The latest stored version's gauges, so a restart never exports a stale or zero version meanwhile."""
        versions = self.store.versions()
        if versions:
            export_latest(self.settings.model_id, self.store.meta(versions[-1]))

    def _export_lag(self, tp: TopicPartition, next_offset: int | None = None) -> None:
        """``fedguard_consumer_lag_records`` of one fl.windows partition; ``next_offset`` None: the consumer's
        position, which is the next offset to process once every polled record is handled."""
        try:
            if next_offset is None:
                next_offset = self.windows.position(tp, timeout_ms=1000)
            end = self.windows.highwater(tp)
        except KafkaError as exc:  # (IllegalStateError: revoked meanwhile) the next idle poll tries again
            log.debug("consumer lag of %s: %r", tp, exc)
            return
        if end is not None and next_offset is not None:
            CONSUMER_LAG.set(tp.topic, tp.partition, max(0, end - next_offset))

    def _export_idle_lag(self) -> None:
        assigned = self.windows.assignment()
        CONSUMER_LAG.keep_only({(tp.topic, tp.partition) for tp in assigned})
        for tp in assigned:
            self._export_lag(tp)

    def close(self) -> None:
        self.windows.close()
        self.producer.close(timeout=5)
