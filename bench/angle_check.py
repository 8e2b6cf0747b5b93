"""Does the angle calibration (processors/detectors.py, ``angle_scale``) leave the committed Fashion-MNIST results
unchanged? It can change a verdict only in a window whose scale is above 1, so this runs every configuration of the
committed evaluation matrix that uses the ensemble (``bench/eval.sh``: each rule x each attack, the default rule over
3 seeds with and without the audit, the late model-replacement anchor) and of ``bench/detection.py``, and reports the
largest scale any window reached, per configuration family.

Usage (result quoted in docs/detection.md)::

    python bench/angle_check.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _simruns import run_many  # noqa: E402

from fedguard.evaluation_matrix import plan  # noqa: E402

ATTACKS = ["none", "model_replacement", "constrain_and_scale", "badnets", "label_flip", "sign_flip", "gaussian", "alie",
           "ipm", "min_max", "min_sum", "slow_drift", "sybil", "window_stuffing"]
RULES = ["norm_clip", "fedavg", "coordinate_median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "bulyan",
         "centered_clipping", "fltrust", "flame", "dp_gaussian", "reputation_weighted"]
PARAMS = {"krum": {"f": 2}, "multi_krum": {"f": 2}, "bulyan": {"f": 1}, "trimmed_mean": {"beta": 0.2},
          "dp_gaussian": {"clip_norm": 2.5, "noise_multiplier": 0.1}}


def configs():
    common = dict(rounds=30, task="fashion-mnist", fractions=[0.2])
    out = [("eval", c) for c in plan(RULES, ATTACKS, seeds=[0], rule_params=PARAMS, **common)]
    out += [("eval-default", c) for c in plan(["norm_clip"], ATTACKS, seeds=[1, 2], **common)]
    out += [("eval-default-audit", c) for c in plan(["norm_clip"], ATTACKS, seeds=[0, 1, 2], audit="neural_cleanse",
                                                   **common)]
    out += [("eval-anchor-default", c) for c in plan(["norm_clip"], ["model_replacement"], seeds=[0, 1, 2],
                                                    attack_start=20, audit="neural_cleanse", **common)]
    out += [("detection-clean", c) for c in plan(["norm_clip"], ["none"], fractions=[0.2], seeds=[0, 1, 2],
                                                 rounds=100, task="fashion-mnist")]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results/angle_check.json"))
    args = p.parse_args(argv)
    todo = configs()
    results = run_many([c for _, c in todo], workers=args.workers, desc="angle check rounds")
    worst: dict[str, float] = {}
    above = []
    for (family, config), res in zip(todo, results):
        scales = [r["angle_scale"] for r in res["rounds"] if r.get("angle_scale") is not None]
        top = max(scales, default=1.0)
        worst[family] = max(worst.get(family, 1.0), top)
        if top > 1.0:
            above.append({"family": family, "rule": config.rule, "attack": config.attack, "seed": config.seed,
                          "audit": config.audit, "max_scale": top})
    report = {"command": "python bench/angle_check.py " + " ".join(argv or sys.argv[1:]), "runs": len(todo),
              "max_scale_per_family": worst, "runs_above_one": above}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
