"""The round driver: what the compromised devices sampled in a round send (pure: no Kafka, no Redis).

Knowledge. By default the colluders know only their own data (partial knowledge, Shejwalkar & Houmansadr 2021):
the benign statistics (mean, std, median norm) are estimated from their own honest deltas of this round. With
``{"omniscient": true}`` and ``ctx.observed_benign`` given, they use the round's other valid updates instead (if that
callable returns no row, partial knowledge is used). With a single colluder in partial-knowledge mode the std is 0:
ALIE, min-max and min-sum then send that colluder's honest delta (no spread to hide in), IPM still flips its mean.

Schedules. ``model_replacement`` is single-shot: at ``round_index == 0`` the colluders each send
``gamma / k`` times their backdoor delta (``k`` colluders in the round, ``gamma = n / eta``), whose sum is the
paper's ``gamma (X - G)``; from ``round_index >= 1`` they send honest deltas. Every other kind acts every round.
The slow-drift direction is derived once (first colluder, first round it runs) and kept in ``ctx.state``: keep the
same dict across the rounds of one attack so the direction stays fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedguard.tasks import TaskData, get_flat_params, local_train, pixel_pattern, set_flat_params

from .backdoor import (backdoor_direction, backdoor_train, constrain_norm, model_replacement_gamma, scale_to_norm,
                       scale_update)
from .collusion import slow_drift, stuffing, sybil_copies
from .poisoning import flip_labels, poison_with_trigger
from .registry import validate_params
from .untargeted import alie, alie_z, gaussian_update, ipm, min_max, min_sum, sign_flip

__all__ = ["AttackContext", "craft_round"]

Updates = dict[int, list[tuple[np.ndarray, int]]]


@dataclass
class AttackContext:
    base: np.ndarray                 # flat global params of the round (float32)
    version: int                     # base version
    round_index: int                 # 0 for the first round of the attack
    devices: list[int]               # indices of the compromised devices sampled this round (>= 1)
    honest_delta: Callable[[int], tuple[np.ndarray, int]]   # honest local training of device i from base
    shard: Callable[[int], tuple[np.ndarray, np.ndarray]]   # device i's own (x, y)
    task: TaskData
    model: torch.nn.Module           # a scratch model of the right shape (its params are overwritten)
    training: dict                   # epochs, lr, batch_size, momentum (the honest defaults)
    window_size: int                 # n of the aggregation (for gamma = n / eta)
    rng: np.random.Generator
    observed_benign: Callable[[], np.ndarray] | None = None   # omniscient mode only: the round's other updates (m, d)
    state: dict = field(default_factory=dict)  # kept by the caller across the rounds of one attack (slow drift)


class _Round:
    """Per-call memo: each device's honest delta and shard are computed at most once; seeds come from ctx.rng."""

    def __init__(self, ctx: AttackContext, p: dict[str, Any]):
        self.ctx, self.p = ctx, p
        self.base = np.asarray(ctx.base, dtype=np.float32)
        self._honest: dict[int, np.ndarray] = {}
        self._samples: dict[int, int] = {}
        self._backdoor: dict[int, np.ndarray] = {}
        self._benign: np.ndarray | None = None
        self._trigger = None

    def seed(self) -> int:
        return int(self.ctx.rng.integers(2**31 - 1))

    def honest(self, i: int) -> np.ndarray:
        if i not in self._honest:
            delta, samples = self.ctx.honest_delta(i)
            self._honest[i] = _flat(delta, self.base.shape[0], f"honest_delta({i})")
            self._samples[i] = int(samples)
        return self._honest[i]

    def samples(self, i: int) -> int:
        if i not in self._samples:
            self._samples[i] = int(len(self.ctx.shard(i)[1]))
        return self._samples[i]

    def cfg(self) -> dict[str, Any]:
        t = self.ctx.training
        return {"epochs": self.p.get("epochs") or t["epochs"], "lr": self.p.get("lr") or t["lr"],
                "batch_size": t["batch_size"], "momentum": t.get("momentum", 0.0)}

    def trigger(self):
        if self._trigger is None:
            self._trigger = pixel_pattern(self.ctx.task, size=self.p["size"], target=self.p["target"])
        return self._trigger

    def backdoor(self, i: int) -> np.ndarray:
        if i not in self._backdoor:
            x, y = self.ctx.shard(i)
            self._backdoor[i] = backdoor_train(
                self.ctx.model, x, y, trigger=self.trigger(), global_params=self.base,
                class_weight=self.p["class_weight"], poison_per_batch=self.p["poison_per_batch"], seed=self.seed(),
                **self.cfg())
        return self._backdoor[i]

    def train_on(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Honest training from the base on data the attacker chose (data poisoning)."""
        set_flat_params(self.ctx.model, self.base)
        local_train(self.ctx.model, x, y, seed=self.seed(), **self.cfg())
        return get_flat_params(self.ctx.model) - self.base.astype(np.float32)

    def benign(self) -> np.ndarray:
        """(m, d): observed updates (omniscient) or the colluders' own honest deltas (partial knowledge)."""
        if self._benign is None:
            self._benign = self._estimate_benign()
        return self._benign

    def _estimate_benign(self) -> np.ndarray:
        if self.p.get("omniscient"):
            if self.ctx.observed_benign is None:
                raise ValueError("omniscient mode needs ctx.observed_benign (the round's other valid updates)")
            observed = np.asarray(self.ctx.observed_benign(), dtype=np.float64)
            if observed.size > 0:
                if observed.ndim != 2 or observed.shape[1] != self.base.shape[0]:
                    raise ValueError(f"observed_benign must be (m, {self.base.shape[0]}), got {observed.shape}")
                return observed
        return np.stack([self.honest(i) for i in self.ctx.devices]).astype(np.float64)

    def reference_norm(self) -> float:
        """Median L2 norm of the benign updates (estimate as in :meth:`benign`)."""
        return float(np.median(np.linalg.norm(self.benign(), axis=1)))

    def scaled_backdoor(self, i: int, share: int) -> np.ndarray:
        """Backdoor delta scaled by ``norm`` ("median_honest" or a number), else by ``gamma / share``; then bound."""
        delta, norm = self.backdoor(i), self.p.get("norm")
        if norm == "median_honest":
            delta = scale_to_norm(delta, self.reference_norm())
        elif norm is not None:
            delta = scale_to_norm(delta, norm)
        else:
            delta = scale_update(delta, self.gamma() / share)
        return constrain_norm(delta, self.p.get("bound"))

    def gamma(self) -> float:
        return self.p["gamma"] or model_replacement_gamma(self.ctx.window_size, self.p["eta"])

    def base_update(self, name: str, i: int, share: int) -> np.ndarray:
        if name == "honest":
            return self.honest(i)
        if name == "backdoor":
            return self.backdoor(i)
        if name == "model_replacement":
            return scale_update(self.backdoor(i), self.gamma() / share)
        if name == "constrain_and_scale":
            return self.scaled_backdoor(i, share)
        return sign_flip(self.honest(i), self.p["scale"])

    def each(self, make: Callable[[int], np.ndarray]) -> Updates:
        return {i: [(make(i), self.samples(i))] for i in self.ctx.devices}

    def same(self, update: np.ndarray) -> Updates:
        return {i: [(update.copy(), self.samples(i))] for i in self.ctx.devices}


def _flat(v: Any, d: int, what: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    if v.shape != (d,):
        raise ValueError(f"{what} has shape {v.shape}, expected ({d},)")
    return v


def _model_replacement(r: _Round) -> Updates:
    if r.ctx.round_index > 0:
        return r.each(r.honest)
    k = len(r.ctx.devices)
    return r.each(lambda i: scale_update(r.backdoor(i), r.gamma() / k))


def _constrain_and_scale(r: _Round) -> Updates:
    return r.each(lambda i: r.scaled_backdoor(i, share=1))


def _badnets(r: _Round) -> Updates:
    def make(i: int) -> np.ndarray:
        x, y = r.ctx.shard(i)
        return r.train_on(*poison_with_trigger(x, y, r.trigger(), r.p["fraction"], r.ctx.rng))
    return r.each(make)


def _label_flip(r: _Round) -> Updates:
    classes = r.ctx.task.num_classes
    if r.p["target"] >= classes or (r.p["source"] != "all" and r.p["source"] >= classes):
        raise ValueError(f"label_flip: source and target must be classes of the task (0..{classes - 1})")

    def make(i: int) -> np.ndarray:
        x, y = r.ctx.shard(i)
        return r.train_on(x, flip_labels(y, r.p["source"], r.p["target"]))
    return r.each(make)


def _alie(r: _Round) -> Updates:
    """n = window size, f = colluders of the round (unless given), f clipped to the largest minority floor(n/2)
    (a majority would make z_max infinite); a window of one (n < 2) gives z = 0, i.e. the mean."""
    n = r.p["n"] or r.ctx.window_size
    f = min(r.p["f"] or len(r.ctx.devices), n // 2)
    z = r.p["z"] if r.p["z"] is not None else (alie_z(n, f) if f >= 1 else 0.0)
    return r.same(alie(r.benign(), n, f, z=z))


def _slow_drift(r: _Round) -> Updates:
    key = ("slow_drift", r.p["target"], r.p["size"], r.base.shape[0])
    if key not in r.ctx.state:
        first = r.ctx.devices[0]
        r.ctx.state[key] = backdoor_direction(r.backdoor(first), r.honest(first))
    direction, ref = r.ctx.state[key], r.reference_norm()
    return r.each(lambda i: slow_drift(r.honest(i), direction, r.p["beta"], ref))


def _sybil(r: _Round) -> Updates:
    devices = r.ctx.devices
    update = r.base_update(r.p["base_attack"], devices[0], share=len(devices))
    copies = sybil_copies(update, len(devices), r.p["jitter"], r.ctx.rng)
    return {i: [(c, r.samples(i))] for i, c in zip(devices, copies)}


def _window_stuffing(r: _Round) -> Updates:
    count = r.p["count"] or r.ctx.window_size
    return {i: [(u, r.samples(i)) for u in stuffing(r.base_update(r.p["base_attack"], i, 1), count)]
            for i in r.ctx.devices}


def _at_norm(r: _Round, update: np.ndarray) -> np.ndarray:
    """``norm`` = "median_honest" or a number: the update rescaled to it (an attacker hiding at the honest norm);
    None: as the paper defines it."""
    norm = r.p.get("norm")
    if norm is None:
        return update
    return scale_to_norm(update, r.reference_norm() if norm == "median_honest" else norm)


_CRAFT: dict[str, Callable[[_Round], Updates]] = {
    "model_replacement": _model_replacement,
    "constrain_and_scale": _constrain_and_scale,
    "badnets": _badnets,
    "label_flip": _label_flip,
    "sign_flip": lambda r: r.each(lambda i: sign_flip(r.honest(i), r.p["scale"])),
    "gaussian": lambda r: r.each(lambda i: gaussian_update(r.base.shape[0], r.p["sigma"], r.ctx.rng)),
    "alie": _alie,
    "ipm": lambda r: r.same(_at_norm(r, ipm(r.benign(), r.p["eps"]))),
    "min_max": lambda r: r.same(min_max(r.benign(), r.p["perturbation"], gamma_init=r.p["gamma_init"],
                                        tau=r.p["tau"])),
    "min_sum": lambda r: r.same(min_sum(r.benign(), r.p["perturbation"], gamma_init=r.p["gamma_init"],
                                        tau=r.p["tau"])),
    "slow_drift": _slow_drift,
    "sybil": _sybil,
    "window_stuffing": _window_stuffing,
}


def _check_ctx(ctx: AttackContext) -> None:
    base = np.asarray(ctx.base)
    if base.ndim != 1 or base.shape[0] == 0 or not np.issubdtype(base.dtype, np.floating):
        raise ValueError(f"ctx.base must be a non-empty 1-D float vector, got shape {base.shape}, dtype {base.dtype}")
    if not ctx.devices or len(set(ctx.devices)) != len(ctx.devices):
        raise ValueError(f"ctx.devices must list at least one device, without repeats, got {ctx.devices!r}")
    if isinstance(ctx.window_size, bool) or not isinstance(ctx.window_size, (int, np.integer)) or ctx.window_size < 1:
        raise ValueError(f"ctx.window_size must be an integer >= 1, got {ctx.window_size!r}")
    if not isinstance(ctx.rng, np.random.Generator):
        raise ValueError("ctx.rng must be a numpy.random.Generator")


def craft_round(kind: str, params: dict | None, ctx: AttackContext) -> Updates:
    """For each compromised device of the round, the (delta, num_samples) updates it sends (usually one;
    window_stuffing: many). ``params`` are checked by :func:`validate_params` (defaults filled in). Deltas are
    float32 vectors of the base's length; ``num_samples`` is the device's true shard size. Deterministic given
    the state of ``ctx.rng`` (and of ``ctx.state`` for slow drift)."""
    p = validate_params(kind, params)
    _check_ctx(ctx)
    out = _CRAFT[kind](_Round(ctx, p))
    d = np.asarray(ctx.base).shape[0]
    return {i: [(_flat(u, d, f"{kind} update of device {i}"), int(n)) for u, n in ups] for i, ups in out.items()}
