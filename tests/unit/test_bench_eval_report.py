"""bench/eval_report.py's verdicts on hand-made cells: the targets of issue 10 read the right runs, count every seed
and every round, and say "not run yet" instead of passing on missing cells (the matrix itself runs for hours; it is
never a test)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import bench_script


@pytest.fixture(scope="module")
def er():
    with bench_script("eval_report") as module:
        yield module


def cell(rule="norm_clip", detection="ensemble", attack="none", seed=0, main=0.86, backdoor=(0.01, 0.02),
         honest=100, flagged_honest=0, malicious=0, flagged_malicious=0) -> dict:
    return {"rule": rule, "detection": detection, "attack": attack, "seed": seed, "final_main_accuracy": main,
            "rounds": [{"round": i + 1, "backdoor_accuracy": b} for i, b in enumerate(backdoor)],
            "detection_rates": {"honest": honest, "flagged_honest": flagged_honest, "malicious": malicious,
                                "flagged_malicious": flagged_malicious}}


def test_anchor_needs_every_seed_at_ninety_percent_in_the_anchor_run(er):
    assert er.anchor([], [])["met"] is False
    assert er.anchor([], [])["measured"] == "injected at round 20 (converged): not run yet; at round 5 (the matrix, " \
        "still learning): not run yet"
    hit = cell(rule="fedavg", detection="none", attack="model_replacement", backdoor=(0.02, 0.97, 0.5))
    assert er.anchor([], [hit])["met"] is True
    assert er.anchor([hit], [])["met"] is False  # the matrix's early injection is shown, not counted
    assert "round 5 (the matrix, still learning): seed 0: 97.0 %" in er.anchor([hit], [])["measured"]
    miss = dict(hit, seed=1, rounds=[{"round": 1, "backdoor_accuracy": 0.89}])
    assert er.anchor([], [hit, miss])["met"] is False
    # the defended cells do not count for the anchor
    assert er.anchor([], [dict(hit, detection="ensemble")])["met"] is False


def test_the_default_defence_against_the_anchor_needs_every_round_of_every_seed_at_most_five_percent(er):
    assert er.anchor_defended([])["met"] is False and er.anchor_defended([])["measured"] == "not run yet"
    held = cell(attack="model_replacement", backdoor=(0.02, 0.05, 0.01))
    assert er.anchor_defended([held])["met"] is True
    assert er.anchor_defended([held, dict(held, seed=1, rounds=[{"round": 1, "backdoor_accuracy": 0.051}])])[
        "met"] is False


def test_backdoor_target_takes_the_worst_round_of_every_seed_and_the_main_drop(er):
    ok = [cell(attack=a, seed=s, backdoor=(0.01, 0.05), main=0.855) for a in er.BACKDOORS for s in (0, 1)]
    assert er.backdoor_target(ok, 0.86, "x")["met"] is True  # 5 % and 0.5 points: both bounds inclusive
    late = ok + [cell(attack="sybil", seed=2, backdoor=(0.01, 0.02, 0.051))]
    assert er.backdoor_target(late, 0.86, "x")["met"] is False
    slow = ok + [cell(attack="slow_drift", seed=2, main=0.8489)]
    result = er.backdoor_target(slow, 0.86, "x")
    assert result["met"] is False  # one seed more than a point below decides, whatever the mean (-0.70)
    assert "slow drift: backdoor max 5.0 % over 3 seed(s), main -1.11 pp worst seed (-0.70 mean) (**not met**)" \
        in result["measured"]
    assert er.backdoor_target(ok, None, "x")["met"] is False  # no clean fedavg: cannot be judged
    missing = [c for c in ok if c["attack"] != "sybil"]
    result = er.backdoor_target(missing, 0.86, "x")
    assert result["met"] is False and "Sybil backdoor: not run yet" in result["measured"]


def test_robustness_is_the_worst_seed_against_clean_fedavg(er):
    cells = [cell(attack=a, main=0.82) for a in er.UNTARGETED]
    assert er.robustness_target(cells, 0.86, "x")["met"] is True  # 0.82 / 0.86 = 95.3 %
    cells.append(cell(attack="ipm", seed=1, main=0.81))  # 94.2 %
    assert er.robustness_target(cells, 0.86, "x")["met"] is False


def test_detection_pools_members_and_skips_the_undetectable(er):
    cells = [cell(honest=1000, flagged_honest=10)] + [
        cell(attack=a, honest=80, malicious=20, flagged_malicious=19) for a in ("sign_flip", "gaussian")]
    fp, tp = er.detection_targets(cells, "x")
    assert fp["met"] is True and "10 of 1160" in fp["measured"]
    assert tp["met"] is True  # 95 %
    cells.append(cell(attack="constrain_and_scale", malicious=20, flagged_malicious=0))
    assert er.detection_targets(cells, "x")[1]["met"] is True  # not detectable by design: reported, not judged
    cells.append(cell(attack="ipm", malicious=20, flagged_malicious=18))
    assert er.detection_targets(cells, "x")[1]["met"] is False
    cells.append(cell(honest=100, flagged_honest=5))
    assert er.detection_targets(cells, "x")[0]["met"] is False  # 15 of 1360 > 1 %


def test_detection_is_judged_over_crafted_members_when_every_cell_recorded_them(er):
    def alie(seed, crafted, flagged_crafted):
        c = cell(attack="alie", seed=seed, honest=80, malicious=20, flagged_malicious=flagged_crafted)
        c["detection_rates"].update(crafted=crafted, flagged_crafted=flagged_crafted)
        return c
    # 13 of 20 members were crafted and all of them flagged; the 7 honest copies were not (65 % of all members)
    cells = [cell(honest=1000), alie(0, 13, 13)]
    tp = er.detection_targets(cells, "x")[1]
    assert tp["met"] is True and "alie 100.0 % of 13 crafted (65.0 % of all 20" in tp["measured"]
    assert "7 honest copies" in tp["measured"]
    assert er.detection_targets([cell(honest=1000), alie(0, 13, 12)], "x")[1]["met"] is False  # 92.3 %
    # one seed without the counts: every member is judged, and the report says so
    old = cell(attack="alie", seed=1, honest=80, malicious=20, flagged_malicious=13)
    tp = er.detection_targets(cells + [old], "x")[1]
    assert tp["met"] is False and "crafted not recorded" in tp["measured"]


def test_report_reads_the_cell_files_and_renders(er, tmp_path):
    for d, c in (("eval", cell(rule="fedavg", detection="none", attack="model_replacement", backdoor=(0.99,))),
                 ("eval", cell(rule="fedavg", detection="none")),
                 ("eval-default-audit", cell(attack="ipm", malicious=10, flagged_malicious=10))):
        (tmp_path / d / "cells").mkdir(parents=True, exist_ok=True)
        (tmp_path / d / "cells" / f"{c['rule']}_{c['detection']}_{c['attack']}.json").write_text(json.dumps(c))
    rep = er.report(tmp_path)
    assert rep["counts"] == {"audit": 1, "default": 0, "matrix": 2, "anchor": 0, "anchor_default": 0}
    assert rep["clean_fedavg"] == 0.86
    assert rep["targets"][0]["met"] is False  # the anchor run is missing; the matrix's cell is only shown
    assert "round 5 (the matrix, still learning): seed 0: 99.0 %" in rep["targets"][0]["measured"]
    text = er.render(rep)
    assert "| `eval/` | 2 of 392 |" in text and "**NOT met**" in text
    er.main(["--results", str(tmp_path), "--out", str(tmp_path / "eval.md")])
    assert (tmp_path / "eval.md").read_text() == text
