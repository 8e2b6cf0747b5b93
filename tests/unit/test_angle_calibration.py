"""The direction thresholds in units of the deployment's honest angles: the definition on hand-checkable inputs,
that Fashion-MNIST-like windows keep the measured thresholds exactly, that honest anti-correlated members are no
longer voted against, and that attackers who fill the baseline cannot widen it past the cap."""

import numpy as np
import pytest

from processors.detectors import (ANGLE_LOWEST, ANGLE_MAX_SCALE, ANGLE_MIN_PAIRS, ANGLE_REFERENCE, angle_scale,
                                  extended_baseline, member_cosines, scaled_threshold)
from processors.ensemble import EnsembleConfig, score_window

K = 1024


def test_no_baseline_or_too_few_pairs_is_scale_one():
    assert angle_scale(None) == 1.0
    assert angle_scale([]) == 1.0
    assert angle_scale([-0.9] * (ANGLE_MIN_PAIRS - 1)) == 1.0
    assert angle_scale([-0.9] * ANGLE_MIN_PAIRS) == ANGLE_MAX_SCALE


def test_scale_is_the_lower_quantile_over_the_reference_clipped_to_one_and_the_cap():
    # numpy's default quantile (type 7) of 50 x -0.18 and 50 x 0.2 at q = 0.1 is -0.18: nu / 0.09 = 2
    assert angle_scale([-0.18] * 50 + [0.2] * 50) == pytest.approx(0.18 / ANGLE_REFERENCE) == pytest.approx(2.0)
    # 10 values 0.0, 0.1, ..., 0.9 shifted by -0.3: q10 = -0.3 + 0.9 x 0.1 = -0.21 (position 0.9 between the first
    # two), nu = 0.21
    values = [-0.3 + 0.1 * i for i in range(10)]
    assert angle_scale(values, min_pairs=10) == pytest.approx(0.21 / ANGLE_REFERENCE)
    assert angle_scale([0.05] * 100) == 1.0  # honest angles that agree (Fashion-MNIST): never stricter
    assert angle_scale([0.0] * 100) == 1.0  # all tied at 0: nu = 0
    assert angle_scale([-ANGLE_REFERENCE] * 100) == 1.0  # exactly the reference
    assert angle_scale([-1.0] * 100) == ANGLE_MAX_SCALE  # the cap
    assert angle_scale([float("nan")] * 100 + [-0.18] * 40) == pytest.approx(2.0)  # non-finite values ignored


def test_scaled_thresholds():
    assert scaled_threshold(-0.2, 1.0) == -0.2  # scale 1: exactly the measured threshold
    assert scaled_threshold(-0.1, 2.0) == pytest.approx(-0.2)
    assert scaled_threshold(-0.5, 3.0) == ANGLE_LOWEST  # the reversal test does not vanish
    assert scaled_threshold(-0.95, 2.0) == -0.95  # a threshold already below the floor is kept


def test_member_cosines_counts_kept_pairs_of_distinct_members_once():
    e = np.eye(4)
    x = np.stack([e[0], e[1], -e[0], e[1] * 3.0])  # members 1 and 3 are copies (one Sybil group)
    labels = np.array([0, 1, 2, 1])
    assert member_cosines(x, np.ones(4, bool), labels) == pytest.approx([0.0, -1.0, 0.0, 0.0, 0.0])
    # pairs (0,1), (0,2), (0,3), (1,2), (2,3); (1,3) is the copy pair, left out
    assert member_cosines(x, np.array([True, False, True, False]), labels) == pytest.approx([-1.0])
    assert member_cosines(x, np.array([True, False, False, False]), labels) == []
    with pytest.raises(ValueError):
        member_cosines(x, np.ones(3, bool), labels)


def test_extended_baseline_keeps_the_newest_and_rounds_them():
    assert extended_baseline([0.1, 0.2], [0.30000049, -0.4], size=3) == [0.2, 0.3, -0.4]
    assert extended_baseline([], [], size=5) == []
    assert extended_baseline([0.1], [0.2], size=0) == []


def honest_window(n, seed, common):
    """Updates around a common direction ``g``: ``common`` 0.25 makes them nearly orthogonal with a small positive
    cosine, as measured on Fashion-MNIST; a negative ``common`` per member pair is built in :func:`anti_window`."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(K)
    g /= np.linalg.norm(g)
    x = common * g + rng.standard_normal((n, K)) / np.sqrt(K)
    return x / np.linalg.norm(x, axis=1, keepdims=True) * rng.uniform(1.6, 2.4, (n, 1)), g


def judge(x, baseline=None, config=EnsembleConfig()):
    n = x.shape[0]
    return score_window(np.linalg.norm(x, axis=1), x, [None] * n, None, np.full(n, 0.5), config,
                        angle_baseline=baseline)


def test_fashion_mnist_like_windows_keep_the_measured_thresholds_exactly():
    baseline: list[float] = []
    for seed in range(30):
        x, _ = honest_window(10, seed, 0.25)
        res = judge(x, baseline)
        baseline = extended_baseline(baseline, res.angle_pairs)
    assert len(baseline) == 500 and angle_scale(baseline) == 1.0
    x, g = honest_window(10, 99, 0.25)
    x[0] = -2.0 * g  # and an update along minus the common direction
    with_baseline, without = judge(x, baseline), judge(x)
    assert with_baseline.stats["angle_scale"] == 1.0
    assert with_baseline.to_dict() == without.to_dict()
    assert with_baseline.members[0].verdict == "reject"


def anti_window(seed, rho=-0.15):
    """Three members whose pairwise cosines are all ``rho`` (e.g. -0.15, the honest spread of the synthetic and
    digits tasks): every member's pairwise score is below the measured -0.1, so all three are voted against."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((K, 3)))
    gram = np.full((3, 3), rho) + (1 - rho) * np.eye(3)
    return (q @ np.linalg.cholesky(gram).T).T * 2.0


def test_honest_members_of_a_deployment_with_wider_angles_are_not_voted_against():
    x = anti_window(0)
    assert np.allclose(x @ x.T / 4.0, np.full((3, 3), -0.15) + 1.15 * np.eye(3))
    before = judge(x)
    assert all("direction" in m.flags for m in before.members)
    wide = [-0.18] * 50 + [0.2] * 50  # scale 2: pairwise threshold -0.2
    after = judge(x, wide)
    assert after.stats["angle_scale"] == pytest.approx(2.0)
    assert [m.verdict for m in after.members] == ["accept"] * 3
    assert after.angle_pairs == pytest.approx([-0.15] * 3)


@pytest.mark.parametrize("seed", range(3))
def test_attackers_who_fill_the_baseline_cannot_widen_it_past_the_cap(seed):
    """The attacker's best: every cosine in the baseline is its own and as low as it likes (scale = the cap, 3).
    An update along minus the honest mean at the honest norm is still rejected and the honest still accepted."""
    x, g = honest_window(10, seed, 0.25)
    honest = x[2:]
    mean = honest.mean(axis=0)
    x[:2] = -np.median(np.linalg.norm(honest, axis=1)) * mean / np.linalg.norm(mean)
    x[1] += 0.3 * np.random.default_rng(seed).standard_normal(K) / np.sqrt(K)  # not copies of each other
    res = judge(x, [-1.0] * 500)
    assert res.stats["angle_scale"] == ANGLE_MAX_SCALE
    assert [m.verdict for m in res.members[:2]] == ["reject", "reject"]
    assert [m.verdict for m in res.members[2:]] == ["accept"] * 8


def test_calibration_can_be_switched_off():
    x = anti_window(1)
    res = judge(x, [-0.18] * 50 + [0.2] * 50, EnsembleConfig(angle_calibration=False))
    assert res.stats["angle_scale"] == 1.0
    assert all("direction" in m.flags for m in res.members)
