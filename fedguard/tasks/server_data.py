"""The clean data the server holds, and what the defences measure on it.

* :func:`select_audit_set`: ``SERVER_SET_SIZE`` class-balanced rows of the task's *training* set, seeded by
  ``Settings.seed`` (disjoint from the test set the evaluation reports on). The model audit
  (:mod:`aggregator.auditing`) reverse-engineers triggers on it; the validator measures each update's loss on it.
* :func:`loss_after`: the cross-entropy on that set of a base version plus one update applied alone, the input of
  the ensemble's ``behaviour`` detector (:func:`processors.detectors.behaviour`; Zeno, Xie, Koyejo & Gupta 2019).
* :class:`LossProbe`: the same for the validator, with the base versions' parameters loaded once per version.

Here, in the shared core, because the aggregator (audit) and the processors (validator, window stage) both use the
set, and ``fedguard.simulation`` runs the same code in-process.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .data import TaskData
from .models import set_flat_params

__all__ = ["LOSS_CAP", "SERVER_SET_SIZE", "LossProbe", "loss_after", "select_audit_set", "server_set"]

log = logging.getLogger(__name__)

#: the loss recorded when the logits are not finite (finite but huge parameters): the worst, and JSON can carry it
LOSS_CAP = 1e30
#: clean training rows the server holds (the audit: docs/audit.md; the behaviour detector: docs/detection.md)
SERVER_SET_SIZE = 256


def select_audit_set(x: np.ndarray, y: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Indices of a class-balanced sample of ``size`` rows of ``(x, y)`` (round-robin over classes in a seeded
    random order, so any prefix is balanced too: the audit uses the first ``audit_size`` rows). Deterministic given
    ``seed``; ``ValueError`` if ``size`` exceeds the rows."""
    y = np.asarray(y)
    if y.ndim != 1 or np.asarray(x).shape[0] != y.shape[0]:
        raise ValueError("x and y must have the same number of rows, y 1-D")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= y.shape[0]:
        raise ValueError(f"size must be an integer in [1, {y.shape[0]}], got {size!r}")
    rng = np.random.default_rng([int(seed), 0xA0D17])
    pools = [rng.permutation(np.flatnonzero(y == c)).tolist() for c in np.unique(y)]
    order = rng.permutation(len(pools))
    out: list[int] = []
    while len(out) < size:
        for c in order:
            if pools[c] and len(out) < size:
                out.append(pools[c].pop())
    return np.asarray(out, dtype=np.int64)


def server_set(task: TaskData, seed: int, size: int = SERVER_SET_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The server's clean rows ``(x, y)`` of ``task`` (:func:`select_audit_set` of its training set)."""
    rows = select_audit_set(task.x_train, task.y_train, min(size, len(task.y_train)), seed=seed)
    return task.x_train[rows], task.y_train[rows]


def loss_after(model: nn.Module, params: np.ndarray, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy of ``model`` with the flat ``params`` (float32, e.g. ``base + delta``) on ``(x, y)``,
    without gradients; ``model`` is overwritten. ``LOSS_CAP`` when it is not finite (parameters that overflow the
    logits: the update destroyed the model)."""
    set_flat_params(model, np.asarray(params, dtype=np.float32))
    model.eval()
    with torch.inference_mode():
        loss = float(F.cross_entropy(model(x), y).item())
    return loss if math.isfinite(loss) and loss < LOSS_CAP else LOSS_CAP


class LossProbe:
    """The validator's side of the ``behaviour`` detector: for an update of base version ``v``, the loss on the
    server's set of ``params(v) + delta`` and of ``params(v)`` alone (computed once per version; the parameters of
    the last ``cache`` versions are kept). ``load_params(v)`` reads a version's weights (the model store); when it
    fails (weights pruned or not yet written, a damaged file) the probe answers ``None`` and the detector abstains
    for that member: an outage of the store must not turn into verdicts."""

    def __init__(self, model: nn.Module, x: np.ndarray, y: np.ndarray, load_params: Callable[[int], np.ndarray],
                 cache: int = 4):
        self.model = model
        self.x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        self.y = torch.as_tensor(np.asarray(y, dtype=np.int64))
        self.load_params = load_params
        self.cache = cache
        self._bases: OrderedDict[int, tuple[np.ndarray, float]] = OrderedDict()
        self._warned: set[int] = set()

    def _base(self, version: int) -> tuple[np.ndarray, float] | None:
        if version in self._bases:
            self._bases.move_to_end(version)
            return self._bases[version]
        try:
            params = np.asarray(self.load_params(version), dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - any failure to read the weights: abstain, do not stop validation
            if version not in self._warned:  # tried again on the next update (the file may be written by then)
                self._warned.add(version)
                log.warning("behaviour detector: no weights for base version %s (%r); its updates carry no loss",
                            version, exc)
            return None
        entry = (params, loss_after(self.model, params, self.x, self.y))
        self._bases[version] = entry
        while len(self._bases) > self.cache:
            self._bases.popitem(last=False)
        return entry

    def __call__(self, base_version: int, delta: np.ndarray) -> tuple[float, float] | None:
        """``(loss of base + delta, loss of base)`` or ``None`` (no weights for the base, or a shape mismatch)."""
        base = self._base(int(base_version))
        if base is None:
            return None
        params, base_loss = base
        delta = np.asarray(delta, dtype=np.float32).reshape(-1)
        if delta.shape != params.shape:
            return None
        with np.errstate(over="ignore"):  # finite but huge parameters: loss_after caps what overflows
            return loss_after(self.model, params + delta, self.x, self.y), base_loss
