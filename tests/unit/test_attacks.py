"""Unit tests for producers.attacks: each attack against its definition on hand-checkable inputs, degenerate
cases, parameter validation, one end-to-end backdoor on the synthetic task, and the round driver for every kind."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedguard.tasks import (Trigger, backdoor_eval_set, build_model, dirichlet_split, evaluate, get_flat_params,
                            load_task, local_train, model_spec, pixel_pattern, set_flat_params, target_rate)
from producers.attacks import (ATTACKS, PERTURBATIONS, AttackContext, alie, alie_z, backdoor_direction,
                               backdoor_train, constrain_norm, craft_round, default_poison_per_batch, flip_labels,
                               gamma_search, gaussian_update, ipm, is_targeted, min_max, min_max_gamma, min_sum,
                               min_sum_gamma, model_replacement_gamma, perturbation_vector, poison_with_trigger,
                               scale_to_norm, scale_update, sign_flip, slow_drift, stuffing, sybil_copies,
                               validate_params)




# ------------------------------------------------------------------------------- model replacement / scaling


def test_model_replacement_gamma_is_n_over_eta():
    assert model_replacement_gamma(10) == 10.0
    assert model_replacement_gamma(10, 0.5) == 20.0
    assert model_replacement_gamma(1, 1.0) == 1.0  # a window of one: the attacker's delta as is


@pytest.mark.parametrize("n, eta", [(0, 1.0), (2.5, 1.0), (True, 1.0), (10, 0.0), (10, -1.0), (10, float("inf"))])
def test_model_replacement_gamma_rejects_bad_parameters(n, eta):
    with pytest.raises(ValueError):
        model_replacement_gamma(n, eta)


def test_model_replacement_replaces_the_fedavg_mean():
    # n = 4 updates, the 3 honest deltas cancel: mean = (gamma * (X - G) + 0) / 4 = X - G with gamma = 4
    target = np.array([1.0, -2.0])
    honest = [np.array([1.0, 1.0]), np.array([-1.0, 0.0]), np.array([0.0, -1.0])]
    crafted = scale_update(target, model_replacement_gamma(4))
    assert np.allclose(np.mean([crafted, *honest], axis=0), target)


def test_scale_update_and_its_validation():
    out = scale_update(np.array([1.0, -0.5]), 3.0)
    assert out.dtype == np.float32 and out.tolist() == [3.0, -1.5]
    for gamma in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            scale_update(np.ones(2), gamma)
    with pytest.raises(ValueError):
        scale_update(np.array([1.0, np.nan]), 2.0)
    with pytest.raises(ValueError):
        scale_update(np.ones((2, 2)), 2.0)


def test_scale_to_norm():
    # ||(3, 4)|| = 5 -> norm 10: (6, 8); norm 1: (0.6, 0.8)
    assert scale_to_norm(np.array([3.0, 4.0]), 10.0).tolist() == [6.0, 8.0]
    assert np.allclose(scale_to_norm(np.array([3.0, 4.0]), 1.0), [0.6, 0.8])
    assert scale_to_norm(np.zeros(3), 5.0).tolist() == [0.0, 0.0, 0.0]  # zero norm: no direction, stays zero
    with pytest.raises(ValueError):
        scale_to_norm(np.ones(2), -1.0)


def test_constrain_norm():
    v = np.array([3.0, 4.0])  # norm 5
    assert np.allclose(constrain_norm(v, 2.5), [1.5, 2.0])  # scaled down to the bound
    assert constrain_norm(v, 5.0).tolist() == [3.0, 4.0]  # at the bound: unchanged
    assert constrain_norm(v, 10.0).tolist() == [3.0, 4.0]  # never scaled up
    assert constrain_norm(v, None).tolist() == [3.0, 4.0]
    assert constrain_norm(np.zeros(2), 1.0).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        constrain_norm(v, 0.0)


def test_default_poison_per_batch_keeps_the_papers_ratio():
    # 20 of 64 in the paper
    assert [default_poison_per_batch(b) for b in (64, 32, 16, 1)] == [20, 10, 5, 1]
    with pytest.raises(ValueError):
        default_poison_per_batch(0)


def test_backdoor_direction_is_the_unit_difference():
    # b - h = (3, 4) - (0, 0)... with h = (1, 1): b = (4, 5) -> (3, 4) / 5
    assert np.allclose(backdoor_direction(np.array([4.0, 5.0]), np.array([1.0, 1.0])), [0.6, 0.8])
    with pytest.raises(ValueError, match="no backdoor direction"):
        backdoor_direction(np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match="differ in length"):
        backdoor_direction(np.ones(2), np.ones(3))


# ------------------------------------------------------------------------------------------- backdoor_train


@pytest.fixture(scope="module")
def synthetic():
    task = load_task("synthetic")
    idx = np.random.default_rng(0).choice(len(task.y_train), 800, replace=False)
    return task, task.x_train[idx], task.y_train[idx]


def _bd(model, x, y, trig, g, **kw):
    args = dict(trigger=trig, global_params=g, epochs=1, lr=0.05, batch_size=16, momentum=0.9, seed=3)
    args.update(kw)
    return backdoor_train(model, x, y, **args)


def test_backdoor_train_beats_honest_training_end_to_end(synthetic):
    task, x, y = synthetic
    spec = model_spec(task)
    trig = pixel_pattern(task)  # last 4 features at the training maximum, target 0
    x_bd = backdoor_eval_set(task, trig)
    model = build_model(spec, seed=0)
    g = get_flat_params(model)
    delta = _bd(model, x, y, trig, g, epochs=3, class_weight=1.0)
    set_flat_params(model, g + delta)
    honest = build_model(spec, seed=0)
    local_train(honest, x, y, epochs=3, lr=0.05, batch_size=16, momentum=0.9, seed=3)
    bd_rate, honest_rate = target_rate(model, x_bd, 0), target_rate(honest, x_bd, 0)
    assert bd_rate > 0.9 and honest_rate < 0.3, (bd_rate, honest_rate)
    # plain backdoor training (alpha = 1) keeps the main task
    assert evaluate(model, task.x_test, task.y_test)[0] > 0.5


def test_backdoor_train_is_deterministic_float32_and_leaves_inputs_alone(synthetic):
    task, x, y = synthetic
    model = build_model(model_spec(task), seed=0)
    g = get_flat_params(model)
    g.flags.writeable = False
    a = _bd(model, x, y, pixel_pattern(task), g)
    b = _bd(build_model(model_spec(task), seed=5), x, y, pixel_pattern(task), g)  # starts from g whatever the model
    c = _bd(model, x, y, pixel_pattern(task), g, seed=4)
    assert a.dtype == np.float32 and a.shape == g.shape and np.isfinite(a).all()
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_backdoor_train_anomaly_term_keeps_the_model_closer_to_global(synthetic):
    task, x, y = synthetic
    model = build_model(model_spec(task), seed=0)
    g = get_flat_params(model)
    plain = np.linalg.norm(_bd(model, x, y, pixel_pattern(task), g, class_weight=1.0))
    evasive = np.linalg.norm(_bd(model, x, y, pixel_pattern(task), g, class_weight=0.7))  # (1 - 0.7) ||w - G||^2
    assert evasive < plain


def test_backdoor_train_zero_epochs_gives_a_zero_delta(synthetic):
    task, x, y = synthetic
    model = build_model(model_spec(task), seed=0)
    g = get_flat_params(model)
    assert not _bd(model, x, y, pixel_pattern(task), g, epochs=0).any()


@pytest.mark.parametrize("kw", [{"class_weight": 0.0}, {"class_weight": 1.5}, {"poison_per_batch": 17},
                                {"poison_per_batch": -1}, {"batch_size": 0}, {"lr": -0.1}, {"momentum": 1.0},
                                {"epochs": -1}])
def test_backdoor_train_rejects_bad_parameters(synthetic, kw):
    task, x, y = synthetic
    model = build_model(model_spec(task), seed=0)
    with pytest.raises(ValueError):
        _bd(model, x, y, pixel_pattern(task), get_flat_params(model), **kw)


def test_backdoor_train_rejects_mismatched_inputs(synthetic):
    task, x, y = synthetic
    model = build_model(model_spec(task), seed=0)
    g = get_flat_params(model)
    with pytest.raises(ValueError):
        _bd(model, x, y[:-1], pixel_pattern(task), g)
    with pytest.raises(ValueError):
        _bd(model, x, y, pixel_pattern(task), g[:-1])
    with pytest.raises(ValueError, match="not one of the model's"):
        _bd(model, x, y, Trigger("t", np.array([0]), 1.0, 10), g)


# ------------------------------------------------------------------------------------------- data poisoning


def test_poison_with_trigger_poisons_exactly_the_fraction():
    x = np.zeros((10, 4), dtype=np.float32)
    y = np.arange(10) % 3 + 1  # no label is 0 yet
    x.flags.writeable = False
    trig = Trigger("t", np.array([3]), 5.0, 0)
    xp, yp = poison_with_trigger(x, y, trig, 0.3, np.random.default_rng(0))
    poisoned = xp[:, 3] == 5.0
    assert poisoned.sum() == 3  # round(0.3 * 10)
    assert (yp[poisoned] == 0).all() and (yp[~poisoned] == y[~poisoned]).all()
    assert not xp[:, :3].any() and not x.any()
    assert poison_with_trigger(x, y, trig, 0.0, np.random.default_rng(0))[1].tolist() == y.tolist()
    assert (poison_with_trigger(x, y, trig, 1.0, np.random.default_rng(0))[1] == 0).all()


@pytest.mark.parametrize("fraction", [-0.1, 1.1, float("nan")])
def test_poison_with_trigger_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError):
        poison_with_trigger(np.zeros((2, 2)), np.zeros(2, dtype=int), Trigger("t", np.array([0]), 1.0, 0), fraction,
                            np.random.default_rng(0))


def test_flip_labels():
    y = np.array([0, 1, 2, 1, 6])
    assert flip_labels(y, 1, 7).tolist() == [0, 7, 2, 7, 6]
    assert flip_labels(y, 6, 0).tolist() == [0, 1, 2, 1, 0]  # Tolpegin's Fashion-MNIST shirt -> T-shirt
    assert flip_labels(y, "all", 2).tolist() == [2, 2, 2, 2, 2]
    assert flip_labels(y, 9, 0).tolist() == y.tolist()  # absent source: nothing changes
    assert y.tolist() == [0, 1, 2, 1, 6]  # input untouched
    for source, target in [(1, 1), ("some", 0), (-1, 0), (1, -2)]:
        with pytest.raises(ValueError):
            flip_labels(y, source, target)
    with pytest.raises(ValueError):
        flip_labels(np.array([0.5, 1.0]), 1, 0)


# ----------------------------------------------------------------------------------------------- untargeted


def test_sign_flip():
    assert sign_flip(np.array([1.0, -2.0])).tolist() == [-1.0, 2.0]
    assert sign_flip(np.array([1.0, -2.0]), 4.0).tolist() == [-4.0, 8.0]
    assert sign_flip(np.zeros(2)).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        sign_flip(np.ones(2), 0.0)


def test_gaussian_update():
    a = gaussian_update(20_000, 2.0, np.random.default_rng(1))
    assert a.dtype == np.float32 and a.shape == (20_000,)
    assert abs(a.mean()) < 0.05 and abs(a.std() - 2.0) < 0.05
    assert np.array_equal(a, gaussian_update(20_000, 2.0, np.random.default_rng(1)))
    assert not gaussian_update(3, 0.0, np.random.default_rng(0)).any()
    for args in [(0, 1.0), (3, -1.0)]:
        with pytest.raises(ValueError):
            gaussian_update(*args, np.random.default_rng(0))
    with pytest.raises(ValueError, match="Generator"):
        gaussian_update(3, 1.0, 0)


def test_alie_z_from_algorithm_1():
    # n = 10, f = 2: s = floor(6) - 2 = 4, z = Phi^-1(6/10) = 0.2533471
    assert alie_z(10, 2) == pytest.approx(0.2533471, abs=1e-6)
    # n = 50, f = 12 (Baruch et al.'s set-up): s = 26 - 12 = 14, z = Phi^-1(36/50) = Phi^-1(0.72) = 0.5828415
    assert alie_z(50, 12) == pytest.approx(0.5828415, abs=1e-6)
    assert alie_z(2, 1) == 0.0  # s = 1, Phi^-1(1/2) = 0
    # n = 3, f = 1: s = floor(2.5) - 1 = 1, z = Phi^-1(2/3) = 0.4307273
    assert alie_z(3, 1) == pytest.approx(0.4307273, abs=1e-6)


@pytest.mark.parametrize("n, f", [(1, 1), (10, 0), (10, 6), (4, 3), (10.0, 2)])
def test_alie_z_rejects_majorities_and_bad_values(n, f):
    with pytest.raises(ValueError):
        alie_z(n, f)


def test_alie_is_mean_minus_z_std():
    benign = np.array([[1.0, 0.0], [3.0, 4.0]])
    # mean (2, 2); sample std (ddof 1): (2/sqrt 2, 4/sqrt 2) = (1.41421, 2.82843); z(10, 2) = 0.2533471
    z = 0.2533471
    assert np.allclose(alie(benign, 10, 2), [2 - z * math.sqrt(2), 2 - z * 2 * math.sqrt(2)], atol=1e-6)
    assert np.allclose(alie(benign, 10, 2, z=1.0), [2 - math.sqrt(2), 2 - 2 * math.sqrt(2)])
    # one benign update: no spread, ALIE sends it unchanged (never NaN)
    assert alie(np.array([[1.0, -1.0]]), 10, 2).tolist() == [1.0, -1.0]
    # identical benign updates: zero std
    assert alie(np.array([[1.0, 2.0]] * 3), 10, 2).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError):
        alie(np.ones(3), 10, 2)
    with pytest.raises(ValueError):
        alie(np.array([[np.inf, 0.0]]), 10, 2)


def test_ipm():
    benign = np.array([[1.0, 2.0], [3.0, 0.0]])  # mean (2, 1)
    assert ipm(benign, 0.1).tolist() == pytest.approx([-0.2, -0.1])
    assert ipm(benign, 100).tolist() == [-200.0, -100.0]
    assert ipm(benign[:1], 1.0).tolist() == [-1.0, -2.0]
    with pytest.raises(ValueError):
        ipm(benign, 0.0)


def test_perturbation_vectors():
    benign = np.array([[0.0, 0.0], [6.0, -8.0]])  # mean (3, -4), ||mean|| = 5
    assert np.allclose(perturbation_vector(benign, "unit"), [0.6, -0.8])
    assert perturbation_vector(benign, "sign").tolist() == [1.0, -1.0]
    assert np.allclose(perturbation_vector(benign, "std"), [6 / math.sqrt(2), 8 / math.sqrt(2)])
    assert perturbation_vector(np.zeros((2, 2)), "unit").tolist() == [0.0, 0.0]  # zero mean: no direction
    with pytest.raises(ValueError, match="perturbation"):
        perturbation_vector(benign, "gauss")


def test_gamma_search_follows_algorithm_1():
    # feasible iff gamma <= 3, gamma_init 10: tests 10 (no), 5 (no), 2.5 (yes), 3.75 (no), 3.125 (no), ...
    seen = []
    got = gamma_search(lambda g: seen.append(g) or g <= 3.0, gamma_init=10.0, tau=1e-3)
    assert seen[:5] == [10.0, 5.0, 2.5, 3.75, 3.125]
    assert 3.0 - 2e-3 <= got <= 3.0
    assert gamma_search(lambda g: False, 10.0, 1e-3) == 0.0  # nothing feasible: gamma 0
    # everything feasible: converges to the top of the search range, 2 * gamma_init
    assert 20.0 - 2e-3 <= gamma_search(lambda g: True, 10.0, 1e-3) < 20.0
    with pytest.raises(ValueError):
        gamma_search(lambda g: True, 0.0, 1e-3)
    with pytest.raises(ValueError):
        gamma_search(lambda g: True, 1.0, 0.0)


def test_min_max_one_dimensional_by_hand():
    # b = {0, 2}: mean 1, max pairwise distance 2; m = 1 - t (t = gamma p) is at most 2 from both iff t <= 1,
    # so the attack lands on m = 0 whatever the perturbation (p = 1 for unit/sign, p = sqrt 2 for std).
    benign = np.array([[0.0], [2.0]])
    for pert, gamma in [("unit", 1.0), ("sign", 1.0), ("std", 1 / math.sqrt(2))]:
        assert min_max_gamma(benign, pert) == pytest.approx(gamma, abs=2e-5)
        assert min_max(benign, pert)[0] == pytest.approx(0.0, abs=3e-5)
        # min-sum: (1 - t)^2 + (1 + t)^2 = 2 + 2 t^2 <= max_i sum_j (b_i - b_j)^2 = 4 iff t <= 1: the same
        assert min_sum(benign, pert)[0] == pytest.approx(0.0, abs=3e-5)


def test_min_max_and_min_sum_two_dimensional_by_hand():
    # b = (0,0), (2,0), (0,2); mean (2/3, 2/3); unit p = (1,1)/sqrt 2; m = (s, s) with s = 2/3 - gamma/sqrt 2.
    benign = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    # min-max: max pairwise distance 2 sqrt 2; binding: ||m - (2,0)||^2 = (s-2)^2 + s^2 <= 8 -> s >= 1 - sqrt 3
    gamma_mm = math.sqrt(2) * (2 / 3 - (1 - math.sqrt(3)))  # 1.97808
    # min-sum: sum_i ||m - b_i||^2 = 6 s^2 - 8 s + 8 <= max(8, 12, 12) = 12 -> s >= (4 - sqrt 40) / 6
    gamma_ms = math.sqrt(2) * (2 / 3 - (4 - math.sqrt(40)) / 6)  # 1.49072
    assert min_max_gamma(benign, "unit") == pytest.approx(gamma_mm, abs=2e-5)
    assert min_sum_gamma(benign, "unit") == pytest.approx(gamma_ms, abs=2e-5)
    s = 1 - math.sqrt(3)
    assert np.allclose(min_max(benign, "unit"), [s, s], atol=2e-5)


def _max_dist_ok(b, m):
    return np.linalg.norm(b - m, axis=1).max() <= max(np.linalg.norm(b - bi, axis=1).max() for bi in b)


def _sum_dist_ok(b, m):
    return (np.linalg.norm(b - m, axis=1) ** 2).sum() <= max((np.linalg.norm(b - bi, axis=1) ** 2).sum() for bi in b)


@pytest.mark.parametrize("pert", PERTURBATIONS)
@pytest.mark.parametrize("attack, gamma_of, ok", [(min_max, min_max_gamma, _max_dist_ok),
                                                  (min_sum, min_sum_gamma, _sum_dist_ok)])
def test_min_max_min_sum_satisfy_the_constraint_and_gamma_is_maximal(attack, gamma_of, ok, pert):
    tau = 1e-4
    for seed in range(30):
        rng = np.random.default_rng(seed)
        b = rng.normal(size=(int(rng.integers(2, 7)), int(rng.integers(1, 6))))
        gamma = gamma_of(b, pert, gamma_init=5.0, tau=tau)
        p = perturbation_vector(b, pert).astype(np.float64)
        m = attack(b, pert, gamma_init=5.0, tau=tau)
        assert np.allclose(m, b.mean(0) - gamma * p, atol=1e-6)
        assert ok(b, b.mean(0) - gamma * p)
        if gamma < 10.0 - 2 * tau:  # below the top of the search range [0, 2 gamma_init)
            assert not ok(b, b.mean(0) - (gamma + 2 * tau) * p), (seed, gamma)


def test_min_max_min_sum_degenerate_inputs():
    one = np.array([[1.0, -2.0]])  # a single benign update: bound 0, gamma 0, the update itself
    for attack in (min_max, min_sum):
        for pert in PERTURBATIONS:
            assert attack(one, pert).tolist() == [1.0, -2.0]
    same = np.array([[1.0, 1.0], [1.0, 1.0]])  # identical updates: distance bound 0, std 0
    assert min_max(same).tolist() == [1.0, 1.0]
    assert np.isfinite(min_sum(np.zeros((3, 2)), "unit")).all()  # zero mean, unit p = 0
    with pytest.raises(ValueError):
        min_max(np.zeros((0, 2)))


# ------------------------------------------------------------------------------------------------ collusion


def test_slow_drift():
    # honest (1, 0) + 0.5 * 2 * (0, 3)/3 = (1, 1)
    assert slow_drift(np.array([1.0, 0.0]), np.array([0.0, 3.0]), 0.5, 2.0).tolist() == [1.0, 1.0]
    assert slow_drift(np.array([1.0, 0.0]), np.array([0.0, 3.0]), 0.0, 2.0).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="zero norm"):
        slow_drift(np.ones(2), np.zeros(2), 0.3, 1.0)
    with pytest.raises(ValueError):
        slow_drift(np.ones(2), np.ones(3), 0.3, 1.0)
    with pytest.raises(ValueError):
        slow_drift(np.ones(2), np.ones(2), -0.1, 1.0)


def test_sybil_copies():
    u = np.array([3.0, 4.0])
    exact = sybil_copies(u, 3, 0.0, None)
    assert len(exact) == 3 and all(c.tolist() == [3.0, 4.0] for c in exact)
    exact[0][0] = 9.0
    assert exact[1][0] == 3.0  # independent arrays
    assert len(sybil_copies(u, 1, 0.0, None)) == 1
    d = 10_000
    big = np.ones(d)  # ||u|| = 100; noise scale jitter * 100 / 100 = jitter per coordinate
    copies = sybil_copies(big, 2, 0.01, np.random.default_rng(0))
    dev = np.linalg.norm(copies[0] - big)
    assert dev == pytest.approx(0.01 * 100, rel=0.05)  # ||u_i - u|| ~= jitter * ||u||
    assert not np.array_equal(copies[0], copies[1])
    assert not any(c.any() for c in sybil_copies(np.zeros(4), 2, 0.5, np.random.default_rng(0)))
    for k, jitter in [(0, 0.0), (2, -0.1)]:
        with pytest.raises(ValueError):
            sybil_copies(u, k, jitter, np.random.default_rng(0))


def test_stuffing():
    out = stuffing(np.array([1.0, 2.0]), 4)
    assert len(out) == 4 and all(o.tolist() == [1.0, 2.0] and o.dtype == np.float32 for o in out)
    with pytest.raises(ValueError):
        stuffing(np.ones(2), 0)


# ------------------------------------------------------------------------------------------------- registry

KINDS = ["model_replacement", "constrain_and_scale", "badnets", "label_flip", "sign_flip", "gaussian", "alie", "ipm",
         "min_max", "min_sum", "slow_drift", "sybil", "window_stuffing"]


def test_registry_has_every_kind_with_valid_defaults():
    assert sorted(ATTACKS) == sorted(KINDS)
    for kind, spec in ATTACKS.items():
        assert spec.name == kind and spec.summary and spec.paper
        assert spec.schedule == ("single" if kind == "model_replacement" else "persistent")
        assert validate_params(kind) == dict(spec.defaults)
    targeted = {k for k, s in ATTACKS.items() if s.targeted}
    assert targeted == {"model_replacement", "constrain_and_scale", "badnets", "slow_drift", "sybil",
                        "window_stuffing"}
    assert {k for k, s in ATTACKS.items() if s.needs_benign} >= {"alie", "ipm", "min_max", "min_sum"}


def test_validate_params_overrides_and_normalises():
    p = validate_params("ipm", {"eps": 1})
    assert p == {"eps": 1.0, "omniscient": False, "norm": None} and isinstance(p["eps"], float)
    assert validate_params("min_max", {"perturbation": "sign"})["perturbation"] == "sign"
    assert validate_params("constrain_and_scale", {"norm": 2})["norm"] == 2.0
    assert validate_params("label_flip", {"source": 6})["source"] == 6


def test_validate_params_names_the_allowed_keys():
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) 'epsilon'.*allowed: eps, omniscient"):
        validate_params("ipm", {"epsilon": 1.0})
    with pytest.raises(ValueError, match="unknown attack kind"):
        validate_params("nope")
    with pytest.raises(ValueError):
        validate_params("ipm", [("eps", 1.0)])


@pytest.mark.parametrize("kind, params", [
    ("ipm", {"eps": 0}), ("ipm", {"omniscient": 1}), ("sign_flip", {"scale": "big"}), ("gaussian", {"sigma": -1}),
    ("min_max", {"perturbation": "gauss"}), ("min_sum", {"tau": 0}), ("badnets", {"fraction": 1.5}),
    ("label_flip", {"source": 0, "target": 0}), ("label_flip", {"source": "some"}), ("alie", {"n": 10, "f": 6}),
    ("alie", {"n": 1}), ("model_replacement", {"target": -1}), ("model_replacement", {"eta": 0}),
    ("constrain_and_scale", {"norm": "mean"}), ("constrain_and_scale", {"class_weight": 0}),
    ("sybil", {"base_attack": "gaussian"}), ("sybil", {"jitter": -1}), ("window_stuffing", {"count": 0}),
    ("slow_drift", {"beta": float("nan")}), ("badnets", {"epochs": 0}), ("badnets", {"size": True}),
])
def test_validate_params_rejects_bad_values(kind, params):
    with pytest.raises(ValueError):
        validate_params(kind, params)


def test_is_targeted_follows_the_base_attack():
    assert is_targeted("sybil") and not is_targeted("sybil", {"base_attack": "sign_flip"})
    assert is_targeted("window_stuffing") and not is_targeted("window_stuffing", {"base_attack": "honest"})
    assert is_targeted("badnets") and not is_targeted("alie")


# --------------------------------------------------------------------------------------------- round driver

TRAINING = {"epochs": 1, "lr": 0.05, "batch_size": 16, "momentum": 0.9}


@pytest.fixture(scope="module")
def fleet():
    task = load_task("synthetic")
    spec = model_spec(task)
    shards = dirichlet_split(task.y_train, 30, 0.9, np.random.default_rng(0))
    base = get_flat_params(build_model(spec, seed=0))
    scratch = build_model(spec, seed=0)
    calls: list[int] = []

    def honest(i):
        calls.append(i)
        set_flat_params(scratch, base)
        local_train(scratch, task.x_train[shards[i]], task.y_train[shards[i]], seed=i, **TRAINING)
        return get_flat_params(scratch) - base, len(shards[i])

    def make(devices, round_index=0, seed=1, observed=None, state=None, window_size=10):
        return AttackContext(base=base, version=7, round_index=round_index, devices=list(devices), honest_delta=honest,
                             shard=lambda i: (task.x_train[shards[i]], task.y_train[shards[i]]), task=task,
                             model=build_model(spec), training=dict(TRAINING), window_size=window_size,
                             rng=np.random.default_rng(seed), observed_benign=observed,
                             state={} if state is None else state)
    return {"task": task, "shards": shards, "base": base, "honest": honest, "make": make, "calls": calls}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("devices", [[3, 11], [5]])
def test_craft_round_every_kind_gives_finite_float32_updates(fleet, kind, devices):
    out = craft_round(kind, {}, fleet["make"](devices))
    assert sorted(out) == sorted(devices)
    for i, ups in out.items():
        assert len(ups) == (10 if kind == "window_stuffing" else 1)  # stuffing: window_size copies by default
        for delta, n in ups:
            assert delta.dtype == np.float32 and delta.shape == fleet["base"].shape and np.isfinite(delta).all()
            assert n == len(fleet["shards"][i]) and isinstance(n, int)


@pytest.mark.parametrize("kind", KINDS)
def test_craft_round_is_deterministic_given_the_rng(fleet, kind):
    a = craft_round(kind, {}, fleet["make"]([2, 9], seed=4))
    b = craft_round(kind, {}, fleet["make"]([2, 9], seed=4))
    for i in a:
        assert all(np.array_equal(u, v) for (u, _), (v, _) in zip(a[i], b[i]))


def test_craft_round_model_replacement_splits_gamma_and_is_single_shot(fleet):
    honest = {i: fleet["honest"](i)[0] for i in (3, 11)}
    # the plain backdoor deltas X_i - G of the two colluders (same seeds: same rng state, same order); model
    # replacement trains without the anomaly-evasion loss (class_weight 1), as the paper's Sec. 4
    plain = craft_round("window_stuffing", {"base_attack": "backdoor", "count": 1, "class_weight": 1.0},
                        fleet["make"]([3, 11]))
    # default gamma = window_size / eta = 10, split over the k = 2 colluders: 5 x each backdoor delta, so the
    # window's sum carries gamma (mean X_i - G), the paper's eq. 3
    first = craft_round("model_replacement", {}, fleet["make"]([3, 11]))
    for i in (3, 11):
        assert np.allclose(first[i][0][0], 5.0 * plain[i][0][0], rtol=1e-6, atol=1e-7)
        assert not np.allclose(plain[i][0][0], honest[i])
    later = craft_round("model_replacement", {}, fleet["make"]([3, 11], round_index=1))
    assert all(np.array_equal(later[i][0][0], honest[i]) for i in later)
    evasive = craft_round("model_replacement", {"class_weight": 0.7}, fleet["make"]([3, 11]))
    assert all(np.linalg.norm(evasive[i][0][0]) < np.linalg.norm(first[i][0][0]) for i in (3, 11))


def test_craft_round_constrain_and_scale_sits_at_the_median_honest_norm(fleet):
    devices = [3, 11, 20]
    median = float(np.median([np.linalg.norm(fleet["honest"](i)[0]) for i in devices]))
    out = craft_round("constrain_and_scale", {}, fleet["make"](devices))
    for i in devices:
        assert np.linalg.norm(out[i][0][0]) == pytest.approx(median, rel=1e-4)
    bounded = craft_round("constrain_and_scale", {"norm": None, "bound": 0.5}, fleet["make"](devices))
    assert all(np.linalg.norm(bounded[i][0][0]) == pytest.approx(0.5, rel=1e-4) for i in devices)


def test_craft_round_sign_flip_and_partial_knowledge_ipm(fleet):
    h = {i: fleet["honest"](i)[0] for i in (3, 11)}
    out = craft_round("sign_flip", {"scale": 2.0}, fleet["make"]([3, 11]))
    assert all(np.allclose(out[i][0][0], -2.0 * h[i]) for i in h)
    out = craft_round("ipm", {"eps": 0.5}, fleet["make"]([3, 11]))
    mean = (h[3].astype(np.float64) + h[11]) / 2
    assert all(np.allclose(out[i][0][0], -0.5 * mean, atol=1e-6) for i in h)


def test_craft_round_single_colluder_falls_back_to_its_honest_delta(fleet):
    h = fleet["honest"](5)[0]
    for kind in ("alie", "min_max", "min_sum"):
        out = craft_round(kind, {}, fleet["make"]([5]))
        assert np.allclose(out[5][0][0], h, atol=1e-6), kind


def test_craft_round_omniscient_uses_the_observed_updates(fleet):
    observed = np.stack([fleet["honest"](i)[0] for i in (1, 2, 4, 6)])
    out = craft_round("alie", {"omniscient": True}, fleet["make"]([3, 11], observed=lambda: observed))
    z = alie_z(10, 2)
    assert np.allclose(out[3][0][0], observed.mean(0) - z * observed.std(0, ddof=1), atol=1e-6)
    with pytest.raises(ValueError, match="observed_benign"):
        craft_round("alie", {"omniscient": True}, fleet["make"]([3, 11]))
    # no other update observed yet: partial knowledge
    empty = craft_round("ipm", {"omniscient": True}, fleet["make"]([3, 11], observed=lambda: np.zeros((0, 0))))
    with pytest.raises(ValueError):  # wrong width
        craft_round("ipm", {"omniscient": True}, fleet["make"]([3], observed=lambda: np.zeros((2, 3))))
    partial = craft_round("ipm", {}, fleet["make"]([3, 11]))
    assert np.array_equal(empty[3][0][0], partial[3][0][0])


def test_craft_round_alie_clips_a_majority_of_colluders(fleet):
    out = craft_round("alie", {}, fleet["make"]([1, 2, 3], window_size=4))  # f = 3 > floor(4/2): f = 2
    b = np.stack([fleet["honest"](i)[0] for i in (1, 2, 3)]).astype(np.float64)
    assert np.allclose(out[1][0][0], b.mean(0) - alie_z(4, 2) * b.std(0, ddof=1), atol=1e-6)


def test_craft_round_slow_drift_keeps_its_direction_across_rounds(fleet):
    state: dict = {}
    craft_round("slow_drift", {}, fleet["make"]([3, 11], state=state))
    assert len(state) == 1
    direction = next(iter(state.values())).copy()
    out = craft_round("slow_drift", {"beta": 0.5}, fleet["make"]([20], round_index=1, seed=9, state=state))
    assert np.array_equal(next(iter(state.values())), direction)
    h = fleet["honest"](20)[0]
    # one colluder: reference norm = its own honest norm
    assert np.allclose(out[20][0][0], h + 0.5 * np.linalg.norm(h) * direction, atol=1e-5)


def test_craft_round_sybil_and_stuffing(fleet):
    out = craft_round("sybil", {"jitter": 0.0}, fleet["make"]([3, 11, 20]))
    ups = [out[i][0][0] for i in (3, 11, 20)]
    assert all(np.array_equal(ups[0], u) for u in ups)
    jittered = craft_round("sybil", {}, fleet["make"]([3, 11]))
    a, b = jittered[3][0][0], jittered[11][0][0]
    assert not np.array_equal(a, b) and np.linalg.norm(a - b) < 0.05 * np.linalg.norm(a)
    flipped = craft_round("sybil", {"base_attack": "sign_flip", "scale": 1.0, "jitter": 0.0}, fleet["make"]([3, 11]))
    assert np.allclose(flipped[11][0][0], -fleet["honest"](3)[0])  # everyone copies the first colluder's flip
    stuffed = craft_round("window_stuffing", {"count": 3, "base_attack": "honest"}, fleet["make"]([3]))
    assert len(stuffed[3]) == 3 and all(np.array_equal(u, fleet["honest"](3)[0]) for u, _ in stuffed[3])


def test_craft_round_rejects_bad_contexts_and_params(fleet):
    with pytest.raises(ValueError, match="devices"):
        craft_round("sign_flip", {}, fleet["make"]([]))
    with pytest.raises(ValueError, match="window_size"):
        craft_round("sign_flip", {}, fleet["make"]([1], window_size=0))
    with pytest.raises(ValueError, match="allowed"):
        craft_round("sign_flip", {"eps": 1.0}, fleet["make"]([1]))
    with pytest.raises(ValueError, match="classes of the task"):
        craft_round("label_flip", {"target": 10}, fleet["make"]([1]))
    with pytest.raises(ValueError):
        craft_round("badnets", {"target": 10}, fleet["make"]([1]))


def test_ipm_at_the_honest_norm_points_along_minus_the_benign_mean_with_their_median_norm():
    """``{"norm": "median_honest"}``: the IPM update rescaled to the median benign norm (the issue's case of an update
    along -global that passes a magnitude check); direction unchanged."""
    import producers.attacks.live as live

    benign = np.array([[3.0, 4.0], [6.0, 8.0], [0.0, 2.0]])  # norms 5, 10, 2 -> median 5; mean (3, 14/3)

    class R:
        p = {"norm": "median_honest"}

        def reference_norm(self):
            return float(np.median(np.linalg.norm(benign, axis=1)))

    out = live._at_norm(R(), -1.0 * benign.mean(axis=0))
    assert np.linalg.norm(out) == pytest.approx(5.0)
    mean = benign.mean(axis=0)
    assert float(out @ mean) / (np.linalg.norm(out) * np.linalg.norm(mean)) == pytest.approx(-1.0)
    R.p = {"norm": None}
    np.testing.assert_array_equal(live._at_norm(R(), mean), mean)
