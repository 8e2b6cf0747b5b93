"""Learning tasks for fedguard: data, non-IID splits, the MLP model and local training.

Public API::

    from fedguard.tasks import (TaskData, load_task, dirichlet_split, ModelSpec, model_spec, build_model,
                                get_flat_params, set_flat_params, local_train, evaluate, TASKS,
                                DEFAULT_TRAINING)
"""

from .data import TASKS, TaskData, dirichlet_split, load_task, read_idx, write_idx
from .models import DEFAULT_TRAINING, ModelSpec, build_model, get_flat_params, model_spec, set_flat_params
from .training import evaluate, local_train
from .backdoor import Trigger, apply_trigger, backdoor_accuracy, backdoor_eval_set, pixel_pattern, target_rate
from .runtime import configure_torch

__all__ = [
    "DEFAULT_TRAINING",
    "TASKS",
    "ModelSpec",
    "TaskData",
    "build_model",
    "dirichlet_split",
    "evaluate",
    "get_flat_params",
    "load_task",
    "local_train",
    "model_spec",
    "read_idx",
    "set_flat_params",
    "write_idx",
    "Trigger",
    "apply_trigger",
    "backdoor_accuracy",
    "backdoor_eval_set",
    "pixel_pattern",
    "target_rate",
    "configure_torch",
]
