"""Anomaly detectors over one window's members: pure functions over arrays, no Kafka."""

from __future__ import annotations

import numpy as np


def modified_z_scores(values: np.ndarray) -> np.ndarray:
    """Modified z-score of Iglewicz and Hoaglin (1993), eq. for M_i: ``M_i = 0.6745 (x_i - median) / MAD``.

    MAD is the median absolute deviation from the median. When MAD is 0 (at least half the values are equal) the
    score is 0 for values at the median and +-inf elsewhere, matching the definition's limit.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    median = np.median(values)
    mad = np.median(np.abs(values - median))
    deviation = values - median
    if mad == 0:
        return np.where(deviation == 0, 0.0, np.copysign(np.inf, deviation))
    return 0.6745 * deviation / mad


def norm_outliers(norms: np.ndarray, threshold: float = 3.5) -> tuple[np.ndarray, np.ndarray]:
    """Flag updates whose L2 norm is an outlier: ``|M_i| > threshold`` (3.5 is Iglewicz and Hoaglin's cut-off).

    Needs at least 3 members to say anything; with fewer, nobody is flagged. Returns (scores, flagged).
    """
    norms = np.asarray(norms, dtype=np.float64)
    if norms.size < 3:
        return np.zeros_like(norms), np.zeros(norms.shape, dtype=bool)
    scores = modified_z_scores(norms)
    return scores, np.abs(scores) > threshold
