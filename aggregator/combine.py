"""Bridge from the service's settings to an aggregation rule: which rule, its parameters, its per-window inputs.

Configuration parameters (``FEDGUARD_RULE_PARAMS``, a JSON object) are checked when the service starts, so a bad
configuration fails at once with a clear message instead of at the first window. Per-window inputs are supplied
here: capped sample counts (FedAvg), the previous aggregate (centered clipping), a server update trained on a small
root dataset (FLTrust), trust scores from the Redis reputation (reputation weighting) and a generator seeded by the
version (FLAME, DP). Distance- and median-based rules run unweighted: sample counts are reported by the devices, and
weighting a robust rule by attacker-controlled numbers would undo it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.rules import RULE_SPECS, AggregateResult, RuleConfigError, aggregate, min_updates, validate_config


@dataclass
class WindowInputs:
    """What a rule may need besides the updates; the expensive ones are computed only when asked for."""

    sample_counts: np.ndarray
    rng: np.random.Generator
    center: Callable[[], np.ndarray]
    server_update: Callable[[], np.ndarray]
    trust_scores: Callable[[], np.ndarray]


class ConfiguredRule:
    def __init__(self, name: str, params_json: str = "", sample_count_cap: float | None = None):
        try:
            params = json.loads(params_json) if params_json else {}
        except json.JSONDecodeError as exc:
            raise RuleConfigError(f"rule parameters are not JSON: {exc}") from None
        if not isinstance(params, dict):
            raise RuleConfigError(f"rule parameters must be a JSON object, got {params_json!r}")
        if name == "fedavg":
            params.setdefault("cap", sample_count_cap)
        self.name = name
        self.config = validate_config(name, params)
        self.min_updates = min_updates(name, self.config)
        self._data = RULE_SPECS[name].data

    def __call__(self, deltas: np.ndarray, inputs: WindowInputs) -> AggregateResult:
        supply: dict[str, Callable[[], Any]] = {
            "sample_counts": lambda: inputs.sample_counts,
            "weights": lambda: None,
            "center": inputs.center,
            "server_update": inputs.server_update,
            "trust_scores": inputs.trust_scores,
            "rng": lambda: inputs.rng,
        }
        data = {key: supply[key]() for key in self._data}
        return aggregate(self.name, deltas, **self.config, **data)
