"""Attacks that exploit time and numbers rather than one crafted vector: slow drift, Sybil copies, window stuffing."""

from __future__ import annotations

import numpy as np

from ._common import as_vector, check_int, check_real, check_rng, f32

__all__ = ["slow_drift", "stuffing", "sybil_copies"]


def slow_drift(honest_delta: np.ndarray, direction: np.ndarray, beta: float, reference_norm: float) -> np.ndarray:
    """Slow drift: the device's honest delta plus a small push along a fixed direction,
    ``honest + beta * reference_norm * direction / ||direction||_2``.

    With ``reference_norm`` the median honest norm and ``beta`` ~ 0.1-0.3, each update stays within the honest
    spread of norms and directions, so no per-window score separates it, while the push adds up over rounds
    (THREATS.md: 0.3 gives 63-83% backdoor accuracy for most rules over 40 rounds). ``direction`` is typically
    :func:`producers.attacks.backdoor_direction`. ``beta >= 0``, ``reference_norm >= 0``; ``ValueError`` if
    ``direction`` is zero or its length differs from ``honest_delta``'s. Float32."""
    h = as_vector("honest_delta", honest_delta)
    d = as_vector("direction", direction)
    if d.shape != h.shape:
        raise ValueError(f"direction has length {d.shape[0]}, honest_delta {h.shape[0]}")
    beta = check_real("beta", beta, low=0.0)
    reference_norm = check_real("reference_norm", reference_norm, low=0.0)
    length = float(np.linalg.norm(d))
    if length == 0.0:
        raise ValueError("direction has zero norm")
    return f32(h + (beta * reference_norm / length) * d)


def sybil_copies(update: np.ndarray, k: int, jitter: float, rng: np.random.Generator) -> list[np.ndarray]:
    """``k`` near-identical copies of one update, one per colluding identity (Sybils; Fung, Yoon & Beschastnikh,
    "The Limitations of Federated Learning in Sybil Settings", RAID 2020):
    ``u_i = u + jitter * ||u||_2 / sqrt(d) * n_i``, ``n_i ~ N(0, I_d)`` i.i.d. (so ``||u_i - u|| ~= jitter ||u||``).
    ``jitter = 0`` gives exact copies (``rng`` unused); a zero update gives zero copies. ``k >= 1``,
    ``jitter >= 0``. Float32 arrays, each new."""
    u = as_vector("update", update)
    k = check_int("k", k, low=1)
    jitter = check_real("jitter", jitter, low=0.0)
    if jitter == 0.0:
        return [f32(u) for _ in range(k)]
    scale = jitter * float(np.linalg.norm(u)) / np.sqrt(u.shape[0])
    noise = check_rng(rng).standard_normal((k, u.shape[0]))
    return [f32(u + scale * row) for row in noise]


def stuffing(update: np.ndarray, count: int) -> list[np.ndarray]:
    """Window stuffing: one device sends ``count`` copies of the same update for the same base version, trying to
    fill a window on its own (the pipeline's one-update-per-device-per-window rule is the defence).
    ``count >= 1``. Float32 arrays, each new."""
    u = as_vector("update", update)
    count = check_int("count", count, low=1)
    return [f32(u) for _ in range(count)]
