"""Geometry both the detectors and the aggregation rules need, on small ``(n, k)`` arrays (n members, k <= a few
thousand columns, e.g. sketches): pairwise squared distances, cosine similarities, Krum scores.

Services never import each other (DESIGN.md, "three floors"), so maths both sides need lives here, in the core.
Everything returns float64 and is exact up to float64 rounding (no blocking or threads: the inputs are small).
"""

from __future__ import annotations

import numpy as np

__all__ = ["cosine_matrix", "cosine_to", "krum_scores", "pairwise_sq_distances", "row_norms", "unit_rows"]


def _rows(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D array (n, k), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("array contains NaN or infinite values")
    return a


def row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norm of every row, float64 ``(n,)``."""
    return np.linalg.norm(_rows(x), axis=1)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Every row scaled to unit L2 norm; zero rows stay zero."""
    a = _rows(x)
    n = np.linalg.norm(a, axis=1)
    return a / np.where(n > 0, n, 1.0)[:, None]


def pairwise_sq_distances(x: np.ndarray) -> np.ndarray:
    """``D[i, j] = ||x_i - x_j||^2`` (``(n, n)``, zero diagonal), from the Gram matrix of the rows centred on their
    mean (the shift removes the shared component that makes ``||x||^2 + ||y||^2 - 2<x, y>`` cancel badly)."""
    a = _rows(x)
    c = a - a.mean(axis=0) if a.shape[0] else a
    g = c @ c.T
    d = np.diag(g)
    d2 = np.maximum(d[:, None] + d[None, :] - 2.0 * g, 0.0)
    np.fill_diagonal(d2, 0.0)
    return d2


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    """``C[i, j] = cos(x_i, x_j)`` in [-1, 1] (``(n, n)``). Conventions: a zero row has cosine 0 with every
    other row; the diagonal is 1 for non-zero rows and 0 for zero rows; two zero rows have cosine 0."""
    u = unit_rows(x)
    c = np.clip(u @ u.T, -1.0, 1.0)
    nz = np.linalg.norm(u, axis=1) > 0
    np.fill_diagonal(c, np.where(nz, 1.0, 0.0))
    return c


def cosine_to(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``cos(x_i, v)`` for every row (``(n,)``); 0 where ``x_i`` or ``v`` is zero."""
    a = _rows(x)
    w = np.asarray(v, dtype=np.float64)
    if w.shape != (a.shape[1],):
        raise ValueError(f"reference must have shape ({a.shape[1]},), got {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("reference contains NaN or infinite values")
    nv = np.linalg.norm(w)
    if nv == 0:
        return np.zeros(a.shape[0])
    return np.clip(unit_rows(a) @ (w / nv), -1.0, 1.0)


def krum_scores(d2: np.ndarray, f: int) -> np.ndarray:
    r"""Krum score of every member from the squared distances ``d2`` ``(n, n)``.

    Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
    Descent", NeurIPS 2017, Sec. 4: :math:`s(i) = \sum_{i \to j} \lVert x_i - x_j \rVert^2` over the
    :math:`n - f - 2` members closest to :math:`x_i` (itself excluded). Here the count is clamped to
    ``[1, n - 1]`` so that it is defined for every ``n >= 2`` (the paper needs ``n > 2f + 2``); ``n = 1`` scores 0.
    """
    d2 = np.asarray(d2, dtype=np.float64)
    n = d2.shape[0]
    if d2.shape != (n, n):
        raise ValueError(f"d2 must be square, got {d2.shape}")
    if n <= 1:
        return np.zeros(n)
    m = min(max(1, n - int(f) - 2), n - 1)
    off = d2.copy()
    np.fill_diagonal(off, np.inf)
    return np.partition(off, m - 1, axis=1)[:, :m].sum(axis=1)
