"""The detection ensemble: every detector of :mod:`processors.detectors` on one window, votes -> verdicts.

Pure function, no Kafka, no Redis: the window stage passes the members' exact norms and sketches, their per-device
histories (before this window), the previous global update's sketch and the members' trust, and gets back one
:class:`MemberVerdict` per member plus window statistics, all JSON-safe (``WindowVerdict.to_dict``).

Voting (anomaly detectors disagree; an ensemble that needs two independent votes to reject keeps each detector's
false positives from becoming rejections, Aggarwal, "Outlier Ensembles", 2017, ch. 1):

* **reject** when any *strong* signal fires (a Sybil group; a norm above 5x the window's centre; a cosine below -0.3
  to the centre of the other members, a median cosine below -0.2 to the other members, or a cosine below -0.5 to
  the previous global update; a loss on the server's clean data above 4x the window's median member, after the
  member's update alone), or when detectors of at least ``reject_votes`` (2) different *families* vote
  (``FAMILIES``: size = magnitude, distance; angle = direction; behaviour; collusion = sybil, cluster, flame,
  foolsgold; history), so that two views of the same fact (a large norm makes a
  large Krum score) do not make two votes;
* **downweight** on votes of one family (a FoolsGold alpha below ``foolsgold_min`` = 0.5 is a vote), or trust below
  ``trust_min`` (0.3, i.e. a device with more negative than positive recent evidence, or just released from
  quarantine);
* **accept** otherwise.

``weight`` (the multiplier the aggregator applies): accept 1, downweight ``min(downweight_weight, alpha)`` with
``downweight_weight = 0.5`` and alpha FoolsGold's, reject 0. ``evidence`` (what reputation should observe) is the
verdict without the trust rule, ``sybil`` for a member of a Sybil group and ``harmful`` for a member the behaviour
detector's strong signal rejected (rejects that :func:`processors.reputation.observe` quarantines at once).
Thresholds and measured false-positive rates: docs/detection.md.

The direction detector's cosine thresholds were measured on Fashion-MNIST; they are multiplied by
:func:`processors.detectors.angle_scale` of ``angle_baseline`` (recent cosines between non-rejected members: 1 on
Fashion-MNIST, up to 3 where honest updates disagree more, e.g. digits; docs/detection.md, "Other tasks and small
windows"). Each verdict returns its window's ``angle_pairs`` for the caller to extend the baseline with.

Centres (magnitude, direction, distance, history) weigh each distinct member by ``trust ** 2 x alpha``: a fresh
device (E = 0.5) counts 0.25, one with a clean record (E = 11/12) 0.84, and a member whose history resembles
another's (FoolsGold alpha 0, from its second round on) counts nothing, so colluders that are a majority of one
window but push one objective across rounds do not define "normal".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from processors import detectors as D
from processors.detectors import DeviceHistory

__all__ = ["DETECTORS", "EnsembleConfig", "MemberVerdict", "WindowVerdict", "score_window"]

#: every detector the ensemble knows; ``EnsembleConfig.enabled`` is a subset
DETECTORS = ("magnitude", "direction", "distance", "behaviour", "sybil", "cluster", "flame", "foolsgold", "history")
#: votes of one family count once: magnitude and Krum distance both see size (on non-IID updates, which are nearly
#: orthogonal, a Krum score is mostly the member's own squared norm); the collusion detectors all see similarity
FAMILIES = {"magnitude": "size", "distance": "size", "direction": "angle", "behaviour": "behaviour",
            "sybil": "collusion", "cluster": "collusion", "flame": "collusion", "foolsgold": "collusion",
            "history": "history"}


@dataclass(frozen=True)
class EnsembleConfig:
    """Every threshold of the ensemble (defaults measured on honest Fashion-MNIST windows, docs/detection.md)."""

    enabled: frozenset[str] = frozenset(DETECTORS)
    # Sybil grouping (used by every centre even when the "sybil" vote is disabled)
    sybil_cos: float = D.SYBIL_COS
    # magnitude
    magnitude_z: float = 3.5
    magnitude_floor: float = 0.4
    magnitude_strong_ratio: float = 5.0
    # direction
    direction_z: float = 3.5
    direction_floor: float = 0.05
    direction_cos_abs: float = -0.2
    direction_pairwise_abs: float = -0.1
    direction_core_min: float = -0.1
    direction_previous_abs: float = -0.5
    direction_strong_cos: float = -0.3
    direction_strong_pairwise: float = -0.2
    # the direction thresholds above are Fashion-MNIST's; in units of the deployment's own honest angles they are
    # multiplied by D.angle_scale of the recent cosines between non-rejected members (1 on Fashion-MNIST)
    angle_calibration: bool = True
    angle_reference: float = D.ANGLE_REFERENCE
    angle_quantile: float = D.ANGLE_QUANTILE
    angle_max_scale: float = D.ANGLE_MAX_SCALE
    angle_min_pairs: int = D.ANGLE_MIN_PAIRS
    # concentration (similar but not identical members)
    cluster_cos_low: float = D.CLUSTER_COS_LOW
    cluster_min_density: float = 1.5
    cluster_margin: float = 0.5
    # distance
    distance_z: float = 3.5
    distance_floor: float = 1.0
    # behaviour: the loss on the server's clean rows after the member's update alone, over the window's median member
    behaviour_ratio: float = 2.5
    behaviour_strong_ratio: float = 4.0
    # FLAME clustering: its vote counts in the ensemble only if True (it is reported either way)
    flame_votes: bool = False
    # FoolsGold
    foolsgold_kappa: float = 1.0
    foolsgold_min: float = 0.5
    foolsgold_min_count: int = 2
    # history
    history_min_count: int = 3
    history_z: float = 3.5
    history_floor: float = 0.1
    # voting
    reject_votes: int = 2
    downweight_weight: float = 0.5
    trust_min: float = 0.3
    weighted_centres: bool = True  # centres weighted by trust ** trust_power x FoolsGold alpha
    trust_power: float = 2.0  # a fresh device (E = 0.5) weighs 0.25, a clean record (E = 11/12) 0.84

    def __post_init__(self) -> None:
        unknown = set(self.enabled) - set(DETECTORS)
        if unknown:
            raise ValueError(f"unknown detectors {sorted(unknown)}; known: {DETECTORS}")
        object.__setattr__(self, "enabled", frozenset(self.enabled))
        if self.reject_votes < 1:
            raise ValueError("reject_votes must be >= 1")
        if not 0.0 <= self.downweight_weight <= 1.0:
            raise ValueError("downweight_weight must be in [0, 1]")


@dataclass
class MemberVerdict:
    """One member's outcome. ``verdict`` drives aggregation (with ``weight``); ``evidence`` is what the detectors
    concluded about *this update* without the device's trust, and is what reputation must observe: feeding back a
    downweight that only low trust caused would keep a low-trust device's trust low for ever."""

    scores: dict[str, float | None]
    flags: list[str]
    verdict: str
    weight: float
    reasons: list[str]
    evidence: str = "accept"


@dataclass
class WindowVerdict:
    members: list[MemberVerdict]
    stats: dict[str, Any] = field(default_factory=dict)
    #: cosines between this window's non-rejected members (:func:`processors.detectors.member_cosines`): the caller
    #: appends them to the baseline it passes as ``angle_baseline`` to the next window (not part of ``to_dict``)
    angle_pairs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"members": [asdict(m) for m in self.members], "stats": self.stats}


def _f(x: Any) -> float | None:
    """JSON-safe float: None for NaN/inf."""
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python numbers, NaN and infinities to None (also for the window stage)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _f(obj)
    return obj


def score_window(norms: np.ndarray, sketches: np.ndarray, histories: Sequence[DeviceHistory | None],
                 previous_global: np.ndarray | None, trust: np.ndarray,
                 config: EnsembleConfig = EnsembleConfig(),
                 equivocated: Sequence[bool] | None = None,
                 angle_baseline: Sequence[float] | None = None,
                 losses: Sequence[float | None] | None = None, base_loss: float | None = None) -> WindowVerdict:
    """Score one window. ``norms`` ``(n,)`` exact L2 norms; ``sketches`` ``(n, k)``; ``histories`` one per member,
    the device's :class:`DeviceHistory` *before* this window (``None`` = never seen); ``previous_global`` the sketch
    ``(k,)`` of the last global update or ``None``; ``trust`` ``(n,)`` in [0, 1] (reputation expectation);
    ``equivocated`` ``(n,)`` (default all False): the member's device sent another update for this window's base
    version (admission refused it as ``window_duplicate``). An honest device sends one update per base version, so
    such a member is rejected whatever the detectors say (a strong signal, evidence ``reject``) and is left out of
    every centre: copies sent to fill a window (window stuffing, a flood) cost the device its seat.
    ``angle_baseline``: the recent cosines between non-rejected members of past windows (oldest first; the caller
    keeps them, extending them with each verdict's ``angle_pairs``); the direction detector's thresholds are
    multiplied by :func:`processors.detectors.angle_scale` of it (``None``: scale 1, the measured thresholds).
    ``losses`` ``(n,)``: each member's loss on the server's clean rows after its update alone (the validator's
    :class:`fedguard.tasks.server_data.LossProbe`; ``None`` entries, or ``None`` for all: not measured, the
    ``behaviour`` detector abstains for them), ``base_loss`` the base version's own (reported only).
    Raises ``ValueError`` on inconsistent shapes or non-finite input."""
    x = np.asarray(norms, dtype=np.float64).reshape(-1)
    n = x.size
    s = np.asarray(sketches, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != n:
        raise ValueError(f"sketches must have shape ({n}, k), got {s.shape}")
    if len(histories) != n:
        raise ValueError(f"need one history (or None) per member: {len(histories)} for {n}")
    if not np.isfinite(x).all() or (x < 0).any() or not np.isfinite(s).all():
        raise ValueError("norms and sketches must be finite (norms non-negative)")
    t = np.clip(np.asarray(trust, dtype=np.float64).reshape(-1), 0.0, 1.0)
    if t.shape != (n,) or not np.isfinite(t).all():
        raise ValueError(f"trust must be {n} finite numbers")
    eq = np.zeros(n, dtype=bool) if equivocated is None else np.asarray(equivocated, dtype=bool).reshape(-1)
    if eq.shape != (n,):
        raise ValueError(f"equivocated must be {n} booleans, got shape {eq.shape}")
    if n == 0:
        return WindowVerdict([], {"n": 0})
    cfg = config
    on = cfg.enabled
    labels = D.sybil_groups(s, x, cfg.sybil_cos)
    k = s.shape[1]
    scale = D.angle_scale(angle_baseline, cfg.angle_reference, cfg.angle_quantile, cfg.angle_max_scale,
                          cfg.angle_min_pairs) if cfg.angle_calibration else 1.0
    hist_now = [D.updated(h, s[i]) for i, h in enumerate(histories)]

    scores: list[dict[str, float | None]] = [{"norm": _f(x[i]), "trust": _f(t[i])} for i in range(n)]
    votes: list[list[str]] = [[] for _ in range(n)]
    strong: list[list[str]] = [[] for _ in range(n)]
    reasons: list[list[str]] = [[] for _ in range(n)]
    stats: dict[str, Any] = {"n": n, "distinct": int(np.unique(labels).size), "median_norm": float(np.median(x)),
                             "k": k, "detectors": {}, "angle_scale": scale}

    # FoolsGold first: its alpha (memory across rounds) also weights every centre below, so that colluders whose
    # histories resemble each other cannot outvote the honest members even when they are a majority of the window
    alpha = np.ones(n)
    if "foolsgold" in on:
        alpha = D.foolsgold(np.stack([h.sum for h in hist_now]), kappa=cfg.foolsgold_kappa)
        counts = np.array([h.count for h in hist_now])
        # a member with too short a history (its sum is just this update) is neither voted against nor weighted
        alpha = np.where(counts >= cfg.foolsgold_min_count, alpha, 1.0)
        low = alpha < cfg.foolsgold_min
        stats["detectors"]["foolsgold"] = {"flagged": int(low.sum()), "strong": 0, "votes": True,
                                           "min_alpha": float(alpha.min())}
        for i in range(n):
            scores[i]["foolsgold_alpha"] = _f(alpha[i])
            if low[i]:
                votes[i].append("foolsgold")
                reasons[i].append(f"foolsgold: history too similar to another member's (alpha {alpha[i]:.3g} < "
                                  f"{cfg.foolsgold_min})")
    cw = t ** cfg.trust_power * alpha
    ct = cw if cfg.weighted_centres and (cw > 0).any() else None
    if eq.any() and not eq.all():  # rejected below; not a reference for the others either
        ct = np.where(eq, 0.0, ct if ct is not None else np.ones(n))
    stats["equivocated"] = int(eq.sum())
    for i in np.flatnonzero(eq):
        strong[i].append("equivocation")
        reasons[i].append("equivocation: the device sent another update for this base version (one per device per "
                          "window)")

    def record(name: str, res: D.DetectorResult, vote: bool = True) -> None:
        stats["detectors"][name] = {**res.info, "flagged": int(res.flagged.sum()), "strong": int(res.strong.sum()),
                                    "votes": vote}
        if not vote:
            return
        for i in np.flatnonzero(res.flagged):
            votes[i].append(name)
            if res.strong[i]:
                strong[i].append(name)

    if "sybil" in on:
        res = D.sybil(s, x, cfg.sybil_cos)
        record("sybil", res)
        for i in range(n):
            scores[i]["sybil_group_size"] = _f(res.scores[i])
            if res.flagged[i]:
                reasons[i].append(f"sybil: near-identical (cosine > {cfg.sybil_cos}) to {int(res.scores[i]) - 1} "
                                  f"other member(s) of this window")
        # A Sybil group is rejected; it must not also be the reference the other members are judged against (two
        # copies along minus the mean in a window of five turned the direction detector against every honest member).
        # Honest non-IID pairs never come near the Sybil cosine (<= 0.61 measured), so no honest member loses weight.
        if res.flagged.any() and not res.flagged.all():
            ct = np.where(res.flagged, 0.0, ct if ct is not None else np.ones(n))
    if "cluster" in on:
        res = D.concentration(s, labels=labels, low=cfg.cluster_cos_low, min_density=cfg.cluster_min_density,
                              margin=cfg.cluster_margin)
        record("cluster", res)
        for i in range(n):
            scores[i]["density"] = _f(res.scores[i])
            if res.flagged[i]:
                reasons[i].append(f"cluster: points the same way as other members (density {res.scores[i]:.3g}, "
                                  f"window median {res.info.get('median_density', 1.0):.3g})")
    if "magnitude" in on:
        res = D.magnitude(x, labels=labels, trust=ct, z_threshold=cfg.magnitude_z, floor_frac=cfg.magnitude_floor,
                          strong_ratio=cfg.magnitude_strong_ratio)
        record("magnitude", res)
        centre = res.info.get("centre")
        for i in range(n):
            scores[i]["magnitude_z"] = _f(res.scores[i])
            if res.flagged[i]:
                ratio = x[i] / centre if centre else float("inf")
                reasons[i].append(f"magnitude: norm {x[i]:.4g} is {ratio:.3g}x the window's centre {centre:.4g} "
                                  f"(z {res.scores[i]:.3g} > {cfg.magnitude_z})")
    if "direction" in on:
        wide = D.scaled_threshold  # the deployment's angles (scale 1: exactly the measured thresholds)
        res = D.direction(s, previous_global, labels=labels, trust=ct, z_threshold=cfg.direction_z,
                          floor_abs=cfg.direction_floor * scale, cos_abs=wide(cfg.direction_cos_abs, scale),
                          pairwise_abs=wide(cfg.direction_pairwise_abs, scale),
                          core_min=wide(cfg.direction_core_min, scale),
                          previous_abs=wide(cfg.direction_previous_abs, scale),
                          strong_cos=wide(cfg.direction_strong_cos, scale),
                          strong_pairwise=wide(cfg.direction_strong_pairwise, scale))
        record("direction", res)
        for i in range(n):
            scores[i]["cos_centre"] = _f(res.scores[i])
            scores[i]["cos_pairwise"] = _f(res.extra["pairwise"][i])
            scores[i]["direction_z"] = _f(res.extra["z"][i])
            scores[i]["cos_previous"] = _f(res.extra["cos_previous"][i])
            if res.flagged[i]:
                cp = res.extra["cos_previous"][i]
                extra = f", {cp:.3g} to the previous global update" if np.isfinite(cp) else ""
                reasons[i].append(f"direction: cosine {res.scores[i]:.3g} to the robust centre of the other members "
                                  f"(window median {res.info.get('median_cos', float('nan')):.3g}, z "
                                  f"{res.extra['z'][i]:.3g}), median cosine {res.extra['pairwise'][i]:.3g} to "
                                  f"the other members{extra}")
    if "distance" in on:
        res = D.distance(s, labels=labels, trust=ct, z_threshold=cfg.distance_z, floor_frac=cfg.distance_floor)
        record("distance", res)
        for i in range(n):
            scores[i]["krum"] = _f(res.extra["krum"][i])
            scores[i]["distance_z"] = _f(res.scores[i])
            if res.flagged[i]:
                reasons[i].append(f"distance: Krum score {res.extra['krum'][i]:.4g} is an outlier "
                                  f"(z {res.scores[i]:.3g} > {cfg.distance_z})")
    if "behaviour" in on and losses is not None:
        if len(losses) != n:
            raise ValueError(f"need one loss (or None) per member: {len(losses)} for {n}")
        res = D.behaviour(losses, base_loss, labels=labels, trust=ct, ratio=cfg.behaviour_ratio,
                          strong_ratio=cfg.behaviour_strong_ratio)
        record("behaviour", res)
        centre = res.info.get("centre")
        for i in range(n):
            scores[i]["loss"] = _f(losses[i]) if losses[i] is not None else None
            scores[i]["loss_ratio"] = _f(res.scores[i]) if centre is not None and losses[i] is not None else None
            if res.flagged[i]:
                reasons[i].append(f"behaviour: its update alone takes the loss on the server's clean data to "
                                  f"{res.scores[i]:.3g}x the window's median member ({centre:.4g}; cut "
                                  f"{cfg.behaviour_ratio}x)")
    if "flame" in on:
        res = D.flame_outliers(s, labels=labels)
        record("flame", res, vote=cfg.flame_votes)
        for i in range(n):
            scores[i]["flame_outlier"] = _f(res.scores[i])
            if res.flagged[i] and cfg.flame_votes:
                reasons[i].append("flame: outside the majority cluster of cosine distances (HDBSCAN)")
    if "history" in on:
        res = D.history(hist_now, trust=ct, min_count=cfg.history_min_count, z_threshold=cfg.history_z,
                        floor_abs=cfg.history_floor)
        record("history", res)
        z = res.extra.get("z", np.full(n, np.nan))
        for i in range(n):
            scores[i]["history_residual"] = _f(res.scores[i])
            scores[i]["history_z"] = _f(z[i])
            scores[i]["consistency"] = _f(res.extra["consistency"][i])
            if res.flagged[i]:
                reasons[i].append(f"history: {res.scores[i]:.3g} of its cumulative update is outside the fleet's "
                                  f"direction (z {z[i]:.3g} > {cfg.history_z}) over {hist_now[i].count} rounds")

    members = []
    for i in range(n):
        flags = sorted(set(votes[i]) | ({"equivocation"} if eq[i] else set()))
        vote_count = len({FAMILIES[f] for f in set(votes[i])})
        if strong[i] or vote_count >= cfg.reject_votes:
            verdict, weight = "reject", 0.0
            if strong[i] and vote_count < cfg.reject_votes:
                reasons[i].append(f"rejected on a strong signal ({', '.join(sorted(set(strong[i])))})")
            else:
                reasons[i].append(f"rejected: {vote_count} independent detector families voted")
        else:
            low_trust = t[i] < cfg.trust_min
            if low_trust:
                flags.append("low_trust")
                reasons[i].append(f"trust {t[i]:.3g} < {cfg.trust_min}")
            if vote_count or low_trust:
                verdict, weight = "downweight", float(min(cfg.downweight_weight, alpha[i]))
            else:
                verdict, weight = "accept", 1.0
        if "sybil" in strong[i]:
            evidence = "sybil"  # near-identical to another device's update: reputation quarantines at once
        elif "behaviour" in strong[i]:
            evidence = "harmful"  # alone it wrecks the model on clean data (> 4x the median member): the same
        else:
            evidence = "reject" if verdict == "reject" else ("downweight" if vote_count else "accept")
        members.append(MemberVerdict(scores[i], flags, verdict, weight, reasons[i], evidence))
    stats["verdicts"] = {v: sum(m.verdict == v for m in members) for v in ("accept", "downweight", "reject")}
    pairs = D.member_cosines(s, np.array([m.verdict != "reject" for m in members]), labels)
    return WindowVerdict(members, json_safe(stats), pairs)
