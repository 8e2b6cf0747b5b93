"""The in-process round loop (fedguard.simulation) on the synthetic task: it learns, it is reproducible, attacks land
without detection, the live pipeline's rules hold (one seat per device, quarantined devices are not sampled,
release after probation counted in rounds), and the small pieces it shares with the services."""

import json

import numpy as np
import pytest
import torch

from aggregator.rules import RuleConfigError
from fedguard.simulation import SimulationConfig, detection_rates, honest_copy, simulate, sketch_seed
from fedguard.weighting import admitted, sample_weights, weighted_mean
from processors.defence import global_update_sketch
from producers.sampling import fleet_shards, sample_devices, training_seed

torch.set_num_threads(1)


def config(**kw):
    """Plain FedAvg unless a test says otherwise (the live default rule may change; these tests are about the loop)."""
    return SimulationConfig(**{"task": "synthetic", "rounds": 10, "seed": 0, "rule": "fedavg", **kw})


@pytest.fixture(scope="module")
def clean():
    return simulate(config(rounds=12))


def test_a_clean_run_learns_and_flags_no_one_for_good(clean):
    rounds = clean["rounds"]
    assert len(rounds) == 12 and [r["round"] for r in rounds] == list(range(1, 13))
    assert clean["final_main_accuracy"] > clean["initial"]["main_accuracy"] + 0.3
    assert clean["final_main_accuracy"] > 0.6
    assert max(r["main_accuracy"] for r in rounds[6:]) > max(r["main_accuracy"] for r in rounds[:2])
    for r in rounds:
        assert r["malicious"] == 0 and r["honest"] == 10 and len(set(r["devices"])) == 10
        assert r["quarantined_honest"] == 0 and r["skipped"] is None
    assert clean["compromised"] == [] and clean["max_backdoor_accuracy"] is not None
    json.dumps(clean)  # JSON-safe


def test_deterministic_given_the_seed():
    cfg = config(rounds=4, attack="sign_flip", attack_start=2, attack_params={"scale": 10.0})
    a, b = simulate(cfg), simulate(cfg)
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    c = simulate(config(rounds=4, attack="sign_flip", attack_start=2, attack_params={"scale": 10.0}, seed=1))
    assert c["compromised"] != a["compromised"]


def test_model_replacement_without_detection_plants_the_backdoor(clean):
    res = simulate(config(detection="none", rule="fedavg", attack="model_replacement", rounds=8))
    rounds = res["rounds"]
    attacked = [r for r in rounds if r["malicious"]]
    assert len(attacked) == 1 and attacked[0]["round"] >= 5  # single-shot, from attack_start on
    assert all(r["flagged_malicious"] == r["flagged_honest"] == 0 for r in rounds)  # detection off
    # 1.0 with seed 0; >= 0.58 for seeds 0-3 (gamma = n: the average is replaced by the attacker's model)
    assert attacked[0]["backdoor_accuracy"] >= 0.5
    assert attacked[0]["backdoor_accuracy"] > clean["rounds"][attacked[0]["round"] - 1]["backdoor_accuracy"] + 0.4


def test_the_ensemble_rejects_a_10x_sign_flip_that_breaks_plain_fedavg(clean):
    kw = dict(attack="sign_flip", attack_params={"scale": 10.0}, rounds=12)
    off = simulate(config(detection="none", **kw))
    on = simulate(config(detection="ensemble", **kw))
    assert on["compromised"] == off["compromised"]
    d = on["detection"]
    # seeds 0-3: every malicious member flagged, 80-100 % rejected, <= 1.7 % of honest members rejected
    assert d["malicious"] >= 10 and d["tp"] == 1.0 and d["tp_reject"] >= 0.8
    assert d["fp_reject"] <= 0.05
    assert on["final_main_accuracy"] >= clean["final_main_accuracy"] - 0.05
    assert off["final_main_accuracy"] < clean["final_main_accuracy"] - 0.3


def test_window_stuffing_gets_one_seat_per_device():
    res = simulate(config(attack="window_stuffing", rounds=8, attack_start=2))
    assert sum(r["sampled_malicious"] for r in res["rounds"]) > 0
    for r in res["rounds"]:
        assert len(set(r["devices"])) == len(r["devices"])
        assert r["malicious"] == r["sampled_malicious"]  # each compromised device sampled holds exactly one seat
        assert r["honest"] + r["malicious"] == 10  # no honest member pushed out
        assert r["refused_malicious"] == 9 * r["sampled_malicious"]  # count = window size: 9 copies refused each
        assert r["refused_honest"] == 0
        # the copies are equivocation: the seated one is rejected too, and no honest member is
        assert r["rejected_malicious"] == r["malicious"] and r["rejected_honest"] == 0
        assert r["votes_malicious"]["equivocation"] == r["malicious"] and r["votes_honest"]["equivocation"] == 0


def test_quarantined_devices_are_not_sampled_and_come_back_after_probation_in_rounds():
    cfg = config(num_devices=40, attack="sign_flip", attack_params={"scale": 10.0}, fraction=0.25, attack_start=1,
                 rounds=30, round_duration_s=1.0, probation_s=4.0)
    assert cfg.probation_rounds == 4
    res = simulate(cfg)
    out: dict[int, int] = {}  # device -> round it was quarantined in
    released = []
    for r in res["rounds"]:
        for d in r["released_now"]:
            released.append((d, r["round"] - out.pop(d)))
        assert not set(r["devices"]) & set(out), "a quarantined device was sampled"
        for d in r["quarantined_now"]:
            out[d] = r["round"]
        assert r["quarantined_malicious"] + r["quarantined_honest"] == len(out)
    assert released, "no device was quarantined and released"
    assert all(gap == 4 for _, gap in released)
    assert all(d in res["compromised"] for d, _ in released)


def test_configuration_is_checked_up_front():
    with pytest.raises(ValueError):
        SimulationConfig(detection="maybe")
    with pytest.raises(ValueError):
        SimulationConfig(attack="no_such_attack")
    with pytest.raises(ValueError):
        SimulationConfig(attack="sign_flip", attack_params={"bogus": 1})
    with pytest.raises(RuleConfigError):
        SimulationConfig(rule="multi_krum")  # needs f
    assert SimulationConfig(attack="sign_flip").attack_params == {"scale": 4.0}  # defaults filled in


def test_detection_rates_definitions():
    rows = [{"round": 1, "malicious": 0, "honest": 10, "flagged_malicious": 0, "flagged_honest": 1,
             "rejected_malicious": 0, "rejected_honest": 0, "refused_malicious": 0, "refused_honest": 0,
             "votes_malicious": {}, "votes_honest": {"magnitude": 1}},
            {"round": 2, "malicious": 4, "honest": 6, "flagged_malicious": 3, "flagged_honest": 0,
             "rejected_malicious": 2, "rejected_honest": 0, "refused_malicious": 0, "refused_honest": 0,
             "votes_malicious": {"direction": 2}, "votes_honest": {}}]
    d = detection_rates(rows)
    assert d["tp"] == 0.75 and d["tp_reject"] == 0.5 and d["fp"] == 1 / 16 and d["fp_reject"] == 0.0
    assert d["votes_fp"]["magnitude"] == 1 / 16 and d["votes_tp"]["direction"] == 0.5
    assert detection_rates(rows, from_round=2)["fp"] == 0.0
    assert detection_rates(rows[:1])["tp"] is None
    # rows recorded before the crafted counts existed (or live ones: None): no crafted rate, not a made-up one
    assert detection_rates(rows)["tp_crafted"] is None and detection_rates(rows)["crafted"] is None
    rows[0].update(crafted=0, flagged_crafted=0, rejected_crafted=0)
    rows[1].update(crafted=3, flagged_crafted=3, rejected_crafted=2)  # the unflagged member was an honest copy
    d = detection_rates(rows)
    assert d["tp"] == 0.75 and d["tp_crafted"] == 1.0 and d["tp_reject_crafted"] == 2 / 3 and d["crafted"] == 3
    assert detection_rates(rows[:1])["tp_crafted"] is None  # nothing crafted to divide by
    rows[1]["crafted"] = None
    assert detection_rates(rows)["tp_crafted"] is None  # one unknown round makes the total unknown
    assert sketch_seed(0) == sketch_seed(0) != sketch_seed(1) and sketch_seed(0).bit_length() > 64


# -- the pieces shared with the services ------------------------------------------------------------------------


def test_sample_devices_is_the_fleet_draw():
    for version in range(5):
        rng = np.random.default_rng([7, version, 0])
        assert sample_devices(7, version, 0, 100, 10) == sorted(rng.choice(100, 10, replace=False).tolist())
    active = [i for i in range(100) if i % 3]
    got = sample_devices(7, 3, 1, 100, 10, active)
    rng = np.random.default_rng([7, 3, 1])
    assert got == sorted(active[i] for i in rng.choice(len(active), 10, replace=False).tolist())
    assert set(got) <= set(active)
    assert sample_devices(0, 0, 0, 100, 10, [4, 2]) == [2, 4]
    assert sample_devices(0, 0, 0, 100, 10, []) == []
    with pytest.raises(ValueError):
        sample_devices(0, 0, 0, 10, 3, [10])
    assert training_seed(0, 1, 2) == 1011 and 0 <= training_seed(10**9, 10**6, 99) < 2**31


def test_fleet_shards_partition_the_training_set():
    y = np.repeat(np.arange(10), 100)
    shards = fleet_shards(y, 20, 0.9, 0)
    assert sorted(np.concatenate(shards).tolist()) == list(range(1000))
    assert min(len(s) for s in shards) >= 10
    assert all(np.array_equal(a, b) for a, b in zip(shards, fleet_shards(y, 20, 0.9, 0)))


def test_weights_and_global_sketch():
    assert admitted("accept") and admitted("downweight", 0.5)
    assert not admitted("reject", 1.0) and not admitted("downweight", 0.0)
    np.testing.assert_allclose(sample_weights([500, 3000, 10], [1.0, 0.5, 1.0], 1000), [500, 500, 10])
    np.testing.assert_allclose(sample_weights([500, 3000], [1.0, 1.0], None), [500, 3000])
    assert weighted_mean(np.ones((2, 3)), np.zeros(2)) is None
    sk = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [9.0, 9.0]])
    mean = global_update_sketch(sk, ["accept", "downweight", "reject", "downweight"], [1.0, 0.5, 0.0, 0.0],
                                [100, 400, 100, 100], 1000)
    np.testing.assert_allclose(mean, [100 / 300, 200 / 300])  # weights 100 and 0.5 x 400; reject and 0 left out
    assert global_update_sketch(sk[:1], ["reject"], [0.0], [100], 1000) is None


def test_defaults_are_the_live_defaults():
    from fedguard.settings import Settings

    live, sim = Settings(), SimulationConfig()
    assert (sim.task, sim.num_devices, sim.per_round, sim.alpha, sim.rule, sim.rule_params, sim.detection,
            sim.sketch_k, sim.sample_count_cap, sim.backdoor_eval, sim.max_update_norm, sim.probation_s) == (
        live.task, live.num_devices, live.devices_per_round, live.dirichlet_alpha, live.rule, live.rule_params,
        live.detection, live.detector_sketch_k, live.sample_count_cap, live.backdoor_eval, live.max_update_norm,
        live.quarantine_probation_s)
    assert sim.probation_rounds == 1566  # 3600 s at the demo's 2.3 s per round


def test_honest_copy_is_exact_equality_with_the_devices_own_training():
    h = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    assert honest_copy(h.copy(), h) and honest_copy(h.astype(np.float64), h)
    assert not honest_copy(np.nextafter(h, np.float32(10)), h)  # one ulp off is crafted
    assert not honest_copy(h, None)  # the attack never trained honestly: whatever it sent is crafted
    assert not honest_copy(h[:2], h) and not honest_copy(np.zeros(3, np.float32), h)


def test_honest_copies_are_not_counted_as_crafted():
    """A lone ALIE colluder (partial knowledge: no spread to hide in) sends its honest update; two or more craft.
    Model replacement's shot is crafted (its campaign stops after it, so no later member counts as malicious)."""
    alie = simulate(config(attack="alie", rounds=10, attack_start=1, fraction=0.2))
    rounds = [r for r in alie["rounds"] if r["malicious"]]
    assert any(r["sampled_malicious"] == 1 for r in rounds) and any(r["sampled_malicious"] >= 2 for r in rounds)
    for r in rounds:
        assert r["crafted"] == (0 if r["sampled_malicious"] == 1 else r["malicious"])
    assert alie["detection"]["crafted"] == sum(r["crafted"] for r in alie["rounds"]) < alie["detection"]["malicious"]
    mr = simulate(config(attack="model_replacement", rounds=4, attack_start=2, fraction=0.3))
    assert [(r["malicious"], r["crafted"]) for r in mr["rounds"]][1] == (2, 2)
    assert mr["detection"]["crafted"] == mr["detection"]["malicious"] == 2
