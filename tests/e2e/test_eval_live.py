"""``fedguard eval --live`` (issue 10, item 2): one cell through the real embedded pipeline (its own broker, Redis,
processors, aggregator and fleet) agrees with the same cell in process.

The cell: norm_clip + the detection ensemble (the default defence until robust_lr became the default rule), sign flip from round 3 at 30% of a 10-device
synthetic fleet, 5 devices per round, 8 rounds. Stated tolerance: every round's main and backdoor accuracy within
0.5 percentage points (the runs differ in the order a window's members arrive, so in the float sums of the
aggregate), and the same verdicts (the same numbers of malicious and honest members, flagged, rejected and admitted
in every round). Measured here: identical to the last digit in every round.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

CELL = ["--task", "synthetic", "--devices", "10", "--per-round", "5", "--rules", "norm_clip", "--detection",
        "ensemble", "--attacks", "sign_flip", "--fractions", "0.3", "--seeds", "0", "--rounds", "8",
        "--attack-start", "3", "--no-plots", "--workers", "1"]
TOLERANCE = 0.005


def run_eval(out, *extra: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "fedguard.cli", "eval", *CELL, "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_a_cell_run_live_agrees_with_the_same_cell_in_process(tmp_path):
    out = tmp_path / "eval"
    live = run_eval(out, "--live")
    in_process = run_eval(out)  # the same directory: the two kinds of cell are kept side by side
    assert live["config"]["mode"] == "live" and in_process["config"]["mode"] == "in-process"
    [a] = live["cells"]
    [b] = in_process["cells"]
    assert a["key"].endswith("__live") and a["key"][:-len("__live")] == b["key"]
    assert a["mode"] == "live" and b["mode"] == "in-process"
    assert a["compromised"] == b["compromised"] and a["compromised"]
    assert len(a["rounds"]) == len(b["rounds"]) == 8
    attacked = 0
    for x, y in zip(a["rounds"], b["rounds"]):
        assert abs(x["main_accuracy"] - y["main_accuracy"]) <= TOLERANCE, (x, y)
        assert abs(x["backdoor_accuracy"] - y["backdoor_accuracy"]) <= TOLERANCE, (x, y)
        for k in ("malicious", "honest", "flagged_malicious", "flagged_honest", "rejected_malicious",
                  "rejected_honest", "admitted"):
            assert x[k] == y[k], (k, x, y)
        attacked += x["malicious"]
    # the attack reached windows, and the ensemble judged it the same way in both; three devices, as each is
    # quarantined at its first rejection (evidence "harmful"), so each reaches about one window
    assert attacked >= 3
    assert a["detection_rates"]["tp"] == b["detection_rates"]["tp"]
    assert (out / "results.md").read_text().count("| norm_clip | ensemble | sign_flip |") == 1
    assert not list((out / "live").glob("*/data"))  # the live cell's stack data is removed, its logs kept
    assert list((out / "live").glob("*/logs/processors.log"))
