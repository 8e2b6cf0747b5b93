"""The behaviour detector (Zeno's score on the server's clean rows) and the loss probe that feeds it.

The definition on hand-checked inputs (median, ties, weights, Sybil groups counted once, unmeasured members,
infinite losses, fewer than three members), the ensemble's use of it, and the probe on a real model: the loss it
reports is the cross-entropy of base + delta, an unreadable base version gives ``None``, not a verdict."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedguard.tasks import build_model, get_flat_params, load_task, model_spec, set_flat_params
from fedguard.tasks.server_data import LOSS_CAP, SERVER_SET_SIZE, LossProbe, loss_after, server_set
from processors import detectors as D
from processors.defence import measured_loss
from processors.ensemble import EnsembleConfig, score_window


# -- the definition -------------------------------------------------------------------------------------------------
def test_ratio_to_the_median_member_by_hand():
    # losses 1, 2, 3, 4, 12: median 3; ratios 1/3, 2/3, 1, 4/3, 4 -> only the last is above 2.5 (vote), and not
    # above 4 (strong: strictly greater)
    res = D.behaviour([1.0, 2.0, 3.0, 4.0, 12.0], base_loss=2.0)
    assert np.allclose(res.scores, [1 / 3, 2 / 3, 1.0, 4 / 3, 4.0])
    assert res.flagged.tolist() == [False, False, False, False, True]
    assert res.strong.tolist() == [False] * 5
    assert res.info["centre"] == 3.0 and res.info["cut"] == 7.5
    assert np.allclose(res.extra["lift"], [0.5, 1.0, 1.5, 2.0, 6.0])  # L_i / L(w), reported only
    res = D.behaviour([1.0, 2.0, 3.0, 4.0, 12.001])
    assert res.strong.tolist() == [False, False, False, False, True]


def test_even_count_takes_the_mean_of_the_two_middle_losses_and_the_cut_is_strict():
    # 1, 2, 4, 5: median (2 + 4) / 2 = 3 -> 7.5 is exactly 2.5x: not flagged; 7.51 is
    assert D.behaviour([1.0, 2.0, 4.0, 7.5]).info["centre"] == 3.0  # 2 and 4 in the middle of 1, 2, 4, 7.5
    assert not D.behaviour([1.0, 2.0, 4.0, 7.5]).flagged.any()
    assert D.behaviour([1.0, 2.0, 4.0, 7.51]).flagged.tolist() == [False, False, False, True]


def test_all_equal_losses_flag_nobody():
    res = D.behaviour([0.7] * 6)
    assert not res.flagged.any() and np.allclose(res.scores, 1.0)


def test_fewer_than_three_measured_members_gives_no_votes():
    assert not D.behaviour([1.0, 100.0]).flagged.any()
    res = D.behaviour([1.0, None, 100.0, float("nan")])
    assert not res.flagged.any() and res.info["measured"] == 2
    assert D.behaviour([]).scores.size == 0


def test_unmeasured_members_abstain_and_stay_out_of_the_median():
    res = D.behaviour([1.0, None, 1.2, 0.8, 5.0, float("nan")])
    assert res.info["centre"] == pytest.approx(1.1) and res.info["measured"] == 4  # (1.0 + 1.2) / 2
    assert res.flagged.tolist() == [False, False, False, False, True, False]
    assert res.scores[1] == 0.0 and res.scores[5] == 0.0


def test_an_infinite_loss_is_the_worst_not_an_error():
    res = D.behaviour([1.0, 1.1, 0.9, math.inf])
    assert res.flagged[3] and res.strong[3] and math.isfinite(res.scores[3])
    with pytest.raises(ValueError):
        D.behaviour([1.0, -0.1, 1.0])


def test_copies_at_a_tiny_loss_count_once_and_cannot_flag_the_honest():
    # Six identical attackers whose update lowers the loss to 0.1 and four honest members at 0.9-1.2: counted one by
    # one the median would be 0.1 and every honest member 9-12x "worse"; as one Sybil group they are one value.
    losses = [0.1] * 6 + [0.9, 1.0, 1.1, 1.2]
    alone = D.behaviour(losses)
    assert alone.flagged[6:].all()  # the attack this guards against
    labels = np.array([0] * 6 + [6, 7, 8, 9])
    grouped = D.behaviour(losses, labels=labels)
    assert not grouped.flagged.any()
    assert grouped.info["distinct"] == 5 and grouped.info["centre"] == 1.0  # of 0.1, 0.9, 1.0, 1.1, 1.2


def test_a_fresh_majority_does_not_outvote_trusted_members():
    # Three trusted members near 1.0, four fresh (trust 0.25 each, as the ensemble weighs E = 0.5) at 0.2:
    # weights 3 x 0.84 against 4 x 0.25, so the weighted median is a trusted member's loss.
    losses = [1.0, 1.1, 0.9, 0.2, 0.2, 0.21, 0.19]
    trust = np.array([0.84] * 3 + [0.25] * 4)
    res = D.behaviour(losses, trust=trust)
    assert res.info["centre"] == 0.9 and not res.flagged.any()
    assert D.behaviour(losses).flagged[:3].all()  # unweighted, the fresh majority would have flagged them


# -- in the ensemble ---------------------------------------------------------------------------------------------------
def _window(n=8, k=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k))
    return x / np.linalg.norm(x, axis=1, keepdims=True) * rng.uniform(1.6, 2.4, n)[:, None]


def test_the_ensemble_rejects_an_update_that_wrecks_the_model_on_clean_data_at_an_ordinary_norm_and_angle():
    x = _window()
    losses = [0.9, 1.0, 1.1, 0.95, 1.05, 0.85, 1.2, 9.0]  # the last: 9x the median member, e.g. a sign flip
    res = score_window(np.linalg.norm(x, axis=1), x, [None] * 8, None, np.full(8, 0.5), losses=losses,
                       base_loss=0.6)
    assert [m.verdict for m in res.members] == ["accept"] * 7 + ["reject"]
    assert res.members[7].flags == ["behaviour"] and "server's clean data" in " ".join(res.members[7].reasons)
    assert res.members[7].scores["loss"] == 9.0 and res.members[7].scores["loss_ratio"] > 8
    assert res.stats["detectors"]["behaviour"]["base_loss"] == 0.6
    assert res.members[7].evidence == "harmful"  # the strong signal: reputation quarantines at once
    assert all(m.evidence == "accept" for m in res.members[:7])
    # one vote below the strong cut: downweighted, not rejected
    losses[7] = 3.0
    res = score_window(np.linalg.norm(x, axis=1), x, [None] * 8, None, np.full(8, 0.5), losses=losses)
    assert res.members[7].verdict == "downweight" and res.members[7].evidence == "downweight"


def test_without_losses_the_detector_abstains_and_verdicts_are_unchanged():
    x = _window(seed=1)
    norms = np.linalg.norm(x, axis=1)
    plain = score_window(norms, x, [None] * 8, None, np.full(8, 0.5))
    none = score_window(norms, x, [None] * 8, None, np.full(8, 0.5), losses=[None] * 8)
    assert [m.verdict for m in plain.members] == [m.verdict for m in none.members] == ["accept"] * 8
    assert "behaviour" not in plain.stats["detectors"]
    off = EnsembleConfig(enabled=frozenset(EnsembleConfig().enabled - {"behaviour"}))
    res = score_window(norms, x, [None] * 8, None, np.full(8, 0.5), off, losses=[1.0] * 7 + [50.0])
    assert res.members[7].verdict == "accept"
    with pytest.raises(ValueError):
        score_window(norms, x, [None] * 8, None, np.full(8, 0.5), losses=[1.0] * 7)


@pytest.mark.parametrize("value, expected", [(0.5, 0.5), (0, 0.0), (None, None), ("0.5", None), (True, None),
                                             (-1.0, None), (float("nan"), None), (LOSS_CAP, LOSS_CAP)])
def test_a_loss_read_from_an_index_record(value, expected):
    assert measured_loss(value) == expected


# -- the probe -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    task = load_task("digits", seed=0)
    return task, model_spec(task)


def test_the_server_set_is_the_audits_balanced_rows(digits):
    task, _ = digits
    x, y = server_set(task, seed=3)
    assert x.shape[0] == min(SERVER_SET_SIZE, len(task.y_train))
    counts = np.bincount(y, minlength=task.num_classes)
    assert counts.max() - counts.min() <= 1


def test_the_probe_reports_the_cross_entropy_of_base_plus_delta(digits):
    task, spec = digits
    x, y = server_set(task, seed=0)
    base = get_flat_params(build_model(spec, seed=1))
    delta = np.random.default_rng(0).standard_normal(base.size).astype(np.float32) * 0.05
    loads = []
    probe = LossProbe(build_model(spec), x, y, lambda v: loads.append(v) or base, cache=2)
    loss, base_loss = probe(7, delta)
    reference = build_model(spec)
    for params, got in ((base + delta, loss), (base, base_loss)):
        set_flat_params(reference, params)
        with torch.no_grad():
            want = F.cross_entropy(reference(torch.as_tensor(x)), torch.as_tensor(y)).item()
        assert got == pytest.approx(want, rel=1e-5)
    probe(7, delta)
    probe(8, delta)
    probe(9, delta)
    probe(7, delta)  # evicted (cache of 2) and read again
    assert loads == [7, 8, 9, 7]


def test_the_probe_abstains_when_the_base_cannot_be_read_or_the_shape_is_wrong(digits):
    task, spec = digits
    x, y = server_set(task, seed=0)
    base = get_flat_params(build_model(spec))

    def load(version):
        if version == 3:
            raise FileNotFoundError("pruned")
        return base

    probe = LossProbe(build_model(spec), x, y, load)
    assert probe(3, np.zeros_like(base)) is None
    assert probe(4, np.zeros(base.size + 1, np.float32)) is None
    assert probe(4, np.zeros_like(base))[0] == pytest.approx(probe(4, np.zeros_like(base))[1])


def test_parameters_that_overflow_the_logits_give_the_capped_loss(digits):
    task, spec = digits
    x, y = server_set(task, seed=0)
    model = build_model(spec)
    huge = np.full(get_flat_params(model).size, 3e38, np.float32)
    assert loss_after(model, huge, torch.as_tensor(x), torch.as_tensor(y)) == LOSS_CAP
