"""Window state and the norm detector, on hand-checkable inputs."""

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
    state, record = W.close_window(state, 0, "m", now=1.0, size=3, z_threshold=3.5)
    assert record["window_id"] == "m:0" and record["closed_by"] == "count"
    assert [m["update_id"] for m in record["members"]] == ["0", "1", "2"]
    assert all(m["verdict"] == "accept" and m["weight"] == 10.0 for m in record["members"])
    assert state == {"open": {}, "closed_upto": 0}


def test_window_closes_on_deadline_and_late_updates_are_not_added():
    state, _ = W.add_member(W.empty_state(), entry("a"), now=100.0, size=10)
    assert W.due_windows(state, now=104.0, size=10, deadline_s=5.0) == []
    assert W.due_windows(state, now=105.0, size=10, deadline_s=5.0) == [0]
    state, record = W.close_window(state, 0, "m", now=105.0, size=10, z_threshold=3.5)
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


def test_flagged_member_gets_zero_weight():
    state = W.empty_state()
    for i, norm in enumerate([1.0, 1.1, 0.9, 1.05, 50.0]):
        state, _ = W.add_member(state, entry(str(i), norm=norm), now=0.0, size=5)
    _, record = W.close_window(state, 0, "m", now=0.0, size=5, z_threshold=3.5)
    assert [m["verdict"] for m in record["members"]] == ["accept"] * 4 + ["reject"]
    assert record["members"][4]["weight"] == 0.0 and record["detector"]["flagged"] == 1
