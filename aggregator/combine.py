"""Bridge from the service's settings to an aggregation rule: which rule, with which parameters."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedguard.settings import Settings


def aggregate_deltas(rule: str, deltas: np.ndarray, sample_counts: np.ndarray,
                     settings: Settings) -> tuple[np.ndarray, dict[str, Any]]:
    """Aggregate the accepted members' deltas with the configured rule; returns (delta, info for the record)."""
    if rule != "fedavg":
        raise ValueError(f"unknown aggregation rule {rule!r}")
    capped = np.minimum(sample_counts, settings.sample_count_cap)
    weights = capped / capped.sum()
    return weights @ deltas.astype(np.float64), {"weights": weights.round(6).tolist()}
