"""Anomaly detectors over one window's members: pure functions over arrays, no Kafka, no Redis.

Inputs per window of ``n`` members: the exact L2 norms ``(n,)`` (the validator computes them on the tensor), the
secret CountSketches ``(n, k)`` of the updates (:mod:`fedguard.sketch`; inner products and norms survive in
expectation, a cosine carries about ``1/sqrt(k)`` of hashing noise), optionally the members' trust ``(n,)`` in
``[0, 1]`` (reputation, :mod:`processors.reputation`) and their per-device history (:class:`DeviceHistory`).

Every detector returns a :class:`DetectorResult`: a score per member, which members it votes against (``flagged``),
which of those votes is strong enough to reject on its own (``strong``), and JSON-safe window-level ``info``.

Defences against being turned against the honest (DESIGN.md: "nothing an attacker sends may turn a detector against
the honest members"), applied by every detector that compares a member with the rest of the window:

* **Sybil groups count once.** Members whose sketches have cosine > 0.99 with each other (connected components of
  that graph, :func:`sybil_groups`) are one *distinct* member in every centre and spread below, whatever their number
  and norms. The brief's "near-duplicate" also required norms within 1 %; grouping by direction alone is stricter
  against the attacker (copies at spread-out norms still count once) and costs nothing: honest pairs never come close
  (highest sketch cosine between two honest Fashion-MNIST updates measured: 0.61 in round 1, <= 0.21 afterwards).
* **Similar members share a vote.** Beyond copies, each distinct member's weight is divided by its :func:`density`
  (how many members point its way: cosine ramp 0.7 -> 0.9), so a coherent group of non-identical colluders weighs
  about one member.
* **Scale floors.** A spread (MAD) is floored at a stated fraction of the centre, so members that all sit at the
  same value (MAD = 0) cannot make an honest member look infinitely far.
* **Weighted centres.** Centres are weighted medians with weight = the caller's ``trust`` (the ensemble passes
  reputation squared times FoolsGold alpha): a fresh majority does not outvote established honest devices.
* **Medians of scalars where a coordinate median is weak.** The direction detector first scores each member by its
  weighted median cosine to the others (a 1-D median a less-than-half-weight group cannot move) and builds its centre
  only from members that agree with the rest.
* **One-sided where only one side can hurt** (magnitude: large only; direction: low cosines only).

What is *not* guaranteed: distinct, dissimilar (cosine < 0.7 to each other) and equally trusted members holding more
than half the weight of a window can move any within-window statistic (the breakdown point of every median); see
docs/detection.md for what then still protects (trust, FoolsGold memory) and what does not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from fedguard.vectors import cosine_matrix, cosine_to, krum_scores, pairwise_sq_distances, unit_rows

__all__ = [
    "DetectorResult",
    "DeviceHistory",
    "angle_scale",
    "behaviour",
    "concentration",
    "coordinate_median",
    "density",
    "direction",
    "distance",
    "extended_baseline",
    "flame_outliers",
    "foolsgold",
    "history",
    "magnitude",
    "member_cosines",
    "modified_z_scores",
    "norm_outliers",
    "robust_z",
    "scaled_threshold",
    "sybil",
    "sybil_groups",
    "updated",
    "weighted_median",
]

#: Iglewicz & Hoaglin's constant: 0.6745 = Phi^-1(0.75), so that MAD / 0.6745 estimates sigma for normal data
_C = 0.6745
#: |z| is capped here so that scores stay finite (JSON has no inf)
Z_CAP = 1e6


# --------------------------------------------------------------------------- #
# the original norm detector (used by processors.windows today)
# --------------------------------------------------------------------------- #


def modified_z_scores(values: np.ndarray) -> np.ndarray:
    """Modified z-score of Iglewicz and Hoaglin (1993), eq. for M_i: ``M_i = 0.6745 (x_i - median) / MAD``.

    MAD is the median absolute deviation from the median. When MAD is 0 (at least half the values are equal) the
    score is 0 for values at the median and +-inf elsewhere, matching the definition's limit.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    median = np.median(values)
    mad = np.median(np.abs(values - median))
    deviation = values - median
    if mad == 0:
        return np.where(deviation == 0, 0.0, np.copysign(np.inf, deviation))
    return 0.6745 * deviation / mad


def norm_outliers(norms: np.ndarray, threshold: float = 3.5) -> tuple[np.ndarray, np.ndarray]:
    """Flag updates whose L2 norm is an outlier: ``|M_i| > threshold`` (3.5 is Iglewicz and Hoaglin's cut-off).

    Needs at least 3 members to say anything; with fewer, nobody is flagged. Returns (scores, flagged).
    """
    norms = np.asarray(norms, dtype=np.float64)
    if norms.size < 3:
        return np.zeros_like(norms), np.zeros(norms.shape, dtype=bool)
    scores = modified_z_scores(norms)
    return scores, np.abs(scores) > threshold


# --------------------------------------------------------------------------- #
# results, helpers
# --------------------------------------------------------------------------- #


@dataclass
class DetectorResult:
    """One detector's output on a window: ``scores`` (float64 ``(n,)``, finite), ``flagged`` / ``strong`` (bool
    ``(n,)``, ``strong`` implies ``flagged``), ``info`` (JSON-safe window-level numbers) and optional named
    ``extra`` per-member scores (float64 ``(n,)``, NaN where not defined)."""

    scores: np.ndarray
    flagged: np.ndarray
    strong: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def _result(scores: np.ndarray, flagged: np.ndarray, strong: np.ndarray | None = None,
            info: dict[str, Any] | None = None, extra: dict[str, np.ndarray] | None = None) -> DetectorResult:
    flagged = np.asarray(flagged, dtype=bool)
    strong = np.zeros_like(flagged) if strong is None else np.asarray(strong, dtype=bool) & flagged
    return DetectorResult(np.asarray(scores, dtype=np.float64), flagged, strong, info or {}, extra or {})


def _empty(n: int, info: dict[str, Any] | None = None) -> DetectorResult:
    return _result(np.zeros(n), np.zeros(n, dtype=bool), info=info)


def weighted_median(values: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Weighted median: the smallest value whose cumulative weight reaches half the total, or the mean of the two
    middle values when a cumulative weight lands exactly on half (so equal weights give ``numpy.median``).
    Zero-weight values are ignored; with no positive weight, the unweighted median."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("weighted_median of an empty array")
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != v.shape or (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("weights must be finite, non-negative, one per value")
    keep = w > 0
    if not keep.any():
        return float(np.median(v))
    v, w = v[keep], w[keep]
    order = np.argsort(v, kind="stable")
    v, w = v[order], w[order]
    cw = np.cumsum(w)
    half = cw[-1] / 2.0
    i = int(np.searchsorted(cw, half * (1 - 1e-12)))
    if abs(cw[i] - half) <= 1e-12 * cw[-1] and i + 1 < v.size:
        return float((v[i] + v[i + 1]) / 2.0)
    return float(v[i])


def coordinate_median(rows: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Coordinate-wise weighted median of ``rows`` ``(m, k)`` (Yin et al., "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates", ICML 2018, Def. 1), float64 ``(k,)``; same tie rule as
    :func:`weighted_median`."""
    x = np.asarray(rows, dtype=np.float64)
    m = x.shape[0]
    w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)
    if not (w > 0).any():
        w = np.ones(m)
    xt = np.ascontiguousarray(x.T)  # (k, m): sort each coordinate's m values in contiguous memory
    order = np.argsort(xt, axis=1)  # ties hold equal values, so their order cannot change the result
    xs = np.take_along_axis(xt, order, axis=1)
    cw = np.cumsum(w[order], axis=1)
    half = cw[:, -1] / 2.0
    i = (cw < (half * (1 - 1e-12))[:, None]).sum(axis=1)
    rows_ = np.arange(xt.shape[0])
    lo = xs[rows_, i]
    exact = np.abs(cw[rows_, i] - half) <= 1e-12 * cw[:, -1]
    hi = xs[rows_, np.minimum(i + 1, m - 1)]
    return np.where(exact & (i + 1 < m), (lo + hi) / 2.0, lo)


def robust_z(values: np.ndarray, weights: np.ndarray | None = None, *, floor_frac: float = 0.0,
             floor_abs: float = 0.0, centre: float | None = None) -> tuple[np.ndarray, float, float]:
    """Modified z-score (Iglewicz & Hoaglin 1993) with a floored scale: ``z_i = 0.6745 (x_i - c) / s`` with
    ``c`` = weighted median (or the given ``centre``), ``s = max(MAD, floor_frac |c|, floor_abs)`` where MAD is the
    weighted median of ``|x_i - c|``. With ``s = 0`` the score is 0 at the centre and +-``Z_CAP`` elsewhere; every
    score is clipped to ``[-Z_CAP, Z_CAP]``. Returns ``(z, c, s)``."""
    x = np.asarray(values, dtype=np.float64)
    c = weighted_median(x, weights) if centre is None else float(centre)
    mad = weighted_median(np.abs(x - c), weights)
    s = max(mad, floor_frac * abs(c), floor_abs)
    dev = x - c
    if s <= 0:
        z = np.where(dev == 0, 0.0, np.copysign(Z_CAP, dev))
    else:
        z = np.clip(_C * dev / s, -Z_CAP, Z_CAP)
    return z, c, s


def _trust(trust: np.ndarray | None, n: int) -> np.ndarray:
    if trust is None:
        return np.ones(n)
    t = np.asarray(trust, dtype=np.float64).reshape(-1)
    if t.shape != (n,):
        raise ValueError(f"trust must have shape ({n},), got {t.shape}")
    if not np.isfinite(t).all():
        raise ValueError("trust contains NaN or infinite values")
    return np.clip(t, 0.0, 1.0)


def _sketches(sketches: np.ndarray, n: int | None = None) -> np.ndarray:
    s = np.asarray(sketches, dtype=np.float64)
    if s.ndim != 2 or (n is not None and s.shape[0] != n):
        raise ValueError(f"sketches must have shape ({n if n is not None else 'n'}, k), got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("sketches contain NaN or infinite values")
    return s


def _norms(norms: np.ndarray) -> np.ndarray:
    v = np.asarray(norms, dtype=np.float64).reshape(-1)
    if not np.isfinite(v).all() or (v < 0).any():
        raise ValueError("norms must be finite and non-negative")
    return v


# --------------------------------------------------------------------------- #
# Sybil groups: the dedupe every centre uses, and the collusion detector (a)
# --------------------------------------------------------------------------- #

#: cosine above which two sketches are near-copies (honest pairs measured: <= 0.61, round 1; <= 0.21 afterwards)
SYBIL_COS = 0.99


def sybil_groups(sketches: np.ndarray, norms: np.ndarray | None = None, cos_min: float = SYBIL_COS) -> np.ndarray:
    """Group label per member (int64 ``(n,)``, the lowest member index of its group): connected components of the
    graph "cosine of the sketches > ``cos_min``". Zero updates (zero sketch, or zero exact norm) form one group of
    their own: they are identical to each other. A member alone in its group has its own index as label."""
    s = _sketches(sketches)
    n = s.shape[0]
    zero = np.linalg.norm(s, axis=1) == 0
    if norms is not None:
        zero |= _norms(norms) == 0
    adj = cosine_matrix(s) > cos_min
    adj[np.ix_(zero, zero)] = True
    adj[zero, :] &= zero[None, :]
    adj[:, zero] &= zero[:, None]
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return int(i)

    for i, j in zip(*np.nonzero(np.triu(adj, 1))):  # union-find; the root is the lowest index
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    labels = np.array([root(i) for i in range(n)], dtype=np.int64)
    return labels


#: soft grouping: pairs above CLUSTER_COS_LOW start sharing their weight, fully from CLUSTER_COS_HIGH on (honest
#: pairs measured <= 0.61, in round 1 where every update points the same way, <= 0.21 afterwards)
CLUSTER_COS_LOW = 0.7
CLUSTER_COS_HIGH = 0.9


def _kernel(cos: np.ndarray, low: float = CLUSTER_COS_LOW, high: float = CLUSTER_COS_HIGH) -> np.ndarray:
    kern = np.clip((cos - low) / (high - low), 0.0, 1.0)
    np.fill_diagonal(kern, 0.0)
    return kern


def density(sketches: np.ndarray, low: float = CLUSTER_COS_LOW, high: float = CLUSTER_COS_HIGH) -> np.ndarray:
    """How many members each member stands for: ``1 + sum_{j != i} K(cos(x_i, x_j))`` with the ramp
    ``K(c) = clip((c - low) / (high - low), 0, 1)``, 0.7 -> 0.9 (float64 ``(n,)``). A member unlike everyone else
    has 1; a member of a group of ``g`` members at cosine >= 0.9 has ``g``. Used to split one vote between members
    that point the same way. Assumes honest updates are dissimilar (non-IID: measured <= 0.61); on a task where
    honest updates agree at cosine > 0.7, it would discount the honest consensus too (raise ``low``/``high``)."""
    return 1.0 + _kernel(cosine_matrix(_sketches(sketches)), low, high).sum(axis=1)


def _distinct(labels: np.ndarray, trust: np.ndarray, sketches: np.ndarray | None = None,
              low: float = CLUSTER_COS_LOW) -> tuple[np.ndarray, np.ndarray]:
    """``(representatives, weights)`` for every centre: one member index per Sybil group (its label, the lowest
    index), weighted by the group's mean trust divided by the representative's :func:`density` among the
    representatives (when ``sketches`` are given): a group counts as one member however large, and members that are
    merely similar (cosine from ``low`` = 0.7 up, fully from 0.9) share one vote between them."""
    reps = np.unique(labels)
    w = np.array([trust[labels == r].mean() for r in reps])
    if sketches is not None and reps.size > 1:
        w = w / density(np.asarray(sketches)[reps], low)
    return reps, w


def sybil(sketches: np.ndarray, norms: np.ndarray | None = None, cos_min: float = SYBIL_COS) -> DetectorResult:
    """Collusion (a): near-identical members (Sybils). Douceur, "The Sybil Attack", IPTPS 2002, for the threat;
    the test is cosine > ``cos_min`` (0.99) between sketches (:func:`sybil_groups`).

    **Every** member of a group of two or more is flagged, strong (rejected on its own): not "all but the lowest
    index". Which copy arrives first is up to the attacker, so keeping one would give every Sybil group a free
    member, and honest non-IID updates are never near-identical (measured above), so the rule costs the honest
    nothing. Score = size of the member's group (1 = alone). ``info``: ``groups`` (number of groups of >= 2) and
    ``largest``.
    """
    labels = sybil_groups(sketches, norms, cos_min)
    sizes = np.bincount(labels, minlength=labels.size)[labels].astype(np.float64)
    flagged = sizes >= 2
    groups = int((np.bincount(labels) >= 2).sum())
    return _result(sizes, flagged, flagged, {"groups": groups, "largest": int(sizes.max()) if sizes.size else 0})


# --------------------------------------------------------------------------- #
# magnitude
# --------------------------------------------------------------------------- #


def magnitude(norms: np.ndarray, sketches: np.ndarray | None = None, *, labels: np.ndarray | None = None,
              trust: np.ndarray | None = None, z_threshold: float = 3.5, floor_frac: float = 0.4,
              strong_ratio: float = 5.0) -> DetectorResult:
    """Magnitude: one-sided modified z-score of the L2 norm (Iglewicz & Hoaglin, "How to Detect and Handle
    Outliers", 1993, Sec. 3.3: ``M_i = 0.6745 (x_i - median) / MAD``, outlier when ``M_i > 3.5``).

    * Centre and MAD over the **distinct** members (Sybil groups count once, with the group's median norm), weighted
      by trust: identical colluders can neither shift the centre nor make MAD = 0.
    * The scale is ``max(MAD, floor_frac * median)``: with ``floor_frac = 0.4`` a member is flagged only above
      ``(1 + 3.5 * 0.4 / 0.6745) = 3.08`` times the median norm, whatever the other members send. On 1,200 honest
      Fashion-MNIST updates MAD/median was 0.06-0.23 per window, so the floor always decides; honest norms reached
      up to 6.8x the window's median in rare spikes: 0.33 % of honest updates are above 3.08x (0.6 % above 2.56x,
      the cut of a 0.3 floor); see docs/detection.md.
    * **One-sided**: only large norms are flagged. A small update cannot dominate an average (its pull is bounded by
      its norm); flagging small norms too rejected about 5 % of honest members (small shards, converged devices),
      and it is the side an attacker can push: members at tiny norms make every honest one look large, which the
      floor and the Sybil grouping bound.
    * ``strong``: norm > ``strong_ratio`` (5) times the centre *and* flagged: rejects on its own (the 10x model
      replacement of Bagdasaryan et al.).

    Fewer than 3 distinct members: nothing is flagged (no spread to compare with). Scores are the z-scores.
    """
    x = _norms(norms)
    n = x.size
    if n == 0:
        return _empty(0)
    if labels is None:
        labels = sybil_groups(sketches, x) if sketches is not None else np.arange(n)
    t = _trust(trust, n)
    reps, w = _distinct(labels, t, sketches)
    rep_norms = np.array([np.median(x[labels == r]) for r in reps])
    if reps.size < 3:
        return _empty(n, {"distinct": int(reps.size), "centre": float(np.median(rep_norms))})
    _, c, s = robust_z(rep_norms, w, floor_frac=floor_frac)
    z, _, _ = robust_z(x, centre=c, floor_abs=s) if s > 0 else robust_z(x, centre=c)
    flagged = z > z_threshold
    strong = flagged & (x > strong_ratio * c)
    return _result(z, flagged, strong, {"distinct": int(reps.size), "centre": c, "scale": s,
                                        "cut": c + z_threshold * s / _C})


# --------------------------------------------------------------------------- #
# direction
# --------------------------------------------------------------------------- #


def direction(sketches: np.ndarray, previous_global: np.ndarray | None = None, *, labels: np.ndarray | None = None,
              trust: np.ndarray | None = None, z_threshold: float = 3.5, floor_abs: float = 0.05,
              cos_abs: float = -0.2, pairwise_abs: float = -0.1, core_min: float = -0.1, previous_abs: float = -0.5,
              strong_cos: float = -0.3, strong_pairwise: float = -0.2) -> DetectorResult:
    """Direction: how each member's direction agrees with the other members', and with the previous global update.

    Two scores per member, over the distinct members (Sybil groups once) weighted by trust / :func:`density`:

    1. **pairwise**: the weighted median of its cosines to the other members. A 1-D weighted median cannot be moved
       by a group holding less than half the weight, however coherent the group is. Measured on 1,200 honest
       Fashion-MNIST updates (windows of 10): honest -0.04 to 0.56 (median 0.03; non-IID updates are nearly
       orthogonal to each other), an update along minus the honest mean -0.74 to -0.15.
    2. **centre**: the cosine to a robust centre of the others: the coordinate-wise median (Yin et al., ICML 2018,
       Def. 1) of the unit sketches of the *core* members (pairwise score >= ``core_min``, -0.1; when those hold
       less than half the weight, the window is *contested* and the core is the members whose pairwise score is at
       least the weighted median's), leaving out the member's own group. The core keeps a coherent minority group
       out of the centre: a coordinate median of few, nearly orthogonal honest vectors is mostly noise, and a tight
       group holding even a third of the weight sits in the middle of most coordinates and would become the centre.
       A contested core is still a weighted majority and still leaves out the members that disagree most: when it
       was all members, one trusted update along minus the honest mean in a window of five (the live IPM test)
       pulled every honest pairwise score below -0.1, joined the centre and put the honest centre cosines at -0.41,
       under ``strong_cos``. Leaving the member out matters too: with itself included, a sign-flipped honest update
       scored 0.22 (honest 0.30). Measured: honest -0.11 to 0.43 (median 0.04), minus the honest mean about -0.6.

    A member votes when its centre cosine has modified z < ``-z_threshold`` (scale floored at ``floor_abs`` = 0.05,
    above the ~0.03 hashing noise of a cosine at k = 1024) or is below ``cos_abs`` (-0.2), when its pairwise score
    is below ``pairwise_abs`` (-0.1), or when its cosine to the previous global update is below ``previous_abs``
    (-0.5: it undoes the last step; honest members measured -0.16 to 0.38, since an honest update is almost
    orthogonal to the last aggregate here, so this reference only catches blunt reversal and is never a centre).
    ``strong`` (rejects alone): centre cosine < ``strong_cos`` (-0.3), pairwise < ``strong_pairwise`` (-0.2), or the
    reversal. Sign-flipping an honest update is nearly invisible (pairwise median -0.03, honest +0.03): the update
    was almost orthogonal to the consensus to begin with.

    Fewer than 3 distinct members: no votes (scores still reported). Scores: the centre cosines; ``extra``:
    ``pairwise``, ``cos_previous`` (NaN when not given) and ``z``; ``info["contested"]``: the core held less than
    half the weight.
    """
    s = _sketches(sketches)
    n = s.shape[0]
    if n == 0:
        return _empty(0)
    if labels is None:
        labels = sybil_groups(s)
    t = _trust(trust, n)
    reps, tw = _distinct(labels, t)
    m = reps.size
    u = unit_rows(s[reps])
    cos = cosine_matrix(s[reps])
    kern = _kernel(cos)
    w = tw / (1.0 + kern.sum(axis=1))
    pair = np.zeros(m)
    for j in range(m):
        others = np.arange(m) != j
        if others.any():
            dens = 1.0 + kern[np.ix_(others, others)].sum(axis=1)  # whom each other member stands for, without j
            pair[j] = weighted_median(cos[j, others], tw[others] / dens)
    core = pair >= core_min
    contested = bool(w[core].sum() < 0.5 * w.sum())
    if contested:  # the members at or above the weighted median pairwise score: still a weighted majority
        core = pair >= weighted_median(pair, w)
    cos_rep = np.zeros(m)
    for j in range(m):
        others = core & (np.arange(m) != j)
        if others.any():
            dens = 1.0 + kern[np.ix_(others, others)].sum(axis=1)  # density without the member left out
            cos_rep[j] = cosine_to(u[j:j + 1], coordinate_median(u[others], tw[others] / dens))[0]
    index = {int(r): j for j, r in enumerate(reps)}
    pos = np.array([index[int(label)] for label in labels])
    zero = np.linalg.norm(s, axis=1) == 0
    cos_c = np.where(zero, 0.0, cos_rep[pos])
    pw = np.where(zero, 0.0, pair[pos])
    cos_p = np.full(n, np.nan) if previous_global is None else cosine_to(s, np.asarray(previous_global))
    extra = {"cos_previous": cos_p, "pairwise": pw}
    if m < 3:
        extra["z"] = np.zeros(n)
        return _result(cos_c, np.zeros(n, dtype=bool), info={"distinct": int(m)}, extra=extra)
    _, med, sc = robust_z(cos_rep, w, floor_abs=floor_abs)
    z = np.clip(_C * (cos_c - med) / sc, -Z_CAP, Z_CAP)
    extra["z"] = z
    reversal = np.nan_to_num(cos_p, nan=1.0) < previous_abs
    flagged = (z < -z_threshold) | (cos_c < cos_abs) | (pw < pairwise_abs) | reversal
    strong = reversal | (cos_c < strong_cos) | (pw < strong_pairwise)
    info = {"distinct": int(m), "median_cos": med, "scale": sc, "core": int(core.sum()), "contested": contested}
    return _result(cos_c, flagged, strong, info, extra)


#: the calibration of the direction thresholds (:func:`angle_scale`), measured (docs/detection.md, "Other tasks and
#: small windows"): on Fashion-MNIST, where the thresholds were set, the 10th percentile of the cosine between two
#: honest members is about -0.03, and at most -0.075 with 20 % label or sign flippers among the pairs; on digits about
#: -0.2, on the synthetic task -0.1 to -0.15
ANGLE_REFERENCE = 0.09
ANGLE_QUANTILE = 0.1
ANGLE_MAX_SCALE = 3.0
ANGLE_MIN_PAIRS = 30
ANGLE_BASELINE_SIZE = 500
#: no scaled direction threshold goes below this cosine (the reversal test, -0.5, would otherwise vanish at scale 2)
ANGLE_LOWEST = -0.9


def angle_scale(baseline: Sequence[float] | np.ndarray | None, reference: float = ANGLE_REFERENCE,
                quantile: float = ANGLE_QUANTILE, max_scale: float = ANGLE_MAX_SCALE,
                min_pairs: int = ANGLE_MIN_PAIRS) -> float:
    """How much wider than on Fashion-MNIST the deployment's honest angles are: the factor the direction thresholds
    (all cosines below 0) are multiplied by.

    ``baseline``: recent cosines between two members of a window that were not rejected (:func:`member_cosines`,
    over past windows). With ``nu = -quantile_q(baseline)`` (q = 0.1: how far below 0 the lower tail of the
    deployment's honest cosines reaches; a quantile, Hyndman & Fan 1996 type 7, numpy's default),

        scale = clip(nu / reference, 1, max_scale),

    and 1 while the baseline holds fewer than ``min_pairs`` cosines. Never below 1: a deployment whose honest updates
    agree more than Fashion-MNIST's keeps the measured thresholds, and on Fashion-MNIST itself (nu <= 0.075 measured,
    also under label and sign flipping) nothing changes. Never above ``max_scale``: attackers whose updates are not
    rejected are in the baseline and can widen it; at the cap the direction detector still rejects an update along
    minus the honest mean (pairwise cosine -0.6 to -0.75 on Fashion-MNIST, strong threshold -0.2 x 3 = -0.6; tested).
    """
    b = np.asarray([] if baseline is None else baseline, dtype=np.float64).reshape(-1)
    b = b[np.isfinite(b)]
    if b.size < max(1, min_pairs):
        return 1.0
    nu = -float(np.quantile(b, quantile))
    return float(np.clip(nu / reference, 1.0, max_scale))


def scaled_threshold(threshold: float, scale: float, lowest: float = ANGLE_LOWEST) -> float:
    """A negative cosine threshold widened by ``scale`` (:func:`angle_scale`), never below ``lowest``."""
    return max(threshold * scale, min(threshold, lowest))


def member_cosines(sketches: np.ndarray, keep: np.ndarray, labels: np.ndarray | None = None) -> list[float]:
    """The sketch cosines between every two kept members (``keep``: ``(n,)`` booleans) of different Sybil groups
    (``labels``, :func:`sybil_groups`): what one window adds to the baseline of :func:`angle_scale`. Copies of one
    update are one member, so a Sybil group adds nothing among itself."""
    s = _sketches(sketches)
    keep = np.asarray(keep, dtype=bool).reshape(-1)
    if keep.shape != (s.shape[0],):
        raise ValueError(f"keep must have {s.shape[0]} entries, got {keep.shape}")
    if labels is None:
        labels = sybil_groups(s)
    idx = np.flatnonzero(keep)
    if idx.size < 2:
        return []
    cos = cosine_matrix(s[idx])
    i, j = np.triu_indices(idx.size, 1)
    distinct = labels[idx][i] != labels[idx][j]
    return [float(c) for c in cos[i, j][distinct]]


def extended_baseline(baseline: Sequence[float], new: Sequence[float],
                      size: int = ANGLE_BASELINE_SIZE) -> list[float]:
    """The baseline after one window: the last ``size`` of ``baseline + new`` (oldest first), the new cosines rounded
    to 6 decimals (what the window stage stores as JSON; the simulation keeps the same values)."""
    out = [float(x) for x in baseline] + [round(float(x), 6) for x in new]
    return out[-size:] if size > 0 else []


def concentration(sketches: np.ndarray, *, labels: np.ndarray | None = None, low: float = CLUSTER_COS_LOW,
                  min_density: float = 1.5, margin: float = 0.5) -> DetectorResult:
    """Collusion (a'): members that are similar without being copies. Score = :func:`density` among the distinct
    members (Sybil groups once): ``1 + sum_j K(cos)``, ``K`` ramping from cosine 0.7 to 0.99. Vote when density >=
    ``min_density`` (1.5: one other member at cosine >= 0.85, or several a bit lower) **and** it exceeds the window's
    median density by ``margin`` (0.5): in a window where every update points the same way (round 1, or an IID
    task) nobody stands out and nobody is flagged. Honest non-IID pairs never reach 0.7 (measured <= 0.61), so this
    is the cosine-space analogue of FoolsGold's "Sybils resemble each other more than honest clients do" within one
    window (Fung et al., RAID 2020). Members of a Sybil group get their representative's density."""
    s = _sketches(sketches)
    n = s.shape[0]
    if n == 0:
        return _empty(0)
    if labels is None:
        labels = sybil_groups(s)
    reps = np.unique(labels)
    if reps.size < 3:
        return _result(np.ones(n), np.zeros(n, dtype=bool), info={"distinct": int(reps.size)})
    dens = density(s[reps], low)
    index = {int(r): j for j, r in enumerate(reps)}
    score = dens[[index[int(label)] for label in labels]]
    med = float(np.median(dens))
    flagged = (score >= min_density) & (score > med + margin)
    return _result(score, flagged, info={"distinct": int(reps.size), "median_density": med})


# --------------------------------------------------------------------------- #
# distance
# --------------------------------------------------------------------------- #


def distance(sketches: np.ndarray, *, labels: np.ndarray | None = None, trust: np.ndarray | None = None,
             f: int | None = None, z_threshold: float = 3.5, floor_frac: float = 1.0) -> DetectorResult:
    """Distance: Krum score (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
    Descent", NeurIPS 2017, Sec. 4: ``s(i) = sum of ||x_i - x_j||^2 over the n - f - 2 nearest``), computed on the
    sketches of the distinct members (a Sybil group is one point, so copies cannot make each other's score 0 and
    everyone else's large), ``f = floor((m - 3) / 2)`` for ``m`` distinct members (the largest ``f`` Krum allows)
    unless given; members of a group get their representative's score.

    Vote: modified z of the score > ``z_threshold`` (upper tail only: being central is never suspicious), trust-
    weighted centre, scale floored at ``floor_frac`` (1.0) of the median score. Krum scores are squared distances,
    so a member at twice the typical distance scores ~4x the median; the floor puts the cut at ``1 + 3.5 / 0.6745
    = 6.2`` times the median score (about 2.5x the typical distance). With a floor of 0.5 (cut 3.6x) it voted
    against 0.8 % of honest updates, mostly honest norm spikes the magnitude detector already sees.
    Fewer than 3 distinct members: no votes. Scores: the z-scores; ``extra``:
    ``krum`` (the raw scores).
    """
    s = _sketches(sketches)
    n = s.shape[0]
    if n == 0:
        return _empty(0)
    if labels is None:
        labels = sybil_groups(s)
    t = _trust(trust, n)
    reps, w = _distinct(labels, t, s)
    m = reps.size
    ff = max(0, (m - 3) // 2) if f is None else int(f)
    rep_scores = krum_scores(pairwise_sq_distances(s[reps]), ff)
    index = {int(r): i for i, r in enumerate(reps)}
    scores = rep_scores[[index[int(label)] for label in labels]]
    if m < 3:
        return _result(np.zeros(n), np.zeros(n, dtype=bool), info={"distinct": int(m), "f": ff},
                       extra={"krum": scores})
    _, c, sc = robust_z(rep_scores, w, floor_frac=floor_frac)
    z = np.clip(_C * (scores - c) / sc, -Z_CAP, Z_CAP) if sc > 0 else np.zeros(n)
    return _result(z, z > z_threshold, info={"distinct": int(m), "f": ff, "centre": c, "scale": sc},
                   extra={"krum": scores})


# --------------------------------------------------------------------------- #
# behaviour on the server's clean data (Zeno)
# --------------------------------------------------------------------------- #

def behaviour(losses: Sequence[float | None] | np.ndarray, base_loss: float | None = None, *,
              labels: np.ndarray | None = None, trust: np.ndarray | None = None, ratio: float = 2.5,
              strong_ratio: float = 4.0) -> DetectorResult:
    """Behaviour: what one update alone does to the model on the server's clean data. Zeno's stochastic descendant
    score (Xie, Koyejo & Gupta, "Zeno: Distributed Stochastic Gradient Descent with Suspicion-based
    Fault-tolerance", ICML 2019, Def. 1: ``Score(u, x) = f_r(x) - f_r(x - gamma u) - rho ||u||^2``, ``f_r`` the
    loss on a batch the server holds), with the update applied as sent (``x - gamma u = w + delta_i``) and
    ``rho = 0`` (size is the magnitude detector's), judged against the window's other members instead of Zeno's
    "keep the m - b best" (the number b of Byzantine members is unknown):

        L_i = f_r(w + delta_i)        mean cross-entropy on the server's clean rows (fedguard/tasks/server_data.py)
        r_i = L_i / median_j L_j      weighted median over the distinct members (Sybil groups once), trust-weighted

    vote when ``r_i > ratio`` (2.5), strong (rejects alone) when ``r_i > strong_ratio`` (4). One-sided: a member
    that lowers the loss more than the others is what training is for. Why a ratio to the window and not
    ``L_i - L(w)``: one honest non-IID update applied alone *raises* the loss on balanced data (5 local epochs on a
    skewed shard; measured on Fashion-MNIST after round 1: L_i / L(w) 1.6 at the median, up to 4.6), by an amount
    that depends on the task and the stage of training, while the ratio to the window's median member is a
    property of one member among its peers: honest members measured up to 2.4 x the median, sign-flipped (x4)
    updates 1.9 at the lowest and 3.6 at the 5th percentile, label-flipped and Gaussian ones 60-500 (docs/detection.md).
    An attacker can push its own L_i down (train on balanced data) but not the honest members' up; moving the median
    needs more than half of the window's distinct, trusted weight (as for every centre here).

    ``losses`` ``(n,)``: ``L_i``, ``None`` / NaN where the validator could not measure it (the base version's
    weights were not readable): such a member gets no vote and is not in the median. ``base_loss``: ``L(w)``,
    reported only (``extra["lift"] = L_i / L(w)``). Fewer than 3 distinct measured members: no votes. Scores: ``r_i``
    (0 where not measured).
    """
    v = np.array([np.nan if x is None else float(x) for x in np.asarray(losses, dtype=object).reshape(-1)])
    n = v.size
    if n == 0:
        return _empty(0)
    if (v[np.isfinite(v)] < 0).any():
        raise ValueError("losses must be non-negative (cross-entropies)")
    v = np.where(np.isinf(v), np.finfo(np.float64).max, v)  # an infinite loss is measured, and the worst
    known = np.isfinite(v)
    if labels is None:
        labels = np.arange(n)
    t = _trust(trust, n)
    lift = np.full(n, np.nan)
    if base_loss is not None and math.isfinite(base_loss) and base_loss > 0:
        lift = np.where(known, v / base_loss, np.nan)
    reps = np.array([r for r in np.unique(labels) if known[labels == r].any()], dtype=np.int64)
    info: dict[str, Any] = {"measured": int(known.sum()), "distinct": int(reps.size), "base_loss": base_loss}
    if reps.size < 3:
        return _result(np.zeros(n), np.zeros(n, dtype=bool), info=info, extra={"lift": lift})
    rep_loss = np.array([np.median(v[(labels == r) & known]) for r in reps])
    w = np.array([t[labels == r].mean() for r in reps])
    centre = weighted_median(rep_loss, w)
    r = np.where(known, v / max(centre, 1e-12), 0.0)
    r = np.minimum(r, Z_CAP)
    flagged = known & (r > ratio)
    return _result(r, flagged, flagged & (r > strong_ratio), {**info, "centre": centre, "cut": ratio * centre},
                   {"lift": lift})


# --------------------------------------------------------------------------- #
# collusion (b): FLAME's clustering
# --------------------------------------------------------------------------- #


_HDBSCAN: Any = None


def load_clustering() -> Any:
    """``sklearn.cluster.HDBSCAN``, imported once. sklearn (with scipy) takes 1-2 s of CPU to import, so a worker
    calls this when it starts: imported at the first window instead, it stalled validation for that long."""
    global _HDBSCAN
    if _HDBSCAN is None:
        from sklearn.cluster import HDBSCAN
        _HDBSCAN = HDBSCAN
    return _HDBSCAN


def flame_outliers(sketches: np.ndarray, *, labels: np.ndarray | None = None,
                   min_cluster_size: int | None = None) -> DetectorResult:
    """Collusion (b): FLAME's filtering step (Nguyen et al., "FLAME: Taming Backdoors in Federated Learning",
    USENIX Security 2022, Sec. 4.2 / Algorithm 1, lines 3-9): HDBSCAN on the pairwise cosine distances
    ``1 - cos(x_i, x_j)`` with minimum cluster size ``floor(m/2) + 1``; members outside the (single, majority)
    cluster are outliers. ``sklearn.cluster.HDBSCAN(metric="precomputed", min_samples=1,
    allow_single_cluster=True)``, as in ``aggregator.rules.flame``.

    Runs on the **distinct** members (a Sybil group is one point), so identical copies cannot form the majority
    cluster and push the honest out; members of a group share their representative's label. Fewer than 3 distinct
    members: no votes. Scores: 1 for an outlier, 0 otherwise.
    """
    s = _sketches(sketches)
    n = s.shape[0]
    if n == 0:
        return _empty(0)
    if labels is None:
        labels = sybil_groups(s)
    reps = np.unique(labels)
    m = reps.size
    if m < 3:
        return _empty(n, {"distinct": int(m)})
    HDBSCAN = load_clustering()
    mcs = m // 2 + 1 if min_cluster_size is None else int(min_cluster_size)
    dist = np.clip(1.0 - cosine_matrix(s[reps]), 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    hl = np.asarray(HDBSCAN(min_cluster_size=mcs, min_samples=1, metric="precomputed", allow_single_cluster=True,
                            copy=True).fit(dist).labels_)
    clustered = hl[hl >= 0]
    if clustered.size == 0:
        out_rep = np.ones(m, dtype=bool)
    else:
        out_rep = hl != np.bincount(clustered).argmax()
    index = {int(r): i for i, r in enumerate(reps)}
    outlier = np.array([out_rep[index[int(label)]] for label in labels])
    return _result(outlier.astype(np.float64), outlier,
                   info={"distinct": int(m), "min_cluster_size": mcs, "no_cluster": bool(clustered.size == 0),
                         "outliers": int(outlier.sum())})


# --------------------------------------------------------------------------- #
# per-device history
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class DeviceHistory:
    """Per-device state across rounds, in sketch space: ``sum`` of the device's sketches (float64 ``(k,)``),
    ``count`` of them, and ``sq_sum`` = sum of their squared sketch norms (for the self-consistency
    ``||sum||^2 / sq_sum``). Linear: the sum of sketches is the sketch of the sum of updates."""

    sum: np.ndarray
    count: int
    sq_sum: float = 0.0

    def __post_init__(self) -> None:
        a = np.array(self.sum, dtype=np.float64).reshape(-1)
        if not np.isfinite(a).all():
            raise ValueError("DeviceHistory.sum contains NaN or infinite values")
        if isinstance(self.count, bool) or int(self.count) != self.count or self.count < 0:
            raise ValueError(f"DeviceHistory.count must be a non-negative int, got {self.count!r}")
        if not (math.isfinite(self.sq_sum) and self.sq_sum >= 0):
            raise ValueError("DeviceHistory.sq_sum must be finite and non-negative")
        a.setflags(write=False)
        object.__setattr__(self, "sum", a)
        object.__setattr__(self, "count", int(self.count))
        object.__setattr__(self, "sq_sum", float(self.sq_sum))

    @classmethod
    def empty(cls, k: int) -> "DeviceHistory":
        return cls(np.zeros(k), 0, 0.0)

    def to_json(self) -> str:
        """JSON text: ``{"v": 1, "count": int, "sq_sum": float, "sum": base64 little-endian float64}``."""
        import base64

        return json.dumps({"v": 1, "count": self.count, "sq_sum": self.sq_sum,
                           "sum": base64.b64encode(self.sum.astype("<f8").tobytes()).decode("ascii")},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, k: int | None = None) -> "DeviceHistory":
        """Strict inverse of :meth:`to_json`; ``k``, when given, must match the stored length."""
        import base64
        import binascii

        try:
            obj = json.loads(text)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"DeviceHistory: not JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("v") != 1 or set(obj) != {"v", "count", "sq_sum", "sum"}:
            raise ValueError("DeviceHistory: expected keys v=1, count, sq_sum, sum")
        if not isinstance(obj["count"], int) or isinstance(obj["count"], bool):
            raise ValueError("DeviceHistory: count must be an int")
        if not isinstance(obj["sq_sum"], (int, float)) or isinstance(obj["sq_sum"], bool):
            raise ValueError("DeviceHistory: sq_sum must be a number")
        try:
            raw = base64.b64decode(str(obj["sum"]).encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise ValueError(f"DeviceHistory: sum is not base64: {exc}") from None
        if len(raw) % 8 or not raw:
            raise ValueError("DeviceHistory: sum has a bad length")
        a = np.frombuffer(raw, dtype="<f8").astype(np.float64)
        if k is not None and a.size != k:
            raise ValueError(f"DeviceHistory: sum has {a.size} entries, expected {k}")
        return cls(a, obj["count"], float(obj["sq_sum"]))


def updated(hist: DeviceHistory | None, sketch: np.ndarray) -> DeviceHistory:
    """The history after one more update with this sketch (``None`` = a device never seen)."""
    s = np.asarray(sketch, dtype=np.float64).reshape(-1)
    if not np.isfinite(s).all():
        raise ValueError("sketch contains NaN or infinite values")
    if hist is None:
        return DeviceHistory(s.copy(), 1, float(s @ s))
    if hist.sum.shape != s.shape:
        raise ValueError(f"sketch has {s.size} entries, history {hist.sum.size}")
    return DeviceHistory(hist.sum + s, hist.count + 1, hist.sq_sum + float(s @ s))


def foolsgold(history_sums: np.ndarray, kappa: float = 1.0) -> np.ndarray:
    """Collusion (c): FoolsGold (Fung, Yoon & Beschastnikh, "The Limitations of Federated Learning in Sybil
    Settings", RAID 2020, Algorithm 1) on the members' historical sketch sums ``H`` ``(n, k)``:

    1. ``cs_ij = cos(H_i, H_j)`` for ``i != j``; ``v_i = max_j cs_ij``;
    2. pardoning: ``cs_ij *= v_i / v_j`` when ``v_j > v_i`` (an honest member that merely resembles a Sybil is not
       punished as hard as the Sybils, who resemble each other most);
    3. ``alpha_i = 1 - max_j cs_ij``, clipped to [0, 1], then divided by ``max_i alpha_i``;
    4. logit with confidence ``kappa``: ``alpha_i = kappa (ln(alpha_i / (1 - alpha_i)) + 0.5)`` clipped to [0, 1]
       (``alpha_i = 1`` stays 1, as ``0.99`` in the authors' code; ``alpha_i = 0`` stays 0).

    Returns alpha float64 ``(n,)`` in [0, 1]: low alpha = a history too similar to another member's (colluders
    pushing the same objective every round). With ``n < 2`` everyone gets 1. A zero history is similar to nothing.
    """
    h = _sketches(history_sums)
    n = h.shape[0]
    if n < 2:
        return np.ones(n)
    cs = cosine_matrix(h)
    np.fill_diagonal(cs, -np.inf)
    v = cs.max(axis=1)
    pardon = v[None, :] > v[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(v[None, :] > 0, v[:, None] / v[None, :], 1.0)
    cs = np.where(pardon & (v[:, None] > 0), cs * ratio, cs)
    np.fill_diagonal(cs, -np.inf)
    alpha = np.clip(1.0 - cs.max(axis=1), 0.0, 1.0)
    top = alpha.max()
    if top <= 0:
        return np.zeros(n)
    alpha = alpha / top
    alpha = np.where(alpha >= 1.0, 0.99, alpha)
    with np.errstate(divide="ignore"):
        logit = kappa * (np.log(alpha / (1.0 - alpha)) + 0.5)
    return np.clip(np.nan_to_num(logit, nan=0.0, neginf=0.0, posinf=1.0), 0.0, 1.0)


def history(histories: Sequence[DeviceHistory], *, trust: np.ndarray | None = None, min_count: int = 3,
            z_threshold: float = 3.5, floor_abs: float = 0.1) -> DetectorResult:
    """Per-device consistency across rounds, in the spirit of FLDetector (Zhang et al., KDD 2022: a device whose
    updates are inconsistent with its own history) and of FoolsGold's premise (a hidden objective is pushed every
    round), on the histories *including* this window's update (see :func:`updated`).

    Score = share of the device's cumulative sketch ``H_i`` the fleet does not have:
    ``r_i = 1 - cos(H_i, F)^2`` where ``F`` is the trust-weighted coordinate-wise median of the members' unit
    cumulative sketches (the fleet's cumulative direction as this window sees it). Vote: modified z of ``r_i`` over
    members with ``count >= min_count`` (3) > ``z_threshold``, scale floored at ``floor_abs`` (0.1).
    ``extra["consistency"]``: ``(||H_i||^2 / sq_sum_i - 1) / (count_i - 1)``, about the mean pairwise cosine
    between the device's own updates (NaN below 2 rounds).

    What it can and cannot see (measured, docs/detection.md): honest devices are *very* self-consistent on a non-IID
    split (own-update cosine ~0.55, spread 0.2-0.7) and each keeps a large private component, so one drifter adding
    0.3x the median norm along a fixed direction raises its ``r_i`` by far less than the honest spread: a lone slow
    drifter is **not** caught by this score. Colluding drifters are the case FoolsGold (:func:`foolsgold`) is for.
    Devices with fewer than ``min_count`` rounds are never flagged.
    """
    n = len(histories)
    if n == 0:
        return _empty(0)
    h = np.stack([np.asarray(x.sum, dtype=np.float64) for x in histories])
    counts = np.array([x.count for x in histories])
    sq = np.array([x.sq_sum for x in histories])
    with np.errstate(divide="ignore", invalid="ignore"):
        consistency = np.where((counts >= 2) & (sq > 0), ((h * h).sum(1) / np.where(sq > 0, sq, 1) - 1)
                               / np.maximum(counts - 1, 1), np.nan)
    t = _trust(trust, n)
    fleet = coordinate_median(unit_rows(h), t)
    r = 1.0 - cosine_to(h, fleet) ** 2
    eligible = counts >= min_count
    extra = {"consistency": consistency}
    if eligible.sum() < 3:
        return _result(r, np.zeros(n, dtype=bool), info={"eligible": int(eligible.sum())}, extra=extra)
    _, c, s = robust_z(r[eligible], t[eligible], floor_abs=floor_abs)
    z = np.clip(_C * (r - c) / s, -Z_CAP, Z_CAP)
    extra["z"] = z
    flagged = eligible & (z > z_threshold)
    return _result(r, flagged, info={"eligible": int(eligible.sum()), "centre": c, "scale": s}, extra=extra)
