"""The model audit as the aggregator runs it (issue 14): a verdict on every candidate version, attribution when flagged.

Thin service logic over :mod:`aggregator.audit` (the maths, its citations and its measurements: docs/audit.md):

* the server's audit set: ``AUDIT_SET_SIZE`` class-balanced images of the task's *training* set
  (:func:`fedguard.tasks.server_data.select_audit_set`, seeded by ``Settings.seed``), the server's clean root set
  (the validator measures each update's loss on the same rows: the ``behaviour`` detector);
* the differential reference: the per-class median of the Neural Cleanse norms of the last
  ``audit_reference_versions`` *served* versions whose audit was clean (or a warm-up audit), read from the stored
  versions' metadata (:func:`served_audits`, :func:`reference_norms`), so it survives a restart;
* warm-up: until the served lineage holds ``audit_warmup_versions`` audited versions (3: versions 1-3 when every
  window aggregates; a version whose parameters were carried over does not count), candidates are audited but not
  judged (verdict ``skipped``, their scores recorded and used as the first reference). A model one to three rounds
  from its random start has trigger norms NC was not designed for: measured false alarms on digits versions 1 and 3
  (one per seed, 2 of 2 seeds), and Fashion-MNIST's random version 0 has anomaly index 2.4 (docs/audit.md);
* :meth:`Auditor.audit_candidate`: the verdict (``clean``, ``flagged`` or ``skipped``), the audit's scores
  (:meth:`aggregator.audit.AuditResult.to_dict`), its wall time, and, when flagged, the window members whose update
  alone pushed the model towards the reversed trigger (:func:`aggregator.audit.attribute`), measured against the
  server's own clean update (below).

The clean-update check (added here): when the maths flags a class, the server trains one update from the parent on
its audit set (the task's tuned local training, :data:`fedguard.tasks.DEFAULT_TRAINING`: what an honest device
does, on clean balanced data) and scores it with the members (key :data:`SERVER`) against the reversed trigger.

* If that clean update *raises* the target margin under the reversed trigger, the small trigger is a feature of
  the class the model is still learning, not a shortcut planted by someone: the verdict is ``clean`` (served, its
  norms join the reference) with the reason. A backdoor trigger is absent from clean data, so clean training does
  not strengthen it. Measured on digits: in 12 flags on honest learning (2 runs, versions 4-21: the differential
  test on a class whose trigger shrank as it was learned) the clean update lifted the margin by +0.5 to +4.0
  logits; in 6 flags of a real constrain-and-scale backdoor (backdoor accuracy of the candidate 48-77%) it lowered
  it by 1.3 to 2.1. Without this check a class learned late was flagged in 11 of 25 versions of one run: its
  versions were withheld, so the lineage never learned it, so every next candidate was flagged again.
* A member is attributed only if :func:`attribute` flags it *and* it lifts the reversed trigger more than the clean
  update: its margin lift is above the server's, and a member flagged for its attack-success lift alone must exceed
  the server's success lift by the same 0.5 (an early model's natural trigger is lifted by every training step:
  measured, 4 honest members of a 5-member digits window at +0.58 to +0.66, the clean update at +0.62).

The aggregation service (:mod:`aggregator.service`) and the in-process simulation (``fedguard eval``,
:mod:`fedguard.simulation`) both call :meth:`Auditor.audit_candidate` and apply the same response: a flagged
candidate is not served (the version carries the last served parameters) and the attributed devices are
quarantined.

Skipped, with the reason in the version's metadata: the audit is off (``FEDGUARD_AUDIT=none``); the task's inputs
are not images or it has fewer than 3 classes (Neural Cleanse reverse-engineers a small *pixel* patch, and its MAD
outlier test needs at least 3 classes: the synthetic task); the parameters did not change (carried over from a
version audited when it was made); the time budget ran out before the first optimisation step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from aggregator.audit import (AuditConfig, ReversedTrigger, ScreenResult, attribute, audit_model, screen_members,
                              select_audit_set)
from fedguard.tasks import (DEFAULT_TRAINING, ModelSpec, TaskData, build_model, get_flat_params, local_train,
                            set_flat_params)
from fedguard.tasks.backdoor import IMAGE_SIDES
from fedguard.tasks.server_data import SERVER_SET_SIZE

__all__ = ["AUDIT_SET_SIZE", "CLEAN", "FLAGGED", "LOOKBACK_WINDOWS", "REMEMBERED_TRIGGERS", "SKIPPED", "AuditOutcome",
           "Auditor", "PastWindow", "carried_over", "reference_norms", "served_audits", "skip_reason", "unconfirmed"]

CLEAN, FLAGGED, SKIPPED = "clean", "flagged", "skipped"
VERDICTS = (CLEAN, FLAGGED, SKIPPED)
#: clean training images the server holds for the audit (the first AuditConfig.audit_size drive the reverse
#: engineering, all of them the attribution; docs/audit.md)
AUDIT_SET_SIZE = SERVER_SET_SIZE
WARMUP_WHY = ("warm-up: the first FEDGUARD_AUDIT_WARMUP_VERSIONS audited versions are not judged (an undertrained "
              "model's trigger norms are not meaningful); their norms start the differential reference")
#: a member flagged for its attack-success lift alone must beat the server's lift by this much (attribute()'s own
#: abs_threshold)
ABS_LIFT = 0.5
#: the attribution's key of the server's clean update (the baseline every member is compared with)
SERVER = "server:clean-update"
#: the robust z a member attributed by a flag the look-back did not confirm needs to be quarantined (screen_members'
#: z bound; :func:`unconfirmed`)
UNCONFIRMED_Z = 4.0
#: the reversed triggers of the last flagged versions that every later window is screened against
#: (:meth:`Auditor.screen`); a campaign keeps one trigger, so a few cover a change of target or pattern
REMEMBERED_TRIGGERS = 4
#: served windows before a flagged one that are screened with its trigger (:meth:`Auditor.look_back`): the audit
#: flagged persistent constrain-and-scale one or two windows after it entered the served lineage, BadNets in one
#: run five windows after (round 12, the backdoor at 13-64% from round 7 on; docs/audit.md)
LOOKBACK_WINDOWS = 6
#: how far back :func:`served_audits` walks the lineage for clean audits (a long run of flagged or carried-over
#: versions has none to give)
MAX_LINEAGE_STEPS = 200


@dataclass(frozen=True)
class AuditOutcome:
    """What the audit decided about one candidate. ``attributed``: the members (their ids as given) the flagged
    version is attributed to, in input order; ``suspected``: those attributed on weak evidence by a flag the
    look-back did not confirm (:func:`unconfirmed`: not quarantined); ``attribution``:
    :meth:`AttributionResult.to_dict` (all members' scores), None unless flagged."""

    verdict: str
    why: str | None = None
    scores: dict[str, Any] | None = None
    seconds: float = 0.0
    attributed: list[Any] = field(default_factory=list)
    attribution: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    reference: bool = False  # its norms may serve as the differential reference (clean, or a warm-up audit)
    trigger: ReversedTrigger | None = None  # the flagged class's reversed trigger (flagged only; not in to_meta)
    suspected: list[Any] = field(default_factory=list)

    @property
    def flagged_class(self) -> int | None:
        return None if self.scores is None or self.verdict != FLAGGED else self.scores.get("flagged")

    def to_meta(self) -> dict[str, Any]:
        """JSON-safe, for the version's metadata (``"audit"``) and ``fl.models``."""
        out: dict[str, Any] = {"verdict": self.verdict, "seconds": round(float(self.seconds), 4),
                               "reference": self.reference}
        if self.why:
            out["why"] = self.why
        if self.scores is not None:
            out["scores"] = self.scores
        if self.verdict == FLAGGED:
            out["attributed"] = [str(m) for m in self.attributed]
            if self.suspected:
                out["suspected"] = [str(m) for m in self.suspected]
        if self.attribution is not None:
            out["attribution"] = self.attribution
        return out


def skip_reason(task: TaskData, method: str) -> str | None:
    """Why the audit cannot judge versions of ``task`` with ``method`` (None: it can)."""
    if method == "none":
        return "audit off (FEDGUARD_AUDIT=none)"
    if method != "neural_cleanse":
        raise ValueError(f"unknown audit method {method!r}; one of: neural_cleanse, none")
    if task.num_classes < 3:
        return f"task {task.name} has {task.num_classes} classes: the MAD anomaly index needs at least 3"
    if task.name not in IMAGE_SIDES:
        return f"task {task.name} has no image inputs: Neural Cleanse reverse-engineers a pixel trigger"
    return None


def carried_over(version: int) -> AuditOutcome:
    """The outcome of a version whose parameters are those of ``version`` (audited when it was made)."""
    return AuditOutcome(SKIPPED, why=f"parameters of version {version} carried over (audited when it was made)")


def served_audits(meta_of: Callable[[int], dict[str, Any]], version: int, count: int) -> list[dict[str, Any]]:
    """The audits (metadata ``"audit"``) of the last ``count`` versions in the *served lineage* of ``version`` that
    may serve as the reference (clean, or a warm-up audit), newest first. The served lineage follows where each
    version's parameters came from: its ``rule_info.params_from`` (a flagged, failed, carried-over or rolled-back
    version) or else its parent, so the versions an operator rolled back from are not part of it."""
    found: list[dict[str, Any]] = []
    seen: set[int] = set()
    current: int | None = version
    for _ in range(MAX_LINEAGE_STEPS):
        if current is None or current in seen or len(found) >= count:
            break
        seen.add(current)
        try:
            meta = meta_of(current)
        except (FileNotFoundError, KeyError):
            break
        audit = meta.get("audit") or {}
        if audit.get("reference") and (audit.get("scores") or {}).get("norms"):
            found.append(audit)
        source = (meta.get("rule_info") or {}).get("params_from")
        current = int(source) if source is not None and int(source) != current else meta.get("parent")
    return found


def reference_norms(audits: list[dict[str, Any]], num_classes: int) -> np.ndarray | None:
    """Per-class median of the Neural Cleanse norms of ``audits`` (outcome metadata, e.g. from
    :func:`served_audits`): the differential reference; None when none has usable norms for ``num_classes``."""
    rows = []
    for audit in audits:
        norms = (audit.get("scores") or {}).get("norms")
        if norms and len(norms) == num_classes and all(isinstance(v, (int, float)) and v > 0 for v in norms):
            rows.append(np.asarray(norms, dtype=np.float64))
    return np.median(np.stack(rows), axis=0) if rows else None


@dataclass(frozen=True)
class PastWindow:
    """A served window the look-back screens: the version it made, its base's parameters, its members' deltas."""

    version: int
    parent: np.ndarray
    members: Mapping[Any, np.ndarray]


class Auditor:
    """The audit of one deployment: method, audit set, config. ``skipped`` says why it never runs (None: it runs)."""

    def __init__(self, task: TaskData, spec: ModelSpec, method: str = "neural_cleanse", time_budget_s: float = 2.0,
                 seed: int = 0, config: AuditConfig | None = None):
        self.task = task
        self.skipped = skip_reason(task, method)
        self.config = config or AuditConfig(time_budget_s=float(time_budget_s), seed=int(seed))
        self.model = build_model(spec)
        self.seed = int(seed)
        self.triggers: list[tuple[int, ReversedTrigger]] = []  # (flagged version, its reversed trigger), by version
        self.x_audit = np.empty((0, task.input_dim), dtype=np.float32)
        self.y_audit = np.empty((0,), dtype=np.int64)
        if self.skipped is None:
            size = min(AUDIT_SET_SIZE, len(task.y_train))
            rows = select_audit_set(task.x_train, task.y_train, size, seed=self.seed)
            self.x_audit, self.y_audit = task.x_train[rows], task.y_train[rows]

    def audit_candidate(self, candidate: np.ndarray, parent: np.ndarray, members: Mapping[Any, np.ndarray],
                        reference: np.ndarray | None = None, *, warmup: bool = False) -> AuditOutcome:
        """Audit the candidate parameters; when flagged, attribute it to ``members`` (``{id: delta}``, each applied
        alone to ``parent``, the window's base). ``reference``: :func:`reference_norms` of the served versions
        (None: the absolute test only). ``warmup``: record the scores, judge nothing (see the module docstring)."""
        if self.skipped is not None:
            return AuditOutcome(SKIPPED, why=self.skipped)
        started = time.perf_counter()
        set_flat_params(self.model, candidate)
        try:
            result = audit_model(self.model, self.x_audit, self.config, reference)
        except TimeoutError as exc:
            return AuditOutcome(SKIPPED, why=str(exc), seconds=time.perf_counter() - started)
        if warmup:
            return AuditOutcome(SKIPPED, why=WARMUP_WHY, scores=result.to_dict(), reference=True,
                                seconds=time.perf_counter() - started)
        scores = result.to_dict()
        if not result.is_flagged:
            return AuditOutcome(CLEAN, scores=scores, reference=True, seconds=time.perf_counter() - started)
        scored = {**members, SERVER: self.server_update(parent)}
        try:
            attribution = attribute(parent, scored, self.model, result.trigger, self.x_audit)
        except ValueError as exc:  # e.g. the parent already sends every audit input to the target
            return AuditOutcome(FLAGGED, scores=scores, seconds=time.perf_counter() - started,
                                attribution={"why": str(exc)}, trigger=result.trigger)
        lift = attribution.scores[SERVER]
        if lift > 0:
            why = (f"class {result.flagged}'s reversed trigger is also strengthened by the server's clean update "
                   f"(target margin {lift:+.2f} logits): a class being learned, not a backdoor")
            return AuditOutcome(CLEAN, why=why, scores=scores, reference=True, attribution=attribution.to_dict(),
                                seconds=time.perf_counter() - started)
        return AuditOutcome(FLAGGED, scores=scores, seconds=time.perf_counter() - started,
                            attributed=beyond_clean_update(attribution), attribution=attribution.to_dict(),
                            trigger=result.trigger)

    # -- remembered triggers ----------------------------------------------------------------------------------
    def remember(self, version: int, trigger: ReversedTrigger) -> None:
        """Keep the reversed trigger of flagged ``version`` (the last :data:`REMEMBERED_TRIGGERS`, by version)."""
        kept = {v: t for v, t in self.triggers if v != version}
        kept[int(version)] = trigger
        self.triggers = sorted(kept.items())[-REMEMBERED_TRIGGERS:]

    def screen(self, parent: np.ndarray, members: Mapping[Any, np.ndarray]) -> ScreenResult | None:
        """Screen a window's members (``{id: delta}`` from ``parent``) against the remembered triggers before the
        rule aggregates them (:func:`aggregator.audit.screen_members`, the server's clean update as baseline).
        None when the audit does not run, nothing is remembered or the window is empty."""
        if self.skipped is not None or not self.triggers or not members:
            return None
        return screen_members(parent, members, self.server_update(parent), self.model,
                              [t for _, t in self.triggers], self.x_audit)

    def look_back(self, trigger: ReversedTrigger, windows: list[PastWindow], flagged: PastWindow | None = None
                  ) -> tuple[PastWindow | None, dict[Any, list[int]]]:
        """Screen the flagged window's members and the served windows before it (newest first, at most
        :data:`LOOKBACK_WINDOWS`) with its trigger. Returns the oldest *served* window that held a screened member
        (the lineage is served again from its base: every version after it carries part of the backdoor), or None,
        and each screened member with the versions of the windows it was screened in. No screened member anywhere:
        nobody pushes the trigger far beyond clean training, so the caller does not remember it (a false alarm's
        natural trigger would otherwise screen honest devices whose data is mostly that class)."""
        oldest, culprits = None, {}
        for window in ([flagged] if flagged is not None else []) + windows[:LOOKBACK_WINDOWS]:
            if not window.members:
                continue
            found = screen_members(window.parent, window.members, self.server_update(window.parent), self.model,
                                   [trigger], self.x_audit)
            for m in found.screened:
                culprits.setdefault(m, []).append(window.version)
            if found.screened and window is not flagged:
                oldest = window
        return oldest, culprits

    def server_update(self, parent: np.ndarray) -> np.ndarray:
        """The server's clean update: the task's tuned local training from ``parent`` on the audit set."""
        hp = DEFAULT_TRAINING[self.task.name]
        set_flat_params(self.model, parent)
        local_train(self.model, self.x_audit, self.y_audit, epochs=hp["epochs"], lr=hp["lr"],
                    batch_size=hp["batch_size"], momentum=hp.get("momentum", 0.0), seed=self.seed)
        return get_flat_params(self.model) - np.asarray(parent, dtype=np.float32)


def unconfirmed(outcome: AuditOutcome, z_bound: float | None = None) -> AuditOutcome:
    """A flag the look-back did not confirm (:meth:`Auditor.look_back` screened nobody: no member of the flagged
    window or of the served windows before it pushes the trigger far beyond clean training). Its attributed members
    stay attributed (quarantined) only on strong evidence: robust z >= ``z_bound`` (default
    :data:`UNCONFIRMED_Z`, screen_members' bound) or the absolute test; the others become ``suspected`` and are not
    quarantined. Measured: 2 of 42 cells of the default matrix had quarantined one honest device each at such a flag
    (robust z 3.0 and 3.3, target margin +4.0 and +5.3 logits), while the attackers of a confirmed flag in the same
    run scored robust z 12-13 (+34 to +37 logits, the clean update -3.4), and constrain-and-scale attackers on digits
    robust z ~7 with lifts under the look-back's 6-logit bound (docs/audit.md). The version is still not served."""
    bound = UNCONFIRMED_Z if z_bound is None else float(z_bound)
    table = outcome.attribution or {}
    robust_z, reasons = table.get("robust_z") or {}, table.get("reasons") or {}

    def strong(member: Any) -> bool:
        z = robust_z.get(str(member))
        return (z is not None and z >= bound) or "absolute" in reasons.get(str(member), [])

    return replace(outcome, attributed=[m for m in outcome.attributed if strong(m)],
                   suspected=[*outcome.suspected, *(m for m in outcome.attributed if not strong(m))])


def beyond_clean_update(result) -> list[Any]:
    """The members :func:`attribute` flagged that also lift the reversed trigger more than the server's clean
    update (see the module docstring)."""
    base_score, base_lift = result.scores[SERVER], result.success_lift[SERVER]
    kept = []
    for member in result.flagged:
        if member == SERVER or result.scores[member] <= base_score:
            continue
        reasons = result.reasons[member]
        if "robust_z" in reasons or result.success_lift[member] - base_lift >= ABS_LIFT:
            kept.append(member)
    return kept
