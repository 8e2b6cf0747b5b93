"""Bridge from the service's settings to an aggregation rule: which rule, its parameters, its per-window inputs.

Configuration parameters (``FEDGUARD_RULE_PARAMS``, a JSON object) are checked when the service starts, so a bad
configuration fails at once with a clear message instead of at the first window. Per-window inputs are supplied
here: capped sample counts (FedAvg), the previous aggregate (centered clipping), a server update trained on a small
root dataset (FLTrust), trust scores from the Redis reputation (reputation weighting) and the noise generator
(FLAME, DP). Distance- and median-based rules run unweighted: sample counts are reported by the devices, and
weighting a robust rule by attacker-controlled numbers would undo it.

Noise (:func:`noise_generator`): by default every window's generator is seeded from fresh OS entropy (128 bits from
``secrets``, via ``numpy.random.SeedSequence``), so nobody can recompute the noise and subtract it from a published
version. Only ``aggregation_experiment_seed`` (an explicit experiment setting) seeds it, with ``[seed, version]``:
reproducible, and therefore not private. Every version of a rule that draws noise says which it was in its
``rule_info``: ``"private": true, "noise_source": "os_entropy"``, or ``"private": false, "noise_source":
"experiment_seed", "noise_seed": [seed, version]``. ``private`` speaks of the noise only (it cannot be predicted);
what the noise buys (the DP guarantee) depends on the rule's parameters, e.g. ``noise_multiplier = 0`` adds none.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.rules import RULE_SPECS, AggregateResult, RuleConfigError, aggregate, min_updates, validate_config
from fedguard.tasks import DEFAULT_TRAINING, TaskData, get_flat_params, local_train, set_flat_params


@dataclass
class WindowInputs:
    """What a rule may need besides the updates; the expensive ones are computed only when asked for."""

    sample_counts: np.ndarray
    rng: np.random.Generator
    center: Callable[[], np.ndarray]
    server_update: Callable[[], np.ndarray]
    trust_scores: Callable[[], np.ndarray]
    noise_seed: list[int] | None = None  # what ``rng`` was seeded with; None: OS entropy (see noise_generator)


def noise_generator(experiment_seed: int | None, version: int) -> tuple[np.random.Generator, list[int] | None]:
    """The generator a window's noise is drawn from, and the seed to record (None: fresh OS entropy, private)."""
    if experiment_seed is None:
        return np.random.default_rng(), None
    seed = [int(experiment_seed), int(version)]
    return np.random.default_rng(seed), seed


def server_update(task: TaskData, model: Any, params: np.ndarray, seed: int, version: int,
                  root_size: int = 100) -> np.ndarray:
    """FLTrust's server update (Cao et al. 2021, Alg. 1): the task's tuned local training (``DEFAULT_TRAINING``)
    from ``params`` on a root dataset of ``root_size`` training samples drawn with ``default_rng(seed)``, training
    seed ``version``; returns the delta in float64. ``model`` (of the task's shape) is overwritten."""
    rng = np.random.default_rng(seed)
    root = rng.choice(len(task.y_train), size=min(root_size, len(task.y_train)), replace=False)
    hp = DEFAULT_TRAINING[task.name]
    set_flat_params(model, params)
    local_train(model, task.x_train[root], task.y_train[root], epochs=hp["epochs"], lr=hp["lr"],
                batch_size=hp["batch_size"], seed=version, momentum=hp.get("momentum", 0.0))
    return get_flat_params(model).astype(np.float64) - params


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
        result = aggregate(self.name, deltas, **self.config, **data)
        if "rng" in self._data:
            if inputs.noise_seed is None:
                noise = {"private": True, "noise_source": "os_entropy"}
            else:
                noise = {"private": False, "noise_source": "experiment_seed", "noise_seed": list(inputs.noise_seed)}
            result = dataclasses.replace(result, info={**result.info, **noise})
        return result
