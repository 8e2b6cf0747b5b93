"""Data poisoning: the attacker trains honestly, on data it has poisoned (no scaling, no crafted update)."""

from __future__ import annotations

import numpy as np

from fedguard.tasks import Trigger, apply_trigger

from ._common import check_int, check_real, check_rng

__all__ = ["flip_labels", "poison_with_trigger"]


def poison_with_trigger(x: np.ndarray, y: np.ndarray, trigger: Trigger, fraction: float,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """BadNets data poisoning (Gu, Dolan-Gavitt & Garg 2017, Sec. 3): ``k = round(fraction * N)`` samples, drawn
    without replacement by ``rng``, get the trigger stamped on and their label set to ``trigger.target``; the other
    samples are unchanged. Returns new arrays ``(x', y')`` of the same shapes (poisoned samples replace clean ones,
    so the data set keeps its size); ``x`` and ``y`` may be read-only. ``0 <= fraction <= 1``."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected x (N, D) and y (N,), got {x.shape} and {y.shape}")
    fraction = check_real("fraction", fraction, low=0.0, high=1.0)
    rng = check_rng(rng)
    n = x.shape[0]
    k = int(round(fraction * n))
    chosen = rng.choice(n, size=k, replace=False) if k else np.empty(0, dtype=np.int64)
    xp = np.array(x, dtype=x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32, copy=True)
    yp = np.array(y, dtype=np.int64, copy=True)
    if k:
        xp[chosen] = apply_trigger(xp[chosen], trigger)
        yp[chosen] = trigger.target
    return xp, yp


def flip_labels(y: np.ndarray, source: int | str, target: int) -> np.ndarray:
    """Label flipping (e.g. Tolpegin, Truex, Gursoy & Liu, "Data Poisoning Attacks Against Federated Learning
    Systems", ESORICS 2020, Sec. 3: every sample of class ``source`` relabelled ``target``).
    ``source="all"``: every label that is not ``target`` becomes ``target``. Returns a new int64 array.
    ``ValueError`` if ``source == target``, or either is not a class index >= 0 (``source`` may be ``"all"``)."""
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {y.shape}, dtype {y.dtype}")
    target = check_int("target", target, low=0)
    out = y.astype(np.int64, copy=True)
    if isinstance(source, str):
        if source != "all":
            raise ValueError(f"source must be a class index or 'all', got {source!r}")
        out[:] = target
        return out
    source = check_int("source", source, low=0)
    if source == target:
        raise ValueError(f"source and target are the same class ({target}): nothing to flip")
    out[out == source] = target
    return out
