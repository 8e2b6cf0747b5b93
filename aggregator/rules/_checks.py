"""Input checks of the rules: scalar parameters (shared with the registry's config validation), the random
generator, the ``(n, d)`` update matrix and per-member / per-parameter vectors.  Every failure is a
:class:`PreconditionError`."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np

from ._kernels import all_finite
from ._types import PreconditionError

# --------------------------------------------------------------------------- #
# scalar parameter checks (shared with the registry's config validation)
# --------------------------------------------------------------------------- #


def check_int(name: str, value: Any, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise PreconditionError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise PreconditionError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise PreconditionError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise PreconditionError(f"{name} must be finite, got {value!r}")
    if low is not None and (v < low or (low_open and v == low)):
        op = ">" if low_open else ">="
        raise PreconditionError(f"{name} must be {op} {low}, got {value}")
    if high is not None and (v > high or (high_open and v == high)):
        op = "<" if high_open else "<="
        raise PreconditionError(f"{name} must be {op} {high}, got {value}")
    return v


def make_rng(rng: Any) -> np.random.Generator:
    """``rng`` may be a Generator, an int seed or None (fresh OS entropy)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, Integral) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    raise PreconditionError(
        f"rng must be a numpy.random.Generator, an int seed or None, got {type(rng).__name__}"
    )


# --------------------------------------------------------------------------- #
# array validation
# --------------------------------------------------------------------------- #


def as_updates(updates: Any, *, check_finite: bool = True) -> np.ndarray:
    """Validate the ``(n, d)`` update matrix without copying it.

    float32 and float64 arrays are used as they are (any memory layout);
    other real dtypes (ints, bool, float16) are converted to float64.
    ``check_finite=False`` is for callers that detect non-finite input
    themselves from the norms/Gram matrix they compute anyway.
    """
    a = np.asarray(updates)
    if a.ndim != 2:
        raise PreconditionError(
            f"updates must be a 2-D array of shape (n_members, n_params), got shape {a.shape}"
        )
    n, d = a.shape
    if n == 0:
        raise PreconditionError("no updates to aggregate (n = 0)")
    if d == 0:
        raise PreconditionError("updates have no parameters (d = 0)")
    if a.dtype not in (np.float32, np.float64):
        if a.dtype.kind not in "biuf":
            raise PreconditionError(f"updates must be real numbers, got dtype {a.dtype}")
        a = a.astype(np.float64)
    if check_finite and not all_finite(a):
        raise PreconditionError("updates contain NaN or infinite values")
    return a


def as_member_vector(name: str, values: Any, n: int, *, nonneg: bool = False) -> np.ndarray:
    """A per-member vector (weights, counts, trust scores) as float64 ``(n,)``."""
    v = _float64(name, values)
    if v.ndim != 1 or v.shape[0] != n:
        raise PreconditionError(f"{name} must have one value per update: expected shape ({n},), got {v.shape}")
    _check_finite(name, v)
    if nonneg and (v < 0).any():
        raise PreconditionError(f"{name} must be non-negative, got min {v.min()}")
    return v


def as_param_vector(name: str, value: Any, d: int) -> np.ndarray:
    """A ``(d,)`` vector parameter (server update, center) as float64."""
    v = _float64(name, value)
    if v.shape != (d,):
        raise PreconditionError(f"{name} must have shape ({d},) like one update, got {np.shape(value)}")
    _check_finite(name, v)
    return v


def _float64(name: str, values: Any) -> np.ndarray:
    """A required array parameter of real numbers, as float64 (no copy if it already is)."""
    if values is None:
        raise PreconditionError(f"{name} is required")
    v = np.asarray(values)
    if v.dtype.kind not in "biuf":
        raise PreconditionError(f"{name} must be numbers, got dtype {v.dtype}")
    return v.astype(np.float64, copy=False)


def _check_finite(name: str, v: np.ndarray) -> None:
    if not np.isfinite(v).all():
        raise PreconditionError(f"{name} contains NaN or infinite values")


def check_finite_stats(values: np.ndarray, what: str = "updates") -> None:
    """Raise if norms/Gram entries computed from the updates are not finite,
    which (for float32/64 input) means the updates held NaN/inf or values so
    large that their squares overflow."""
    if not np.isfinite(values).all():
        raise PreconditionError(f"{what} contain NaN or infinite values (or overflow when squared)")
