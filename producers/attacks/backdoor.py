"""Model replacement and constrain-and-scale (Bagdasaryan, Veit, Hua, Estrin & Shmatikov, "How To Backdoor
Federated Learning", AISTATS 2020), and the fixed backdoor direction used by the slow-drift attack.

Notation of the paper: ``G`` = global model of the round, ``X`` = the model the attacker wants the round to produce,
``n`` = participants of the round, ``eta`` = global learning rate, the server step being (eq. 1)
``G' = G + eta/n * sum_i (L_i - G)``. Here every update is a *delta* ``L_i - G`` (flat float32), so the attacker's
submission ``L~ - G`` is the scaled delta ``gamma (X - G)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedguard.tasks import Trigger, apply_trigger, get_flat_params, set_flat_params
from fedguard.tasks.training import _sgd_step

from ._common import as_vector, check_int, check_real, f32

__all__ = ["backdoor_direction", "backdoor_train", "constrain_norm", "default_poison_per_batch",
           "model_replacement_gamma", "scale_to_norm", "scale_update"]

#: Bagdasaryan et al.'s image set-up: 20 backdoor samples in every batch of 64.
PAPER_POISON_PER_BATCH = (20, 64)


def model_replacement_gamma(n: int, eta: float = 1.0) -> float:
    """Scale factor of model replacement, ``gamma = n / eta`` (Bagdasaryan et al. 2020, Sec. 4, eq. 3:
    ``L~ = gamma (X - G) + G``). With it, if the other ``n - 1`` deltas roughly cancel, the server step of eq. 1
    gives ``G' ~= X``: the global model is replaced. ``eta = 1`` is FedAvg's plain mean of deltas.

    ``n`` (the number of updates averaged, the window size) must be an integer >= 1; ``eta > 0``.
    Example: ``n = 10, eta = 1`` -> ``10.0``; ``n = 10, eta = 0.5`` -> ``20.0``."""
    n = check_int("n", n, low=1)
    eta = check_real("eta", eta, low=0.0, low_open=True)
    return n / eta


def scale_update(delta: np.ndarray, gamma: float) -> np.ndarray:
    """``gamma * delta`` (eq. 3 applied to a delta: ``L~ - G = gamma (X - G)``), float32; ``gamma > 0``."""
    v = as_vector("delta", delta)
    gamma = check_real("gamma", gamma, low=0.0, low_open=True)
    return f32(gamma * v)


def scale_to_norm(delta: np.ndarray, norm: float) -> np.ndarray:
    """``delta * norm / ||delta||_2``: the same direction at exactly the given L2 norm (up or down). Used by the
    persistent constrain-and-scale attack to sit at the honest median norm (THREATS.md). A zero delta has no
    direction and stays zero. ``norm >= 0``."""
    v = as_vector("delta", delta)
    norm = check_real("norm", norm, low=0.0)
    length = float(np.linalg.norm(v))
    return f32(v * (norm / length)) if length > 0 else f32(v)


def constrain_norm(delta: np.ndarray, bound: float | None = None) -> np.ndarray:
    """Scale ``delta`` down to an L2 ``bound`` if it exceeds it: ``delta * min(1, bound / ||delta||_2)``.
    The "scale" half of constrain-and-scale against a server that clips or rejects norms above ``S``
    (Bagdasaryan et al. 2020, Sec. 4: the attacker scales by at most ``S / ||X - G||``). ``bound=None``: no
    constraint (a float32 copy). A zero delta is returned unchanged. ``bound > 0``."""
    v = as_vector("delta", delta)
    if bound is None:
        return f32(v)
    bound = check_real("bound", bound, low=0.0, low_open=True)
    length = float(np.linalg.norm(v))
    return f32(v * (bound / length)) if length > bound else f32(v)


def default_poison_per_batch(batch_size: int) -> int:
    """The paper's ratio, 20 backdoor samples per batch of 64, at another batch size: ``round(b * 20 / 64)``,
    at least 1 (batch 32 -> 10, batch 16 -> 5, batch 64 -> 20)."""
    batch_size = check_int("batch_size", batch_size, low=1)
    num, den = PAPER_POISON_PER_BATCH
    return max(1, min(batch_size, round(batch_size * num / den)))


def backdoor_train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    trigger: Trigger,
    global_params: np.ndarray,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    class_weight: float = 0.7,
    poison_per_batch: int | None = None,
    momentum: float = 0.0,
) -> np.ndarray:
    """Train a backdoored local model from the global one and return its delta ``X - G`` (float32).

    Bagdasaryan et al. 2020, Sec. 4 "constrain-and-scale", eq. 4:
    ``L_model = alpha * L_class + (1 - alpha) * L_ano`` with ``alpha = class_weight``, ``L_class`` the
    cross-entropy on a batch mixing clean and backdoor samples, and ``L_ano = ||w - G||_2^2`` (squared L2 distance
    of all parameters to the global model) keeping ``X`` close to ``G`` so the update looks normal.
    ``class_weight = 1`` is plain backdoor training (naive model replacement).

    Batches: ``x, y`` (the attacker's own data) are shuffled every epoch by a ``torch.Generator`` seeded with
    ``seed``; in each batch the first ``min(poison_per_batch, len(batch))`` samples get the trigger and label
    ``trigger.target`` (the paper mixes 20 backdoor samples into each batch of 64; ``None`` keeps that ratio, see
    :func:`default_poison_per_batch`). SGD with ``momentum`` is the hand-written step of
    ``fedguard.tasks.training`` (equal to ``torch.optim.SGD``). ``model`` is overwritten: it starts from
    ``global_params``. Deterministic given ``seed``.
    """
    alpha = check_real("class_weight", class_weight, low=0.0, low_open=True, high=1.0)
    epochs = check_int("epochs", epochs, low=0)
    batch_size = check_int("batch_size", batch_size, low=1)
    lr = check_real("lr", lr, low=0.0)
    momentum = check_real("momentum", momentum, low=0.0, high=1.0, high_open=True)
    seed = check_int("seed", seed)
    ppb = default_poison_per_batch(batch_size) if poison_per_batch is None else check_int(
        "poison_per_batch", poison_per_batch, low=0, high=batch_size)
    if not isinstance(trigger, Trigger):
        raise ValueError(f"trigger must be a fedguard.tasks.Trigger, got {type(trigger).__name__}")
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"expected non-empty x (N, D) and y (N,), got {x.shape} and {y.shape}")
    g = np.asarray(as_vector("global_params", global_params), dtype=np.float32)
    set_flat_params(model, g)
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.int64)
    xp = torch.tensor(apply_trigger(x, trigger), dtype=torch.float32)
    with torch.no_grad():
        n_out = model(xt[:1]).shape[1]
    if trigger.target >= n_out:
        raise ValueError(f"trigger target {trigger.target} is not one of the model's {n_out} classes")
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params]
    bufs: list[torch.Tensor | None] = [None] * len(params)
    gen = torch.Generator().manual_seed(seed)
    n = xt.shape[0]
    was_training = model.training
    model.train()
    try:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                k = min(ppb, idx.shape[0])
                xb, yb = xt[idx].clone(), yt[idx].clone()
                xb[:k] = xp[idx[:k]]
                yb[:k] = trigger.target
                loss = alpha * F.cross_entropy(model(xb), yb)
                if alpha < 1.0:
                    loss = loss + (1.0 - alpha) * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
                for p in params:
                    p.grad = None
                loss.backward()
                _sgd_step(params, bufs, lr, momentum, 0.0)
    finally:
        model.train(was_training)
    return f32(get_flat_params(model) - g)


def backdoor_direction(backdoor_delta: np.ndarray, honest_delta: np.ndarray) -> np.ndarray:
    """Unit vector ``(b - h) / ||b - h||_2`` of what backdoor training adds to honest training from the same base:
    ``b`` = the delta of :func:`backdoor_train`, ``h`` = the same device's honest delta. The slow-drift attack
    (:func:`producers.attacks.slow_drift`) pushes along it, derived once (from the first base of the attack) and
    kept fixed, so the same hidden objective accumulates over rounds (THREATS.md). ``ValueError`` if the two
    deltas differ in length or are equal (no direction)."""
    b = as_vector("backdoor_delta", backdoor_delta)
    h = as_vector("honest_delta", honest_delta)
    if b.shape != h.shape:
        raise ValueError(f"backdoor_delta and honest_delta differ in length: {b.shape[0]} vs {h.shape[0]}")
    diff = b - h
    length = float(np.linalg.norm(diff))
    if length == 0.0:
        raise ValueError("backdoor_delta equals honest_delta: no backdoor direction")
    return f32(diff / length)
