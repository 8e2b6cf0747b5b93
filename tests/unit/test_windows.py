"""Window state, records and the modified z-score, on hand-checkable inputs."""

import numpy as np
import pytest

from processors import windows as W
from processors.detectors import modified_z_scores, norm_outliers


def entry(uid, base=0, norm=1.0, n=10):
    return {"update_id": uid, "device_id": f"d{uid}", "base_version": base, "num_samples": n, "norm": norm,
            "valid": {"partition": 0, "offset": 0}}


def test_modified_z_score_matches_iglewicz_hoaglin():
    # median 3, absolute deviations [2, 1, 0, 1, 7] -> MAD 1; M_i = 0.6745 (x_i - 3) / 1
    np.testing.assert_allclose(modified_z_scores([1, 2, 3, 4, 10]), 0.6745 * np.array([-2, -1, 0, 1, 7]))


def test_mad_zero_gives_infinite_score_off_the_median():
    scores = modified_z_scores([5, 5, 5, 6])
    assert scores[:3].tolist() == [0, 0, 0] and scores[3] == np.inf


def test_norm_outlier_flags_only_the_outlier():
    scores, flagged = norm_outliers(np.array([1.0, 1.1, 0.9, 1.05, 0.95, 40.0]))
    assert flagged.tolist() == [False] * 5 + [True]
    assert norm_outliers(np.array([1.0, 100.0]))[1].tolist() == [False, False]


def test_window_closes_on_count():
    state = W.empty_state()
    for i in range(2):
        state, outcome = W.add_member(state, entry(str(i)), now=0.0, size=3)
        assert outcome == "added"
    state, outcome = W.add_member(state, entry("2"), now=0.0, size=3)
    assert outcome == "full"
    state, window = W.take_window(state, 0)
    record = W.window_record(window, [accept()] * 3, {"detection": "test"}, model_id="m", base_version=0, now=1.0,
                             size=3)
    assert record["window_id"] == "m:0" and record["closed_by"] == "count" and record["distinct_devices"] == 3
    assert [m["update_id"] for m in record["members"]] == ["0", "1", "2"]
    assert all(m["verdict"] == "accept" and m["weight"] == 1.0 and m["num_samples"] == 10 for m in record["members"])
    assert record["detector"] == {"detection": "test", "flagged": 0, "rejected": 0, "downweighted": 0}
    assert state == {"open": {}, "closed_upto": 0}


def test_window_closes_on_deadline_and_late_updates_are_not_added():
    state, _ = W.add_member(W.empty_state(), entry("a"), now=100.0, size=10)
    assert W.due_windows(state, now=104.0, size=10, deadline_s=5.0) == []
    assert W.due_windows(state, now=105.0, size=10, deadline_s=5.0) == [0]
    state, window = W.take_window(state, 0)
    record = W.window_record(window, [accept()], {}, model_id="m", base_version=0, now=105.0, size=10)
    assert record["closed_by"] == "deadline" and len(record["members"]) == 1
    state, outcome = W.add_member(state, entry("b", base=0), now=106.0, size=10)
    assert outcome == "late" and state["open"] == {}


def test_duplicate_delivery_is_added_once():
    state, _ = W.add_member(W.empty_state(), entry("a"), now=0.0, size=10)
    state, outcome = W.add_member(state, entry("a"), now=0.0, size=10)
    assert outcome == "duplicate" and len(state["open"]["0"]["members"]) == 1


def test_windows_per_base_version_are_separate():
    state = W.empty_state()
    state, _ = W.add_member(state, entry("a", base=4), now=0.0, size=10)
    state, _ = W.add_member(state, entry("b", base=5), now=1.0, size=10)
    assert sorted(state["open"]) == ["4", "5"]
    assert W.due_windows(state, now=10.5, size=10, deadline_s=10.0) == [4]


def test_a_second_update_of_a_device_in_the_window_keeps_no_seat():
    state, _ = W.add_member(W.empty_state(), entry("a"), now=0.0, size=10)
    second = {**entry("b"), "device_id": "da"}
    state, outcome = W.add_member(state, second, now=0.0, size=10)
    assert outcome == "device_duplicate" and [m["update_id"] for m in state["open"]["0"]["members"]] == ["a"]


def test_record_carries_each_verdict_and_weight_and_drops_the_sketch():
    state = W.empty_state()
    for i in range(3):
        state, _ = W.add_member(state, {**entry(str(i)), "sketch": "AAAA"}, now=0.0, size=3)
    state, window = W.take_window(state, 0)
    judged = [accept(), {**accept(), "verdict": "downweight", "weight": 0.5, "flags": ["direction"]},
              {**accept(), "verdict": "reject", "weight": 0.0, "flags": ["magnitude", "direction"]}]
    record = W.window_record(window, judged, {}, model_id="m", base_version=0, now=0.0, size=3)
    assert [(m["verdict"], m["weight"]) for m in record["members"]] == [("accept", 1.0), ("downweight", 0.5),
                                                                         ("reject", 0.0)]
    assert all("sketch" not in m for m in record["members"])
    assert record["detector"] == {"flagged": 2, "rejected": 1, "downweighted": 1}
    with pytest.raises(ValueError):
        W.window_record(window, judged[:2], {}, model_id="m", base_version=0, now=0.0, size=3)


def accept() -> dict:
    return {"scores": {}, "flags": [], "verdict": "accept", "weight": 1.0, "reasons": [], "evidence": "accept"}
