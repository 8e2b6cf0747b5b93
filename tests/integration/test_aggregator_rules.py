"""The aggregation service with robust rules, on the real broker and Redis: windows in, versions out.

Every rule's version is compared with a direct call of the rule (``aggregator.rules.aggregate``) on the same inputs:
the accepted members' deltas, their sample counts, the previous aggregate, the server update, the trust scores from
Redis and, for the rules that draw noise, a generator seeded by the experiment seed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from aggregator.combine import ConfiguredRule
from aggregator.rules import RULE_SPECS, RuleConfigError, aggregate, validate_config
from aggregator.service import AggregatorService
from fedguard import registry
from fedguard.stack import create_topics
from fedguard.updatestore import UpdateStore

pytestmark = pytest.mark.integration


def write_window(settings, deltas, base_version, num_samples=None, verdicts=None):
    """A closed window of ``deltas``, their tensors written to the update store of ``settings`` (where the service
    made from the same settings reads them), as the validator writes them."""
    store = UpdateStore(settings.update_store_dir)
    members = []
    for i, delta in enumerate(deltas):
        count = 50 if num_samples is None else num_samples[i]
        meta = {"update_id": f"u{base_version}-{i}", "device_id": f"dev-{i:04d}", "base_version": base_version,
                "num_samples": count, "norm": float(np.linalg.norm(delta))}
        ref = store.put(settings.model_id, base_version, meta["device_id"], delta.astype(np.float32))
        verdict = "accept" if verdicts is None else verdicts[i]
        members.append({**meta, "valid": {"partition": 0, "offset": i}, "tensor": ref, "verdict": verdict,
                        "weight": {"accept": 1.0, "downweight": 0.5}.get(verdict, 0.0)})
    return {"window_id": f"{settings.model_id}:{base_version}", "model_id": settings.model_id,
            "base_version": base_version, "opened_at": 0.0, "closed_at": 0.0, "closed_by": "count",
            "members": members}


def test_multi_krum_window_excludes_the_attacker_and_records_rule_and_params(settings):
    settings = settings.with_overrides(rule="multi_krum", rule_params='{"f": 1, "m": 3}')
    create_topics(settings)
    service = AggregatorService(settings)
    try:
        v0 = service.start()
        d = v0.params.size
        rng = np.random.default_rng(3)
        honest = [rng.normal(0, 0.01, d) for _ in range(4)]
        attacker = np.full(d, 5.0)
        window = write_window(settings, honest + [attacker], base_version=0)
        v1 = service.handle_window(window)
        assert v1.version == 1 and v1.meta["rule"] == "multi_krum" and v1.meta["rule_params"] == {"f": 1, "m": 3}
        selected = v1.meta["rule_info"]["selected"]
        assert len(selected) == 3 and "dev-0004" not in selected
        expected = np.mean([honest[int(s[-4:])].astype(np.float32) for s in selected], axis=0)
        np.testing.assert_allclose(v1.params - v0.params, expected, atol=1e-6)
        assert service.store.meta(1)["window_id"] == window["window_id"]

        # Too few members for f = 1 (needs 2f + 3 = 5): one version all the same, unchanged, with the reason.
        small = write_window(settings, honest[:2], base_version=1)
        v2 = service.handle_window(small)
        assert v2.version == 2 and "skipped" in v2.meta["rule_info"]
        np.testing.assert_array_equal(v2.params, v1.params)
        # The same window again is recognised as applied.
        assert service.handle_window(small) is None and service.current.version == 2
    finally:
        service.close()


def test_bad_rule_configuration_fails_at_start():
    with pytest.raises(RuleConfigError, match="unknown aggregation rule"):
        ConfiguredRule("average-ish")
    with pytest.raises(RuleConfigError, match="requires parameter 'f'"):
        ConfiguredRule("krum", "{}")
    with pytest.raises(RuleConfigError, match="not JSON"):
        ConfiguredRule("krum", "{f: 1}")
    assert ConfiguredRule("fedavg", "", 1000).config == {"cap": 1000.0}


RULE_CONFIGS = [
    ("fedavg", ""), ("norm_clip", ""), ("coordinate_median", ""), ("trimmed_mean", '{"beta": 0.2}'),
    ("krum", '{"f": 1}'), ("multi_krum", '{"f": 1}'), ("geometric_median", ""), ("bulyan", '{"f": 1}'),
    ("centered_clipping", '{"tau": 0.5, "iters": 2}'), ("fltrust", ""), ("flame", '{"noise_lambda": 0.001}'),
    ("dp_gaussian", '{"clip_norm": 1.0, "noise_multiplier": 0.1}'), ("reputation_weighted", ""),
    ("robust_lr", '{"threshold": 4, "disagreement_rate": 0}'),
]


EXPERIMENT_SEED = 20240613
# Claimed sample counts of the seven accepted members (capped at 100 for FedAvg) and their trust in Redis (None: no
# reputation yet, which counts as 1.0). Unequal on purpose, so a rule that ignored them would give another result.
COUNTS = [5, 20, 80, 300, 1200, 2000, 40]
TRUST = [1.0, 0.5, 0.9, 0.2, 0.7, None, 0.0]


@pytest.mark.parametrize("rule, params", RULE_CONFIGS, ids=[r for r, _ in RULE_CONFIGS])
def test_every_rule_in_the_service_equals_a_direct_call_on_the_same_inputs(settings, rule, params):
    settings = settings.with_overrides(rule=rule, rule_params=params, sample_count_cap=100,
                                       aggregation_experiment_seed=EXPERIMENT_SEED)
    create_topics(settings)
    client = registry.connect(settings)
    for i, trust in enumerate(TRUST):
        if trust is not None:
            client.hset(settings.redis_key("reputation", f"dev-{i:04d}"), "trust", trust)
    config = validate_config(rule, {**json.loads(params or "{}"), **({"cap": 100} if rule == "fedavg" else {})})
    service = AggregatorService(settings)
    try:
        current = service.start()
        previous = None
        d = current.params.size
        rng = np.random.default_rng(5)
        for base in (0, 1):  # two windows, so centered clipping starts from a non-zero previous aggregate
            deltas = [rng.normal(0, 0.01, d) for _ in range(7)]
            outsider = rng.normal(0, 0.5, d)  # rejected by the window stage: must not enter the aggregate
            window = write_window(settings, deltas + [outsider], base, num_samples=COUNTS + [50],
                                  verdicts=["accept"] * 7 + ["reject"])
            new = service.handle_window(window)
            assert new.version == base + 1 and new.meta["rule"] == rule, new.meta["rule_info"]
            assert new.meta["rule_params"] == config
            info = new.meta["rule_info"]
            assert "skipped" not in info and "failed" not in info, info

            # The same rule, called directly on the same inputs.
            x = np.stack([delta.astype(np.float32) for delta in deltas])
            supply = {
                # the service caps claimed counts for every rule that weights by them (fedavg's cap is then a no-op)
                "sample_counts": lambda: np.minimum(np.array(COUNTS, dtype=np.float64), 100),
                "weights": lambda: None,
                "center": lambda: (np.zeros(d) if previous is None
                                   else current.params.astype(np.float64) - previous.params.astype(np.float64)),
                "server_update": lambda: service._server_update(current),
                "trust_scores": lambda: np.array([1.0 if t is None else t for t in TRUST]),
                "rng": lambda: np.random.default_rng([EXPERIMENT_SEED, current.version]),
            }
            direct = aggregate(rule, x, **config, **{key: supply[key]() for key in RULE_SPECS[rule].data})
            expected = (current.params.astype(np.float64) + direct.vector).astype(np.float32)
            np.testing.assert_allclose(new.params, expected, rtol=0, atol=1e-6)
            assert not np.allclose(new.params, current.params, rtol=0, atol=1e-6)
            assert info["selected"] == [f"dev-{i:04d}" for i in direct.selected]
            assert "dev-0007" not in info["selected"]
            if "rng" in RULE_SPECS[rule].data:
                assert info["private"] is False and info["noise_seed"] == [EXPERIMENT_SEED, current.version]
            previous, current = current, new
    finally:
        service.close()


@pytest.mark.parametrize("rule, params", [("dp_gaussian", '{"clip_norm": 1.0, "noise_multiplier": 0.1}'),
                                          ("flame", '{"noise_lambda": 0.001}')], ids=["dp_gaussian", "flame"])
def test_noise_is_unpredictable_unless_an_experiment_seeds_it(settings, tmp_path, rule, params):
    """The same window aggregated twice: different noise by default (OS entropy), the same noise with the
    experiment seed, and then the version says it is not private."""
    settings = settings.with_overrides(rule=rule, rule_params=params)
    create_topics(settings)
    rng = np.random.default_rng(9)
    deltas = None

    def aggregate_once(run: str, **overrides):
        nonlocal deltas
        run_settings = settings.with_overrides(data_dir=tmp_path / run, **overrides)
        service = AggregatorService(run_settings)
        try:
            v0 = service.start()
            if deltas is None:
                deltas = [rng.normal(0, 0.01, v0.params.size) for _ in range(7)]
            # The same window each run, its tensors in this run's own data dir (the update store is in it).
            return v0, service.handle_window(write_window(run_settings, deltas, 0))
        finally:
            service.close()

    v0, a = aggregate_once("a")
    _, b = aggregate_once("b")
    assert not np.array_equal(a.params - v0.params, b.params - v0.params)  # nobody can recompute the noise
    for version in (a, b):
        info = version.meta["rule_info"]
        assert info["private"] is True and info["noise_source"] == "os_entropy" and "noise_seed" not in info, info

    _, c = aggregate_once("c", aggregation_experiment_seed=7)
    _, d = aggregate_once("d", aggregation_experiment_seed=7)
    np.testing.assert_array_equal(c.params, d.params)
    for version in (c, d):
        info = version.meta["rule_info"]
        assert info["private"] is False and info["noise_source"] == "experiment_seed", info
        assert info["noise_seed"] == [7, 0]


def test_downweighted_members_count_with_their_weight_and_rejected_ones_not_at_all(settings):
    """The window stage's weight multiplies FedAvg's capped sample count; a rejected member never enters; the version
    records the weight applied to each member (issue 13, item 3)."""
    settings = settings.with_overrides(rule="fedavg", sample_count_cap=100)
    service = AggregatorService(settings)
    try:
        current = service.start()
        dim = current.params.size
        deltas = [np.full(dim, 1.0), np.full(dim, 3.0), np.full(dim, 100.0)]
        window = write_window(settings, deltas, 0, num_samples=[50, 400, 50],
                              verdicts=["accept", "downweight", "reject"])
        new = service.handle_window(window)
        # weights: 50 * 1.0 and min(400, 100) * 0.5 = 50 -> the mean of 1 and 3.
        np.testing.assert_allclose(new.params - current.params, 2.0, atol=1e-5)
        assert new.meta["rule_info"]["member_weights"] == {"dev-0000": 1.0, "dev-0001": 0.5}
        assert new.meta["accepted"] == 2 and new.meta["members"] == 3
    finally:
        service.close()


def test_a_window_the_rule_cannot_aggregate_says_its_parameters_were_carried_over(settings):
    settings = settings.with_overrides(rule="krum", rule_params='{"f": 1}')
    service = AggregatorService(settings)
    try:
        current = service.start()
        window = write_window(settings, [np.ones(current.params.size)] * 2, 0)
        new = service.handle_window(window)
        assert new.version == 1 and np.array_equal(new.params, current.params)
        info = new.meta["rule_info"]
        assert info["params_from"] == 0 and "carried into version 1" in info["skipped"], info
    finally:
        service.close()


def test_the_default_rule_drops_what_a_colluding_minority_pushes_and_keeps_what_the_honest_members_agree_on(settings):
    """The default rule (robust_lr: norm clipping's mean, coordinates without sign agreement dropped), in the service
    with the default settings. Ten members: each an honest update that agrees with the others on the first half of
    the coordinates (a common step plus small noise) and not on the rest (zero-mean noise, as on the coordinates a
    backdoor uses); two of them (the 20% the issues test) collude and add a fixed push of a third of the honest norm
    on the second half, the slow drift's recipe. Under norm_clip the push enters the version at the colluders'
    share; under the default (threshold 5 of 10: 8 members must agree) it is dropped wherever the honest members'
    signs do not happen to side with it (the two colluders' votes count only with 6 of the 8 honest ones), while the
    agreed half moves exactly as norm_clip moves it. A mitigation, not a filter: about two fifths of the push still
    passes here (0.38 for this draw; 0.75 with the paper's threshold 4), as a slow drift's backdoor (mean of the
    maxima of seeds 0-1, 30 rounds) fell from 10.8% under norm_clip to 4.0%, not to 0."""
    assert settings.rule == "robust_lr" and not settings.rule_params
    service = AggregatorService(settings)
    try:
        current = service.start()
        d = current.params.size
        half = d // 2
        rng = np.random.default_rng(11)
        common = np.zeros(d)
        common[:half] = 0.01
        honest = [common + rng.normal(0, 1, d) * np.r_[np.full(half, 0.0002), np.full(d - half, 0.01)]
                  for _ in range(10)]
        push = np.zeros(d)
        push[half:] = 1.0
        push *= np.median([np.linalg.norm(h) for h in honest]) / 3 / np.linalg.norm(push)
        deltas = honest[:8] + [honest[8] + push, honest[9] + push]
        new = service.handle_window(write_window(settings, deltas, 0))
        step = new.params.astype(np.float64) - current.params.astype(np.float64)
        info = new.meta["rule_info"]
        assert new.meta["rule"] == "robust_lr" and info["threshold"] == 5 and "skipped" not in info, info

        x = np.stack([delta.astype(np.float32) for delta in deltas]).astype(np.float64)
        clipped_mean = aggregate("norm_clip", x, sample_counts=np.full(10, 50.0)).vector
        agreed = np.abs(np.sign(x).sum(axis=0)) >= 5
        assert agreed[:half].mean() > 0.99  # the honest step is kept ...
        np.testing.assert_allclose(step[agreed], clipped_mean[agreed], rtol=0, atol=1e-6)
        # ... and where the honest members disagree the push is dropped: along it the version moves less than half of
        # what norm_clip lets in (0.38 for this draw), itself about the colluders' share of the push
        along = push / np.linalg.norm(push)
        assert (clipped_mean @ along) > 0.5 * 0.2 * np.linalg.norm(push)
        assert step @ along < 0.5 * (clipped_mean @ along), (step @ along, clipped_mean @ along)
        assert np.all(step[~agreed] == 0)
    finally:
        service.close()
