"""Rule registry: pick a rule by name from configuration, validate its
parameters before the first window arrives, and call it uniformly."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._checks import check_int, check_real
from ._types import AggregateResult, PreconditionError, RuleConfigError
from .averaging import centered_clipping, dp_gaussian, fedavg, norm_clip, reputation_weighted, robust_lr
from .coordinatewise import coordinate_median, trimmed_mean
from .distance import bulyan, geometric_median, krum, multi_krum
from .similarity import flame, fltrust

__all__ = ["RULES", "RULE_SPECS", "RuleSpec", "aggregate", "min_updates", "validate_config"]


def _opt(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else check(v)


def _pos(name: str) -> Callable[[Any], float]:
    return lambda v: check_real(name, v, low=0.0, low_open=True)


def _nonneg(name: str) -> Callable[[Any], float]:
    return lambda v: check_real(name, v, low=0.0)


def _bool(name: str) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if not isinstance(v, bool):
            raise PreconditionError(f"{name} must be true or false, got {v!r}")
        return v
    return check


def _int(name: str, minimum: int) -> Callable[[Any], int]:
    return lambda v: check_int(name, v, minimum=minimum)


@dataclass(frozen=True)
class RuleSpec:
    """Metadata about one rule.

    ``config``: scalar parameters that belong in configuration (and in the
    record of how a model version was made), each with a checker that
    raises :class:`PreconditionError` for a value that can never be valid.
    ``data``: per-window inputs the service supplies at call time
    (sample counts, trust scores, the server update, the previous aggregate,
    the random generator).  ``min_updates(params)``: smallest window the rule
    accepts.
    """

    name: str
    fn: Callable[..., AggregateResult]
    config: Mapping[str, Callable[[Any], Any]]
    data: tuple[str, ...]
    min_updates: Callable[[Mapping[str, Any]], int]
    summary: str


def _one(_: Mapping[str, Any]) -> int:
    return 1


RULE_SPECS: dict[str, RuleSpec] = {
    s.name: s
    for s in [
        RuleSpec("fedavg", fedavg, {"cap": _opt(_pos("cap"))}, ("sample_counts",), _one,
                 "sample-count weighted mean, counts capped"),
        RuleSpec("norm_clip", norm_clip, {"max_norm": _opt(_pos("max_norm"))}, ("sample_counts",), _one,
                 "clip each update to a norm bound (fixed or median), then FedAvg's weighted mean"),
        RuleSpec("coordinate_median", coordinate_median, {}, (), _one, "coordinate-wise median"),
        RuleSpec("trimmed_mean", trimmed_mean,
                 {"beta": lambda v: check_real("beta", v, low=0.0, high=0.5, high_open=True)}, (), _one,
                 "coordinate-wise trimmed mean"),
        RuleSpec("krum", krum, {"f": _int("f", 0)}, (), lambda p: 2 * int(p["f"]) + 3,
                 "the update with the smallest Krum score"),
        RuleSpec("multi_krum", multi_krum, {"f": _int("f", 0), "m": _opt(_int("m", 1))}, ("weights",),
                 lambda p: max(2 * int(p["f"]) + 3, int(p.get("m") or 1)),
                 "mean of the m updates with the smallest Krum scores"),
        RuleSpec("geometric_median", geometric_median,
                 {"eps": _pos("eps"), "max_iter": _int("max_iter", 1), "tol": _nonneg("tol")}, ("weights",), _one,
                 "geometric median, smoothed Weiszfeld (RFA)"),
        RuleSpec("bulyan", bulyan, {"f": _int("f", 0)}, (), lambda p: 4 * int(p["f"]) + 3,
                 "iterated Krum selection, then coordinate-wise trimmed around the median"),
        RuleSpec("centered_clipping", centered_clipping, {"tau": _pos("tau"), "iters": _int("iters", 1)},
                 ("center",), _one, "centered clipping around the previous aggregate"),
        RuleSpec("fltrust", fltrust, {}, ("server_update",), _one,
                 "cosine trust against a server update, magnitude-normalised"),
        RuleSpec("flame", flame,
                 {"noise_lambda": _nonneg("noise_lambda"), "min_cluster_size": _opt(_int("min_cluster_size", 2))},
                 ("rng",), lambda p: max(2, int(p.get("min_cluster_size") or 2)),
                 "HDBSCAN cosine clustering, median-norm clipping, Gaussian noise"),
        RuleSpec("dp_gaussian", dp_gaussian,
                 {"clip_norm": _pos("clip_norm"), "noise_multiplier": _nonneg("noise_multiplier")}, ("rng",),
                 _one, "clip, sum, Gaussian noise, divide by n (DP-FedAvg)"),
        RuleSpec("reputation_weighted", reputation_weighted, {}, ("trust_scores",), _one,
                 "mean weighted by reputation trust scores"),
        RuleSpec("robust_lr", robust_lr,
                 {"threshold": _opt(_int("threshold", 1)), "max_norm": _opt(_pos("max_norm")), "clip": _bool("clip"),
                  "disagreement_rate": lambda v: check_real("disagreement_rate", v, low=-1.0, high=0.0)},
                 ("sample_counts",), lambda p: int(p.get("threshold") or 1),
                 "drop (or reverse) the step of every coordinate fewer than threshold members agree on by sign"),
    ]
}

#: name -> rule function.  Every rule is ``fn(updates, **params) -> AggregateResult``.
RULES: dict[str, Callable[..., AggregateResult]] = {name: spec.fn for name, spec in RULE_SPECS.items()}


def _spec(name: str) -> RuleSpec:
    if not isinstance(name, str) or name not in RULE_SPECS:
        raise RuleConfigError(f"unknown aggregation rule {name!r}; known rules: {', '.join(sorted(RULE_SPECS))}")
    return RULE_SPECS[name]


def _signature_params(spec: RuleSpec) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(spec.fn).parameters)
    params.pop("updates")
    return params


def validate_config(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check a rule name and its *configuration* parameters without data.

    Returns the configuration with defaults filled in (what to record next
    to a model version).  Raises :class:`RuleConfigError` for an unknown
    rule, an unknown or per-window parameter, a missing required parameter
    or an invalid value.
    """
    spec = _spec(name)
    params = dict(params or {})
    sig = _signature_params(spec)
    unknown = sorted(set(params) - set(spec.config))
    if unknown:
        data = [p for p in unknown if p in spec.data]
        hint = f" ({', '.join(data)} are supplied per window, not in config)" if data else ""
        raise RuleConfigError(
            f"unknown parameter(s) for rule {name!r}: {', '.join(unknown)}{hint}; "
            f"config parameters: {', '.join(spec.config) or 'none'}"
        )
    out: dict[str, Any] = {}
    for p, check in spec.config.items():
        if p in params:
            value = params[p]
        elif sig[p].default is not inspect.Parameter.empty:
            value = sig[p].default
        else:
            raise RuleConfigError(f"rule {name!r} requires parameter {p!r}")
        try:
            out[p] = check(value)
        except PreconditionError as e:
            raise RuleConfigError(f"rule {name!r}: {e}") from e
    return out


def min_updates(name: str, params: Mapping[str, Any] | None = None) -> int:
    """Smallest number of updates the rule accepts with these parameters
    (e.g. ``2f + 3`` for Krum, ``4f + 3`` for Bulyan)."""
    spec = _spec(name)
    return spec.min_updates(validate_config(name, params))


def aggregate(name: str, updates: np.ndarray, **params: Any) -> AggregateResult:
    """Run rule ``name`` on ``updates`` with configuration and per-window
    parameters given as keywords.

    Raises :class:`RuleConfigError` for an unknown rule or parameter name or
    a missing required parameter, and :class:`PreconditionError` when the
    data violate the rule's preconditions (e.g. too few updates for ``f``).
    """
    spec = _spec(name)
    sig = _signature_params(spec)
    unknown = sorted(set(params) - set(sig))
    if unknown:
        raise RuleConfigError(
            f"unknown parameter(s) for rule {name!r}: {', '.join(unknown)}; accepted: {', '.join(sig)}"
        )
    missing = [p for p, prm in sig.items() if prm.default is inspect.Parameter.empty and p not in params]
    if missing:
        raise RuleConfigError(f"rule {name!r} requires parameter(s): {', '.join(missing)}")
    return spec.fn(updates, **params)
