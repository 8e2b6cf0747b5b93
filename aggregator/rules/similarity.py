"""Direction-based rules: FLTrust and FLAME."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._checks import as_param_vector, as_updates, check_finite_stats, check_int, check_real, make_rng
from ._kernels import combine, dots_and_sq_norms, gram
from ._types import AggregateResult, PreconditionError, result, to_list

__all__ = ["flame", "fltrust", "cosine_distances"]


def fltrust(updates: np.ndarray, server_update: Any) -> AggregateResult:
    r"""FLTrust.

    Definition (Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust Federated
    Learning via Trust Bootstrapping", NDSS 2021, Sec. IV): the server
    computes its own update :math:`g_0` on a small clean root data set; then

    .. math::
        TS_i = \mathrm{ReLU}\bigl(\cos(g_i, g_0)\bigr), \qquad
        \bar g_i = \frac{\lVert g_0\rVert}{\lVert g_i\rVert}\, g_i, \qquad
        \mathrm{agg} = \frac{\sum_i TS_i\, \bar g_i}{\sum_j TS_j}

    An update with zero norm gets trust 0.  **When every trust score is 0**
    (all updates orthogonal or opposite to :math:`g_0`) the result is the
    zero vector (no change to the model), ``selected`` is empty and
    ``info["all_zero_trust"]`` is True.

    Preconditions: ``server_update`` of shape ``(d,)``, finite, non-zero.

    ``selected`` = members with positive trust; ``info``: ``trust_scores``,
    ``weights`` (effective coefficients of the raw updates),
    ``server_norm``, ``all_zero_trust``.
    """
    x = as_updates(updates, check_finite=False)
    n, d = x.shape
    g0 = as_param_vector("server_update", server_update, d)
    n0 = float(np.linalg.norm(g0))
    if n0 == 0.0:
        raise PreconditionError("server_update has zero norm: cosine similarity undefined")
    dots, sq = dots_and_sq_norms(x, g0)
    check_finite_stats(sq)
    norms = np.sqrt(sq)
    safe = np.where(norms > 0, norms, 1.0)
    cos = np.where(norms > 0, dots / (safe * n0), 0.0)
    ts = np.maximum(cos, 0.0)
    total = ts.sum()
    base = {"trust_scores": to_list(ts), "server_norm": n0}
    if total <= 0:
        return result(np.zeros(d), [], {**base, "weights": [0.0] * n, "all_zero_trust": True}, "fltrust")
    coef = ts * (n0 / safe) / total
    vec = combine(x, coef)
    return result(vec, np.flatnonzero(ts), {**base, "weights": to_list(coef), "all_zero_trust": False}, "fltrust")


def cosine_distances(updates: np.ndarray) -> np.ndarray:
    """``1 - cos(x_i, x_j)`` (float64 ``(n, n)``, in [0, 2], zero diagonal);
    a zero update is at distance 1 from everything else."""
    x = as_updates(updates, check_finite=False)
    g = gram(x, center=False)
    check_finite_stats(np.diag(g))
    return _cosine_from_gram(g)[0]


def _cosine_from_gram(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    safe = np.where(norms > 0, norms, 1.0)
    cos = g / safe[:, None] / safe[None, :]
    dist = np.clip(1.0 - cos, 0.0, 2.0)
    zero = norms == 0
    dist[zero, :] = 1.0
    dist[:, zero] = 1.0
    np.fill_diagonal(dist, 0.0)
    return dist, norms


def flame(
    updates: np.ndarray,
    noise_lambda: float = 0.001,
    rng: Any = None,
    min_cluster_size: int | None = None,
) -> AggregateResult:
    r"""FLAME (clustering + clipping + noising).

    Definition (Nguyen et al., "FLAME: Taming Backdoors in Federated
    Learning", USENIX Security 2022, Sec. 4 / Algorithm 1):

    1. *Filtering*: HDBSCAN on the pairwise cosine distances
       :math:`1 - \cos(x_i, x_j)` with minimum cluster size
       :math:`\lfloor n/2 \rfloor + 1` (so at most one cluster, holding a
       majority); members labelled noise are rejected.  Implemented with
       ``sklearn.cluster.HDBSCAN(metric="precomputed", min_samples=1,
       allow_single_cluster=True)`` -- ``allow_single_cluster`` is needed,
       otherwise HDBSCAN never returns a cluster larger than ``n/2``.  With a
       smaller custom ``min_cluster_size`` the largest cluster is kept.
    2. *Clipping*: :math:`S = \mathrm{median}_i \lVert x_i\rVert` over **all**
       n updates; each admitted update is scaled by
       :math:`\min(1, S / \lVert x_i\rVert)`.
    3. *Aggregation and noising*: the admitted clipped updates are averaged
       and :math:`\mathcal N(0, (\lambda S)^2 I_d)` is added
       (:math:`\lambda` = ``noise_lambda``; the paper uses 0.001 for image
       classification and 0.01 for NLP).

    If HDBSCAN admits nobody the result is the zero vector (no change, no
    noise), ``selected`` is empty and ``info["no_cluster"]`` is True.

    Preconditions: ``n >= 2``; ``noise_lambda >= 0``;
    ``2 <= min_cluster_size <= n``.

    ``info``: ``clip_norm`` (S), ``noise_std`` (lambda*S), ``labels``
    (HDBSCAN labels, -1 = rejected), ``min_cluster_size``, ``no_cluster``,
    ``weights`` (coefficients of the raw updates, before noise).
    """
    from sklearn.cluster import HDBSCAN  # local import: sklearn is slow to import

    lam = check_real("noise_lambda", noise_lambda, low=0.0)
    gen = make_rng(rng)
    x = as_updates(updates, check_finite=False)
    n, d = x.shape
    if n < 2:
        raise PreconditionError(f"FLAME needs at least 2 updates to cluster, got {n}")
    mcs = n // 2 + 1 if min_cluster_size is None else check_int("min_cluster_size", min_cluster_size, minimum=2)
    if mcs > n:
        raise PreconditionError(f"min_cluster_size ({mcs}) must be <= n ({n})")

    g = gram(x, center=False)
    check_finite_stats(np.diag(g))
    dist, norms = _cosine_from_gram(g)
    labels = HDBSCAN(
        min_cluster_size=mcs,
        min_samples=1,
        metric="precomputed",
        allow_single_cluster=True,
        copy=True,
    ).fit(dist).labels_
    labels = np.asarray(labels, dtype=np.int64)
    clustered = labels[labels >= 0]
    s = float(np.median(norms))
    base = {"clip_norm": s, "labels": to_list(labels), "min_cluster_size": mcs}
    if clustered.size == 0:
        return result(
            np.zeros(d), [], {**base, "noise_std": 0.0, "no_cluster": True, "weights": [0.0] * n}, "flame"
        )
    biggest = np.bincount(clustered).argmax()
    admitted = np.flatnonzero(labels == biggest)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(norms > s, s / np.where(norms > 0, norms, 1.0), 1.0)
    coef = np.zeros(n)
    coef[admitted] = scale[admitted] / admitted.size
    vec = combine(x, coef)
    std = lam * s
    if std > 0:
        vec += gen.normal(0.0, std, size=d)
    info = {**base, "noise_std": std, "no_cluster": False, "weights": to_list(coef)}
    return result(vec, admitted, info, "flame")
