"""The model: a small MLP, its shape (``ModelSpec``), deterministic construction and flat-vector views.

The flat layout is ``[W_0 (row-major, out x in), b_0, W_1, b_1, ...]``, i.e. ``model.parameters()`` order, and is
the wire/storage format of updates; ``ModelSpec.num_params`` gives its length without building a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import SYNTHETIC_CLASSES, SYNTHETIC_DIM, TASKS, TaskData

# Chosen with bench/fedavg_sim.py (see bench/results/fedavg_sim.md): 100 devices, 10 per round, Dirichlet 0.9.
DEFAULT_TRAINING: dict[str, dict[str, Any]] = {
    "fashion-mnist": {"epochs": 5, "lr": 0.02, "batch_size": 32, "momentum": 0.9, "hidden": (200,)},
    "digits": {"epochs": 5, "lr": 0.02, "batch_size": 16, "momentum": 0.9, "hidden": (64,)},
    "synthetic": {"epochs": 2, "lr": 0.05, "batch_size": 16, "momentum": 0.9, "hidden": (64,)},
}

_SHAPES = {"fashion-mnist": (784, 10), "digits": (64, 10), "synthetic": (SYNTHETIC_DIM, SYNTHETIC_CLASSES)}


@dataclass(frozen=True)
class ModelSpec:
    task: str
    input_dim: int
    num_classes: int
    hidden: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.input_dim < 1 or self.num_classes < 2 or any(h < 1 for h in self.hidden):
            raise ValueError(f"invalid model spec {self}")

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (self.input_dim, *self.hidden, self.num_classes)

    @property
    def num_params(self) -> int:
        """Number of scalars (weights + biases), by arithmetic; equals ``sum(p.numel())`` of the built model."""
        sizes = self.layer_sizes
        return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def model_spec(task: str | TaskData, hidden: tuple[int, ...] | list[int] | int | None = None) -> ModelSpec:
    """The model shape for a task (name or loaded ``TaskData``); ``hidden`` defaults to the task's tuned value.

    Given a name, the input/output sizes are known constants (no data loaded). Note that ``load_task`` may fall
    back from Fashion-MNIST to digits: pass the loaded ``TaskData`` so the spec matches the data actually used.
    """
    if isinstance(task, TaskData):
        name, input_dim, num_classes = task.name, task.input_dim, task.num_classes
    elif task in _SHAPES:
        name = task
        input_dim, num_classes = _SHAPES[task]
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS} or a TaskData")
    if hidden is None:
        hidden = DEFAULT_TRAINING.get(name, DEFAULT_TRAINING["synthetic"])["hidden"]
    elif isinstance(hidden, int):
        hidden = (hidden,)
    return ModelSpec(name, int(input_dim), int(num_classes), tuple(int(h) for h in hidden))


def build_model(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """An MLP (Linear + ReLU between layers, logits out). Initialisation equals PyTorch's ``nn.Linear`` default
    (Kaiming-uniform weights, U(+-1/sqrt(fan_in)) biases) but drawn from a private generator seeded with
    ``seed``, so it is deterministic and leaves the global torch RNG untouched."""
    gen = torch.Generator().manual_seed(int(seed))
    layers: list[nn.Module] = []
    sizes = spec.layer_sizes
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.utils.skip_init(nn.Linear, fan_in, fan_out)
        with torch.no_grad():
            nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=gen)
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(lin.bias, -bound, bound, generator=gen)
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def get_flat_params(model: nn.Module) -> np.ndarray:
    """All parameters as one new float32 1-D array (``model.parameters()`` order)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).to(torch.float32).cpu() for p in model.parameters()])
    return flat.numpy().copy()


def set_flat_params(model: nn.Module, flat: np.ndarray) -> None:
    """Load a flat vector (as produced by :func:`get_flat_params`) into ``model`` in place."""
    arr = np.asarray(flat)
    if arr.ndim != 1:
        raise ValueError(f"flat params must be 1-D, got shape {arr.shape}")
    params = list(model.parameters())
    expected = sum(p.numel() for p in params)
    if arr.shape[0] != expected:
        raise ValueError(f"flat params have length {arr.shape[0]}, model needs {expected}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"flat params must be floating point, got {arr.dtype}")
    src = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(src[offset : offset + n].view_as(p))
            offset += n
