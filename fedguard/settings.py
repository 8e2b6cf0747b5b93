"""Settings shared by every fedguard service.

One explicit configuration object, read from the environment (``FEDGUARD_*`` plus the two standard names
``KAFKA_BOOTSTRAP_SERVERS`` and ``REDIS_URL``) and overridable field by field from the CLI. Defaults avoid the
standard ports (9092, 6379) so the embedded stack can run beside services that already listen there.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Topics:
    models: str = "fl.models"
    raw: str = "fl.updates.raw"
    valid: str = "fl.updates.valid"
    rejected: str = "fl.updates.rejected"
    # Internal: a small pointer to each valid record, keyed by model id, so the window stage is co-partitioned
    # with its table (all updates of one model meet on one partition) without copying tensors.
    valid_index: str = "fl.updates.valid.index"
    windows: str = "fl.windows"
    events: str = "fl.events"

    def all(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self)]


DETECTION_MODES = ("ensemble", "none")
AUDIT_MODES = ("neural_cleanse", "none")


@dataclass(frozen=True)
class Settings:
    # Where the services meet.
    kafka_bootstrap: str | None = None  # None: the embedded broker at 127.0.0.1:<broker_port>
    redis_url: str | None = None  # None: the embedded Redis at 127.0.0.1:<redis_port>
    data_dir: Path = Path(".fedguard")
    topics: Topics = field(default_factory=Topics)
    partitions: int = 4
    redis_prefix: str = "fedguard"

    # The learning task.
    model_id: str = "fedguard"
    task: str = "fashion-mnist"
    seed: int = 0
    # Hidden layer widths of the task's MLP, comma-separated ("126": 100,180 parameters on Fashion-MNIST); empty: the
    # task's tuned default (fedguard/tasks/models.py). Every service must agree: the validator checks the size.
    model_hidden: str = ""

    # Device fleet.
    num_devices: int = 100
    devices_per_round: int = 10
    dirichlet_alpha: float = 0.9
    local_epochs: int | None = None  # None: the task's tuned default
    local_lr: float | None = None
    local_batch_size: int | None = None
    round_timeout_s: float = 60.0

    # Validation.
    max_payload_bytes: int = 64 * 1024 * 1024
    max_update_norm: float = 1.0e4
    max_staleness: int = 0  # versions an update may lag behind the current global model
    max_sample_count: int = 1_000_000
    max_clock_skew_s: float = 300.0
    # One update per device per base version (window_duplicate). A defence: without it one enrolled device can fill
    # a window by itself. Off only in tests of other admission mechanics that send many updates per version.
    one_update_per_window: bool = True

    # Windows.
    window_size: int | None = None  # None: devices_per_round, one window per round
    window_deadline_s: float = 30.0
    detector_z_threshold: float = 3.5
    detector_sketch_k: int = 1024  # width of the secret update sketch the window stage detects on (fedguard/sketch.py)
    # "ensemble": the detection ensemble and reputation of processors/defence.py (the default, measured in
    # bench/results/detection.md); "none": every member accepted with weight 1 and no reputation (experiments only).
    detection: str = "ensemble"
    quarantine_probation_s: float = 3600.0  # seconds a device stays quarantined by reputation before release

    # Aggregation.
    # The default holds under attack together with the detection ensemble (README "Defences",
    # bench/results/eval-robust-lr/): the robust learning rate (Ozdayi et al. 2021) on norm clipping's mean: each
    # admitted update clipped to the window's median norm, FedAvg's weights (capped sample count x the ensemble's
    # weight), and every coordinate fewer than 4 in 10 members agree on left where it was. Against norm_clip alone it
    # halves what slow drift and constrain-and-scale plant (max backdoor 10.8% -> 6.0%, 7.5% -> 3.9%) for
    # 0-0.4 points of main accuracy.
    rule: str = "robust_lr"
    rule_params: str = ""  # JSON object of the rule's parameters, e.g. {"f": 2} for krum
    sample_count_cap: int = 1000
    # Noise of the randomised rules (dp_gaussian, FLAME) comes from OS entropy. An experiment that must be
    # reproducible sets a seed here: the noise of version v is then drawn from default_rng([seed, v]), which anyone
    # who knows the seed can recompute and subtract, so such versions are marked "private": false in rule_info.
    aggregation_experiment_seed: int | None = None
    # Backdoor accuracy measured on every version (aggregator/evaluation.py): "pixel_pattern:<target>[:<size>],...";
    # a measurement for operators and experiments, never read by a detector or a rule. Empty: none.
    backdoor_eval: str = "pixel_pattern:0"
    # Model audit (issue 14, aggregator/auditing.py, docs/audit.md): "neural_cleanse" audits every candidate version
    # for a backdoor without knowing the trigger; a flagged version is not served (the next version carries the last
    # served parameters) and the window members that pushed it are quarantined. "none": off. Secure by default; on a
    # task it cannot judge (not images, or fewer than 3 classes: the synthetic task) each version records why it was
    # skipped. The budget bounds one audit's CPU time (~1.3 s on the demo's model, docs/audit.md); the
    # differential test compares with the per-class median of the last N served versions' audits; the first W
    # audited versions of the served lineage are audited but not judged (warm-up: an undertrained model's trigger
    # norms are not meaningful; their norms start the reference).
    audit: str = "neural_cleanse"
    audit_time_budget_s: float = 2.0
    audit_reference_versions: int = 3
    audit_warmup_versions: int = 3
    # Model store retention (fedguard/modelstore.py): weights of the last N versions, of every K-th, of version 0
    # and of pinned versions; every version's metadata (the lineage) is kept.
    model_store_keep_last: int = 50
    model_store_keep_every: int = 100
    # Update store retention (fedguard/updatestore.py): files of pruned base versions kept to be written over, up to
    # this many bytes in all (a new file costs the kernel 5x the CPU); 0: delete them.
    update_store_spare_bytes: int = 256 << 20
    # Bounded broker memory (`fedguard up`, embedded broker): its memory engine keeps every record and ignores
    # retention, so when its resident memory passes this many bytes the stack holds the fleet, waits until the
    # pipeline has drained, and restarts the broker empty (docs/operations.md). 0: never.
    broker_recycle_bytes: int = 3 << 30

    # Hardening (issue 3): rate limits, security events, validator batching. Token buckets live in Redis, so every
    # processors worker shares them; capacities are in updates, refill rates in updates per second. The defaults
    # let an honest device send a burst of 20 updates and 1 per second after that (the demo sends one per device
    # per round, rounds take ~2 s), and admit 500 updates/s from all devices together (burst 2000).
    rate_device_capacity: float = 20.0
    rate_device_refill_per_s: float = 1.0
    rate_global_capacity: float = 2000.0
    rate_global_refill_per_s: float = 500.0
    security_event_interval_s: float = 60.0  # at most one rate-limit / replay event per device per interval
    validate_batch_size: int = 256  # raw records validated together (three Redis calls: processors/validation.py)
    validate_batch_within_s: float = 0.02  # ... or what arrived within this time
    validate_batch_max_bytes: int = 16 * 1024 * 1024  # ... split so the records of one call stay below this size

    # Faust worker processes `fedguard processors` runs, sharing the partitions (processors/worker.py); worker i
    # gets the web and metrics ports base + i, skipping the other services' ports (docs/operations.md).
    processors_workers: int = 1
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 in containers, so Prometheus can scrape
    # Ports (metrics: one per process; Faust's web server needs its own).
    broker_port: int = 19092
    redis_port: int = 16379
    processors_web_port: int = 16066
    processors_metrics_port: int = 19464
    aggregator_metrics_port: int = 19465
    fleet_metrics_port: int = 19466
    infra_metrics_port: int = 19467  # broker, Redis and disk gauges (fedguard/infra_metrics.py)
    prometheus_port: int = 19090  # the embedded stack's Prometheus, on loopback (fedguard/prometheus.py)

    def __post_init__(self) -> None:
        if self.kafka_bootstrap is None:
            object.__setattr__(self, "kafka_bootstrap", f"127.0.0.1:{self.broker_port}")
        if self.redis_url is None:
            object.__setattr__(self, "redis_url", f"redis://127.0.0.1:{self.redis_port}/0")
        if self.window_size is None:
            object.__setattr__(self, "window_size", self.devices_per_round)
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        self.__post_init_checks()

    def __post_init_checks(self) -> None:
        if self.detection not in DETECTION_MODES:
            raise ValueError(f"detection must be one of {DETECTION_MODES}, got {self.detection!r}")
        if self.update_store_spare_bytes < 0:
            raise ValueError(f"FEDGUARD_UPDATE_STORE_SPARE_BYTES must be >= 0, got {self.update_store_spare_bytes}")
        if self.audit not in AUDIT_MODES:
            raise ValueError(f"FEDGUARD_AUDIT must be one of {AUDIT_MODES}, got {self.audit!r}")
        if not self.audit_time_budget_s > 0 or self.audit_reference_versions < 1 or self.audit_warmup_versions < 0:
            raise ValueError(f"FEDGUARD_AUDIT_TIME_BUDGET_S must be > 0, FEDGUARD_AUDIT_REFERENCE_VERSIONS >= 1 and "
                             f"FEDGUARD_AUDIT_WARMUP_VERSIONS >= 0, got {self.audit_time_budget_s}, "
                             f"{self.audit_reference_versions} and {self.audit_warmup_versions}")

    def with_overrides(self, **overrides: Any) -> "Settings":
        clean = {k: v for k, v in overrides.items() if v is not None}
        # Addresses derived from a port follow that port unless they were given explicitly.
        if "broker_port" in clean and self.kafka_bootstrap == f"127.0.0.1:{self.broker_port}":
            clean.setdefault("kafka_bootstrap", None)
        if "redis_port" in clean and self.redis_url == f"redis://127.0.0.1:{self.redis_port}/0":
            clean.setdefault("redis_url", None)
        if "devices_per_round" in clean and self.window_size == self.devices_per_round:
            clean.setdefault("window_size", None)
        return dataclasses.replace(self, **clean)

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models" / self.model_id

    @property
    def update_store_dir(self) -> Path:
        """Where validated tensors wait for their window (fedguard/updatestore.py): shared by processors and
        aggregator."""
        return self.data_dir / "updates"

    @property
    def keystore_path(self) -> Path:
        return self.data_dir / "devices.json"

    @property
    def server_key_path(self) -> Path:
        return self.data_dir / "server.key"

    def hidden_widths(self) -> tuple[int, ...] | None:
        """``model_hidden`` as widths for ``model_spec``; None for the task's default."""
        if not self.model_hidden.strip():
            return None
        try:
            widths = tuple(int(w) for w in self.model_hidden.split(","))
        except ValueError:
            raise ValueError(f"FEDGUARD_MODEL_HIDDEN must be comma-separated widths, e.g. 126 or 256,64; got "
                             f"{self.model_hidden!r}") from None
        if any(w < 1 for w in widths):
            raise ValueError(f"FEDGUARD_MODEL_HIDDEN widths must be >= 1; got {self.model_hidden!r}")
        return widths

    def redis_key(self, *parts: object) -> str:
        return ":".join([self.redis_prefix, *map(str, parts)])


def _cast(value: str, annotation: Any) -> Any:
    text = str(annotation)
    if text == "bool":
        if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"expected a boolean (true/false), got {value!r}")
        return value.lower() in ("1", "true", "yes")
    if "Path" in text:
        return Path(value)
    if "float" in text:
        return float(value)
    if "int" in text:
        return int(value)
    return value


def from_env(env: dict[str, str] | None = None) -> Settings:
    """Settings from ``FEDGUARD_<FIELD>`` variables (e.g. ``FEDGUARD_WINDOW_SIZE=20``)."""
    env = dict(os.environ if env is None else env)
    values: dict[str, Any] = {}
    for f in fields(Settings):
        if f.name == "topics":
            continue
        raw = env.get(f"FEDGUARD_{f.name.upper()}")
        if raw is not None and raw != "":
            values[f.name] = _cast(raw, f.type)
    if env.get("KAFKA_BOOTSTRAP_SERVERS"):
        values["kafka_bootstrap"] = env["KAFKA_BOOTSTRAP_SERVERS"]
    if env.get("REDIS_URL"):
        values["redis_url"] = env["REDIS_URL"]
    topic_values = {
        f.name: env[f"FEDGUARD_TOPIC_{f.name.upper()}"]
        for f in fields(Topics)
        if env.get(f"FEDGUARD_TOPIC_{f.name.upper()}")
    }
    return Settings(topics=Topics(**topic_values), **values)


def to_env(settings: Settings) -> dict[str, str]:
    """The inverse of :func:`from_env`: how a launcher hands its settings to child processes."""
    env: dict[str, str] = {}
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if f.name == "window_size" and value == settings.devices_per_round:
            continue  # derived: stays in step with devices_per_round
        if f.name == "topics":
            for tf in fields(Topics):
                env[f"FEDGUARD_TOPIC_{tf.name.upper()}"] = getattr(value, tf.name)
        elif value is not None:
            env[f"FEDGUARD_{f.name.upper()}"] = str(value)
    env["KAFKA_BOOTSTRAP_SERVERS"] = settings.kafka_bootstrap
    env["REDIS_URL"] = settings.redis_url
    return env
