"""The aggregation service with robust rules, on the real broker and Redis: windows in, versions out."""

from __future__ import annotations

import numpy as np
import pytest
from kafka import KafkaProducer

from aggregator.combine import ConfiguredRule
from aggregator.rules import RuleConfigError
from aggregator.service import AggregatorService
from fedguard import records
from fedguard.stack import create_topics

pytestmark = pytest.mark.integration


def write_window(settings, service, deltas, base_version):
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", max_request_size=64 << 20)
    members = []
    for i, delta in enumerate(deltas):
        meta = {"update_id": f"u{base_version}-{i}", "device_id": f"dev-{i:04d}", "base_version": base_version,
                "num_samples": 50, "norm": float(np.linalg.norm(delta))}
        md = producer.send(settings.topics.valid, key=meta["device_id"].encode(),
                           value=records.encode_valid(meta, delta.astype(np.float32))).get(timeout=30)
        members.append({**meta, "valid": {"partition": md.partition, "offset": md.offset}, "verdict": "accept",
                        "weight": 50.0})
    producer.close()
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
        window = write_window(settings, service, honest + [attacker], base_version=0)
        v1 = service.handle_window(window)
        assert v1.version == 1 and v1.meta["rule"] == "multi_krum" and v1.meta["rule_params"] == {"f": 1, "m": 3}
        selected = v1.meta["rule_info"]["selected"]
        assert len(selected) == 3 and "dev-0004" not in selected
        expected = np.mean([honest[int(s[-4:])].astype(np.float32) for s in selected], axis=0)
        np.testing.assert_allclose(v1.params - v0.params, expected, atol=1e-6)
        assert service.store.meta(1)["window_id"] == window["window_id"]

        # Too few members for f = 1 (needs 2f + 3 = 5): one version all the same, unchanged, with the reason.
        small = write_window(settings, service, honest[:2], base_version=1)
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
]


@pytest.mark.parametrize("rule, params", RULE_CONFIGS, ids=[r for r, _ in RULE_CONFIGS])
def test_every_rule_runs_in_the_service_with_its_per_window_inputs(settings, rule, params):
    settings = settings.with_overrides(rule=rule, rule_params=params)
    create_topics(settings)
    service = AggregatorService(settings)
    try:
        v0 = service.start()
        rng = np.random.default_rng(5)
        for base in (0, 1):  # two windows, so centered clipping starts from a non-zero previous aggregate
            window = write_window(settings, service, [rng.normal(0, 0.01, v0.params.size) for _ in range(7)], base)
            new = service.handle_window(window)
            assert new.version == base + 1 and new.meta["rule"] == rule, new.meta["rule_info"]
            assert "skipped" not in new.meta["rule_info"]
            assert np.isfinite(new.params).all() and not np.array_equal(new.params, v0.params)
            assert new.meta["rule_info"]["selected"], new.meta["rule_info"]
    finally:
        service.close()
