"""The pure summaries of bench/audit.py on hand-made round lists: first flag, first round above 10 %, the shares of
devices attributed and quarantined, the clean false-alarm rate and the targets' verdicts (the benchmark itself runs
the simulation for minutes; it is never a test)."""

from __future__ import annotations

import pytest

from tests.conftest import bench_script


@pytest.fixture(scope="module")
def audit():
    with bench_script("audit") as module:
        yield module


def rnd(r: int, *, audit: str | None = "clean", served: bool = True, backdoor: float | None = 0.01,
        candidate: float | None = None, att_bad: int = 0, att_honest: int = 0, q_bad: int = 0, q_honest: int = 0,
        main: float = 0.8, seconds: float | None = 1.0, devices: list[int] | None = None) -> dict:
    return {"round": r, "audit": audit, "served": served, "backdoor_accuracy": backdoor,
            "candidate_backdoor_accuracy": candidate, "attributed_malicious": att_bad,
            "attributed_honest": att_honest, "quarantined_malicious": q_bad, "quarantined_honest": q_honest,
            "main_accuracy": main, "audit_seconds": seconds, "devices": devices or []}


def result(rounds: list[dict], compromised: list[int], *, attack: str | None = "constrain_and_scale",
           audit: str = "neural_cleanse", seed: int = 0, start: int = 5, num_devices: int = 10) -> dict:
    return {"config": {"attack": attack, "audit": audit, "seed": seed, "attack_start": start,
                       "num_devices": num_devices},
            "compromised": compromised, "rounds": rounds}


def test_first_flag_and_audited_versions(audit):
    rounds = [rnd(1, audit="skipped"), rnd(2, audit="skipped"), rnd(3, audit="clean"),
              rnd(4, audit="flagged", served=False, candidate=0.9), rnd(5, audit="flagged", served=False)]
    assert audit.first_flag(rounds) == 4
    assert audit.flagged_rounds(rounds) == [4, 5]
    assert [r["round"] for r in audit.audited(rounds)] == [3, 4, 5]  # warm-up / carried over are not audited


def test_never_flagged_and_audit_off(audit):
    assert audit.first_flag([rnd(1), rnd(2)]) is None
    off = [rnd(1, audit=None), rnd(2, audit=None)]
    assert audit.first_flag(off) is None and audit.audited(off) == []
    assert audit.first_flag([]) is None


def test_candidate_backdoor_is_the_withheld_candidate(audit):
    assert audit.candidate_backdoor(rnd(1, served=False, backdoor=0.02, candidate=0.7)) == 0.7
    assert audit.candidate_backdoor(rnd(1, served=True, backdoor=0.3, candidate=None)) == 0.3
    assert audit.served_backdoor(rnd(1, served=False, backdoor=0.02, candidate=0.7)) == 0.02


def test_first_above_ten_percent(audit):
    rounds = [rnd(1, backdoor=0.5), rnd(5, backdoor=0.10), rnd(6, served=False, backdoor=0.02, candidate=0.4),
              rnd(7, backdoor=0.2)]
    assert audit.first_above(rounds) == 1
    assert audit.first_above(rounds, from_round=2) == 6  # exactly 10 % does not pass 10 %
    assert audit.first_above(rounds, audit.served_backdoor, from_round=2) == 7
    assert audit.first_above([rnd(1, backdoor=0.05), rnd(2, backdoor=None)]) is None  # never
    assert audit.first_above([]) is None


def test_device_shares_within_and_at_end(audit):
    # 4 of 10 devices compromised, attack from round 2, window of 2 rounds: rounds 2-3
    rounds = [rnd(1), rnd(2, att_bad=1, q_bad=1), rnd(3, att_bad=1, att_honest=1, q_bad=2, q_honest=1),
              rnd(4, att_bad=1, q_bad=4, q_honest=1)]
    s = audit.device_shares(rounds, [0, 1, 2, 3], 10, attack_start=2, within=2, took_part={0, 1, 2})
    assert s["cutoff_round"] == 3
    assert s["attributed_malicious_within"] == 2 and s["attributed_malicious_end"] == 3
    assert s["share_attributed_within"] == 0.5 and s["share_attributed_end"] == 0.75
    assert s["share_quarantined_within"] == 0.5 and s["share_quarantined_end"] == 1.0  # reputation counts too
    assert s["attributed_honest"] == 1 and s["share_honest_attributed"] == pytest.approx(1 / 6)
    assert s["quarantined_honest_ever"] == 1 and s["share_honest_quarantined"] == pytest.approx(1 / 6)
    assert s["took_part_within"] == 3


def test_device_shares_without_attackers(audit):
    s = audit.device_shares([rnd(1), rnd(2)], [], 10, attack_start=1)
    assert s["compromised"] == 0
    assert s["share_attributed_within"] is None and s["share_quarantined_end"] is None
    assert s["share_honest_quarantined"] == 0.0
    assert audit.device_shares([], [1], 10, attack_start=1)["share_quarantined_end"] == 0.0


def test_attack_cell(audit):
    rounds = [rnd(1, audit="skipped"), rnd(2, audit="skipped"), rnd(3, audit="skipped"), rnd(4),
              rnd(5, backdoor=0.03, devices=[0, 5]), rnd(6, backdoor=0.08, devices=[1, 6], seconds=2.0),
              rnd(7, audit="flagged", served=False, backdoor=0.08, candidate=0.6, att_bad=2, q_bad=2,
                  devices=[0, 1, 7], seconds=3.0),
              rnd(8, backdoor=0.04, q_bad=2, main=0.79)]
    cell = audit.attack_cell(result(rounds, [0, 1, 2], start=5), clean_main=0.8)
    assert cell["first_flag"] == 7 and cell["flagged_rounds"] == [7]
    assert cell["first_candidate_above_10"] == 7 and cell["first_served_above_10"] is None
    assert cell["max_served_backdoor"] == 0.08 and cell["final_served_backdoor"] == 0.04
    assert cell["max_candidate_backdoor"] == 0.6
    assert cell["audited_versions"] == 5
    assert cell["took_part_within"] == 2  # device 2 never sampled
    assert cell["share_attributed_end"] == pytest.approx(2 / 3)
    assert cell["main_delta_pp"] == pytest.approx(-1.0)
    assert cell["audit_seconds_median"] == 1.0


def test_clean_summary(audit):
    a = result([rnd(1, audit="skipped"), rnd(2), rnd(3, audit="flagged", served=False), rnd(4)], [], attack=None)
    b = result([rnd(1, audit="skipped"), rnd(2), rnd(3, q_honest=1, att_honest=1)], [], attack=None, seed=1)
    s = audit.clean_summary([a, b])
    assert s["audited_versions"] == 5 and s["flagged"] == 1
    assert s["false_alarms_per_100"] == pytest.approx(20.0)
    assert s["flagged_rounds"] == {"0": [3], "1": []}
    assert s["honest_quarantined"] == 1 and s["honest_attributed"] == 1
    assert s["share_honest_quarantined"] == pytest.approx(1 / 20)
    empty = audit.clean_summary([])
    assert empty["audited_versions"] == 0 and empty["false_alarms_per_100"] is None


def _cell(**kw):
    base = dict(attack="constrain_and_scale", audit="neural_cleanse", seed=0, max_served_backdoor=0.03,
                share_quarantined_within=0.95, quarantined_malicious_within=19, compromised=20, took_part_within=20,
                share_honest_quarantined=0.0, quarantined_honest_ever=0, main_delta_pp=-0.4)
    return {**base, **kw}


def _clean(**kw):
    return {"runs": 4, "audited_versions": 108, "flagged": 1, "false_alarms_per_100": 100 / 108,
            "share_honest_quarantined": 0.0, "honest_quarantined": 0, **kw}


def test_targets_all_met(audit):
    ts = audit.targets(_clean(), [_cell(), _cell(audit="none", max_served_backdoor=1.0,
                                                      share_quarantined_within=0.0, main_delta_pp=-5.0)])
    assert len(ts) == 5
    assert all(t["met"] for t in ts), ts  # the audit-off reference cells are not judged


def test_targets_not_met(audit):
    ts = audit.targets(_clean(flagged=2, false_alarms_per_100=2 / 1.08),
                       [_cell(max_served_backdoor=0.051, share_quarantined_within=0.85,
                              share_honest_quarantined=0.025, quarantined_honest_ever=2, main_delta_pp=-1.2)])
    assert [t["met"] for t in ts] == [False] * 5
    # a higher main accuracy than the clean run is within the target
    assert audit.targets(_clean(), [_cell(main_delta_pp=+3.0)])[4]["met"]


def test_targets_with_nothing_measured(audit):
    ts = audit.targets({"runs": 0, "false_alarms_per_100": None}, [])
    assert [t["met"] for t in ts] == [False] * 5
    # no attackers: the quarantine share is None and cannot be met
    ts = audit.targets(_clean(), [_cell(share_quarantined_within=None)])
    assert ts[2]["met"] is False


def test_notes_say_what_the_audit_did_under_the_sybil_backdoor(audit):
    on = [_cell(attack="sybil", seed=0, first_flag=7, first_candidate_above_10=None, max_served_backdoor=0.028,
                quarantined_malicious_end=15),
          _cell(attack="sybil", seed=1, first_flag=None, first_candidate_above_10=None, max_served_backdoor=0.028,
                quarantined_malicious_end=17)]
    off = [_cell(attack="sybil", audit="none", seed=0, first_served_above_10=None, max_served_backdoor=0.04),
           _cell(attack="sybil", audit="none", seed=1, first_served_above_10=None, max_served_backdoor=0.028)]
    report = {"targets": [], "cells": on + off, "runs": []}
    line = next(n for n in audit.notes(report) if n.startswith("sybil (base"))
    assert "without the audit 4.0 %, 2.8 %" in line and "quarantined 15, 17 of 20" in line
    assert line.endswith("the audit flagged seed 0 at round 7.")
    report["cells"] = [{**c, "first_flag": None} for c in on]
    line = next(n for n in audit.notes(report) if n.startswith("sybil (base"))
    assert line.endswith("the audit flagged nothing.") and "without the audit" not in line
