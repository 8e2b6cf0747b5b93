"""How a judged window's members weigh: one definition for the window stage, the aggregator and the simulation.

Services never import each other (DESIGN.md, "three floors"), and both sides need these numbers: the aggregator
weighs FedAvg by them (``aggregator/service.py``), the window stage averages the admitted members' sketches with
them into the previous global update's sketch (``processors/defence.py``), and :mod:`fedguard.simulation` does both.

* A member is **admitted** to aggregation when its verdict is not ``reject`` and its weight is positive.
* Its **sample weight** is the sample count it claimed, capped at ``cap`` (a device chooses the number; ``cap``
  ``None`` or 0: no cap), times the ensemble's weight (accept 1, downweight in (0, 0.5]).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["admitted", "sample_weights", "weighted_mean"]


def admitted(verdict: str, weight: float = 1.0) -> bool:
    """Whether a member with this verdict and weight enters the aggregate."""
    return verdict != "reject" and float(weight) > 0


def sample_weights(num_samples: Sequence[float], weights: Sequence[float], cap: float | None) -> np.ndarray:
    """``min(num_samples_i, cap) * weight_i`` for every member, float64 ``(n,)``."""
    limit = float(cap or np.inf)
    n = np.asarray(num_samples, dtype=np.float64).reshape(-1)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if n.shape != w.shape:
        raise ValueError(f"one weight per member: {w.size} weights for {n.size} sample counts")
    return np.minimum(n, limit) * w


def weighted_mean(rows: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
    """``sum_i w_i rows_i / sum_i w_i`` in float64, or ``None`` when the weights sum to zero (nothing admitted)."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    total = float(w.sum())
    if w.size == 0 or total <= 0:
        return None
    x = np.asarray(rows, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != w.size:
        raise ValueError(f"expected {w.size} rows, got shape {x.shape}")
    return (w[:, None] * x).sum(axis=0) / total
