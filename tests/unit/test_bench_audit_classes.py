"""The pure summary of bench/audit_classes.py on hand-made audit records: which judged versions meet Neural
Cleanse's two conditions (index > threshold, norm <= abs_max_ratio of the median) and which class of them is
reported (the benchmark itself runs simulations for minutes; it is never a test)."""

from __future__ import annotations

import pytest

from tests.conftest import bench_script


@pytest.fixture(scope="module")
def classes():
    with bench_script("audit_classes") as module:
        yield module


def audit(r: int, q: list[float], anomaly: list[float | None], rel: list[float] | None, verdict: str = "clean",
          backdoor: float = 0.01) -> dict:
    return {"round": r, "verdict": verdict, "reasons": [], "flagged": None, "q": q, "anomaly": anomaly, "rel": rel,
            "backdoor": backdoor}


def test_candidates_need_both_conditions_and_a_reference(classes):
    run = {"audits": [
        audit(1, [0.5, 1.0, 1.0], [3.0, 0.0, 0.0], None, verdict="skipped"),  # warm-up: not judged
        audit(2, [0.5, 1.0, 1.0], [3.0, 0.0, 0.0], None),                      # no reference: not counted
        audit(3, [0.7, 1.0, 1.0], [2.5, 0.0, 0.0], [0.95, 1.0, 1.0]),          # q at the bound (inclusive): hit
        audit(4, [0.71, 1.0, 1.0], [2.5, 0.0, 0.0], [0.95, 1.0, 1.0]),         # q just above: no
        audit(5, [0.6, 1.0, 1.0], [2.0, 0.0, 0.0], [0.95, 1.0, 1.0]),          # index at the threshold: no (> 2)
        # two classes meet both: the smaller q is reported; a None index above the median (-inf) does not count
        audit(6, [0.6, 0.4, 1.0], [2.1, 2.2, None], [0.9, 0.5, 1.0], verdict="flagged", backdoor=0.9),
        audit(7, [0.3, 1.0, 1.0], [None, 0.0, 0.0], [0.4, 1.0, 1.0]),          # None below the median: +inf, hit
    ]}
    hits = classes.candidates(run, threshold=2.0, abs_max_ratio=0.7)
    assert [(c["round"], c["class"]) for c in hits] == [(3, 0), (6, 1), (7, 0)]
    assert hits[1] == {"round": 6, "class": 1, "q": 0.4, "anomaly": 2.2, "rel": 0.5, "verdict": "flagged",
                       "reasons": [], "backdoor": 0.9}


def test_span(classes):
    assert classes.span([]) == "-"
    assert classes.span([0.891, 0.5, 0.98]) == "0.50-0.98"


def test_crossing_is_the_first_version_strictly_above_the_bound(classes):
    run = {"audits": [audit(1, [1.0] * 3, [0.0] * 3, None, backdoor=0.05),
                      audit(2, [1.0] * 3, [0.0] * 3, None, backdoor=0.10),   # at the bound: not past it
                      audit(3, [0.9, 1, 1], [0.4, 0, 0], [0.95, 1, 1], backdoor=0.11),
                      audit(4, [0.5, 1, 1], [3.0, 0, 0], [0.5, 1, 1], backdoor=0.50)]}
    assert classes.crossing(run)["round"] == 3
    assert classes.crossing(run, bound=0.6) is None


def test_slow_drift_lines_place_the_target_class_among_the_clean_runs(classes):
    clean = {"group": "clean-long", "config": {"seed": 0}, "audits": [
        audit(1, [0.2, 1.0, 1.0], [5.0, 0, 0], None, verdict="skipped"),      # warm-up: not in the clean range
        audit(2, [0.8, 1.0, 1.0], [1.0, 0, 0], [1.0, 1, 1]),
        audit(3, [1.1, 1.0, 1.0], [-0.5, 0, 0], [1.0, 1, 1])]}
    slow = {"group": "slow-drift", "config": {"seed": 7}, "audits": [
        audit(1, [1.0, 1, 1], [0.0, 0, 0], None, verdict="skipped", backdoor=0.02),
        audit(2, [0.9, 1, 1], [0.6, 0, 0], [0.97, 1, 1], backdoor=0.12),
        audit(3, [0.7, 1, 1], [None, 0, 0], [0.8, 1, 1], verdict="flagged", backdoor=0.30)]}
    text = "\n".join(classes.slow_drift_lines([clean, slow]))
    assert "class 0's `q` in 2 judged clean versions 0.80-1.10, anomaly index -0.50 to 1.00" in text
    assert "| 7 | 3 | 2 | 0.90 | 0.60 | 0.97 | 30.0% | 0.70 | 1 |" in text
    never = {**slow, "audits": slow["audits"][:1]}
    assert "| 7 | 1 | never | - | - | - | 2.0% | 1.00 | 0 |" in "\n".join(classes.slow_drift_lines([clean, never]))
    assert classes.slow_drift_lines([clean]) == []
