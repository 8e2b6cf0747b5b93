"""Distance-based rules: Krum, Multi-Krum, Bulyan and the geometric median.

All of them need only the pairwise geometry of the updates, so they start
from one ``(n, n)`` Gram matrix of the centered updates (block-wise BLAS, see
:func:`aggregator.rules._kernels.gram`) and then work on ``n x n`` numbers;
the ``(n, d)`` array is read once more at the end to form the output.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._checks import as_member_vector, as_updates, check_finite_stats, check_int, check_real
from ._kernels import blockwise, combine, gram, sq_distances_from_gram
from ._types import AggregateResult, PreconditionError, result, to_list

__all__ = [
    "bulyan",
    "bulyan_select",
    "geometric_median",
    "krum",
    "krum_scores",
    "multi_krum",
    "multi_krum_select",
    "pairwise_sq_distances",
]


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def pairwise_sq_distances(updates: np.ndarray) -> np.ndarray:
    """``D[i, j] = ||x_i - x_j||^2`` (float64 ``(n, n)``) via the Gram matrix
    of the centered updates: ``||x||^2 + ||y||^2 - 2<x, y>`` clamped at 0."""
    x = as_updates(updates, check_finite=False)
    g = gram(x, center=True)
    check_finite_stats(np.diag(g))
    return sq_distances_from_gram(g)


def _scores_from_sq_distances(d2: np.ndarray, f: int) -> np.ndarray:
    """Krum scores on a (sub)set of ``m`` members: the sum of the squared
    distances to the ``k = max(1, m - f - 2)`` nearest *other* members
    (``k`` capped at ``m - 1``; a single member scores 0).  The ``max(1, .)``
    is Flower's, and only matters inside Bulyan, where Krum runs on sets
    smaller than ``2f + 3``."""
    m = d2.shape[0]
    if m == 1:
        return np.zeros(1)
    k = min(max(1, m - f - 2), m - 1)
    off = d2.copy()
    np.fill_diagonal(off, np.inf)
    part = np.partition(off, k - 1, axis=1)[:, :k]
    return part.sum(axis=1)


def _check_krum_f(n: int, f: Any) -> int:
    f = check_int("f", f, minimum=0)
    if n <= 2 * f + 2:
        raise PreconditionError(
            f"Krum needs n > 2f + 2 updates (Blanchard et al. 2017): got n = {n}, f = {f}; "
            f"need at least {2 * f + 3} updates or f <= {max((n - 3) // 2, 0) if n >= 3 else 'none'}"
        )
    return f


def krum_scores(updates: np.ndarray, f: int) -> np.ndarray:
    """Krum score of every update (float64 ``(n,)``), see :func:`krum`."""
    x = as_updates(updates, check_finite=False)
    f = _check_krum_f(x.shape[0], f)
    return _scores_from_sq_distances(pairwise_sq_distances(x), f)


def multi_krum_select(updates: np.ndarray, f: int, m: int | None = None) -> np.ndarray:
    """Indices of the ``m`` updates with the lowest Krum scores, best first
    (ties broken by the lower index)."""
    x = as_updates(updates, check_finite=False)
    scores = krum_scores(x, f)
    m = _check_m(x.shape[0], f, m)
    return np.argsort(scores, kind="stable")[:m]


def _check_m(n: int, f: int, m: Any) -> int:
    if m is None:
        return n - f
    m = check_int("m", m, minimum=1)
    if m > n:
        raise PreconditionError(f"m must be <= n: cannot select {m} of {n} updates")
    return m


# --------------------------------------------------------------------------- #
# Krum family
# --------------------------------------------------------------------------- #


def krum(updates: np.ndarray, f: int) -> AggregateResult:
    r"""Krum.

    Definition (Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning
    with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017,
    Sec. 4): the score of update ``i`` is

    .. math::  s(i) = \sum_{i \to j} \lVert x_i - x_j \rVert_2^2

    where :math:`i \to j` ranges over the :math:`n - f - 2` updates closest
    to :math:`x_i` (itself excluded); Krum returns the update with the lowest
    score (ties: lowest index, like ``numpy.argmin`` in Flower).

    Preconditions: :math:`n > 2f + 2` (:math:`n \ge 2f + 3`), ``f >= 0``.

    ``selected`` = ``[argmin]``; ``info``: ``f``, ``scores`` (all n).
    """
    x = as_updates(updates, check_finite=False)
    f = _check_krum_f(x.shape[0], f)
    scores = _scores_from_sq_distances(pairwise_sq_distances(x), f)
    best = int(np.argmin(scores))
    vec = x[best].astype(np.float64)
    return result(vec, [best], {"f": f, "scores": to_list(scores)}, "krum")


def multi_krum(
    updates: np.ndarray,
    f: int,
    m: int | None = None,
    weights: Any = None,
) -> AggregateResult:
    r"""Multi-Krum.

    Definition (Blanchard et al. 2017, Sec. 5 / El Mhamdi et al. 2018): score
    every update once as in :func:`krum`, select the ``m`` updates with the
    lowest scores and return their average.  ``m = 1`` is Krum;
    ``m = None`` means ``m = n - f``.

    ``weights=None`` averages uniformly (the paper).  Flower's
    ``aggregate_krum(..., to_keep=m)`` instead averages the selected updates
    weighted by their ``num_examples``; pass those counts as ``weights`` to
    get Flower's result.

    Preconditions: :math:`n > 2f + 2`; ``1 <= m <= n``; ``weights`` (if
    given) non-negative with a positive sum over the selected members.

    ``selected`` = the m chosen indices (sorted); ``info``: ``f``, ``m``,
    ``scores``, ``order`` (selection, best first), ``weights`` (per member).
    """
    x = as_updates(updates, check_finite=False)
    n = x.shape[0]
    f = _check_krum_f(n, f)
    m = _check_m(n, f, m)
    w_in = None if weights is None else as_member_vector("weights", weights, n, nonneg=True)
    scores = _scores_from_sq_distances(pairwise_sq_distances(x), f)
    order = np.argsort(scores, kind="stable")[:m]
    coef = np.zeros(n)
    if w_in is None:
        coef[order] = 1.0 / m
    else:
        tot = w_in[order].sum()
        if tot <= 0:
            raise PreconditionError("the weights of the selected updates sum to 0")
        coef[order] = w_in[order] / tot
    vec = combine(x, coef)
    info = {"f": f, "m": m, "scores": to_list(scores), "order": to_list(order), "weights": to_list(coef)}
    return result(vec, order, info, "multi_krum")


# --------------------------------------------------------------------------- #
# Bulyan
# --------------------------------------------------------------------------- #


def _check_bulyan_f(n: int, f: Any) -> int:
    f = check_int("f", f, minimum=0)
    if n < 4 * f + 3:
        raise PreconditionError(
            f"Bulyan needs n >= 4f + 3 updates (El Mhamdi et al. 2018): got n = {n}, f = {f}; "
            f"need at least {4 * f + 3} updates"
        )
    return f


def bulyan_select(updates: np.ndarray, f: int) -> np.ndarray:
    """Bulyan's selection phase: the ``theta = n - 2f`` indices chosen by
    iterated Krum, in selection order."""
    x = as_updates(updates, check_finite=False)
    f = _check_bulyan_f(x.shape[0], f)
    return _bulyan_select(pairwise_sq_distances(x), f)


def _bulyan_select(d2: np.ndarray, f: int) -> np.ndarray:
    n = d2.shape[0]
    theta = n - 2 * f
    remaining = list(range(n))
    chosen: list[int] = []
    for _ in range(theta):
        sub = d2[np.ix_(remaining, remaining)]
        j = int(np.argmin(_scores_from_sq_distances(sub, f)))
        chosen.append(remaining.pop(j))
    return np.asarray(chosen, dtype=np.int64)


def bulyan(updates: np.ndarray, f: int) -> AggregateResult:
    r"""Bulyan on top of Krum.

    Definition (El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of
    Distributed Learning in Byzantium", ICML 2018, Sec. 4):

    1. *Selection*: apply Krum :math:`\theta = n - 2f` times, each time
       moving the chosen update from the remaining set to the selection set
       :math:`S` (Krum is re-run on the shrinking set with the same ``f``).
    2. *Aggregation*, coordinate-wise: with :math:`\beta = \theta - 2f`,

       .. math::  \mathrm{agg}_k = \frac1\beta \sum_{x \in M_k} x_k, \quad
                  M_k = \operatorname*{arg\,min}_{M \subset S, |M| = \beta}
                        \sum_{x \in M} |x_k - \mathrm{med}_k(S)|

       i.e. the average of the :math:`\beta` values closest to the
       coordinate-wise median of the selection.

    Differences from the paper (the first and the last are Flower's too):

    * inside the loop Krum uses ``k = max(1, m - f - 2)`` neighbours on a
      remaining set of size ``m``; once :math:`m \le 2f + 2` the paper's
      Krum precondition no longer holds (the paper does not say what to do)
      and at least one neighbour is used;
    * ties are broken by the lowest original index, both in Krum (as in
      Flower) and in :math:`M_k` when more values than fit lie at exactly the
      :math:`\beta`-th smallest distance from the median (e.g. the median
      is 0, one slot is left and the selection holds both -1 and 1: the
      member with the lower index wins).  The paper does not break ties;
      any tie-break gives a set :math:`M_k` of the definition;
    * for even :math:`\theta` the median is the mean of the two middle
      values.

    Agreement with Flower's ``aggregate_bulyan(..., aggregation_rule=
    aggregate_krum, to_keep=0)`` (``tests/unit/test_rules_flower.py``):
    the selection is identical, and so is the output wherever the
    :math:`\beta` closest values are unique, i.e. on continuous data.  They
    differ (1) where the :math:`\beta` boundary is tied between different
    values (integer or quantised updates): Flower keeps whichever tied value
    ``numpy.argpartition`` happens to place first, over the members in
    selection order; both choices are sets :math:`M_k` of the definition,
    with the same total distance to the median; and (2) on float32 input,
    where Flower computes in float32 and can resolve a near-tie differently
    from our float64 arithmetic.

    Cost: one sort of the :math:`\theta` values per coordinate (for the
    median, and to find the :math:`\beta`-th smallest distance from the
    ends of the :math:`\theta - \beta + 1` windows of consecutive sorted
    values), then O(:math:`\theta`) vectorised passes, see
    :func:`_mean_closest_to_median`.

    Preconditions: :math:`n \ge 4f + 3`, ``f >= 0``.

    ``selected`` = the :math:`\theta` chosen indices (sorted); ``info``:
    ``f``, ``theta``, ``beta``, ``order`` (selection order).
    """
    x = as_updates(updates, check_finite=False)
    n, d = x.shape
    f = _check_bulyan_f(n, f)
    order = _bulyan_select(pairwise_sq_distances(x), f)
    theta = order.size
    beta = theta - 2 * f
    rows = np.sort(order)
    out = np.empty(d)

    def step(ws: _Workspace, sl: slice, t: np.ndarray) -> None:
        # t: (w, theta) float64, one row per coordinate, members in ascending index order
        if beta == theta:
            t.mean(axis=1, out=out[sl])
        else:
            _mean_closest_to_median(t, beta, out[sl], ws)

    # 4x narrower blocks than usual: a few (w, theta) buffers are alive
    blockwise(x, step, init=lambda width: _Workspace(width, theta, beta), rows=rows, transpose=True,
              block_rows=4 * theta)
    check_finite_stats(out, "the aggregate")
    info = {"f": f, "theta": int(theta), "beta": int(beta), "order": to_list(order)}
    return result(out, order, info, "bulyan")


def _mean_closest_to_median(t: np.ndarray, beta: int, out: np.ndarray, ws: _Workspace | None = None) -> None:
    """Bulyan's aggregation step on one block: for every row of ``t`` (one
    coordinate; its ``theta`` values in member order, ascending index),
    ``out[row]`` = the mean of the ``beta`` values closest to the row's
    median.

    Exact, ties included.  With ``r`` the ``beta``-th smallest distance to
    the median, every value closer than ``r`` is taken; when more values lie
    at exactly ``r`` than there are slots left, the slots go to the lowest
    member indices.  ``r`` comes from the sorted row: the ``beta`` closest
    values are ``beta`` consecutive sorted values (all values within ``r``
    of the median are consecutive), so ``r`` is the smallest, over the
    ``theta - beta + 1`` windows of ``beta`` consecutive values, of the
    window's larger end distance.  One sort per row, which the median needs
    anyway; the member-order pass runs only on the rows with a tie at ``r``.
    ``ws`` holds reused buffers (fresh ones per block cost page faults).
    """
    w, theta = t.shape
    ws = ws or _Workspace(w, theta, beta)
    s, dist, take = ws.s[:w], ws.dist[:w], ws.take[:w]
    lo, hi = ws.lo[:w], ws.hi[:w]
    h = theta // 2
    np.copyto(s, t)
    s.sort(axis=1)
    med = s[:, h : h + 1] if theta % 2 else 0.5 * (s[:, h - 1 : h] + s[:, h : h + 1])  # (w, 1)
    # window j = s[:, j : j + beta]; its farthest value is one of its ends (med - s_j and s_{j+beta-1} - med are
    # the same floats as |s - med|: IEEE subtraction is sign-symmetric)
    np.subtract(med, s[:, : theta - beta + 1], out=lo)
    np.subtract(s[:, beta - 1 :], med, out=hi)
    r = np.maximum(lo, hi, out=lo).min(axis=1, keepdims=True)
    np.abs(np.subtract(t, med, out=dist), out=dist)
    np.less_equal(dist, r, out=take)
    surplus = np.count_nonzero(take, axis=1) - beta  # values at distance r that do not fit
    tied = np.flatnonzero(surplus > 0)
    if tied.size:
        d_t, r_t = dist[tied], r[tied]
        at_r = d_t == r_t
        slots = np.count_nonzero(at_r, axis=1) - surplus[tied]
        take[tied] = (d_t < r_t) | (at_r & (np.cumsum(at_r, axis=1) <= slots[:, None]))
    np.multiply(t, take, out=dist).sum(axis=1, out=out)
    out /= beta


class _Workspace:
    """Buffers of :func:`_mean_closest_to_median` for blocks of up to ``rows`` coordinates."""

    def __init__(self, rows: int, theta: int, beta: int):
        self.s = np.empty((rows, theta))
        self.dist = np.empty((rows, theta))
        self.take = np.empty((rows, theta), dtype=bool)
        self.lo = np.empty((rows, theta - beta + 1))
        self.hi = np.empty((rows, theta - beta + 1))


# --------------------------------------------------------------------------- #
# geometric median
# --------------------------------------------------------------------------- #


def geometric_median(
    updates: np.ndarray,
    weights: Any = None,
    eps: float = 1e-6,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> AggregateResult:
    r"""Geometric median by the smoothed Weiszfeld algorithm (RFA).

    Definition (Pillutla, Kakade, Harchaoui, "Robust Aggregation for
    Federated Learning", IEEE Trans. Signal Processing 2022, Algorithm 2):
    approximately minimise :math:`\sum_i \alpha_i \lVert v - x_i\rVert_2`
    by iterating, from the weighted mean :math:`v_0 = \sum_i \alpha_i x_i`,

    .. math::  \beta_i = \frac{\alpha_i}{\max(\nu, \lVert v_t - x_i\rVert)}, \quad
               v_{t+1} = \frac{\sum_i \beta_i x_i}{\sum_i \beta_i}

    with smoothing :math:`\nu` = ``eps``; stop after ``max_iter``
    iterations or when the objective changes by less than ``tol`` times its
    value (RFA's reference code uses the same test; its defaults are
    ``eps=1e-5, maxiter=4, ftol=1e-6``).

    Every iterate is a convex combination :math:`v = \sum_i c_i x_i`, so the
    iteration runs on the coefficients ``c`` using the ``n x n`` Gram matrix
    (:math:`\lVert x_i - v\rVert^2 = G_{ii} - 2 (Gc)_i + c^\top G c`):
    each iteration costs O(n^2) instead of O(nd), and the ``(n, d)`` array
    is read twice in total.  Distances below ~1e-8 times the updates' spread
    are not resolved (float64 cancellation); that is far below any useful
    ``eps``.

    Preconditions: ``weights`` (the :math:`\alpha_i`, default uniform)
    non-negative with a positive sum; ``eps > 0``; ``max_iter >= 1``;
    ``tol >= 0``.

    ``selected`` = members with non-zero weight; ``info``: ``iterations``,
    ``objective`` (weighted sum of distances, alphas normalised),
    ``converged``, ``weights`` (the final coefficients c).
    """
    eps = check_real("eps", eps, low=0.0, low_open=True)
    max_iter = check_int("max_iter", max_iter, minimum=1)
    tol = check_real("tol", tol, low=0.0)
    x = as_updates(updates, check_finite=False)
    n = x.shape[0]
    if weights is None:
        alpha = np.full(n, 1.0 / n)
    else:
        alpha = as_member_vector("weights", weights, n, nonneg=True)
        if alpha.sum() <= 0:
            raise PreconditionError("weights sum to 0")
        alpha = alpha / alpha.sum()
    g = gram(x, center=True)
    check_finite_stats(np.diag(g))
    diag = np.diag(g)

    def dists(c: np.ndarray) -> np.ndarray:
        gc = g @ c
        return np.sqrt(np.maximum(diag - 2.0 * gc + c @ gc, 0.0))

    c = alpha.copy()
    obj = float(alpha @ dists(c))
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        prev = obj
        beta = alpha / np.maximum(eps, dists(c))
        c = beta / beta.sum()
        obj = float(alpha @ dists(c))
        if abs(prev - obj) <= tol * obj:
            converged = True
            break
    vec = combine(x, c)
    info = {"iterations": it, "objective": obj, "converged": converged, "weights": to_list(c)}
    return result(vec, np.flatnonzero(alpha), info, "geometric_median")
