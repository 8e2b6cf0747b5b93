"""Untargeted (Byzantine) model poisoning: updates crafted to slow down or wreck training.

``benign`` below is always an ``(m, d)`` array of benign updates, or the attackers' estimate of them: their own
honest deltas (partial knowledge) or the round's other updates (omniscient). All colluders send the same crafted
update unless stated otherwise. Standard deviations are coordinate-wise sample deviations (``ddof=1``, as
``torch.std`` in the papers' code); with a single benign update the spread is unknown and taken as 0, so the
std-based attacks degrade to sending the mean (documented per function, never NaN).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist

import numpy as np

from ._common import as_benign, as_vector, check_int, check_real, check_rng, coordinate_std, f32

__all__ = ["PERTURBATIONS", "alie", "alie_z", "gamma_search", "gaussian_update", "ipm", "min_max", "min_max_gamma",
           "min_sum", "min_sum_gamma", "perturbation_vector", "sign_flip"]

PERTURBATIONS = ("std", "unit", "sign")


def sign_flip(delta: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Sign flipping: send ``-scale * delta`` instead of the honest ``delta`` (the sign-flipping attack of e.g.
    Li et al., "RSA: Byzantine-Robust Stochastic Aggregation Methods", AAAI 2019, Sec. 5). ``scale > 0``;
    ``scale = 1`` is the plain flip, larger values also amplify it. Float32."""
    v = as_vector("delta", delta)
    scale = check_real("scale", scale, low=0.0, low_open=True)
    return f32(-scale * v)


def gaussian_update(dim: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian attack: an update drawn from ``N(0, sigma^2 I_dim)``, independent of the data (Blanchard et al.,
    "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017, Sec. 5; Fang et al.,
    USENIX Security 2020, Sec. 5 baselines). ``dim >= 1``, ``sigma >= 0`` (0 gives zeros). Float32."""
    dim = check_int("dim", dim, low=1)
    sigma = check_real("sigma", sigma, low=0.0)
    return f32(sigma * check_rng(rng).standard_normal(dim))


def alie_z(n: int, f: int) -> float:
    """``z_max`` of "A Little Is Enough" (Baruch, Baruch & Goldberg, NeurIPS 2019, Algorithm 1, lines 1-2):
    ``s = floor(n/2 + 1) - f`` (benign workers the attackers must "recruit" for a majority) and
    ``z_max = Phi^{-1}((n - s) / n)``, ``Phi`` the standard normal CDF (``statistics.NormalDist().inv_cdf``).
    Needs ``n >= 2`` and ``1 <= f <= floor(n/2)`` (otherwise ``(n - s)/n`` leaves (0, 1) and z is infinite).
    Example: ``n = 10, f = 2``: ``s = 6 - 2 = 4``, ``z = Phi^{-1}(0.6) = 0.2533``; ``n = 2, f = 1``: ``z = 0``."""
    n = check_int("n", n, low=2)
    f = check_int("f", f, low=1)
    if f > n // 2:
        raise ValueError(f"ALIE needs a minority of attackers: 1 <= f <= floor(n/2) = {n // 2}, got f={f} for n={n}")
    s = math.floor(n / 2 + 1) - f
    return NormalDist().inv_cdf((n - s) / n)


def alie(benign: np.ndarray, n: int, f: int, z: float | None = None) -> np.ndarray:
    """"A Little Is Enough" (Baruch et al. 2019, Algorithm 1, line 3): coordinate-wise ``mu_j - z * sigma_j`` with
    ``mu``, ``sigma`` the mean and standard deviation of ``benign`` over its rows and ``z = alie_z(n, f)``
    (``n`` workers, ``f`` of them corrupted); an explicit ``z`` overrides it (``n``, ``f`` are then not used).
    With one benign row ``sigma = 0`` and the result is that row. Float32."""
    b = as_benign(benign)
    z = alie_z(n, f) if z is None else check_real("z", z)
    return f32(b.mean(axis=0) - z * coordinate_std(b))


def ipm(benign: np.ndarray, eps: float) -> np.ndarray:
    """Inner-product manipulation (Xie, Koyejo & Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by
    Inner Product Manipulation", UAI 2020, Sec. 4): every attacker sends ``-eps * mean(benign)``, so that the inner
    product of the aggregate with the true mean turns negative. Small ``eps`` (0.1) targets median/Krum-like
    rules, large ``eps`` (100) the mean. ``eps > 0``. Float32."""
    b = as_benign(benign)
    eps = check_real("eps", eps, low=0.0, low_open=True)
    return f32(-eps * b.mean(axis=0))


def perturbation_vector(benign: np.ndarray, kind: str = "std") -> np.ndarray:
    """The perturbation ``p`` of Shejwalkar & Houmansadr 2021 (Sec. IV-A), for ``m = mean(benign) - gamma * p``:
    ``"unit"`` = ``mean / ||mean||`` (inverse unit vector; zero if the mean is zero), ``"sign"`` =
    ``sign(mean)`` (inverse sign), ``"std"`` = coordinate-wise std of ``benign`` (inverse std; zero for one row)."""
    b = as_benign(benign)
    return f32(_perturbation(b, kind))


def _perturbation(b: np.ndarray, kind: str) -> np.ndarray:
    if kind not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {kind!r}")
    mean = b.mean(axis=0)
    if kind == "std":
        return coordinate_std(b)
    if kind == "sign":
        return np.sign(mean)
    length = float(np.linalg.norm(mean))
    return mean / length if length > 0 else np.zeros_like(mean)


def gamma_search(oracle: Callable[[float], bool], gamma_init: float = 10.0, tau: float = 1e-5) -> float:
    """The scale search of Shejwalkar & Houmansadr 2021, Algorithm 1 (as in the authors' reference code)::

        gamma <- gamma_init; step <- gamma_init; gamma_succ <- 0
        while |gamma_succ - gamma| > tau:
            if oracle(gamma): gamma_succ <- gamma; gamma <- gamma + step/2
            else:             gamma <- gamma - step/2
            step <- step/2
        return gamma_succ

    A bisection on ``[0, 2 gamma_init)``: for a constraint that holds on an interval ``[0, gamma*]`` with
    ``gamma* < 2 gamma_init`` it returns a feasible gamma within ``2 tau`` of ``gamma*``; if nothing positive is
    feasible it returns 0 (only ``gamma_succ`` values the oracle accepted are ever returned).
    ``gamma_init > 0``, ``tau > 0``."""
    gamma_init = check_real("gamma_init", gamma_init, low=0.0, low_open=True)
    tau = check_real("tau", tau, low=0.0, low_open=True)
    gamma, step, succ = gamma_init, gamma_init, 0.0
    while abs(succ - gamma) > tau:
        if oracle(gamma):
            succ = gamma
            gamma = gamma + step / 2
        else:
            gamma = gamma - step / 2
        step = step / 2
    return succ


def _sq_dists_to(b: np.ndarray, v: np.ndarray) -> np.ndarray:
    diff = b - v
    return np.einsum("ij,ij->i", diff, diff)


def _pairwise_sq(b: np.ndarray) -> np.ndarray:
    return np.stack([_sq_dists_to(b, row) for row in b])


def min_max_gamma(benign: np.ndarray, perturbation: str = "std", *, gamma_init: float = 10.0,
                  tau: float = 1e-5) -> float:
    """The gamma of :func:`min_max`: the largest (within ``tau``, by :func:`gamma_search`) gamma such that
    ``max_i ||mean - gamma p - b_i||_2 <= max_{i,j} ||b_i - b_j||_2``."""
    b = as_benign(benign)
    mean, p = b.mean(axis=0), _perturbation(b, perturbation)
    bound = float(_pairwise_sq(b).max())
    return gamma_search(lambda g: float(_sq_dists_to(b, mean - g * p).max()) <= bound, gamma_init, tau)


def min_max(benign: np.ndarray, perturbation: str = "std", *, gamma_init: float = 10.0,
            tau: float = 1e-5) -> np.ndarray:
    """Min-Max attack (Shejwalkar & Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks
    and Defenses for Federated Learning", NDSS 2021, Sec. IV-B, AGR-agnostic Min-Max):
    ``m = mean(benign) - gamma * p`` with the largest ``gamma`` such that the malicious update is no farther from
    any benign update than the two farthest benign updates are from each other,
    ``max_i ||m - b_i|| <= max_{i,j} ||b_i - b_j||``; gamma by their Algorithm 1 (:func:`gamma_search`).
    ``p`` from :func:`perturbation_vector`. With one benign row the bound is 0, gamma is 0 and ``m`` is that row.
    Float32."""
    b = as_benign(benign)
    gamma = min_max_gamma(b, perturbation, gamma_init=gamma_init, tau=tau)
    return f32(b.mean(axis=0) - gamma * _perturbation(b, perturbation))


def min_sum_gamma(benign: np.ndarray, perturbation: str = "std", *, gamma_init: float = 10.0,
                  tau: float = 1e-5) -> float:
    """The gamma of :func:`min_sum`: the largest (within ``tau``) gamma such that
    ``sum_i ||mean - gamma p - b_i||^2 <= max_i sum_j ||b_i - b_j||^2``."""
    b = as_benign(benign)
    mean, p = b.mean(axis=0), _perturbation(b, perturbation)
    bound = float(_pairwise_sq(b).sum(axis=1).max())
    return gamma_search(lambda g: float(_sq_dists_to(b, mean - g * p).sum()) <= bound, gamma_init, tau)


def min_sum(benign: np.ndarray, perturbation: str = "std", *, gamma_init: float = 10.0,
            tau: float = 1e-5) -> np.ndarray:
    """Min-Sum attack (Shejwalkar & Houmansadr, NDSS 2021, Sec. IV-B, AGR-agnostic Min-Sum):
    ``m = mean(benign) - gamma * p`` with the largest ``gamma`` such that the sum of squared distances of ``m`` to
    the benign updates is at most the largest such sum of a benign update,
    ``sum_i ||m - b_i||^2 <= max_i sum_j ||b_i - b_j||^2`` (the paper's bound; the authors' code compares with the
    *smallest* sum, a stricter variant). Gamma by Algorithm 1 (:func:`gamma_search`). One benign row: ``m`` is
    that row. Float32."""
    b = as_benign(benign)
    gamma = min_sum_gamma(b, perturbation, gamma_init=gamma_init, tau=tau)
    return f32(b.mean(axis=0) - gamma * _perturbation(b, perturbation))
