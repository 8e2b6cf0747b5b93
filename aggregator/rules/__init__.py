"""Robust aggregation rules: pure numpy functions over a ``(n, d)`` array of
model updates (one row per member of a window).

Every rule returns an :class:`AggregateResult` (``vector``, ``selected``
member indices, JSON-serialisable ``info``) and raises
:class:`PreconditionError` (a ``ValueError``) when its preconditions fail.
Pick a rule by name with :func:`aggregate` / :data:`RULES`; check a
configuration up front with :func:`validate_config`.  See
``docs/aggregation.md`` for the definitions and references.
"""

from ._runtime import get_num_threads, set_num_threads
from ._types import AggregateResult, PreconditionError, RuleConfigError
from .averaging import centered_clipping, dp_gaussian, fedavg, norm_clip, reputation_weighted, robust_lr
from .coordinatewise import coordinate_median, trim_count, trimmed_mean
from .distance import (
    bulyan,
    bulyan_select,
    geometric_median,
    krum,
    krum_scores,
    multi_krum,
    multi_krum_select,
    pairwise_sq_distances,
)
from .registry import RULE_SPECS, RULES, RuleSpec, aggregate, min_updates, validate_config
from .similarity import cosine_distances, flame, fltrust

__all__ = [
    "AggregateResult",
    "PreconditionError",
    "RULES",
    "RULE_SPECS",
    "RuleConfigError",
    "RuleSpec",
    "aggregate",
    "bulyan",
    "bulyan_select",
    "centered_clipping",
    "coordinate_median",
    "cosine_distances",
    "dp_gaussian",
    "fedavg",
    "flame",
    "fltrust",
    "geometric_median",
    "get_num_threads",
    "krum",
    "krum_scores",
    "min_updates",
    "multi_krum",
    "multi_krum_select",
    "norm_clip",
    "pairwise_sq_distances",
    "reputation_weighted",
    "robust_lr",
    "set_num_threads",
    "trim_count",
    "trimmed_mean",
    "validate_config",
]
