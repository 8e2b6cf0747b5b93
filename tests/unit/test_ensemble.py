"""The ensemble: verdicts, weights, JSON safety, and that nothing an attacker sends turns it against the honest."""

import json

import numpy as np
import pytest

from processors.detectors import DeviceHistory, updated
from processors.ensemble import DETECTORS, FAMILIES, EnsembleConfig, score_window

K = 1024


def honest_window(n=10, seed=0, common=0.25):
    """Non-IID-like honest updates in sketch space: nearly orthogonal (pairwise cosine ~0.06, as measured on
    Fashion-MNIST) around a weak common direction ``g``, norms 1.6-2.4."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(K)
    g /= np.linalg.norm(g)
    noise = rng.standard_normal((n, K)) / np.sqrt(K)
    x = common * g + noise
    norms = rng.uniform(1.6, 2.4, n)
    x = x / np.linalg.norm(x, axis=1, keepdims=True) * norms[:, None]
    return x, g


def run(x, trust=None, histories=None, previous=None, config=EnsembleConfig()):
    n = x.shape[0]
    return score_window(np.linalg.norm(x, axis=1), x, histories or [None] * n, previous,
                        np.full(n, 0.5) if trust is None else trust, config)


def verdicts(res):
    return [m.verdict for m in res.members]


@pytest.mark.parametrize("seed", range(5))
def test_honest_windows_are_accepted(seed):
    x, _ = honest_window(seed=seed)
    res = run(x)
    assert verdicts(res) == ["accept"] * 10
    assert all(m.weight == 1.0 and m.flags == [] and m.evidence == "accept" for m in res.members)


def test_scaled_and_reversed_updates_are_rejected_with_reasons():
    x, g = honest_window()
    x[0] *= 10  # model replacement
    x[1] = -2.0 * g  # minus the common direction at the honest norm
    res = run(x)
    assert verdicts(res)[:2] == ["reject", "reject"] and verdicts(res)[2:] == ["accept"] * 8
    assert "magnitude" in res.members[0].flags and any("magnitude" in r for r in res.members[0].reasons)
    assert "direction" in res.members[1].flags and res.members[1].weight == 0.0
    assert res.members[1].scores["cos_centre"] < -0.3


def test_json_safe_output_and_stats():
    x, g = honest_window()
    x[3] = 0.0  # a zero update
    x[4] = x[5]  # a copy
    x[6] *= 1e30
    res = run(x)
    text = json.dumps(res.to_dict(), allow_nan=False)
    back = json.loads(text)
    assert len(back["members"]) == 10 and back["stats"]["n"] == 10 and back["stats"]["k"] == K
    assert sum(back["stats"]["verdicts"].values()) == 10
    for m in res.members:
        assert 0.0 <= m.weight <= 1.0 and m.verdict in ("accept", "downweight", "reject")
        assert (m.weight == 0.0) == (m.verdict == "reject")
        assert all(v is None or isinstance(v, float) for v in m.scores.values())
    assert res.members[4].verdict == res.members[5].verdict == "reject"
    assert "sybil" in res.members[4].flags and res.members[6].verdict == "reject"
    # reputation quarantines the copies at once; the huge norm is an ordinary reject (three strikes)
    assert res.members[4].evidence == res.members[5].evidence == "sybil" and res.members[6].evidence == "reject"


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_tiny_windows(n):
    x, _ = honest_window(n=max(n, 1))
    x = x[:n]
    res = run(x)
    assert len(res.members) == n
    if n and n < 3:
        assert verdicts(res) == ["accept"] * n  # nothing to compare with
    json.dumps(res.to_dict(), allow_nan=False)


def test_identical_members_all_rejected_as_sybils():
    x, _ = honest_window(n=1)
    res = run(np.tile(x, (5, 1)))
    assert verdicts(res) == ["reject"] * 5
    assert all("sybil" in m.flags and m.evidence == "sybil" for m in res.members)


def test_zero_vectors():
    x, _ = honest_window()
    x[0] = 0.0
    res = run(x)
    assert verdicts(res) == ["accept"] * 10  # a single zero update is harmless: it cannot dominate a mean
    x[1] = 0.0
    res = run(x)
    assert verdicts(res)[:2] == ["reject", "reject"] and verdicts(res)[2:] == ["accept"] * 8


# --------------------------------------------------------------------------- the hard requirement


@pytest.mark.parametrize("seed", range(3))
def test_six_identical_attackers_of_ten_do_not_hurt_the_honest(seed):
    x, g = honest_window(seed=seed)
    rng = np.random.default_rng(100 + seed)
    for attack in (rng.standard_normal(K), -g, 0.01 * rng.standard_normal(K), 50 * rng.standard_normal(K)):
        y = x.copy()
        y[:6] = attack  # identical: at any norm, any direction
        res = run(y)
        assert verdicts(res)[6:] == ["accept"] * 4, attack[:3]
        assert verdicts(res)[:6] == ["reject"] * 6


@pytest.mark.parametrize("seed", range(3))
def test_six_attackers_at_the_honest_median_norm_along_minus_the_mean(seed):
    x, g = honest_window(seed=seed)
    honest = x[6:]
    m = np.median(np.linalg.norm(honest, axis=1))
    mean = honest.mean(axis=0)
    bad = -m * mean / np.linalg.norm(mean)
    rng = np.random.default_rng(seed)
    exact = np.tile(bad, (6, 1))
    jittered = bad + 0.02 * m * rng.standard_normal((6, K)) / np.sqrt(K)  # cosine ~0.9998: near-copies
    noisy = bad + 0.33 * m * rng.standard_normal((6, K)) / np.sqrt(K)  # cosine ~0.9 to each other: not copies
    for attack in (exact, jittered, noisy):
        y = x.copy()
        y[:6] = attack
        res = run(y)
        assert verdicts(res)[6:] == ["accept"] * 4
        assert all(v == "reject" for v in verdicts(res)[:6])


def test_many_attackers_thirty_copies_and_ten_honest():
    x, g = honest_window()
    y = np.vstack([np.tile(-g * 2.0, (30, 1)), x])
    res = run(y)
    assert verdicts(res)[30:] == ["accept"] * 10 and set(verdicts(res)[:30]) == {"reject"}
    assert res.stats["distinct"] == 11


def test_tiny_norm_majority_cannot_make_the_honest_look_large():
    x, g = honest_window()
    rng = np.random.default_rng(7)
    y = x.copy()
    y[:6] = np.tile(0.02 * rng.standard_normal(K), (6, 1))  # identical, tiny
    res = run(y)
    assert verdicts(res)[6:] == ["accept"] * 4
    assert all(m.scores["magnitude_z"] < 3.5 for m in res.members[6:])


def test_trusted_honest_outweigh_a_fresh_diverse_majority():
    """Six fresh attackers that are not near-copies (cosine ~0.5 to each other) can move any within-window centre
    when everyone is equally trusted (docs/detection.md, limits); established honest devices (trust 0.92) vs fresh
    Sybils (0.5) keep the centres honest."""
    x, g = honest_window()
    honest = x[6:]
    m = np.median(np.linalg.norm(honest, axis=1))
    mean = honest.mean(axis=0)
    rng = np.random.default_rng(3)
    bad = -mean / np.linalg.norm(mean) + rng.standard_normal((6, K)) / np.sqrt(K)
    y = x.copy()
    y[:6] = m * bad / np.linalg.norm(bad, axis=1, keepdims=True)
    trust = np.r_[[0.5] * 6, [11 / 12] * 4]
    res = run(y, trust=trust)
    assert verdicts(res)[6:] == ["accept"] * 4


def test_colluding_histories_lower_the_foolsgold_alpha_and_the_centre_weight():
    x, g = honest_window()
    rng = np.random.default_rng(11)
    target = rng.standard_normal(K)
    hist = []
    for i in range(10):
        h = None
        for _ in range(3):
            past = target + rng.standard_normal(K) * 0.3 if i < 3 else rng.standard_normal(K)
            h = updated(h, past)
        hist.append(h)
    res = run(x, histories=hist)
    alphas = [m.scores["foolsgold_alpha"] for m in res.members]
    assert max(alphas[:3]) < 0.5 and min(alphas[3:]) == 1.0
    assert all("foolsgold" in m.flags and m.verdict == "downweight" for m in res.members[:3])
    assert all(m.weight <= 0.5 for m in res.members[:3])
    assert verdicts(res)[3:] == ["accept"] * 7


def test_previous_global_reversal_is_rejected():
    x, g = honest_window()
    prev = x[5:].mean(axis=0)
    y = x.copy()
    y[0] = -prev / np.linalg.norm(prev) * 2.0
    res = run(y, previous=prev)
    assert res.members[0].verdict == "reject" and res.members[0].scores["cos_previous"] < -0.5
    assert verdicts(res)[1:] == ["accept"] * 9


def test_low_trust_downweights_without_negative_evidence():
    x, _ = honest_window()
    trust = np.full(10, 0.9)
    trust[2] = 0.1
    res = run(x, trust=trust)
    m = res.members[2]
    assert m.verdict == "downweight" and m.flags == ["low_trust"] and m.weight == 0.5
    assert m.evidence == "accept"  # reputation must not punish a device for its own low trust


def test_one_family_downweights_two_families_reject():
    x, g = honest_window()
    y = x.copy()
    y[0] *= 4.0  # size only (magnitude and distance: one family)
    res = run(y)
    m = res.members[0]
    assert {"magnitude", "distance"} <= set(m.flags) and m.verdict == "downweight" and m.evidence == "downweight"
    assert m.weight == 0.5
    y[0] = -4.0 * np.linalg.norm(x[0]) * g / 2  # size and angle
    res = run(y)
    assert res.members[0].verdict == "reject"


def test_config_enabled_subset_and_validation():
    x, _ = honest_window()
    x[0] *= 10
    res = run(x, config=EnsembleConfig(enabled={"direction"}))
    assert res.members[0].verdict == "accept" and "magnitude_z" not in res.members[0].scores
    assert set(res.stats["detectors"]) == {"direction"}
    with pytest.raises(ValueError):
        EnsembleConfig(enabled={"nope"})
    assert set(FAMILIES) == set(DETECTORS)


def test_bad_input_raises():
    x, _ = honest_window(n=3)
    with pytest.raises(ValueError):
        score_window(np.ones(3), x[:2], [None] * 3, None, np.ones(3))
    with pytest.raises(ValueError):
        score_window(np.ones(3), x, [None] * 2, None, np.ones(3))
    y = x.copy()
    y[0, 0] = np.nan
    with pytest.raises(ValueError):
        score_window(np.ones(3), y, [None] * 3, None, np.ones(3))
    with pytest.raises(ValueError):
        score_window(np.ones(3), x, [None] * 3, None, np.ones(2))
    with pytest.raises(ValueError):
        score_window(np.ones(3), x, [DeviceHistory.empty(K + 1), None, None], None, np.ones(3))


@pytest.mark.parametrize("copies", [2, 3])
def test_a_sybil_group_along_minus_the_mean_does_not_become_the_reference_for_honest_members(copies):
    """Found live: two copies along minus the honest mean, at the honest median norm, in a window of five, turned
    the direction detector against every honest member (they were rejected). The group is rejected; the honest
    members are not."""
    rng = np.random.default_rng(7)
    d, n_honest = 400, 5 - copies
    common = rng.normal(size=d)
    honest = np.stack([0.45 * common + rng.normal(size=d) for _ in range(n_honest)])  # pairwise cosines ~0.15
    mean = honest.mean(axis=0)
    attack = -mean / np.linalg.norm(mean) * np.median(np.linalg.norm(honest, axis=1))
    window = np.vstack([honest] + [attack] * copies)
    verdict = score_window(np.linalg.norm(window, axis=1), window, [None] * 5, None, np.full(5, 0.5))
    verdicts = [m.verdict for m in verdict.members]
    assert verdicts[n_honest:] == ["reject"] * copies
    assert "reject" not in verdicts[:n_honest], [(m.verdict, m.flags) for m in verdict.members]


def test_an_equivocating_member_is_rejected_whatever_its_update_looks_like():
    """A device that sent another update for the window's base version (window stuffing, a flood) loses its seat,
    even when the seated update is indistinguishable from an honest one: here it *is* an honest update."""
    x, _ = honest_window(seed=1)
    flagged = [False] * 10
    flagged[3] = True
    n = 10
    res = score_window(np.linalg.norm(x, axis=1), x, [None] * n, None, np.full(n, 0.5), equivocated=flagged)
    assert verdicts(res) == ["accept"] * 3 + ["reject"] + ["accept"] * 6
    m = res.members[3]
    assert m.weight == 0.0 and m.evidence == "reject" and m.flags == ["equivocation"]
    assert any(r.startswith("equivocation:") for r in m.reasons)
    assert res.stats["equivocated"] == 1
    # without the input (or all False) nothing changes
    assert verdicts(run(x)) == ["accept"] * 10
    plain = score_window(np.linalg.norm(x, axis=1), x, [None] * n, None, np.full(n, 0.5), equivocated=[False] * n)
    assert verdicts(plain) == ["accept"] * 10 and plain.stats["equivocated"] == 0


@pytest.mark.parametrize("seed", range(3))
def test_equivocating_members_are_not_the_reference_for_the_honest(seed):
    """Four stuffers of ten with a clean record (trust 0.9, against the honest members' 0.5), each along minus the
    honest direction at the honest norm with its own noise (no Sybil group): they are rejected, and as they are left
    out of every centre, no honest member is rejected (as references they got 1 to 4 honest members rejected in each of
    these seeds)."""
    x, g = honest_window(seed=seed)
    rng = np.random.default_rng(100 + seed)
    median = float(np.median(np.linalg.norm(x, axis=1)))
    for i in range(4):
        v = -g + 0.6 * rng.standard_normal(K) / np.sqrt(K)
        x[i] = v / np.linalg.norm(v) * median
    eq = [True] * 4 + [False] * 6
    trust = np.array([0.9] * 4 + [0.5] * 6)
    res = score_window(np.linalg.norm(x, axis=1), x, [None] * 10, None, trust, equivocated=eq)
    assert verdicts(res)[:4] == ["reject"] * 4
    assert "reject" not in verdicts(res)[4:], [(m.verdict, m.flags) for m in res.members]


def test_equivocated_must_match_the_window():
    x, _ = honest_window(n=3)
    with pytest.raises(ValueError, match="equivocated"):
        score_window(np.linalg.norm(x, axis=1), x, [None] * 3, None, np.ones(3), equivocated=[True, False])
