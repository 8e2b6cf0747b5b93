"""Rules that are (clipped, weighted, noised) averages of the updates:
FedAvg, norm clipping, DP-FedAvg's Gaussian mechanism, reputation weighting,
centered clipping and the robust learning rate."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._checks import (
    as_member_vector,
    as_param_vector,
    as_updates,
    check_finite_stats,
    check_int,
    check_real,
    make_rng,
)
from ._kernels import combine, row_distances, sq_norms
from ._types import AggregateResult, PreconditionError, result, to_list

__all__ = ["centered_clipping", "dp_gaussian", "fedavg", "norm_clip", "reputation_weighted", "robust_lr"]


def _clip_scales(norms: np.ndarray, s: float) -> np.ndarray:
    """``min(1, s / ||x_i||)``; a zero-norm update keeps scale 1."""
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(norms > s, s / np.where(norms > 0, norms, 1.0), 1.0)
    return scale


def fedavg(
    updates: np.ndarray,
    sample_counts: Any = None,
    cap: float | None = None,
) -> AggregateResult:
    r"""Federated averaging with capped sample counts.

    Definition (McMahan et al., "Communication-Efficient Learning of Deep
    Networks from Decentralized Data", AISTATS 2017, Algorithm 1, server
    step :math:`w \leftarrow \sum_k \frac{n_k}{n} w_k`):

    .. math::  \mathrm{agg} = \sum_i \frac{\min(c_i, \mathrm{cap})}{\sum_j \min(c_j, \mathrm{cap})}\, x_i

    The counts :math:`c_i` are *reported by the clients*: an attacker can claim
    a huge count to dominate the average, so they are capped at ``cap``
    (``cap=None``: no cap, the paper's rule).  ``sample_counts=None`` gives
    the plain, unweighted mean.  Not robust: one member can move the result
    arbitrarily far.

    Preconditions: counts finite, non-negative, one per update, not all zero
    (after capping); ``cap > 0``.

    ``selected`` = members with a non-zero (capped) count; ``info``:
    ``weights`` (normalised, per member), ``n_capped``.
    """
    x = as_updates(updates, check_finite=False)
    n = x.shape[0]
    if sample_counts is None:
        counts = np.ones(n)
    else:
        counts = as_member_vector("sample_counts", sample_counts, n, nonneg=True)
    n_capped = 0
    if cap is not None:
        cap = check_real("cap", cap, low=0.0, low_open=True)
        n_capped = int((counts > cap).sum())
        counts = np.minimum(counts, cap)
    total = counts.sum()
    if total <= 0:
        raise PreconditionError("all sample counts are zero: nothing to average")
    w = counts / total
    vec = combine(x, w)
    check_finite_stats(vec)
    return result(vec, np.flatnonzero(w), {"weights": to_list(w), "n_capped": n_capped}, "fedavg")


def norm_clip(updates: np.ndarray, max_norm: float | None = None,
              sample_counts: Any = None) -> AggregateResult:
    r"""Norm clipping ("norm thresholding") then averaging.

    Definition (Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor
    Federated Learning?", arXiv:1911.07963, 2019, Sec. 3 "norm thresholding
    of updates", applied to FedAvg's weighted average):

    .. math::  \mathrm{agg} = \sum_i p_i\, x_i \min\Bigl(1, \frac{S}{\lVert x_i\rVert_2}\Bigr),
               \qquad p_i = \frac{c_i}{\sum_j c_j}

    with :math:`S` = ``max_norm`` if given, otherwise the median of the
    updates' L2 norms (an adaptive threshold, as FLAME uses), and
    :math:`c_i` = ``sample_counts`` (all 1 when not given: the plain mean).

    Preconditions: ``max_norm > 0`` when given; ``sample_counts``
    non-negative with a positive sum.

    ``selected`` = all members; ``info``: ``clip_norm`` (S), ``n_clipped``,
    ``weights`` (the effective coefficients ``p_i min(1, S/||x_i||)``).
    """
    x = as_updates(updates, check_finite=False)
    n = x.shape[0]
    norms = np.sqrt(sq_norms(x))
    check_finite_stats(norms)
    if max_norm is None:
        s = float(np.median(norms))
    else:
        s = check_real("max_norm", max_norm, low=0.0, low_open=True)
    if sample_counts is None:
        p = np.full(n, 1.0 / n)
    else:
        c = np.asarray(sample_counts, dtype=np.float64).reshape(-1)
        if c.shape != (n,) or not np.isfinite(c).all() or (c < 0).any() or c.sum() <= 0:
            raise PreconditionError(f"sample_counts must be {n} non-negative numbers with a positive sum")
        p = c / c.sum()
    scale = _clip_scales(norms, s)
    w = scale * p
    vec = combine(x, w)
    info = {"clip_norm": s, "n_clipped": int((scale < 1.0).sum()), "weights": to_list(w)}
    return result(vec, np.arange(n), info, "norm_clip")


#: robust_lr's default threshold as a share of the window: |sum of signs| >= n / 2, i.e. about three quarters of the
#: members agree (8 of 10). The paper's 4 of 10 (0.4) let a slow drift through (6.5% backdoor; 4.3% with 0.5, README)
DEFAULT_AGREEMENT = 0.5


def robust_lr(
    updates: np.ndarray,
    threshold: int | None = None,
    sample_counts: Any = None,
    max_norm: float | None = None,
    clip: bool = True,
    disagreement_rate: float = 0.0,
) -> AggregateResult:
    r"""Robust learning rate: a per-coordinate server learning rate whose
    sign is set by how many members agree on the coordinate's direction.

    Definition (Ozdayi, Kantarcioglu, Gel, "Defending against Backdoors in
    Federated Learning with Robust Learning Rate", AAAI 2021, Sec. 4,
    Eq. (4)-(5), with server learning rate :math:`\eta = 1`):

    .. math::  \eta_{\theta,k} = \begin{cases} 1 & \bigl|\sum_i \mathrm{sgn}(x_{i,k})\bigr| \ge \theta \\
               r & \text{otherwise} \end{cases}
               \qquad \mathrm{agg} = \eta_\theta \odot \bar x

    with :math:`r` = ``disagreement_rate``: -1 in the paper; 0, the default
    here, drops those coordinates instead of reversing them (this project's
    variant: it costs less main accuracy and removes less of a backdoor,
    measured in ``bench/results/eval-robust-lr*``, docs/aggregation.md), and
    where :math:`\bar x` is FedAvg's weighted mean (``clip=False``, the
    paper's rule) or, with ``clip=True``, norm clipping's clipped weighted
    mean (:func:`norm_clip`: Sun et al. 2019, bound ``max_norm`` or the
    median norm). Every member has one vote per coordinate whatever its
    sample count, and :math:`\mathrm{sgn}(0) = 0`. A backdoor lives in
    coordinates the honest members do not agree on; there the step is
    reversed (or dropped), so what a minority pushes is undone rather than
    averaged in.
    The composition with clipping is this project's: sign agreement ignores
    magnitude, clipping bounds it.

    Defaults: ``threshold`` None = :math:`\lceil 0.5\,n \rceil` (a window of
    10 uses 5: 8 of 10 members must agree; one of 5 uses 3: 4 of 5), one
    step stricter than the paper's 4 for 10 agents per round (its runner
    script), measured against a slow drift (bench/results/eval-default);
    ``clip`` on; ``disagreement_rate`` 0.

    Preconditions: ``threshold`` an integer >= 1 and at most the number of
    members (with fewer, every coordinate would be reversed: the whole
    mean negated); ``-1 <= disagreement_rate <= 0``; ``max_norm > 0`` when
    given; ``sample_counts`` as :func:`fedavg`.

    ``selected`` = all members; ``info``: ``threshold``, ``disagreement_rate``,
    ``reversed_fraction`` (share of coordinates given the rate :math:`r`),
    ``weights`` of the mean, and with ``clip`` its ``clip_norm`` and
    ``n_clipped``.
    """
    x = as_updates(updates, check_finite=False)
    n = x.shape[0]
    theta = math.ceil(DEFAULT_AGREEMENT * n) if threshold is None else check_int("threshold", threshold, minimum=1)
    if theta > n:
        raise PreconditionError(f"robust_lr needs at least threshold = {theta} members, got {n}: "
                                "with fewer every coordinate's step would be reversed")
    rate = check_real("disagreement_rate", disagreement_rate, low=-1.0, high=0.0)
    mean = norm_clip(x, max_norm, sample_counts) if clip else fedavg(x, sample_counts)
    votes = np.zeros(x.shape[1])
    for row in x:  # one row at a time: no (n, d) temporary
        votes += np.sign(row)
    agree = np.abs(votes) >= theta
    vec = np.where(agree, mean.vector, rate * mean.vector)
    info = {**mean.info, "threshold": theta, "disagreement_rate": rate,
            "reversed_fraction": float(1.0 - agree.mean())}
    return result(vec, np.arange(n), info, "robust_lr")


def dp_gaussian(
    updates: np.ndarray,
    clip_norm: float,
    noise_multiplier: float,
    rng: Any = None,
) -> AggregateResult:
    r"""DP-FedAvg's Gaussian mechanism with a fixed clipping norm.

    Definition (McMahan, Ramage, Talwar, Zhang, "Learning Differentially
    Private Recurrent Language Models", ICLR 2018, Algorithm 1 with the
    fixed-denominator estimator and uniform weights):

    .. math::  \mathrm{agg} = \frac1n\Bigl(\sum_i x_i \min\bigl(1, \tfrac{S}{\lVert x_i\rVert}\bigr)
               + \mathcal N\bigl(0, (\sigma S)^2 I_d\bigr)\Bigr)

    i.e. the noise on the returned average has standard deviation
    :math:`\sigma S / n` per coordinate.  S = ``clip_norm``, sigma =
    ``noise_multiplier``.  The privacy accounting (epsilon, delta over the
    rounds) is the caller's business; this function only applies the
    mechanism.

    Preconditions: ``clip_norm > 0``, ``noise_multiplier >= 0``; ``rng`` a
    ``numpy.random.Generator``, an int seed (tests only) or None (fresh OS
    entropy, what you want for real privacy).

    ``selected`` = all members; ``info``: ``clip_norm``, ``noise_multiplier``,
    ``noise_std`` (per coordinate, on the returned average, = sigma*S/n),
    ``noise_std_sum`` (sigma*S, on the sum), ``n_clipped``, ``weights``.
    """
    s = check_real("clip_norm", clip_norm, low=0.0, low_open=True)
    sigma = check_real("noise_multiplier", noise_multiplier, low=0.0)
    gen = make_rng(rng)
    x = as_updates(updates, check_finite=False)
    n, d = x.shape
    norms = np.sqrt(sq_norms(x))
    check_finite_stats(norms)
    scale = _clip_scales(norms, s)
    total = combine(x, scale)
    std_sum = sigma * s
    if std_sum > 0:
        total += gen.normal(0.0, std_sum, size=d)
    vec = total / n
    info = {
        "clip_norm": s,
        "noise_multiplier": sigma,
        "noise_std": std_sum / n,
        "noise_std_sum": std_sum,
        "n_clipped": int((scale < 1.0).sum()),
        "weights": to_list(scale / n),
    }
    return result(vec, np.arange(n), info, "dp_gaussian")


def reputation_weighted(updates: np.ndarray, trust_scores: Any) -> AggregateResult:
    r"""Average weighted by externally supplied trust (reputation) scores.

    .. math::  \mathrm{agg} = \sum_i \frac{t_i}{\sum_j t_j} x_i

    The trust scores :math:`t_i \ge 0` come from the reputation store (e.g.
    an exponentially weighted history of detector verdicts); any scale is
    fine, they are normalised here.  Members with zero trust are excluded.
    If every score is 0 the result is the **zero vector** (no change to the
    model), ``selected`` is empty and ``info["all_zero_trust"]`` is True.

    Preconditions: one finite, non-negative score per update.

    ``info``: ``weights`` (normalised), ``all_zero_trust``.
    """
    x = as_updates(updates, check_finite=False)
    n, d = x.shape
    t = as_member_vector("trust_scores", trust_scores, n, nonneg=True)
    total = t.sum()
    if total <= 0:
        return result(np.zeros(d), [], {"weights": [0.0] * n, "all_zero_trust": True}, "reputation_weighted")
    w = t / total
    vec = combine(x, w)
    check_finite_stats(vec)
    return result(vec, np.flatnonzero(w), {"weights": to_list(w), "all_zero_trust": False}, "reputation_weighted")


def centered_clipping(
    updates: np.ndarray,
    center: Any = None,
    tau: float = 1.0,
    iters: int = 1,
) -> AggregateResult:
    r"""Centered clipping (CC).

    Definition (Karimireddy, He, Jaggi, "Learning from History for Byzantine
    Robust Optimization", ICML 2021, Sec. 4, the CC rule), iterated ``L =
    iters`` times from :math:`v_0` = ``center``:

    .. math::  v_{l+1} = v_l + \frac1n \sum_i (x_i - v_l)\,
               \min\Bigl(1, \frac{\tau}{\lVert x_i - v_l\rVert_2}\Bigr)

    The paper starts from the previous round's aggregate (with worker
    momentum), so pass the last aggregate as ``center``; ``center=None``
    starts from the zero vector.

    Preconditions: ``tau > 0``; ``iters >= 1``; ``center`` of shape ``(d,)``.

    ``selected`` = all members; ``info``: ``tau``, ``iters``,
    ``n_clipped`` (per iteration), ``weights`` and ``center_weight``: the
    result equals ``center_weight * center + sum_i weights[i] * x_i``.
    """
    tau = check_real("tau", tau, low=0.0, low_open=True)
    iters = check_int("iters", iters, minimum=1)
    x = as_updates(updates, check_finite=False)
    n, d = x.shape
    v = np.zeros(d) if center is None else as_param_vector("center", center, d).copy()
    a = 1.0  # coefficient of center in v
    c = np.zeros(n)  # coefficients of the updates in v
    n_clipped = []
    for _ in range(iters):
        dist = row_distances(x, v)
        check_finite_stats(dist)
        s = _clip_scales(dist, tau)
        n_clipped.append(int((s < 1.0).sum()))
        # v + mean_i s_i (x_i - v) = (1 - mean(s)) v + sum_i (s_i / n) x_i
        keep = 1.0 - s.sum() / n
        v *= keep
        v += combine(x, s / n)
        a *= keep
        c = keep * c + s / n
    info = {"tau": tau, "iters": iters, "n_clipped": n_clipped, "weights": to_list(c), "center_weight": a}
    return result(v, np.arange(n), info, "centered_clipping")
