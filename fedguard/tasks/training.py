"""Local training and evaluation (plain minibatch SGD, cross-entropy), deterministic from a seed."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def _as_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected x (N, D) and y (N,), got {x.shape} and {y.shape}")
    # torch.tensor copies: inputs may be read-only cached arrays.
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


@torch.no_grad()
def _sgd_step(params: list[torch.Tensor], bufs: list[torch.Tensor | None], lr: float, momentum: float,
              weight_decay: float) -> None:
    """One step of ``torch.optim.SGD`` (dampening 0, no Nesterov), written out: constructing the first
    ``torch.optim`` optimizer in a process imports ``torch._dynamo`` (~1-3 s and ~300 modules), a cost every
    device process would pay for nothing. ``tests/unit/test_tasks.py`` checks it matches torch.optim.SGD (to 1e-6)."""
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        g = p.grad
        if weight_decay:
            g = g.add(p, alpha=weight_decay)
        if momentum:
            if bufs[i] is None:
                bufs[i] = g.detach().clone()
            else:
                bufs[i].mul_(momentum).add_(g)
            g = bufs[i]
        p.add_(g, alpha=-lr)


def local_train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> dict:
    """Train ``model`` in place with SGD for ``epochs`` passes over (x, y), minibatches shuffled by a
    ``torch.Generator`` seeded with ``seed`` (the last batch of an epoch may be smaller).

    Same update as ``torch.optim.SGD(lr, momentum, weight_decay)``; a fresh momentum buffer per call.
    Returns ``{"loss": mean training loss over the last epoch, "steps": optimizer steps taken}``.
    """
    if epochs < 0 or batch_size < 1 or lr < 0:
        raise ValueError(f"invalid hyperparameters epochs={epochs} batch_size={batch_size} lr={lr}")
    xt, yt = _as_tensors(x, y)
    n = xt.shape[0]
    if n == 0:
        raise ValueError("local_train needs at least one sample")
    gen = torch.Generator().manual_seed(int(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    bufs: list[torch.Tensor | None] = [None] * len(params)
    was_training = model.training
    model.train()
    steps = 0
    last_loss = float("nan")
    try:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                loss = F.cross_entropy(model(xt[idx]), yt[idx])
                for p in params:
                    p.grad = None
                loss.backward()
                _sgd_step(params, bufs, lr, momentum, weight_decay)
                steps += 1
                total += loss.item() * idx.shape[0]
            last_loss = total / n
    finally:
        model.train(was_training)
    return {"loss": last_loss, "steps": steps}


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 4096) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) of ``model`` on (x, y), without gradients, in eval mode."""
    xt, yt = _as_tensors(x, y)
    n = xt.shape[0]
    if n == 0:
        raise ValueError("evaluate needs at least one sample")
    was_training = model.training
    model.eval()
    correct = 0
    loss_sum = 0.0
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                logits = model(xt[start : start + batch_size])
                target = yt[start : start + batch_size]
                loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
                correct += int((logits.argmax(dim=1) == target).sum())
    finally:
        model.train(was_training)
    return correct / n, loss_sum / n
