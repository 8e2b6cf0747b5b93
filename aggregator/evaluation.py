"""Evaluation of every model version: main-task accuracy and loss, and backdoor accuracy for each configured trigger.

Backdoor accuracy (attack success rate, Bagdasaryan et al. 2020, Sec. 5) is the share of test inputs whose true
label is not the trigger's target that, with the trigger applied, the model classifies as the target. The
aggregator measures it for the triggers named in ``Settings.backdoor_eval`` (default: the 4x4 pixel pattern,
target class 0, the backdoor of ../shared/THREATS.md and of the attack library's defaults). It is a measurement for
operators and experiments: no detector and no rule reads it, and the model audit (issue 14) never sees the trigger.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from prometheus_client import Gauge, Histogram
from torch import nn

from fedguard.tasks import TaskData, evaluate
from fedguard.tasks.backdoor import Trigger, backdoor_eval_set, pixel_pattern, target_rate

BACKDOOR_ACCURACY = Gauge("fedguard_model_backdoor_accuracy",
                          "Backdoor accuracy (attack success rate) of the current global model, per configured trigger",
                          ["backdoor"])
# Every evaluated version, observed once when it is published (the gauge above only shows what a scrape happens to
# see); fine buckets at the low end, where a backdoor starts to take hold.
BACKDOOR_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
VERSION_BACKDOOR_ACCURACY = Histogram("fedguard_version_backdoor_accuracy", "Backdoor accuracy (attack success rate) "
                                      "of every published version, per configured trigger", ["backdoor"],
                                      buckets=BACKDOOR_BUCKETS)

TRIGGER_KINDS = ("pixel_pattern",)


class BackdoorSpecError(ValueError):
    pass


def parse_backdoors(text: str, task: TaskData) -> list[Trigger]:
    """Triggers from ``"pixel_pattern:<target>[:<size>],..."`` (empty: none). The trigger's name is the spec item, so
    the metric label and the version's metadata say exactly what was measured."""
    triggers: list[Trigger] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kind, *args = item.split(":")
        if kind not in TRIGGER_KINDS or not 1 <= len(args) <= 2 or not all(a.isdigit() for a in args):
            raise BackdoorSpecError(f"backdoor {item!r}: expected pixel_pattern:<target class>[:<square size>]")
        target, size = int(args[0]), int(args[1]) if len(args) > 1 else 4
        if not 0 <= target < task.num_classes:
            raise BackdoorSpecError(f"backdoor {item!r}: target {target} is not a class of {task.name} "
                                    f"(0..{task.num_classes - 1})")
        trigger = pixel_pattern(task, size=size, target=target)
        triggers.append(Trigger(name=item, indices=trigger.indices, value=trigger.value, target=trigger.target))
    return triggers


@dataclass
class Evaluator:
    """Evaluates flat parameter vectors on the task's test set; the triggered sets are built once."""

    task: TaskData
    model: nn.Module
    triggers: list[Trigger]

    def __post_init__(self) -> None:
        self._sets = [(t, backdoor_eval_set(self.task, t)) for t in self.triggers]

    def __call__(self, set_params, params: np.ndarray) -> dict:
        """``{"accuracy", "loss", "backdoor": {name: rate}, "backdoor_accuracy": max or None}``."""
        set_params(self.model, params)
        accuracy, loss = evaluate(self.model, self.task.x_test, self.task.y_test)
        backdoor = {t.name: target_rate(self.model, x, t.target) for t, x in self._sets}
        return {"accuracy": accuracy, "loss": loss, "backdoor": backdoor,
                "backdoor_accuracy": max(backdoor.values()) if backdoor else None}


def export(metrics: dict) -> None:
    for name, rate in metrics.get("backdoor", {}).items():
        BACKDOOR_ACCURACY.labels(name).set(rate)


def observe_backdoors(metrics: dict) -> None:
    """Observe a new version's backdoor accuracy for each configured trigger (once per version)."""
    for name, rate in metrics.get("backdoor", {}).items():
        VERSION_BACKDOOR_ACCURACY.labels(name).observe(rate)


def declare_backdoors(triggers: list[Trigger]) -> None:
    """Create each trigger's histogram series at zero, so the first version's observation is visible to rate()."""
    for trigger in triggers:
        VERSION_BACKDOOR_ACCURACY.labels(trigger.name)
