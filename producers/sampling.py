"""Which devices take part in a round: pure functions, shared by the live fleet and the in-process simulation.

:func:`sample_devices` is the fleet's round sampling (``producers.fleet.Fleet.select`` calls it), so the live
pipeline and :mod:`fedguard.simulation` draw exactly the same devices for the same (seed, version, attempt) and the
same set of active devices. :func:`fleet_shards` is the fleet's non-IID split of the training set over its devices
and :func:`training_seed` the seed of a device's local training in a round (``Fleet.__init__`` and ``Fleet._seed``
compute the same, inline).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedguard.tasks import dirichlet_split

__all__ = ["fleet_shards", "sample_devices", "training_seed"]


def sample_devices(seed: int, version: int, attempt: int, num_devices: int, per_round: int,
                   active: Sequence[int] | None = None) -> list[int]:
    """``per_round`` of the ``active`` device indices (default: all of ``range(num_devices)``; all of them if
    fewer), drawn without replacement with ``numpy.random.default_rng([seed, version, attempt])``, returned sorted.
    The choice depends only on those arguments; with every device active it is the fleet's historical choice
    ``sorted(rng.choice(num_devices, per_round, replace=False))``. Revoked and quarantined devices are left out of
    ``active`` by the caller (they are never sampled). ``ValueError`` for an index outside the fleet."""
    pool = list(range(int(num_devices))) if active is None else [int(i) for i in active]
    if any(not 0 <= i < num_devices for i in pool):
        raise ValueError(f"active devices must be indices in [0, {num_devices})")
    count = min(int(per_round), len(pool))
    if count <= 0:
        return []
    rng = np.random.default_rng([int(seed), int(version), int(attempt)])
    return sorted(pool[i] for i in rng.choice(len(pool), count, replace=False).tolist())


def training_seed(seed: int, version: int, index: int) -> int:
    """The seed of device ``index``'s local training on base ``version`` (``Fleet._seed``)."""
    return (int(seed) * 1_000_003 + int(version) * 1009 + int(index)) % 2**31


def fleet_shards(y_train: np.ndarray, num_devices: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Device ``i``'s training indices: Dirichlet(``alpha``) split with ``default_rng(seed)``, at least
    ``min(10, N // (3 num_devices))`` (and 1) samples each (small data sets, e.g. digits at 100 devices, cannot
    give every shard 10)."""
    min_size = max(1, min(10, len(y_train) // (3 * int(num_devices))))
    return dirichlet_split(y_train, int(num_devices), alpha, np.random.default_rng(seed), min_size=min_size)
