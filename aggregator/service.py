"""The aggregation service: one new global model version per closed window, exactly once, across restarts.

Loop: read a window from ``fl.windows``; fetch the accepted members' tensors from ``fl.updates.valid`` by the
positions the window names; apply the configured rule to the deltas; evaluate; persist the version (the commit
point); publish it to ``fl.models`` and Redis; only then commit the window's offset. A crash between persisting
and committing re-delivers the window, which is then recognised as applied (its id is on the current version).

A window whose tensors cannot be read from ``fl.updates.valid`` (an offset past the end of its partition or already
deleted by retention, a partition that does not exist, a broker that does not answer) does not stop the service.
The read is retried ``FETCH_ATTEMPTS`` times with exponential backoff (``FETCH_BACKOFF_S``, doubled each time);
if it still fails the window is *failed*: version N+1 is published with version N's parameters unchanged and
``rule_info = {"selected": [], "failed": <reason>, "params_from": N}``, the window is counted as
``fedguard_aggregator_windows_total{outcome="failed"}`` (not ``applied``) and logged with the reason, and its
offset is committed, so the service goes on with the next window. Publishing N+1 rather than nothing is what
keeps the pipeline moving: the processors close exactly one window per base version (processors/windows.py), so
no second window for version N would ever come, and the devices would keep training on a version nobody
aggregates. The window's updates are lost to aggregation; the version's record says so and why.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter, Gauge, Histogram

from aggregator.combine import ConfiguredRule, WindowInputs, noise_generator, server_update
from aggregator.evaluation import Evaluator, parse_backdoors
from aggregator.evaluation import export as export_metrics
from aggregator.rules import PreconditionError
from fedguard import records, registry
from fedguard.modelstore import ModelStore, ModelVersion
from fedguard.settings import Settings
from fedguard.tasks import build_model, get_flat_params, load_task, model_spec, set_flat_params
from fedguard.weighting import admitted, sample_weights

log = logging.getLogger("fedguard.aggregator")

MODEL_VERSION = Gauge("fedguard_model_version", "Current global model version")
ACCURACY = Gauge("fedguard_model_accuracy", "Test accuracy of the current global model")
LOSS = Gauge("fedguard_model_loss", "Test loss of the current global model")
WINDOWS = Counter("fedguard_aggregator_windows_total", "Windows read", ["outcome"])
ROUND_SECONDS = Histogram("fedguard_round_latency_seconds", "From a window's first update to its published version",
                          buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300))
AGGREGATE_SECONDS = Histogram("fedguard_aggregate_seconds", "Fetch + aggregate + evaluate + persist one window",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
UPDATES_AGGREGATED = Counter("fedguard_updates_aggregated_total", "Updates that entered an aggregate")
WINDOWS_OFFSET = Gauge("fedguard_aggregator_windows_offset", "Next offset to read on the windows topic", ["partition"])

# Create every labelled series at zero, so the first increase of each is visible to rate() and increase().
for _outcome in ("applied", "already_applied", "out_of_order", "rule_skipped", "failed"):
    WINDOWS.labels(_outcome)


class WindowFetchError(RuntimeError):
    """The tensors a window names cannot be read from ``fl.updates.valid``; the message says which and why."""


class AggregatorService:
    # Reading a window's tensors: attempts, the first back-off (doubled after each failed attempt) and how long one
    # attempt may wait for the records of one partition.
    FETCH_ATTEMPTS = 4
    FETCH_BACKOFF_S = 0.5
    FETCH_TIMEOUT_S = 30.0

    def __init__(self, settings: Settings):
        self.settings = settings
        self.rule = ConfiguredRule(settings.rule, settings.rule_params, settings.sample_count_cap)
        self.store = ModelStore(settings.models_dir)
        self.redis = registry.connect(settings)
        self.task = load_task(settings.task, seed=settings.seed)
        self.spec = model_spec(self.task)
        self.model = build_model(self.spec, seed=settings.seed)
        self.evaluator = Evaluator(self.task, build_model(self.spec), parse_backdoors(settings.backdoor_eval, self.task))
        big = settings.max_payload_bytes + 1024 * 1024
        common = dict(bootstrap_servers=settings.kafka_bootstrap, client_id="fedguard-aggregator")
        self.producer = KafkaProducer(acks="all", max_request_size=big, **common)
        self.windows = KafkaConsumer(
            group_id=f"fedguard-aggregator-{settings.model_id}", enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=2000,
            max_partition_fetch_bytes=big, fetch_max_bytes=big, **common)
        self.fetcher = KafkaConsumer(enable_auto_commit=False, max_partition_fetch_bytes=big, fetch_max_bytes=big,
                                     **common)
        self.current: ModelVersion | None = None

    # -- start-up ---------------------------------------------------------------------------------------------
    def start(self) -> ModelVersion:
        current = self.store.latest()
        if current is None:
            params = get_flat_params(self.model)
            metrics = self._evaluate(params)
            meta = self.store.save(0, params, self._meta(parent=None, window=None, metrics=metrics,
                                                         accepted=0, members=0))
            current = ModelVersion(meta=meta, params=params)
            log.info("initialised version 0 (accuracy %.4f)", metrics["accuracy"])
        else:
            log.info("resuming from persisted version %d", current.version)
        self._publish(current)
        self.windows.subscribe([self.settings.topics.windows])
        return current

    # -- main loop --------------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self.start()
        while not stop.is_set():
            batch = self.windows.poll(timeout_ms=500)
            for tp, messages in batch.items():
                for message in messages:
                    self.handle_window(records.loads(message.value))
                    self.windows.commit({tp: OffsetAndMetadata(message.offset + 1, "", -1)})
                    WINDOWS_OFFSET.labels(str(tp.partition)).set(message.offset + 1)

    def handle_window(self, window: dict[str, Any]) -> ModelVersion | None:
        current = self.current
        assert current is not None
        if window["window_id"] == current.meta.get("window_id") or window["base_version"] < current.version:
            WINDOWS.labels("already_applied").inc()
            log.info("window %s already applied (current version %d): skipped", window["window_id"], current.version)
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
        if "skipped" in result_info:
            WINDOWS.labels("rule_skipped").inc()
            log.warning("window %s: %s", window["window_id"], result_info["skipped"])
        metrics = self._evaluate(params)
        meta = self._meta(parent=current.version, window=window, metrics=metrics,
                          accepted=len(accepted), members=len(window["members"]), info=result_info)
        meta = self.store.save(current.version + 1, params, meta)
        new = ModelVersion(meta=meta, params=params)
        self._publish(new)
        UPDATES_AGGREGATED.inc(len(accepted))
        WINDOWS.labels("applied").inc()
        AGGREGATE_SECONDS.observe(time.perf_counter() - started)
        ROUND_SECONDS.observe(max(0.0, time.time() - window["opened_at"]))
        log.info("version %d from window %s: %d/%d accepted, accuracy %.4f", new.version, window["window_id"],
                 len(accepted), len(window["members"]), metrics["accuracy"])
        return new

    def fetch_updates(self, members: list[dict[str, Any]]) -> np.ndarray:
        """The members' tensors, read from ``fl.updates.valid`` at the positions the window names.

        Retried ``FETCH_ATTEMPTS`` times with exponential backoff; raises :class:`WindowFetchError` when every
        attempt failed (see the module docstring for what the service then does)."""
        delay = self.FETCH_BACKOFF_S
        for attempt in range(1, self.FETCH_ATTEMPTS + 1):
            try:
                return self._fetch_once(members)
            except (WindowFetchError, KafkaError) as exc:
                reason = str(exc) if isinstance(exc, WindowFetchError) else f"{type(exc).__name__}: {exc}"
                if attempt == self.FETCH_ATTEMPTS:
                    raise WindowFetchError(f"{reason} (after {attempt} attempts)") from exc
                log.warning("reading a window's updates failed (attempt %d of %d): %s; retrying in %.1f s", attempt,
                            self.FETCH_ATTEMPTS, reason, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _fetch_once(self, members: list[dict[str, Any]]) -> np.ndarray:
        topic = self.settings.topics.valid
        wanted: dict[int, set[int]] = defaultdict(set)
        for m in members:
            wanted[m["valid"]["partition"]].add(m["valid"]["offset"])
        if wanted:
            partitions = self.fetcher.partitions_for_topic(topic) or set()
            unknown = sorted(p for p in wanted if p not in partitions)
            if unknown:
                raise WindowFetchError(f"{topic} has no partition {unknown} (partitions: {sorted(partitions)})")
        found: dict[tuple[int, int], np.ndarray] = {}
        for partition, offsets in wanted.items():
            tp = TopicPartition(topic, partition)
            self.fetcher.assign([tp])
            start, end = self.fetcher.beginning_offsets([tp])[tp], self.fetcher.end_offsets([tp])[tp]
            gone, beyond = sorted(o for o in offsets if o < start), sorted(o for o in offsets if o >= end)
            if gone:
                raise WindowFetchError(f"{topic}[{partition}] offsets {gone} were deleted (the log starts at {start})")
            if beyond:
                raise WindowFetchError(f"{topic}[{partition}] offsets {beyond} are past the end of the partition "
                                       f"(next offset {end})")
            self.fetcher.seek(tp, min(offsets))
            missing, last = set(offsets), max(offsets)
            deadline = time.monotonic() + self.FETCH_TIMEOUT_S
            while missing and time.monotonic() < deadline:
                for message in self.fetcher.poll(timeout_ms=1000).get(tp, []):
                    if message.offset in missing:
                        try:
                            _, tensor = records.decode_valid(message.value, self.spec.num_params)
                        except ValueError as exc:
                            raise WindowFetchError(f"{topic}[{partition}] offset {message.offset} does not decode: "
                                                   f"{exc}") from exc
                        found[(partition, message.offset)] = tensor
                        missing.discard(message.offset)
                if self.fetcher.position(tp) > last:
                    break  # read past every wanted offset: what is still missing is not there
            if missing:
                raise WindowFetchError(f"{topic}[{partition}] offsets {sorted(missing)} not found")
        out = np.empty((len(members), self.spec.num_params), dtype=np.float32)
        for i, m in enumerate(members):
            tensor = found[(m["valid"]["partition"], m["valid"]["offset"])]
            if tensor.size != self.spec.num_params:
                raise WindowFetchError(f"{topic}[{m['valid']['partition']}] offset {m['valid']['offset']} holds "
                                       f"{tensor.size} parameters, the model has {self.spec.num_params}")
            out[i] = tensor
        return out

    def _fail_window(self, window: dict[str, Any], current: ModelVersion, accepted: list[dict[str, Any]],
                     reason: str) -> ModelVersion:
        """A window whose updates cannot be read: version N+1 carries version N's parameters and says why."""
        WINDOWS.labels("failed").inc()
        log.error("window %s failed: %s; version %d carries version %d's parameters", window["window_id"], reason,
                  current.version + 1, current.version)
        info = {"selected": [], "failed": reason, "params_from": current.version}
        meta = self._meta(parent=current.version, window=window, metrics=current.meta["metrics"],
                          accepted=len(accepted), members=len(window["members"]), info=info)
        meta = self.store.save(current.version + 1, current.params, meta)
        new = ModelVersion(meta=meta, params=current.params)
        self._publish(new)
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

    def _meta(self, *, parent, window, metrics, accepted, members, info=None) -> dict[str, Any]:
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
        }

    def _publish(self, version: ModelVersion) -> None:
        self.redis.set(registry.model_version_key(self.settings), version.version)
        self.producer.send(self.settings.topics.models, key=self.settings.model_id.encode(),
                           value=records.dumps(version.meta)).get(timeout=30)
        self.current = version
        MODEL_VERSION.set(version.version)
        ACCURACY.set(version.meta["metrics"]["accuracy"])
        LOSS.set(version.meta["metrics"]["loss"])
        export_metrics(version.meta["metrics"])

    def close(self) -> None:
        for client in (self.windows, self.fetcher):
            client.close()
        self.producer.close(timeout=5)
