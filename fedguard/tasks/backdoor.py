"""Backdoor triggers and backdoor accuracy (shared core: the aggregator measures, the attacks implant).

A trigger is a set of flat feature indices set to one value, plus the class the attacker wants triggered inputs to
be classified as. :func:`pixel_pattern` is the BadNets pattern (Gu, Dolan-Gavitt & Garg, "BadNets: Identifying
Vulnerabilities in the Machine Learning Model Supply Chain", 2017): a white square in the bottom-right corner.
Backdoor accuracy is as in Bagdasaryan et al., "How To Backdoor Federated Learning" (AISTATS 2020): the share of
triggered test inputs whose true label is not the target that the model classifies as the target.

Evaluate many model versions cheaply by building the triggered set once::

    trigger = pixel_pattern(task)                      # 4x4 bottom-right, target 0 (THREATS.md)
    x_bd = backdoor_eval_set(task, trigger)            # triggered, non-target test inputs (read-only)
    rate = target_rate(model, x_bd, trigger.target)    # == backdoor_accuracy(model, x_test, y_test, trigger)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .data import TaskData

__all__ = ["Trigger", "apply_trigger", "backdoor_accuracy", "backdoor_eval_set", "pixel_pattern", "target_rate"]

#: Side of the square images of the known image tasks; other tasks get a perfect-square check (see pixel_pattern).
IMAGE_SIDES = {"fashion-mnist": 28, "digits": 8}
#: The pattern size is given in Fashion-MNIST pixels (28 x 28) and scaled to smaller images.
_REFERENCE_SIDE = 28


@dataclass(frozen=True)
class Trigger:
    """``indices``: int64 indices into the flat input (read-only, sorted, unique); every one is set to ``value``;
    triggered inputs should be classified as ``target``. Hashable and comparable by content (usable as a cache key)."""

    name: str
    indices: np.ndarray
    value: float
    target: int

    def __post_init__(self) -> None:
        idx = np.unique(np.asarray(self.indices).astype(np.int64, copy=False).ravel())
        if idx.size == 0 or idx[0] < 0:
            raise ValueError(f"trigger {self.name!r}: indices must be non-empty and >= 0")
        if not math.isfinite(float(self.value)):
            raise ValueError(f"trigger {self.name!r}: value must be finite, got {self.value}")
        if isinstance(self.target, bool) or not isinstance(self.target, (int, np.integer)) or self.target < 0:
            raise ValueError(f"trigger {self.name!r}: target must be a class index >= 0, got {self.target!r}")
        idx.flags.writeable = False
        object.__setattr__(self, "indices", idx)
        object.__setattr__(self, "value", float(self.value))
        object.__setattr__(self, "target", int(self.target))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Trigger):
            return NotImplemented
        return (self.name, self.value, self.target) == (other.name, other.value, other.target) and np.array_equal(
            self.indices, other.indices)

    def __hash__(self) -> int:
        return hash((self.name, self.value, self.target, self.indices.tobytes()))


def _image_side(task: TaskData) -> int | None:
    if task.name in IMAGE_SIDES:
        return IMAGE_SIDES[task.name]
    if task.name == "synthetic":
        return None
    side = math.isqrt(task.input_dim)
    return side if side * side == task.input_dim and side > 1 else None


def pixel_pattern(task: TaskData, size: int = 4, target: int = 0) -> Trigger:
    """BadNets-style trigger (Gu et al. 2017): a ``size`` x ``size`` square of maximal intensity in the bottom-right
    corner of the image, and the class ``target`` the attacker wants it to cause (THREATS.md: 4x4, class 0).

    * square images (Fashion-MNIST 28x28, row-major flat): pixels ``(r, c)`` with ``r, c >= side - s``, flat index
      ``r * side + c``, where ``s = size`` on 28x28 and ``s = ceil(size * side / 28)`` on smaller images
      (digits 8x8: a 4-pixel square becomes 2x2);
    * non-image tasks (``synthetic``, 32 features): the last ``size`` features.

    ``value`` is the largest training feature value: inputs are standardised, so "white" is ``x_train.max()``,
    not 1.0. ``ValueError`` if ``size`` < 1 or larger than the image (or feature count), or ``target`` is not a class.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be an integer >= 1, got {size!r}")
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 0 <= target < task.num_classes:
        raise ValueError(f"target must be a class index in [0, {task.num_classes}), got {target!r}")
    side = _image_side(task)
    if side is None:
        if size > task.input_dim:
            raise ValueError(f"size {size} exceeds the {task.input_dim} features of task {task.name!r}")
        indices = np.arange(task.input_dim - size, task.input_dim, dtype=np.int64)
        name = f"last{size}-t{target}"
    else:
        s = size if side == _REFERENCE_SIDE else math.ceil(size * side / _REFERENCE_SIDE)
        if s > side:
            raise ValueError(f"a {s}x{s} square does not fit a {side}x{side} image")
        rows = np.arange(side - s, side, dtype=np.int64)
        indices = (rows[:, None] * side + rows[None, :]).ravel()
        name = f"square{s}x{s}-t{target}"
    return Trigger(name=name, indices=indices, value=float(task.x_train.max()), target=int(target))


def apply_trigger(x: np.ndarray, trigger: Trigger) -> np.ndarray:
    """A copy of ``x`` (one input ``(D,)`` or a batch ``(N, D)``; may be read-only) with the trigger's features set
    to its value. Float inputs keep their dtype; others become float32."""
    x = np.asarray(x)
    if x.ndim not in (1, 2):
        raise ValueError(f"expected inputs of shape (D,) or (N, D), got {x.shape}")
    if trigger.indices[-1] >= x.shape[-1]:
        raise ValueError(f"trigger {trigger.name!r} needs {trigger.indices[-1] + 1} features, "
                         f"inputs have {x.shape[-1]}")
    out = np.array(x, dtype=x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32, copy=True)
    out[..., trigger.indices] = trigger.value
    return out


def _triggered_non_target(x: np.ndarray, y: np.ndarray, trigger: Trigger) -> np.ndarray:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected x (N, D) and y (N,), got {x.shape} and {y.shape}")
    keep = y != trigger.target
    if not keep.any():
        raise ValueError(f"no test input has a label other than the target {trigger.target}: backdoor undefined")
    out = apply_trigger(x[keep], trigger)
    out.flags.writeable = False
    return out


def backdoor_eval_set(task: TaskData, trigger: Trigger) -> np.ndarray:
    """The triggered test inputs whose true label is not ``trigger.target`` (read-only float32 ``(M, D)``).
    Build it once and call :func:`target_rate` on every model version."""
    return _triggered_non_target(task.x_test, task.y_test, trigger)


def target_rate(model: nn.Module, x: np.ndarray, target: int, batch_size: int = 4096) -> float:
    """Share of the inputs ``x`` that ``model`` classifies as ``target`` (eval mode, no gradients, in batches)."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch (N, D), got {x.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    hits = 0
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                xb = torch.tensor(x[start : start + batch_size], dtype=torch.float32)
                hits += int((model(xb).argmax(dim=1) == int(target)).sum())
    finally:
        model.train(was_training)
    return hits / x.shape[0]


def backdoor_accuracy(model: nn.Module, x_test: np.ndarray, y_test: np.ndarray, trigger: Trigger,
                      batch_size: int = 4096) -> float:
    """Backdoor accuracy / attack success rate (Bagdasaryan et al. 2020, Sec. 5): among the test inputs whose true
    label is not ``trigger.target``, the share that ``model`` classifies as ``trigger.target`` once the trigger is
    applied. ``ValueError`` if every test label is the target."""
    return target_rate(model, _triggered_non_target(x_test, y_test, trigger), trigger.target, batch_size)
