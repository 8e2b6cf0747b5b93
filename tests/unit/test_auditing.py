"""The aggregator's audit logic (aggregator/auditing.py) without Kafka or Redis: when the audit runs, what a verdict
records, the differential reference from the served lineage, the clean-update filter on attribution; and the same
code in the in-process simulation (fedguard eval's ``audit`` option) on digits under a persistent backdoor."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from aggregator.auditing import (CLEAN, FLAGGED, SERVER, SKIPPED, AuditOutcome, Auditor, beyond_clean_update,
                                 carried_over, reference_norms, served_audits, skip_reason)
from fedguard.simulation import SimulationConfig, simulate
from fedguard.tasks import build_model, get_flat_params, load_task, model_spec


def norms(*values: float) -> dict:
    return {"norms": list(values)}


def test_the_audit_runs_on_image_tasks_with_three_or_more_classes():
    assert skip_reason(load_task("digits"), "neural_cleanse") is None
    assert "no image inputs" in skip_reason(load_task("synthetic"), "neural_cleanse")
    assert "FEDGUARD_AUDIT=none" in skip_reason(load_task("digits"), "none")
    two_classes = SimpleNamespace(name="digits", num_classes=2)
    assert "at least 3" in skip_reason(two_classes, "neural_cleanse")
    with pytest.raises(ValueError, match="unknown audit method"):
        skip_reason(load_task("digits"), "deepsight")


def test_a_skipped_task_records_why_and_runs_nothing():
    task = load_task("synthetic")
    auditor = Auditor(task, model_spec(task))
    params = get_flat_params(build_model(model_spec(task)))
    outcome = auditor.audit_candidate(params, params, {"dev-0000": np.zeros_like(params)})
    assert outcome.verdict == SKIPPED and outcome.scores is None and not outcome.reference
    assert outcome.to_meta() == {"verdict": "skipped", "why": auditor.skipped, "seconds": 0.0, "reference": False}


def test_outcome_metadata():
    with pytest.raises(ValueError):
        AuditOutcome("dirty")
    flagged = AuditOutcome(FLAGGED, scores={"flagged": 0, "norms": [1.0, 2.0, 3.0]}, seconds=1.23456,
                           attributed=[3, "dev-0001"], attribution={"target": 0})
    meta = flagged.to_meta()
    assert meta["attributed"] == ["3", "dev-0001"] and meta["seconds"] == 1.2346 and flagged.flagged_class == 0
    assert meta["attribution"] == {"target": 0} and meta["reference"] is False
    clean = AuditOutcome(CLEAN, scores={"flagged": 2, "norms": [1.0, 2.0, 3.0]}, reference=True)
    assert clean.flagged_class is None and "attributed" not in clean.to_meta()  # a flag explained away is no flag
    carried = carried_over(7)
    assert carried.verdict == SKIPPED and "version 7" in carried.why and not carried.reference


def test_the_reference_follows_the_served_lineage_and_skips_what_was_not_served():
    metas = {
        0: {"parent": None, "audit": {"verdict": "skipped"}},
        1: {"parent": 0, "audit": {"verdict": "skipped", "reference": True, "scores": norms(1, 1, 1)}},  # warm-up
        2: {"parent": 1, "audit": {"verdict": "clean", "reference": True, "scores": norms(2, 2, 2)}},
        3: {"parent": 2, "rule_info": {"params_from": 2}, "audit": {"verdict": "flagged", "scores": norms(9, 9, 9)}},
        4: {"parent": 3, "audit": {"verdict": "clean", "reference": True, "scores": norms(4, 4, 4)}},
        5: {"parent": 4, "rule_info": {"params_from": 2}, "audit": {"verdict": "skipped"}},  # rollback to 2
        6: {"parent": 5, "audit": {"verdict": "clean", "reference": True, "scores": norms(6, 6, 6)}},
    }
    meta_of = metas.__getitem__
    versions = lambda found: [int(a["scores"]["norms"][0]) for a in found]  # noqa: E731
    assert versions(served_audits(meta_of, 4, 3)) == [4, 2, 1]  # the flagged version 3 is not in it
    assert versions(served_audits(meta_of, 6, 3)) == [6, 2, 1]  # the rolled-back-from version 4 is not either
    assert versions(served_audits(meta_of, 6, 1)) == [6]
    assert served_audits(lambda v: (_ for _ in ()).throw(FileNotFoundError(v)), 3, 3) == []
    np.testing.assert_array_equal(reference_norms(served_audits(meta_of, 6, 3), 3), [2, 2, 2])
    assert reference_norms([{"scores": norms(1, 2)}], 3) is None  # another model's classes
    assert reference_norms([], 3) is None


def test_attribution_keeps_only_members_that_beat_the_clean_update():
    result = SimpleNamespace(
        flagged=["a", "b", "c", SERVER],
        reasons={"a": ["robust_z"], "b": ["absolute"], "c": ["absolute"], SERVER: ["absolute"]},
        scores={"a": 4.0, "b": 3.0, "c": 3.5, SERVER: 3.2},
        success_lift={"a": 0.1, "b": 0.9, "c": 0.6, SERVER: 0.3})
    # a: a robust outlier above the server's margin lift; b: below it; c: its success lift is not 0.5 above the
    # server's; the server itself is never blamed
    assert beyond_clean_update(result) == ["a"]
    result.success_lift["c"] = 0.81
    assert beyond_clean_update(result) == ["a", "c"]


def sim(**kw):
    return simulate(SimulationConfig(**{"task": "digits", "num_devices": 10, "per_round": 5, "rounds": 9,
                                        "attack": "constrain_and_scale", "fraction": 0.4, "attack_start": 5,
                                        "seed": 0, "audit": "neural_cleanse", **kw}))


def test_the_simulation_runs_the_audit_and_its_response():
    result = sim()
    rounds = result["rounds"]
    assert [r["audit"] for r in rounds[:3]] == ["skipped"] * 3  # warm-up
    flagged = [r for r in rounds if r["audit"] == "flagged"]
    assert flagged, [(r["round"], r["audit"], r["backdoor_accuracy"]) for r in rounds]
    for r in flagged:
        before = rounds[r["round"] - 2]
        # not served: the version keeps the parameters of the round before
        assert (r["main_accuracy"], r["backdoor_accuracy"]) == (before["main_accuracy"], before["backdoor_accuracy"])
        assert r["candidate_backdoor_accuracy"] > r["backdoor_accuracy"] and not r["served"]
        assert r["attributed_honest"] == 0
    first = flagged[0]
    assert first["attributed_malicious"] >= 1 and first["audit_class"] == 0
    assert first["quarantined_malicious"] >= first["attributed_malicious"]
    assert set(first["quarantined_now"]) <= set(result["compromised"])
    assert rounds[-1]["quarantined_honest"] == 0
    # the attributed devices are quarantined: never sampled again
    gone = set(first["quarantined_now"])
    assert not any(gone & set(r["devices"]) for r in rounds[first["round"]:])


def test_the_simulation_without_the_audit_records_no_verdict():
    rounds = sim(audit="none", rounds=6)["rounds"]
    assert all(r["audit"] is None and r["served"] for r in rounds)
    with pytest.raises(ValueError, match="audit must be one of"):
        SimulationConfig(audit="sometimes")


def test_eval_takes_the_audit_flag_and_keeps_the_keys_of_cells_without_it():
    import hashlib
    import json
    from dataclasses import asdict

    from fedguard.cli import build_parser
    from fedguard.evaluation_matrix import cell_key

    assert build_parser().parse_args(["eval", "--audit", "neural_cleanse"]).audit == "neural_cleanse"
    assert build_parser().parse_args(["eval"]).audit == "none"
    off, on = SimulationConfig(task="digits"), SimulationConfig(task="digits", audit="neural_cleanse")
    # the digest of a cell without the audit is the one it had before the audit's fields existed
    before = {k: v for k, v in asdict(off).items() if not k.startswith("audit")}
    assert cell_key(off).endswith(hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode())
                                  .hexdigest()[:10])
    assert cell_key(on) != cell_key(off)


from tests.unit.test_audit import FAST, world  # noqa: E402,F401 - the backdoored synthetic model and its audit set


def test_the_absolute_test_needs_the_class_norm_well_below_the_median(world):  # noqa: F811
    from dataclasses import replace

    from aggregator.audit import audit_model

    flagged = audit_model(world["backdoored"], world["x_audit"], FAST)
    assert flagged.flagged == 0 and "absolute" in flagged.reasons
    ratio = flagged.norms[0] / np.median(flagged.norms)
    # the same outlier is not flagged once the norm must be below a ratio it does not reach
    unflagged = audit_model(world["backdoored"], world["x_audit"], replace(FAST, abs_max_ratio=ratio * 0.9))
    assert unflagged.anomaly[0] > FAST.threshold and unflagged.flagged is None
    with pytest.raises(ValueError, match="abs_max_ratio"):
        replace(FAST, abs_max_ratio=0.0)
