"""``fedguard versions`` rows and the checks ``fedguard rollback --to V`` makes before writing anything
(fedguard/lineage.py), on a real model store in a temporary directory."""

from __future__ import annotations

import numpy as np
import pytest

from fedguard.lineage import RollbackError, format_lineage, lineage, rollback_target, version_outcome
from fedguard.modelstore import ModelStore


def meta(version: int, **kw) -> dict:
    base = {"parent": None if version == 0 else version - 1, "round": version, "rule": "norm_clip", "rule_info": {},
            "window_id": None if version == 0 else f"m:{version - 1}:w", "metrics": {"accuracy": 0.5 + version / 100,
                                                                                  "backdoor_accuracy": 0.01}}
    return {**base, **kw}


@pytest.fixture
def store(tmp_path):
    store = ModelStore(tmp_path / "models")
    p = np.zeros(4, dtype=np.float32)
    store.save(0, p, meta(0, audit={"verdict": "skipped", "why": "version 0"}))
    store.save(1, p, meta(1, audit={"verdict": "clean", "reference": True, "scores": {"flagged": None}}))
    store.save(2, p, meta(2, rule_info={"params_from": 1, "withheld": "..."},
                          audit={"verdict": "flagged", "scores": {"flagged": 0, "reasons": ["absolute"]},
                                 "attributed": ["dev-0003", "dev-0007"]}))
    store.save(3, p, meta(3, rule_info={"params_from": 2, "failed": "offsets [4] not found"},
                          audit={"verdict": "skipped", "why": "carried over"}))
    store.save(4, p, meta(4, rule_info={"params_from": 1, "rollback": {"to": 1, "by": "operator", "reason": "oops"}},
                          window_id=None))
    store.save(5, p, meta(5, rule_info={"skipped": "1 accepted updates, rule krum needs 3", "params_from": 4}))
    return store


def test_each_version_says_how_it_was_made(store):
    rows = lineage(store)
    assert [(r["version"], r["outcome"], r["audit"], r["params_from"]) for r in rows] == [
        (0, "initial", "skipped", None), (1, "applied", "clean", None), (2, "flagged", "flagged", 1),
        (3, "failed", "skipped", 2), (4, "rollback", None, 1), (5, "rule_skipped", None, 4)]
    assert rows[2]["audit_class"] == 0 and rows[2]["attributed"] == ["dev-0003", "dev-0007"]
    assert rows[1]["audit_class"] is None
    assert [r["version"] for r in lineage(store, last=2)] == [4, 5] and lineage(store, last=0) == []
    assert version_outcome({"parent": 3, "rule_info": {}, "audit": {"verdict": "clean"}}) == "applied"


def test_the_table(store):
    store._stem(3).with_suffix(".safetensors").unlink()
    lines = format_lineage(lineage(store))
    assert lines[0].split() == ["version", "parent", "from", "outcome", "audit", "class", "accuracy", "backdoor",
                                "weights", "note"]
    assert len(lines) == 7
    assert lines[3].split()[:9] == ["2", "1", "1", "flagged", "flagged", "0", "0.5200", "0.0100", "yes"]
    assert lines[3].endswith("attributed: dev-0003, dev-0007")
    assert "pruned" in lines[4] and lines[4].endswith("offsets [4] not found")
    assert lines[5].endswith("rollback to 1 by operator: oops")


def test_rollback_targets_are_checked_with_a_hint(store, tmp_path):
    assert rollback_target(store, 1) == 1
    with pytest.raises(RollbackError, match="current version: nothing to roll back"):
        rollback_target(store, 5)
    for bad in (6, -1, True, "2"):
        with pytest.raises(RollbackError, match=r"versions are 0\.\.5 \(fedguard versions lists them\)"):
            rollback_target(store, bad)
    for v in (1, 2):
        store._stem(v).with_suffix(".safetensors").unlink()
    with pytest.raises(RollbackError, match=r"deleted by the model store's retention; versions with weights near "
                                            r"it: 0, 3, 4$"):
        rollback_target(store, 2)
    with pytest.raises(RollbackError, match="no model versions"):
        rollback_target(ModelStore(tmp_path / "empty"), 0)


def test_the_remembered_triggers_work_is_in_the_note(tmp_path):
    store = ModelStore(tmp_path / "models")
    p = np.zeros(4, dtype=np.float32)
    store.save(0, p, meta(0))
    store.save(1, p, meta(1, rule_info={"params_from": 0}, audit={
        "verdict": "flagged", "scores": {"flagged": 0}, "attributed": ["dev-0002"],
        "look_back": {"windows": [0], "screened": {"dev-0009": [0], "dev-0004": [0]}, "served_from": 0}}))
    store.save(2, p, meta(2, audit={"verdict": "clean", "screened": {"screened": ["dev-0011"], "triggers": []}}))
    store.save(3, p, meta(3, rule_info={"params_from": 2}, audit={
        "verdict": "flagged", "scores": {"flagged": 1}, "attributed": [], "suspected": ["dev-0007"],
        "look_back": {"windows": [2], "screened": {}, "served_from": 2}}))
    rows = lineage(store)
    assert rows[3]["note"] == "attributed: nobody (suspected, unconfirmed: dev-0007)" and rows[3]["look_back"] == []
    assert rows[1]["look_back"] == ["dev-0004", "dev-0009"] and rows[2]["screened"] == ["dev-0011"]
    assert rows[1]["note"] == "attributed: dev-0002; look-back: dev-0004, dev-0009"
    assert rows[2]["note"] == "screened out: dev-0011"
    assert rows[0]["note"] == "" and rows[0]["screened"] == [] and rows[0]["look_back"] == []
