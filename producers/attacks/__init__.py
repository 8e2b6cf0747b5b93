"""Poisoning attacks: pure functions over arrays (paper-exact, no Kafka), a registry and a per-round driver.

Public API::

    from producers.attacks import (
        # model replacement / constrain-and-scale (Bagdasaryan et al. 2020)
        model_replacement_gamma, scale_update, scale_to_norm, constrain_norm, backdoor_train, backdoor_direction,
        # data poisoning
        poison_with_trigger, flip_labels,
        # untargeted
        sign_flip, gaussian_update, alie_z, alie, ipm, perturbation_vector, gamma_search,
        min_max, min_max_gamma, min_sum, min_sum_gamma,
        # collusion
        slow_drift, sybil_copies, stuffing,
        # registry and round driver
        ATTACKS, AttackSpec, validate_params, is_targeted, AttackContext, craft_round,
    )

Triggers and backdoor accuracy live in the shared core: ``fedguard.tasks`` (``pixel_pattern``, ``apply_trigger``,
``backdoor_accuracy``, ``backdoor_eval_set``). See docs/attacks.md.
"""

from .backdoor import (backdoor_direction, backdoor_train, constrain_norm, default_poison_per_batch,
                       model_replacement_gamma, scale_to_norm, scale_update)
from .collusion import slow_drift, stuffing, sybil_copies
from .live import AttackContext, craft_round
from .poisoning import flip_labels, poison_with_trigger
from .registry import ATTACKS, BASE_ATTACKS, AttackSpec, is_targeted, validate_params
from .untargeted import (PERTURBATIONS, alie, alie_z, gamma_search, gaussian_update, ipm, min_max, min_max_gamma,
                         min_sum, min_sum_gamma, perturbation_vector, sign_flip)

__all__ = [
    "ATTACKS",
    "BASE_ATTACKS",
    "PERTURBATIONS",
    "AttackContext",
    "AttackSpec",
    "alie",
    "alie_z",
    "backdoor_direction",
    "backdoor_train",
    "constrain_norm",
    "craft_round",
    "default_poison_per_batch",
    "flip_labels",
    "gamma_search",
    "gaussian_update",
    "ipm",
    "is_targeted",
    "min_max",
    "min_max_gamma",
    "min_sum",
    "min_sum_gamma",
    "model_replacement_gamma",
    "perturbation_vector",
    "poison_with_trigger",
    "scale_to_norm",
    "scale_update",
    "sign_flip",
    "slow_drift",
    "stuffing",
    "sybil_copies",
    "validate_params",
]
