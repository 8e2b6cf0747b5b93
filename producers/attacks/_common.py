"""Parameter and array checks shared by the attack functions (every failure is a ``ValueError`` naming the input)."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np


def check_real(name: str, value: Any, *, low: float | None = None, low_open: bool = False,
               high: float | None = None, high_open: bool = False) -> float:
    """``value`` as a finite float within the given bounds (``bool`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    v = float(value)
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {v}")
    return v


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int within ``[low, high]`` (``bool`` and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def check_rng(rng: Any) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                         f"got {type(rng).__name__}")
    return rng


def as_vector(name: str, value: Any) -> np.ndarray:
    """A non-empty, finite, 1-D floating vector, as float64 (a new array; the input is never modified)."""
    v = np.asarray(value)
    if v.ndim != 1 or v.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {v.shape}")
    if not (np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {v.dtype}")
    v = v.astype(np.float64)
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return v


def as_benign(value: Any) -> np.ndarray:
    """Benign updates (or the attackers' estimate of them) as a finite float64 ``(m, d)`` array, ``m, d >= 1``."""
    b = np.asarray(value)
    if b.ndim != 2 or b.shape[0] < 1 or b.shape[1] < 1:
        raise ValueError(f"benign updates must be an (m, d) array with m, d >= 1, got shape {b.shape}")
    if not (np.issubdtype(b.dtype, np.floating) or np.issubdtype(b.dtype, np.integer)):
        raise ValueError(f"benign updates must be numeric, got dtype {b.dtype}")
    b = b.astype(np.float64)
    if not np.isfinite(b).all():
        raise ValueError("benign updates contain NaN or Inf")
    return b


def coordinate_std(benign: np.ndarray) -> np.ndarray:
    """Coordinate-wise sample standard deviation (``ddof=1``, as ``torch.std`` in the papers' code) of ``(m, d)``
    benign updates; with a single update (``m = 1``) the spread is unknown and taken as 0 (never NaN)."""
    if benign.shape[0] < 2:
        return np.zeros(benign.shape[1])
    return benign.std(axis=0, ddof=1)


def f32(v: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(v, dtype=np.float32)
