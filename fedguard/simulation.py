"""One in-process federated round loop built from the live pipeline's own code: no Kafka, no Redis.

``simulate(SimulationConfig(...))`` runs what ``fedguard up`` does, round by round, calling the same functions the
services call (the composition layer: it may import the producers, the processors and the aggregator):

| step | live component | what the simulation calls |
|---|---|---|
| data split, model | ``producers.fleet.Fleet`` | :func:`producers.sampling.fleet_shards`, ``build_model(spec, seed)`` |
| release after probation | ``WindowDefence.release_due`` (timer) | :func:`processors.reputation.maybe_release` |
| who takes part | ``Fleet.active`` + ``Fleet.select`` | :func:`producers.sampling.sample_devices` over the non-quarantined devices |
| honest training | ``Fleet.train`` | ``fedguard.tasks.local_train``, tuned defaults, seed :func:`producers.sampling.training_seed` |
| compromised devices | ``Fleet.attack`` + ``producers.campaign`` | :func:`producers.attacks.live.craft_round`, ``Campaign.fires_at`` |
| validation | ``processors.validation`` | :func:`processors.validation.finite_norm` (NaN/Inf, norm bound: the exact norm), one update per device per window (``window_duplicate``: the first keeps the seat, and is rejected by the ensemble as equivocation), window closes at ``per_round`` members |
| sketch | validator | :func:`fedguard.sketch.sketch_rows` with a secret-like seed (below) |
| detection, reputation | ``processors.defence.WindowDefence.judge`` | :func:`processors.ensemble.score_window` (histories before the window, trust = E before it, the previous global sketch), :func:`processors.reputation.observe` on each member's ``evidence``, :func:`processors.detectors.updated` for every member, :func:`processors.defence.global_update_sketch` |
| aggregation | ``aggregator.service.AggregatorService.handle_window`` | admitted members (:func:`fedguard.weighting.admitted`), :class:`aggregator.combine.ConfiguredRule` with FedAvg weights :func:`fedguard.weighting.sample_weights`, the previous aggregate, :func:`aggregator.combine.server_update`, trust after the window, noise from ``noise_generator(seed, version)``; too few admitted members or a rule precondition: the parameters carry over |
| model audit (``audit``) | ``AggregatorService.handle_window`` | :meth:`aggregator.auditing.Auditor.audit_candidate` on each candidate, reference :func:`aggregator.auditing.reference_norms` of the last served clean audits; flagged: the version keeps the served parameters, the attributed devices are quarantined (never released: live, only an operator releases them), :meth:`~aggregator.auditing.Auditor.look_back` screens the flagged window and the last served windows with its trigger (serving the base of the oldest served one holding a screened member) and, if it found anyone, the trigger is remembered; before each rule: :meth:`~aggregator.auditing.Auditor.screen` against the remembered triggers |
| evaluation | aggregator | :class:`aggregator.evaluation.Evaluator` (main accuracy, backdoor accuracy per ``backdoor_eval``) |

Round ``r`` (1-based) trains on base version ``r - 1`` and makes version ``r``. The attack fires in rounds
``r >= attack_start`` (a campaign with ``start_version = attack_start - 1``), in at most ``attack_rounds`` rounds
in which a compromised device was sampled (default: ``producers.campaign.SINGLE_SHOT``, i.e. one for
``model_replacement``, unlimited otherwise), exactly as ``producers.campaign.Campaign.fires_at`` counts them.

Differences from the live pipeline, all for reproducible experiments:

* **Seeds.** Everything random is drawn from ``config.seed``: the compromised devices (live: ``fedguard attack``
  draws them with OS entropy from the devices active at that moment; here a fixed ``round(fraction x
  num_devices)`` sample of the whole fleet, ``default_rng([seed, 0xC0])``), the attackers' randomness (live:
  ``default_rng()``; here ``default_rng([seed, version, 0xA7])``), the noise of FLAME / DP (live: OS entropy
  unless ``aggregation_experiment_seed``; here ``[seed, version]``, so such versions are not private) and **the
  sketch seed** (live: a 128-bit secret from :mod:`secrets`, stored in Redis; here derived from ``config.seed``).
  A known sketch seed lets an attacker hide in the sketch's null space: these runs measure the detectors, they are
  not a deployment.
* **Time.** Reputation sees ``now = r x round_duration_s`` (default 2.3 s, the demo's measured round: README).
  Probation (``probation_s``, the live default 3600 s) therefore lasts ``ceil(probation_s / round_duration_s)``
  rounds (1566 by default: a quarantined device does not come back within a short run); a device is released at
  the start of the first round at which the probation is over (live: a 5 s timer).
* **Arrival order.** A window's members arrive as the fleet publishes them: the honest devices of the round in
  index order, then the compromised ones (the live validator's partitions may interleave them; only the first
  update of each device matters, and that is the same).
* **Retries.** A round whose window would be empty (no device sampled, or every update refused at validation) is
  sampled again with ``attempt + 1`` (the fleet's ``round_timeout_s`` retry), at most 3 times; then the round
  carries the parameters over.

Result (``simulate`` returns a JSON-safe dict): ``config``, ``compromised`` (device indices), ``initial`` (main and
backdoor accuracy of version 0), ``rounds`` (one record per round: ``round``, ``main_accuracy``,
``backdoor_accuracy`` (None without a configured backdoor), ``malicious`` / ``honest`` (members of the window),
``flagged_*`` (verdict not accept), ``rejected_*`` (verdict reject), ``crafted`` / ``flagged_crafted`` /
``rejected_crafted`` (the malicious members that are not an honest copy, :func:`honest_copy`), ``quarantined_*`` (devices in quarantine after
the round), ``refused_*`` (updates refused before the window: a second update of a device, the norm bound),
``sampled_malicious``, ``admitted``, ``skipped`` (why the parameters carried over, or None), ``votes_malicious`` /
``votes_honest`` (members each detector voted against; ``low_trust`` too), ``angle_scale`` (the direction
thresholds' factor, :func:`processors.detectors.angle_scale`; None without detection), ``loss``, ``devices`` (the window's
members in arrival order), ``quarantined_now`` / ``released_now`` (devices quarantined by this window / released at
the start of the round)), with the audit on: ``audit`` (verdict), ``audit_class``, ``audit_seconds``,
``attributed_malicious`` / ``attributed_honest`` (quarantined), ``suspected_malicious`` / ``suspected_honest``
(attributed by a flag the look-back did not confirm: not quarantined), ``candidate_backdoor_accuracy`` (of a
flagged candidate that was not served), ``screened_malicious`` / ``screened_honest`` (members left out: they pushed a
remembered trigger), ``looked_back_malicious`` / ``looked_back_honest`` (devices a flag's look-back screened in
earlier served windows), ``rolled_back_to`` (the version whose parameters a flag's look-back served, or None);
``served`` (False: flagged), ``final_main_accuracy``,
``max_backdoor_accuracy``, ``final_backdoor_accuracy``, ``detection`` (:func:`detection_rates` over the rounds from
``attack_start``) and ``seconds``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from aggregator.auditing import (FLAGGED, LOOKBACK_WINDOWS, AuditOutcome, Auditor, PastWindow, carried_over,
                                 reference_norms, unconfirmed)
from aggregator.combine import ConfiguredRule, WindowInputs, noise_generator, server_update
from aggregator.evaluation import Evaluator, parse_backdoors
from aggregator.rules import PreconditionError
from fedguard.reasons import RejectError
from fedguard.settings import AUDIT_MODES, Settings
from fedguard.sketch import SketchSpec, sketch_rows
from fedguard.tasks.server_data import loss_after, server_set
from fedguard.tasks import (DEFAULT_TRAINING, build_model, get_flat_params, load_task, local_train, model_spec,
                            set_flat_params)
from fedguard.weighting import admitted, sample_weights
from processors.defence import global_update_sketch
from processors.detectors import DeviceHistory, extended_baseline, updated
from processors.ensemble import DETECTORS, EnsembleConfig, score_window
from processors.reputation import Reputation, ReputationParams, expectation, maybe_release, observe
from processors.validation import finite_norm
from producers.attacks.live import AttackContext, craft_round
from producers.attacks.registry import validate_params
from producers.campaign import SINGLE_SHOT, Campaign
from producers.enroll import device_ids
from producers.sampling import fleet_shards, sample_devices, training_seed

__all__ = ["DETECTION_MODES", "SimulationConfig", "detection_rates", "simulate", "sketch_seed"]

DETECTION_MODES = ("ensemble", "none")
#: the demo's measured wall time per round (README: 30 rounds, stack start to stop, 93 s, "about 2.3 s per round")
DEMO_ROUND_S = 2.3
MAX_ATTEMPTS = 3
#: what the per-round vote counts name: every detector of the ensemble, and the trust rule
VOTES = (*DETECTORS, "low_trust", "equivocation")


@dataclass
class SimulationConfig:
    """One simulated run. Defaults are the live defaults (``fedguard.settings.Settings``) where there is one."""

    task: str = Settings.task
    num_devices: int = Settings.num_devices
    per_round: int = Settings.devices_per_round
    alpha: float = Settings.dirichlet_alpha
    rounds: int = 30
    rule: str = Settings.rule
    rule_params: str = ""  # JSON object, as FEDGUARD_RULE_PARAMS
    detection: str = Settings.detection  # "ensemble" | "none"
    attack: str | None = None  # a kind of producers.attacks.registry.ATTACKS, or None
    attack_params: dict[str, Any] = field(default_factory=dict)
    fraction: float = 0.2
    attack_start: int = 5  # first round (1-based) in which the compromised devices attack
    attack_rounds: int | None = None  # None: producers.campaign.SINGLE_SHOT (model_replacement: 1), else unlimited
    seed: int = 0
    sketch_k: int = Settings.detector_sketch_k
    sample_count_cap: int = Settings.sample_count_cap
    backdoor_eval: str = Settings.backdoor_eval
    max_update_norm: float = Settings.max_update_norm
    probation_s: float = Settings.quarantine_probation_s
    round_duration_s: float = DEMO_ROUND_S
    local_epochs: int | None = None  # None: the task's tuned default (DEFAULT_TRAINING), as the fleet
    local_lr: float | None = None
    local_batch_size: int | None = None
    # The aggregator's model audit (aggregator/auditing.py). Off by default here, unlike live: it adds ~1.3 s of CPU
    # per round on Fashion-MNIST, about doubling a cell of the eval matrix (docs/audit.md).
    audit: str = "none"
    audit_time_budget_s: float = Settings.audit_time_budget_s
    audit_reference_versions: int = Settings.audit_reference_versions
    audit_warmup_versions: int = Settings.audit_warmup_versions

    def __post_init__(self) -> None:
        if self.detection not in DETECTION_MODES:
            raise ValueError(f"detection must be one of {DETECTION_MODES}, got {self.detection!r}")
        if self.audit not in AUDIT_MODES:
            raise ValueError(f"audit must be one of {AUDIT_MODES}, got {self.audit!r}")
        if not self.audit_time_budget_s > 0 or self.audit_reference_versions < 1 or self.audit_warmup_versions < 0:
            raise ValueError("audit_time_budget_s must be > 0, audit_reference_versions >= 1, "
                             "audit_warmup_versions >= 0")
        for name in ("num_devices", "per_round", "attack_start"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.rounds < 0:
            raise ValueError("rounds must be >= 0")
        if self.attack is not None:
            self.attack_params = validate_params(self.attack, self.attack_params)  # raises on a bad kind/param
            if not 0 < self.fraction <= 1:
                raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
            if self.attack_rounds is not None and self.attack_rounds < 1:
                raise ValueError("attack_rounds must be >= 1 (or None)")
        if not (self.round_duration_s > 0 and math.isfinite(self.round_duration_s)):
            raise ValueError("round_duration_s must be a positive number")
        ConfiguredRule(self.rule, self.rule_params, self.sample_count_cap)  # raises RuleConfigError early

    @property
    def probation_rounds(self) -> int:
        """Rounds a quarantined device stays out: ``ceil(probation_s / round_duration_s)``."""
        return math.ceil(self.probation_s / self.round_duration_s)


def compromised_devices(num_devices: int, fraction: float, seed: int) -> list[int]:
    """The device indices a run with ``seed`` compromises: ``max(1, round(fraction x num_devices))`` of them
    (producers.campaign's count), drawn with a generator seeded by (seed, 0xC0), sorted. ``fedguard eval --live``
    compromises the same ones."""
    count = max(1, min(num_devices, round(fraction * num_devices)))
    rng = np.random.default_rng([seed, 0xC0])
    return sorted(rng.choice(num_devices, count, replace=False).tolist())


def sketch_seed(seed: int) -> int:
    """The 128-bit sketch seed of a simulation, derived from ``config.seed`` with SHAKE-256 (reproducible, hence
    *not* secret: experiments only; the live pipeline draws it from :mod:`secrets`)."""
    return int.from_bytes(hashlib.shake_256(b"fedguard/simulation/sketch" + int(seed).to_bytes(16, "little",
                                                                                              signed=True))
                          .digest(16), "little")


def detection_rates(rounds: list[dict[str, Any]], from_round: int = 1) -> dict[str, Any]:
    """Totals and rates over the rounds ``>= from_round``: ``tp`` = flagged (verdict not accept) / malicious
    members, ``tp_reject`` = rejected / malicious, ``tp_crafted`` / ``tp_reject_crafted`` the same over the crafted
    members only (:func:`honest_copy`; None unless every round recorded them), ``fp`` = flagged / honest members, ``fp_reject`` likewise;
    per detector ``votes_tp`` / ``votes_fp`` (share of malicious / honest members it voted against). A rate is None
    when there is nothing to divide by."""
    rs = [r for r in rounds if r["round"] >= from_round]
    # (refused_* are None in a live cell's rounds: fedguard/live_eval.py; crafted_* are missing from rounds
    # recorded before they existed, and None in a live cell's: the pipeline cannot tell an honest copy)
    tot = {k: sum(r[k] or 0 for r in rs) for k in ("malicious", "honest", "flagged_malicious", "flagged_honest",
                                                   "rejected_malicious", "rejected_honest", "refused_malicious",
                                                   "refused_honest")}
    known = bool(rs) and all(r.get("crafted") is not None for r in rs)
    for k in ("crafted", "flagged_crafted", "rejected_crafted"):
        tot[k] = sum(r[k] for r in rs) if known else None
    rate = lambda a, b: (a / b) if b else None  # noqa: E731
    out: dict[str, Any] = {**tot,
                           "tp": rate(tot["flagged_malicious"], tot["malicious"]),
                           "tp_reject": rate(tot["rejected_malicious"], tot["malicious"]),
                           "tp_crafted": rate(tot["flagged_crafted"], tot["crafted"]) if known else None,
                           "tp_reject_crafted": rate(tot["rejected_crafted"], tot["crafted"]) if known else None,
                           "fp": rate(tot["flagged_honest"], tot["honest"]),
                           "fp_reject": rate(tot["rejected_honest"], tot["honest"])}
    out["votes_tp"] = {d: rate(sum(r["votes_malicious"].get(d, 0) for r in rs), tot["malicious"]) for d in VOTES}
    out["votes_fp"] = {d: rate(sum(r["votes_honest"].get(d, 0) for r in rs), tot["honest"]) for d in VOTES}
    return out


def honest_copy(update: np.ndarray, honest: np.ndarray | None) -> bool:
    """Whether a compromised device's ``update`` is exactly its own honest training of the round (``honest``: what
    the attack computed with ``ctx.honest_delta``, None if it never asked). The attack library sends honest copies
    on purpose: a lone colluder of ALIE, min-max or min-sum in partial-knowledge mode (no spread to hide in), and
    model replacement after its single shot (``producers/attacks/live.py``). No detector should flag those, so the
    true-positive rate over crafted updates (``tp_crafted``) leaves them out."""
    if honest is None:
        return False
    u = np.asarray(update, dtype=np.float32).reshape(-1)
    h = np.asarray(honest, dtype=np.float32).reshape(-1)
    return u.shape == h.shape and bool(np.array_equal(u, h))


@dataclass
class _Member:
    device: int
    delta: np.ndarray  # float32 (d,)
    num_samples: int
    malicious: bool
    norm: float = 0.0
    crafted: bool = False  # a compromised device's update that is not its honest training (see honest_copy)


class _Simulation:
    def __init__(self, config: SimulationConfig):
        c = self.c = config
        self.task = load_task(c.task, seed=c.seed)
        self.spec = model_spec(self.task)
        self.model = build_model(self.spec, seed=c.seed)  # the fleet's training model and the aggregator's v0
        self.scratch = build_model(self.spec, seed=c.seed)  # the attackers' and FLTrust's scratch model
        self.params = get_flat_params(self.model)
        self.previous_aggregate = np.zeros(self.params.shape, dtype=np.float64)
        self.shards = fleet_shards(self.task.y_train, c.num_devices, c.alpha, c.seed)
        hp = DEFAULT_TRAINING[self.task.name]
        self.training = {"epochs": c.local_epochs or hp["epochs"], "lr": c.local_lr or hp["lr"],
                         "batch_size": c.local_batch_size or hp["batch_size"], "momentum": hp.get("momentum", 0.0)}
        self.rule = ConfiguredRule(c.rule, c.rule_params, c.sample_count_cap)
        self.evaluator = Evaluator(self.task, build_model(self.spec), parse_backdoors(c.backdoor_eval, self.task))
        self.spec_sketch = SketchSpec(self.spec.num_params, c.sketch_k, sketch_seed(c.seed))
        self.ensemble = EnsembleConfig()
        # what the validator's loss probe measures (processors/app.py, fedguard/tasks/server_data.py): the same rows
        server_x, server_y = server_set(self.task, c.seed)
        self.server_rows = torch.as_tensor(server_x, dtype=torch.float32), torch.as_tensor(server_y)
        self.probe_model = build_model(self.spec)
        self.rep_params = ReputationParams(probation_s=c.probation_s)
        self.reps: dict[int, Reputation] = {}
        self.histories: dict[int, DeviceHistory] = {}
        self.previous_global: np.ndarray | None = None
        self.angle_baseline: list[float] = []  # the window stage's angle baseline (processors/defence.py)
        self.equivocated: set[int] = set()  # this window's (see window())
        self.ids = device_ids(c.num_devices)
        self.compromised: list[int] = []
        self.campaign: Campaign | None = None
        self.fired = 0
        self.attack_state: dict = {}
        self.events: dict[str, list[int]] = {"quarantined": [], "released": []}
        if c.attack is not None:
            self.compromised = compromised_devices(c.num_devices, c.fraction, c.seed)
            rounds = c.attack_rounds if c.attack_rounds is not None else SINGLE_SHOT.get(c.attack)
            self.campaign = Campaign(kind=c.attack, params=dict(c.attack_params), fraction=c.fraction,
                                     devices=[self.ids[i] for i in self.compromised],
                                     start_version=c.attack_start - 1, rounds=rounds, id="simulation",
                                     started_at=0.0)
        self.bad = set(self.compromised)
        self.auditor = Auditor(self.task, self.spec, c.audit, c.audit_time_budget_s, seed=c.seed)
        # (version, audit metadata) of the served versions' reference audits, oldest first
        self.served_audits: list[tuple[int, dict[str, Any]]] = []
        self.audit_quarantined: set[int] = set()  # quarantined by the audit: released only by an operator
        self.admitted: list[_Member] = []  # the last window's admitted members
        self.screened: set[int] = set()  # the last window's members screened against remembered triggers
        self.past: list[PastWindow] = []  # the served windows the audit's look-back screens, newest first
        self.rolled_back_to: int | None = None  # a flag's look-back served this version's parameters
        self.looked_back: set[int] = set()  # the devices a flag's look-back screened in earlier windows

    # -- devices ---------------------------------------------------------------------------------------------
    def train(self, index: int, base: np.ndarray, version: int) -> tuple[np.ndarray, int]:
        """``Fleet.train``: local training of device ``index`` from ``base``; (delta float32, shard size)."""
        shard = self.shards[index]
        set_flat_params(self.model, base)
        local_train(self.model, self.task.x_train[shard], self.task.y_train[shard],
                    seed=training_seed(self.c.seed, version, index), **self.training)
        return get_flat_params(self.model) - base, int(len(shard))

    def quarantined(self, index: int) -> bool:
        rep = self.reps.get(index)
        return index in self.audit_quarantined or (rep is not None and rep.status == "quarantined")

    def sent(self, version: int, attempt: int) -> tuple[list[_Member], int]:
        """What the sampled devices publish, in publishing order, and how many compromised devices were sampled."""
        active = [i for i in range(self.c.num_devices) if not self.quarantined(i)]
        selected = sample_devices(self.c.seed, version, attempt, self.c.num_devices, self.c.per_round, active)
        fires = self.campaign is not None and self.campaign.fires_at(version, self.fired)
        attackers = [i for i in selected if fires and i in self.bad]
        base = self.params
        out: list[_Member] = []
        honest_deltas: list[np.ndarray] = []
        for i in selected:
            if i in attackers:
                continue
            delta, n = self.train(i, base, version)
            out.append(_Member(i, delta, n, False))
            honest_deltas.append(delta)
        if attackers:
            trained: dict[int, np.ndarray] = {}

            def honest_delta(i: int) -> tuple[np.ndarray, int]:
                delta, n = self.train(i, base, version)
                trained[i] = delta
                return delta, n

            ctx = AttackContext(
                base=base, version=version, round_index=self.fired, devices=attackers,
                honest_delta=honest_delta,
                shard=lambda i: (self.task.x_train[self.shards[i]], self.task.y_train[self.shards[i]]),
                task=self.task, model=self.scratch, training=dict(self.training), window_size=self.c.per_round,
                rng=np.random.default_rng([self.c.seed, version, 0xA7]),
                observed_benign=(lambda: np.stack(honest_deltas)) if honest_deltas else None,
                state=self.attack_state)
            crafted = craft_round(self.c.attack, self.c.attack_params, ctx)
            self.fired += 1  # producers.campaign.record_round
            for i, updates in crafted.items():
                out.extend(_Member(i, delta, n, True, crafted=not honest_copy(delta, trained.get(i)))
                           for delta, n in updates)
        return out, len(attackers)

    def window(self, sent: list[_Member]) -> tuple[list[_Member], dict[str, int]]:
        """The validator (norm bound, NaN/Inf; one update per device per window) and the window (closes at
        ``per_round`` members). Returns the members and the refused counts; ``self.equivocated`` holds the seated
        devices that sent another update for the same base version (admission's equivocation record)."""
        members: list[_Member] = []
        seated: set[int] = set()
        refused = {"malicious": 0, "honest": 0}
        self.equivocated = set()
        for m in sent:
            who = "malicious" if m.malicious else "honest"
            try:
                m.norm = finite_norm(np.asarray(m.delta, dtype=np.float32), self.c.max_update_norm)
            except RejectError:
                refused[who] += 1
                continue
            if m.device in seated:
                refused[who] += 1  # window_duplicate
                self.equivocated.add(m.device)
                continue
            if len(members) >= self.c.per_round:
                refused[who] += 1  # a late update for a closed window
                continue
            seated.add(m.device)
            members.append(m)
        return members, refused

    # -- the window stage ------------------------------------------------------------------------------------
    def judge(self, members: list[_Member], now: float) -> tuple[list[dict[str, Any]], float | None]:
        """``WindowDefence.judge`` without Redis: verdicts, reputation, histories, the global sketch and the angle
        baseline. Returns the members' outcomes and the window's angle scale (None without detection)."""
        sketches = sketch_rows(np.stack([m.delta for m in members]).astype(np.float32), self.spec_sketch)
        norms = np.array([m.norm for m in members])
        devices = [m.device for m in members]
        angle_scale = None
        if self.c.detection == "none":
            outcome = [{"flags": [], "verdict": "accept", "weight": 1.0, "evidence": "accept"} for _ in members]
        else:
            reps = [self.reps.get(d, Reputation()) for d in devices]
            base_loss = loss_after(self.probe_model, self.params, *self.server_rows)
            losses = [loss_after(self.probe_model, self.params + m.delta, *self.server_rows) for m in members]
            verdict = score_window(norms, sketches, [self.histories.get(d) for d in devices], self.previous_global,
                                   np.array([expectation(r) for r in reps]), self.ensemble,
                                   equivocated=[d in self.equivocated for d in devices],
                                   angle_baseline=self.angle_baseline,
                                   losses=losses, base_loss=base_loss)
            self.angle_baseline = extended_baseline(self.angle_baseline, verdict.angle_pairs)
            angle_scale = verdict.stats["angle_scale"]
            outcome = [{"flags": v.flags, "verdict": v.verdict, "weight": v.weight, "evidence": v.evidence}
                       for v in verdict.members]
            for d, rep, out in zip(devices, reps, outcome):
                self.reps[d], events = observe(rep, out["evidence"], now, self.rep_params)
                if "quarantined" in events:
                    self.events["quarantined"].append(d)
        for i, d in enumerate(devices):
            self.histories[d] = updated(self.histories.get(d), sketches[i])
        mean = global_update_sketch(sketches, [o["verdict"] for o in outcome], [o["weight"] for o in outcome],
                                    [m.num_samples for m in members], self.c.sample_count_cap)
        if mean is not None:
            self.previous_global = mean.astype(np.float32)  # stored as float32 (sketch codec) in the live stage
        return outcome, angle_scale

    # -- the aggregator --------------------------------------------------------------------------------------
    def aggregate(self, members: list[_Member], outcome: list[dict[str, Any]], version: int) -> tuple[int, str | None]:
        keep = [j for j, o in enumerate(outcome) if admitted(o["verdict"], o["weight"])]
        self.screened = self.screen([members[j] for j in keep])
        keep = [j for j in keep if members[j].device not in self.screened]
        self.admitted = [members[j] for j in keep]
        if len(keep) < self.rule.min_updates:
            return len(keep), f"{len(keep)} accepted updates, rule {self.rule.name} needs {self.rule.min_updates}"
        base = self.params
        trust = lambda: np.array([expectation(self.reps[members[j].device]) if members[j].device in self.reps  # noqa: E731
                                  else 1.0 for j in keep], dtype=np.float64)
        rng, noise_seed = noise_generator(self.c.seed, version)
        inputs = WindowInputs(
            sample_counts=sample_weights([members[j].num_samples for j in keep], [outcome[j]["weight"] for j in keep],
                                         self.c.sample_count_cap),
            rng=rng, noise_seed=noise_seed, center=lambda: self.previous_aggregate,
            server_update=lambda: server_update(self.task, self.scratch, base, self.c.seed, version),
            trust_scores=trust)
        try:
            result = self.rule(np.stack([members[j].delta for j in keep]), inputs)
        except PreconditionError as exc:
            return len(keep), str(exc)
        self.params = (base.astype(np.float64) + result.vector).astype(np.float32)
        return len(keep), None

    def screen(self, members: list[_Member]) -> set[int]:
        """``AggregatorService``'s screening of the admitted members against the remembered triggers: the screened
        devices are left out of the aggregate and quarantined by the audit."""
        if self.c.audit == "none":
            return set()
        result = self.auditor.screen(self.params, {m.device: m.delta for m in members})
        screened = set(result.screened) if result is not None else set()
        for device in screened:
            self.quarantine_by_audit(device)
        return screened

    def quarantine_by_audit(self, device: int) -> None:
        if device not in self.audit_quarantined:
            self.audit_quarantined.add(device)
            self.events["quarantined"].append(device)

    def audit(self, parent: np.ndarray, version: int, skipped: str | None) -> AuditOutcome | None:
        """``AggregatorService``'s audit of the candidate (``self.params``, version ``version + 1``): a flagged
        candidate is not served, and the flagged window and the served windows before it are screened with its
        trigger (``Auditor.look_back``): whoever it finds is quarantined; if it found someone, the attributed devices
        are quarantined too and the trigger remembered, else only the strongly attributed ones (``unconfirmed``); the
        parameters served are those of the base of the oldest served window that held a screened member, else
        ``parent``'s."""
        if self.c.audit == "none":
            return None
        if skipped is not None:
            return carried_over(version)
        reference = reference_norms([a for _, a in self.served_audits[::-1][:self.c.audit_reference_versions]],
                                    self.task.num_classes)
        warmup = len(self.served_audits) < self.c.audit_warmup_versions
        members = {m.device: m.delta for m in self.admitted}
        outcome = self.auditor.audit_candidate(self.params, parent, members, reference, warmup=warmup)
        if outcome.reference:
            self.served_audits.append((version + 1, outcome.to_meta()))
        if outcome.verdict != FLAGGED:  # served: the look-back may screen it later
            self.past = [PastWindow(version + 1, parent, members), *self.past][:LOOKBACK_WINDOWS]
        else:
            self.params = parent
            if outcome.trigger is not None:
                oldest, culprits = self.auditor.look_back(outcome.trigger, self.past,
                                                          flagged=PastWindow(version + 1, parent, members))
                if culprits:  # confirmed: someone pushes it far beyond clean training
                    self.auditor.remember(version + 1, outcome.trigger)
                else:  # only strong attributions stand, the rest are suspected
                    outcome = unconfirmed(outcome)
                for device in outcome.attributed:
                    self.quarantine_by_audit(device)
                self.looked_back = set(culprits) - set(outcome.attributed)  # (counted once a round)
                for device in culprits:
                    self.quarantine_by_audit(device)
                if oldest is not None:
                    self.params = oldest.parent
                    self.rolled_back_to = oldest.version - 1
                    self.served_audits = [(v, a) for v, a in self.served_audits if v < oldest.version]
                    # the served lineage is the oldest window's base and what came before it (as live)
                    self.past = [w for w in self.past if w.version < oldest.version]
        return outcome

    def evaluate(self, params: np.ndarray | None = None) -> dict[str, Any]:
        return self.evaluator(set_flat_params, self.params if params is None else params)

    # -- one round -------------------------------------------------------------------------------------------
    def round(self, r: int) -> dict[str, Any]:
        version, now = r - 1, r * self.c.round_duration_s
        self.events = {"quarantined": [], "released": []}
        self.screened, self.looked_back, self.rolled_back_to = set(), set(), None
        # (live, the audit's quarantine takes a device out of the reputation's release set)
        for d in [d for d in self.reps if self.quarantined(d) and d not in self.audit_quarantined]:
            self.reps[d], events = maybe_release(self.reps[d], now, self.rep_params)
            if "released" in events:
                self.events["released"].append(d)
        sampled_bad, refused, members = 0, {"malicious": 0, "honest": 0}, []
        for attempt in range(MAX_ATTEMPTS):
            sent, n_bad = self.sent(version, attempt)
            sampled_bad += n_bad
            members, ref = self.window(sent)
            refused = {k: refused[k] + ref[k] for k in refused}
            if members:
                break
        old = self.params
        votes = {"malicious": {v: 0 for v in VOTES}, "honest": {v: 0 for v in VOTES}}
        flagged = {"malicious": 0, "honest": 0}
        rejected = {"malicious": 0, "honest": 0}
        count = {"malicious": 0, "honest": 0}
        crafted = {"count": 0, "flagged": 0, "rejected": 0}
        angle_scale = None
        if members:
            outcome, angle_scale = self.judge(members, now)
            kept, skipped = self.aggregate(members, outcome, version)
            candidate = self.params
            for m, o in zip(members, outcome):
                who = "malicious" if m.malicious else "honest"
                count[who] += 1
                flagged[who] += o["verdict"] != "accept"
                rejected[who] += o["verdict"] == "reject"
                if m.crafted:
                    crafted["count"] += 1
                    crafted["flagged"] += o["verdict"] != "accept"
                    crafted["rejected"] += o["verdict"] == "reject"
                for f in o["flags"]:
                    if f in votes[who]:
                        votes[who][f] += 1
        else:
            kept, skipped = 0, f"no update reached the window in {MAX_ATTEMPTS} attempts"
            candidate = self.params
        audit = self.audit(old, version, skipped)
        self.previous_aggregate = self.params.astype(np.float64) - old
        metrics = self.evaluate()
        quarantined = [d for d in set(self.reps) | self.audit_quarantined if self.quarantined(d)]
        return {
            "round": r, "version": r, "main_accuracy": float(metrics["accuracy"]),
            "backdoor_accuracy": None if metrics["backdoor_accuracy"] is None else float(metrics["backdoor_accuracy"]),
            "loss": float(metrics["loss"]),
            "malicious": count["malicious"], "honest": count["honest"],
            "flagged_malicious": flagged["malicious"], "flagged_honest": flagged["honest"],
            "rejected_malicious": rejected["malicious"], "rejected_honest": rejected["honest"],
            "crafted": crafted["count"], "flagged_crafted": crafted["flagged"], "rejected_crafted": crafted["rejected"],
            "quarantined_malicious": sum(d in self.bad for d in quarantined),
            "quarantined_honest": sum(d not in self.bad for d in quarantined),
            "refused_malicious": refused["malicious"], "refused_honest": refused["honest"],
            "sampled_malicious": sampled_bad, "admitted": kept, "skipped": skipped,
            "votes_malicious": votes["malicious"], "votes_honest": votes["honest"],
            "angle_scale": angle_scale,
            "devices": [m.device for m in members], "quarantined_now": sorted(self.events["quarantined"]),
            "released_now": sorted(self.events["released"]),
            **self.audit_record(audit, candidate),
        }

    def audit_record(self, audit: AuditOutcome | None, candidate: np.ndarray) -> dict[str, Any]:
        if audit is None:
            return {"audit": None, "served": True}
        flagged = audit.verdict == FLAGGED
        return {"audit": audit.verdict, "audit_class": audit.flagged_class, "audit_seconds": audit.seconds,
                "attributed_malicious": sum(d in self.bad for d in audit.attributed),
                "attributed_honest": sum(d not in self.bad for d in audit.attributed),
                "suspected_malicious": sum(d in self.bad for d in audit.suspected),
                "suspected_honest": sum(d not in self.bad for d in audit.suspected),
                "candidate_backdoor_accuracy": self.evaluate(candidate)["backdoor_accuracy"] if flagged else None,
                "screened_malicious": sum(d in self.bad for d in self.screened),
                "screened_honest": sum(d not in self.bad for d in self.screened),
                "looked_back_malicious": sum(d in self.bad for d in self.looked_back),
                "looked_back_honest": sum(d not in self.bad for d in self.looked_back),
                "rolled_back_to": self.rolled_back_to, "served": not flagged}


def simulate(config: SimulationConfig, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``config.rounds`` rounds; ``progress`` (if given) is called with each round's record as it finishes.
    Deterministic given the config (same machine, same torch thread count)."""
    started = time.perf_counter()
    sim = _Simulation(config)
    first = sim.evaluate()
    rounds = []
    for r in range(1, config.rounds + 1):
        record = sim.round(r)
        rounds.append(record)
        if progress is not None:
            progress(record)
    backdoor = [r["backdoor_accuracy"] for r in rounds if r["backdoor_accuracy"] is not None]
    result = {
        "config": asdict(config),
        "task": sim.task.name,
        "num_params": sim.spec.num_params,
        "compromised": list(sim.compromised),
        "probation_rounds": config.probation_rounds,
        "initial": {"main_accuracy": float(first["accuracy"]), "backdoor_accuracy": first["backdoor_accuracy"]},
        "rounds": rounds,
        "final_main_accuracy": rounds[-1]["main_accuracy"] if rounds else float(first["accuracy"]),
        "max_backdoor_accuracy": max(backdoor) if backdoor else None,
        "final_backdoor_accuracy": backdoor[-1] if backdoor else None,
        "detection": detection_rates(rounds, config.attack_start if config.attack else 1),
        "seconds": time.perf_counter() - started,
    }
    return json.loads(json.dumps(result))  # JSON-safe (numpy scalars would fail here, not in the caller)
