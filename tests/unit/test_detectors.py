"""Detectors on small, hand-checkable inputs: ties, n = 1, 2, 3, identical members, zero vectors."""

import json

import numpy as np
import pytest

from processors import detectors as D
from processors.detectors import DeviceHistory, updated


def e(i, k=8, scale=1.0):
    v = np.zeros(k)
    v[i] = scale
    return v


# --------------------------------------------------------------------------- the original norm detector


def test_modified_z_and_norm_outliers_unchanged():
    np.testing.assert_allclose(D.modified_z_scores([1, 2, 3, 4, 10]), 0.6745 * np.array([-2, -1, 0, 1, 7]))
    assert D.modified_z_scores([5, 5, 5, 6])[3] == np.inf
    assert D.norm_outliers(np.array([1.0, 1.1, 0.9, 1.05, 0.95, 40.0]))[1].tolist() == [False] * 5 + [True]
    assert D.norm_outliers(np.array([1.0, 100.0]))[1].tolist() == [False, False]


# --------------------------------------------------------------------------- helpers


def test_weighted_median_matches_numpy_and_weights():
    assert D.weighted_median([3, 1, 2]) == 2.0
    assert D.weighted_median([4, 1, 3, 2]) == 2.5  # even n: mean of the middle two, like numpy
    assert D.weighted_median([1, 2, 3], [1, 1, 5]) == 3.0
    assert D.weighted_median([1, 2, 3], [0, 0, 1]) == 3.0  # zero weight ignored
    assert D.weighted_median([1, 2, 3], [0, 0, 0]) == 2.0  # no weight: unweighted
    assert D.weighted_median([2, 2, 2, 9]) == 2.0  # ties
    with pytest.raises(ValueError):
        D.weighted_median([])
    rng = np.random.default_rng(0)
    for n in range(1, 8):
        v = rng.standard_normal(n)
        assert D.weighted_median(v) == pytest.approx(np.median(v))


def test_coordinate_median():
    x = np.array([[1, 2], [3, 4], [5, 0], [7, 1]], float)
    np.testing.assert_allclose(D.coordinate_median(x), np.median(x, axis=0))
    np.testing.assert_allclose(D.coordinate_median(x, np.array([0, 0, 0, 1.0])), [7, 1])
    np.testing.assert_allclose(D.coordinate_median(x[:1]), x[0])


def test_robust_z_floor_and_zero_mad():
    z, c, s = D.robust_z([1, 1, 1, 2])
    assert c == 1 and s == 0 and z.tolist() == [0, 0, 0, D.Z_CAP]  # MAD 0, no floor: capped, finite
    z, c, s = D.robust_z([1, 1, 1, 2], floor_frac=0.5)
    assert s == 0.5 and z[3] == pytest.approx(0.6745 * 1 / 0.5)
    z, c, s = D.robust_z([0, 0, 0])
    assert z.tolist() == [0, 0, 0]


# --------------------------------------------------------------------------- Sybil groups


def test_sybil_groups_components_zero_vectors_and_lowest_index_label():
    s = np.stack([e(0), e(1), e(0, scale=3), np.zeros(8), np.zeros(8), e(0) + 0.01 * e(2), e(2)])
    labels = D.sybil_groups(s)
    assert labels.tolist() == [0, 1, 0, 3, 3, 0, 6]  # direction only: the 3x copy is in the group
    res = D.sybil(s)
    assert res.flagged.tolist() == [True, False, True, True, True, True, False]
    assert res.strong.tolist() == res.flagged.tolist()
    assert res.scores.tolist() == [3, 1, 3, 2, 2, 3, 1]
    assert res.info == {"groups": 2, "largest": 3}


def test_sybil_threshold_is_strict_and_small_windows():
    c = 0.99
    a, b = e(0), c * e(0) + np.sqrt(1 - c ** 2) * e(1)  # cosine exactly 0.99: not a copy
    assert D.sybil_groups(np.stack([a, b])).tolist() == [0, 1]
    assert D.sybil(np.zeros((0, 4))).flagged.size == 0
    assert D.sybil(e(0)[None]).flagged.tolist() == [False]
    assert D.sybil(np.stack([e(0), e(0)])).flagged.tolist() == [True, True]
    # a zero exact norm makes a member a zero update even if its sketch is not (cannot happen honestly)
    assert D.sybil_groups(np.stack([e(0), e(1)]), norms=np.array([0.0, 0.0])).tolist() == [0, 0]


def test_density_ramp():
    c = 0.8  # halfway on the 0.7 -> 0.9 ramp
    s = np.stack([e(0), c * e(0) + np.sqrt(1 - c ** 2) * e(1), e(3), e(3)])
    np.testing.assert_allclose(D.density(s), [1.5, 1.5, 2.0, 2.0])


# --------------------------------------------------------------------------- magnitude


def test_magnitude_flags_only_large_norms():
    norms = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 40.0, 0.01])
    res = D.magnitude(norms)
    assert res.flagged.tolist() == [False] * 5 + [True, False]  # one-sided: the tiny norm is fine
    assert res.strong[5] and res.info["centre"] == 1.0
    # scale = max(MAD 0.05, 0.4 * 1.0) = 0.4: cut = 1 + 3.5 * 0.4 / 0.6745
    assert res.info["scale"] == pytest.approx(0.4) and res.info["cut"] == pytest.approx(1 + 3.5 * 0.4 / 0.6745)


@pytest.mark.parametrize("n", [1, 2])
def test_magnitude_needs_three_distinct(n):
    res = D.magnitude(np.arange(1, n + 1) * 100.0)
    assert not res.flagged.any() and np.isfinite(res.scores).all()


def test_magnitude_three_members_and_floor_with_zero_mad():
    assert D.magnitude(np.array([1.0, 1.0, 10.0])).flagged.tolist() == [False, False, True]
    # MAD = 0 (identical norms): the floor (0.4 x median) decides, not +inf
    res = D.magnitude(np.array([1.0] * 5 + [2.0, 3.0, 3.2]))
    assert res.flagged.tolist() == [False] * 7 + [True]
    assert np.isfinite(res.scores).all()
    assert not D.magnitude(np.ones(6)).flagged.any()
    assert not D.magnitude(np.zeros(4)).flagged.any()


def test_magnitude_identical_tiny_attackers_do_not_flag_the_honest():
    rng = np.random.default_rng(0)
    honest = rng.standard_normal((4, 64))
    attack = np.tile(rng.standard_normal(64), (6, 1))  # 6 identical copies
    sk = np.vstack([honest, attack])
    norms = np.r_[[1.0, 1.2, 0.9, 1.1], [0.05] * 6]
    assert D.magnitude(norms).flagged[:4].all()  # counted six times, they would drag the median to 0.05
    res = D.magnitude(norms, sk)
    assert not res.flagged.any() and res.info["distinct"] == 5


def test_magnitude_trust_weighted_centre():
    norms = np.array([1.0, 1.1, 0.9, 0.1, 0.12, 0.11, 0.09])
    sk = np.eye(7)
    assert D.magnitude(norms, sk).flagged[:3].all()
    trust = np.array([0.9, 0.9, 0.9, 0.2, 0.2, 0.2, 0.2])
    assert not D.magnitude(norms, sk, trust=trust).flagged.any()


# --------------------------------------------------------------------------- direction


def window(n_honest=7, k=256, seed=0, common=0.3):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(k)
    g /= np.linalg.norm(g)
    noise = rng.standard_normal((n_honest, k)) / np.sqrt(k)
    return common * g + noise, g


def test_direction_flags_minus_the_mean_and_is_leave_one_out():
    h, g = window()
    s = np.vstack([h, -np.linalg.norm(h, axis=1).mean() * g])
    res = D.direction(s)
    assert res.flagged.tolist() == [False] * 7 + [True] and res.strong[7]
    assert res.scores[7] < -0.3 and (res.scores[:7] > -0.1).all()
    assert np.isnan(res.extra["cos_previous"]).all()


def test_direction_identical_members_and_zero_vector():
    s = np.tile(e(0), (4, 1))
    res = D.direction(s)  # one distinct member: no votes
    assert not res.flagged.any() and res.info["distinct"] == 1
    s = np.stack([e(0) + 0.1 * e(1), e(0) + 0.1 * e(2), e(0) + 0.1 * e(3), np.zeros(8)])
    res = D.direction(s)
    assert res.scores[3] == 0.0 and not res.flagged.any()


@pytest.mark.parametrize("n", [1, 2])
def test_direction_small_windows_never_vote(n):
    s = np.stack([e(0), -e(0)])[:n]
    res = D.direction(s)
    assert not res.flagged.any()


def test_direction_three_members():
    s = np.stack([e(0) + 0.2 * e(1), e(0) + 0.2 * e(2), -e(0)])
    res = D.direction(s)
    assert res.flagged.tolist() == [False, False, True]


def test_direction_previous_global_reversal():
    h, g = window()
    prev = h.mean(axis=0)
    s = np.vstack([h, -prev * 3])  # undoes the last step
    res = D.direction(s, prev)
    assert res.flagged[7] and res.strong[7] and res.extra["cos_previous"][7] == pytest.approx(-1.0)
    assert not res.flagged[:7].any()


@pytest.mark.parametrize("seed", [0, 2, 3, 4])  # seed 1 gives a window that is not contested
def test_direction_a_trusted_update_along_minus_the_mean_cannot_become_the_centre_of_a_contested_window(seed):
    # The live IPM test's window of five: four honest non-IID updates, slightly anti-correlated (pairwise about
    # -0.1, as on the synthetic task), and one attacker along minus their mean at their norm with the highest trust.
    # Its -0.44 pulls every honest pairwise median below core_min, so the window is contested. When the contested
    # core was every member, the attacker sat in each honest member's centre and all four scored about -0.35 to it,
    # under strong_cos: rejected on the attacker's account.
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((4, 256)) / 16.0
    h -= 0.15 * h.mean(axis=0)
    bad = -h.mean(axis=0)
    bad *= np.linalg.norm(h, axis=1).mean() / np.linalg.norm(bad)
    res = D.direction(np.vstack([h, bad]), trust=np.array([0.73, 0.5, 0.67, 0.74, 0.79]) ** 2)
    assert not res.strong[:4].any(), (res.scores, res.extra["pairwise"], res.info)
    assert res.strong[4] and res.scores[4] < -0.6
    assert res.info["contested"] and res.info["core"] < 5  # the core: the upper weighted half of the pairwise scores


def test_direction_copies_count_once():
    h, g = window(n_honest=4)
    bad = np.tile(-g, (6, 1))
    res = D.direction(np.vstack([h, bad]))
    assert not res.flagged[:4].any() and res.flagged[4:].all()


# --------------------------------------------------------------------------- distance


KRUM_POINTS = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -10.0]])


def test_distance_krum_scores_by_hand():
    res = D.distance(KRUM_POINTS)
    # squared distances: ab 2, ac 4, ad 101, bc 2, bd 121, cd 101; m = 4, f = 0, n - f - 2 = 2 nearest
    np.testing.assert_allclose(res.extra["krum"], [6, 4, 6, 202])
    assert res.flagged.tolist() == [False, False, False, True]
    # median 6, MAD 1 -> floor 1.0 x 6 = 6: z = 0.6745 (202 - 6) / 6
    assert res.scores[3] == pytest.approx(0.6745 * 196 / 6)
    assert res.info["f"] == 0 and res.info["distinct"] == 4


def test_distance_copies_share_a_score_and_small_windows():
    s = np.vstack([KRUM_POINTS, KRUM_POINTS[[3, 3]]])
    res = D.distance(s)
    assert res.info["distinct"] == 4 and res.extra["krum"][3:].tolist() == [202, 202, 202]
    assert res.flagged[3:].all() and not res.flagged[:3].any()
    assert not D.distance(KRUM_POINTS[:2]).flagged.any()
    assert not D.distance(np.zeros((3, 2))).flagged.any()
    assert D.distance(KRUM_POINTS[:1]).scores.tolist() == [0.0]


# --------------------------------------------------------------------------- FLAME


def pts(degrees):
    a = np.deg2rad(degrees)
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def test_flame_outliers_majority_cluster():
    # 10 degrees apart: cosine 0.985, not near-copies
    res = D.flame_outliers(pts([0, 10, 20, 30, 40, 50, 180]))
    assert res.flagged.tolist() == [False] * 6 + [True] and res.info["min_cluster_size"] == 4


def test_flame_copies_cannot_form_the_majority():
    res = D.flame_outliers(pts([0, 10, 20, 30] + [200] * 6))
    assert res.info["distinct"] == 5 and res.info["min_cluster_size"] == 3
    assert res.flagged.tolist() == [False] * 4 + [True] * 6
    assert not D.flame_outliers(pts([0, 90])).flagged.any()  # fewer than 3 distinct: no votes


# --------------------------------------------------------------------------- concentration


def test_concentration_flags_similar_not_identical_members():
    rng = np.random.default_rng(4)
    h, g = window(n_honest=6)
    bad = -g + 0.2 * rng.standard_normal((3, 256)) / np.sqrt(256)  # mutual cosine ~0.96
    res = D.concentration(np.vstack([h, bad]))
    assert res.flagged.tolist() == [False] * 6 + [True] * 3
    # everyone alike (round 1, IID): nobody stands out
    assert not D.concentration(np.vstack([bad, bad[0] * 1.01 + 0.01])).flagged.any()


# --------------------------------------------------------------------------- FoolsGold


def test_foolsgold_by_hand():
    h = np.stack([e(0), e(0), e(1)])
    np.testing.assert_allclose(D.foolsgold(h), [0.0, 0.0, 1.0])
    assert D.foolsgold(e(0)[None]).tolist() == [1.0]
    np.testing.assert_allclose(D.foolsgold(np.eye(4)), 1.0)  # all unlike each other
    assert D.foolsgold(np.tile(e(0), (3, 1))).tolist() == [0.0, 0.0, 0.0]


def test_foolsgold_pardoning_and_logit():
    c = 0.6
    h = np.stack([e(0), e(0), c * e(0) + np.sqrt(1 - c * c) * e(1), e(2)])
    alpha = D.foolsgold(h)
    # member 2: max cosine 0.6 to the Sybils (v = 1), pardoned to 0.6 * 0.6 / 1 = 0.36 -> 0.64, then / max (1)
    # and the logit ln(0.64 / 0.36) + 0.5 = 1.075 -> clipped to 1
    assert alpha[:2].tolist() == [0.0, 0.0] and alpha[2] == 1.0 and alpha[3] == 1.0
    assert D.foolsgold(h, kappa=0.2)[2] == pytest.approx(0.2 * (np.log(0.64 / 0.36) + 0.5))


# --------------------------------------------------------------------------- history


def test_device_history_update_and_json_round_trip():
    h = updated(None, np.array([1.0, 2.0]))
    h = updated(h, np.array([3.0, -1.0]))
    assert h.sum.tolist() == [4.0, 1.0] and h.count == 2 and h.sq_sum == pytest.approx(5 + 10)
    back = DeviceHistory.from_json(h.to_json(), k=2)
    assert back.sum.tolist() == h.sum.tolist() and back.count == 2 and back.sq_sum == h.sq_sum
    with pytest.raises(ValueError):
        DeviceHistory.from_json(h.to_json(), k=3)
    with pytest.raises(ValueError):
        updated(h, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError):
        updated(h, np.array([np.nan, 0.0]))


@pytest.mark.parametrize("text", ["", "[]", '{"v":1}', '{"v":2,"count":1,"sq_sum":0,"sum":"AAAAAAAAAAA="}',
                                  '{"v":1,"count":-1,"sq_sum":0,"sum":"AAAAAAAAAAA="}',
                                  '{"v":1,"count":true,"sq_sum":0,"sum":"AAAAAAAAAAA="}',
                                  '{"v":1,"count":1,"sq_sum":0,"sum":"AAAA"}',
                                  '{"v":1,"count":1,"sq_sum":0,"sum":"AAAAAAAA+H8="}',  # NaN
                                  '{"v":1,"count":1,"sq_sum":0,"sum":"!!"}',
                                  '{"v":1,"count":1,"sq_sum":0,"sum":"AAAAAAAAAAA=","x":1}'])
def test_device_history_from_json_is_strict(text):
    with pytest.raises(ValueError):
        DeviceHistory.from_json(text)


def test_history_needs_min_count_and_flags_an_off_fleet_history():
    rng = np.random.default_rng(5)
    g = rng.standard_normal(64)
    hists = []
    for i in range(6):
        h = None
        for _ in range(4):
            h = updated(h, g + 0.3 * rng.standard_normal(64))
        hists.append(h)
    odd = None
    for _ in range(4):
        odd = updated(odd, rng.standard_normal(64) * 0.2 + 3 * e(0, k=64))
    res = D.history(hists + [odd])
    assert res.flagged.tolist() == [False] * 6 + [True]
    assert np.all(res.extra["consistency"][:6] > 0.5)
    young = [updated(None, rng.standard_normal(64)) for _ in range(5)]
    assert not D.history(young).flagged.any()
    assert np.isnan(D.history(young).extra["consistency"]).all()


def test_detector_results_are_json_safe():
    s = np.stack([e(0), e(0), np.zeros(8), e(1), -e(1)])
    norms = np.array([1.0, 1.0, 0.0, 1e300, 2.0])
    for res in (D.magnitude(norms, s), D.direction(s), D.distance(s), D.sybil(s, norms), D.concentration(s)):
        json.dumps(res.info, allow_nan=False)
        assert np.isfinite(res.scores).all()
