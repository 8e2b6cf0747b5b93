"""Honest false positives of the detection ensemble by task and window size (docs/detection.md, "Small windows").

A CI run of ``tests/e2e/test_broker_memory.py`` (synthetic task, 6 devices, windows of 3) saw the strike rule
quarantine 4 of 6 honest devices. This measures whether that is the window size or the task: clean runs (no
attack) of :func:`fedguard.simulation.simulate`, i.e. the live pipeline's sampling, training, sketch, ensemble,
reputation and rule, for each task x members per window x seed. Per configuration:

* ``fp`` / ``fp_reject``: honest members flagged (verdict not accept) / rejected, over every round;
* per detector: the members it voted against; for ``direction``, which of its tests fired (pairwise score below
  -0.1, centre cosine below -0.2, centre z below -3.5, cosine to the previous global update below -0.5) and the
  quantiles of the members' pairwise scores (weighted median cosine to the other members) and of every raw pairwise
  cosine between two members of a window;
* ``quarantined``: honest devices the strike rule quarantined, and the round of the first;
* the same split by thirds of the run (early training vs near convergence).

Usage (the committed results)::

    python bench/window_size.py --out bench/results/window_size.md
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import simulation_machine  # noqa: E402

QUANTILES = (0.01, 0.05, 0.25, 0.5)


def _direction_probe(samples: dict[str, list]) -> None:
    """Wrap :func:`processors.detectors.direction` (in this worker process only) to keep, per call with >= 3
    distinct members, which of its tests fired for each member, and the members' pairwise scores and raw cosines."""
    from fedguard.vectors import cosine_matrix
    from processors import detectors as D

    original = D.direction

    def probed(sketches, previous_global=None, **kw):
        res = original(sketches, previous_global, **kw)
        if res.info.get("distinct", 0) >= 3:
            pw, cc, z = res.extra["pairwise"], res.scores, res.extra["z"]
            cp = np.nan_to_num(res.extra["cos_previous"], nan=1.0)
            for i in range(cc.size):
                samples["tests"].append([bool(pw[i] < kw["pairwise_abs"]), bool(cc[i] < kw["cos_abs"]),
                                         bool(z[i] < -kw["z_threshold"]), bool(cp[i] < kw["previous_abs"])])
            samples["pairwise"].extend(float(v) for v in pw)
            cos = cosine_matrix(np.asarray(sketches, dtype=np.float64))
            samples["cosines"].extend(float(v) for v in cos[np.triu_indices(cos.shape[0], 1)])
        return res

    D.direction = probed


def run_one(job: tuple[str, int, int, int, int]) -> dict[str, Any]:
    """One clean run: ``(task, devices, per_round, rounds, seed)`` -> its honest false-positive record."""
    import torch

    torch.set_num_threads(1)
    from fedguard.simulation import SimulationConfig, simulate

    task, devices, per_round, rounds, seed = job
    samples: dict[str, list] = {"tests": [], "pairwise": [], "cosines": []}
    _direction_probe(samples)
    res = simulate(SimulationConfig(task=task, num_devices=devices, per_round=per_round, rounds=rounds, seed=seed))
    rs = res["rounds"]
    votes: Counter = Counter()
    for r in rs:
        votes.update({k: v for k, v in (r["votes_honest"] or {}).items() if v})
    thirds = []
    for part in np.array_split(np.arange(len(rs)), 3):
        sub = [rs[i] for i in part]
        honest = sum(r["honest"] for r in sub)
        thirds.append(sum(r["flagged_honest"] for r in sub) / honest if honest else None)
    quarantined = [(r["round"], d) for r in rs for d in (r.get("quarantined_now") or [])]
    tests = np.array(samples["tests"], dtype=bool).reshape(-1, 4)
    det = res["detection"]  # fedguard.simulation.detection_rates over every round (no attack)
    return {
        "task": task, "devices": devices, "per_round": per_round, "rounds": rounds, "seed": seed,
        "honest": det["honest"], "flagged": det["flagged_honest"], "rejected": det["rejected_honest"],
        "votes": dict(votes),
        "direction_tests": dict(zip(("pairwise", "centre", "z", "reversal"), tests.sum(axis=0).tolist())),
        "direction_scored": int(tests.shape[0]),
        "pairwise_q": [float(np.quantile(samples["pairwise"], q)) for q in QUANTILES] if samples["pairwise"] else [],
        "cosine_q": [float(np.quantile(samples["cosines"], q)) for q in QUANTILES] if samples["cosines"] else [],
        "cosine_mean": float(np.mean(samples["cosines"])) if samples["cosines"] else None,
        "fp_by_third": thirds, "quarantined": quarantined,
        "final_main_accuracy": res["final_main_accuracy"], "seconds": res["seconds"],
    }


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, devices, per_round): the seeds' totals."""
    rows: dict[tuple, dict[str, Any]] = {}
    for r in runs:
        key = (r["task"], r["devices"], r["per_round"])
        row = rows.setdefault(key, {"task": r["task"], "devices": r["devices"], "per_round": r["per_round"],
                                    "seeds": [], "rounds": r["rounds"], "honest": 0, "flagged": 0, "rejected": 0,
                                    "votes": Counter(), "direction_tests": Counter(), "quarantined": 0,
                                    "first_quarantine": None, "pairwise_median": [], "cosine_mean": [],
                                    "thirds": [[], [], []], "accuracy": []})
        row["seeds"].append(r["seed"])
        for k in ("honest", "flagged", "rejected"):
            row[k] += r[k]
        row["votes"].update(r["votes"])
        row["direction_tests"].update(r["direction_tests"])
        row["quarantined"] += len(r["quarantined"])
        if r["quarantined"]:
            first = r["quarantined"][0][0]
            row["first_quarantine"] = first if row["first_quarantine"] is None else min(row["first_quarantine"], first)
        if r["pairwise_q"]:
            row["pairwise_median"].append(r["pairwise_q"][QUANTILES.index(0.5)])
        if r["cosine_mean"] is not None:
            row["cosine_mean"].append(r["cosine_mean"])
        for i, v in enumerate(r["fp_by_third"]):
            if v is not None:
                row["thirds"][i].append(v)
        row["accuracy"].append(r["final_main_accuracy"])
    out = []
    for row in rows.values():
        row["fp"] = row["flagged"] / row["honest"] if row["honest"] else None
        row["fp_reject"] = row["rejected"] / row["honest"] if row["honest"] else None
        row["votes"], row["direction_tests"] = dict(row["votes"]), dict(row["direction_tests"])
        row["thirds"] = [float(np.mean(t)) if t else None for t in row["thirds"]]
        out.append(row)
    return out


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Honest false positives by task and window size", "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}, {report['wall_min']:.1f} min on {report['workers']} workers; {m['cpu']} "
        f"({m['nproc']} CPUs), torch {m['torch']}, load {m['load_start']} -> {m['load_end']}.", "",
        f"Clean runs (no attacker), the live defaults (rule {report.get('rule', '?')}, detection "
        f"{report.get('detection', '?')}, reputation with the strike rule). Every member is honest: any flag is a "
        "false positive. `fp`: flagged (downweight or reject) / honest members; `direction: pairwise / centre / z / reversal`: members for which that test of the direction detector "
        "fired; `pairwise median`, `cosine mean`: the members' pairwise scores (median cosine to the other members) "
        "and the raw cosine between two members of a window, averaged over seeds; `fp by third`: the flagged share "
        "in the first, middle and last third of the rounds; `quarantined`: honest devices quarantined (all seeds).", "",
        "| task | devices | per window | seeds x rounds | honest members | fp | fp reject | direction: pairwise / "
        "centre / z / reversal | other votes | pairwise median | cosine mean | fp by third | quarantined (first round) "
        "| final accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        dt = r["direction_tests"]
        other = ", ".join(f"{k} {v}" for k, v in sorted(r["votes"].items()) if k != "direction" and v) or "-"
        q = f"{r['quarantined']}" + (f" ({r['first_quarantine']})" if r["first_quarantine"] else "")
        lines.append(
            f"| {r['task']} | {r['devices']} | {r['per_round']} | {len(r['seeds'])} x {r['rounds']} | {r['honest']} | "
            f"{pct(r['fp'])} | {pct(r['fp_reject'])} | {dt.get('pairwise', 0)} / {dt.get('centre', 0)} / "
            f"{dt.get('z', 0)} / {dt.get('reversal', 0)} | {other} | {np.mean(r['pairwise_median']):+.3f} | "
            f"{np.mean(r['cosine_mean']):+.3f} | {' / '.join(pct(t) for t in r['thirds'])} | {q} | "
            f"{np.mean(r['accuracy']):.3f} |")
    lines += ["", "Raw per-run records: the JSON file beside this one.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["fashion-mnist", "synthetic"])
    p.add_argument("--per-round", type=int, nargs="+", default=[3, 5, 10])
    p.add_argument("--devices", type=int, nargs="+", default=[100],
                   help="fleet sizes (each with every --per-round); the synthetic CI fleets are added with "
                        "--small-fleets")
    p.add_argument("--small-fleets", action="store_true",
                   help="also the synthetic task with 2 x per_round devices (the e2e tests' fleets: 6 for 3)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results/window_size.md"))
    args = p.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/window_size.py", *(argv or sys.argv[1:])])
    load_start = tuple(round(x, 2) for x in os.getloadavg())
    jobs = [(t, d, n, args.rounds, s) for t in args.tasks for d in args.devices for n in args.per_round
            for s in args.seeds]
    if args.small_fleets:
        jobs += [("synthetic", 2 * n, n, args.rounds, s) for n in args.per_round for s in args.seeds]
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for i, res in enumerate(pool.imap_unordered(run_one, jobs), 1):
            runs.append(res)
            elapsed = time.perf_counter() - started
            print(f"[{i}/{len(jobs)}] {res['task']} devices={res['devices']} per_round={res['per_round']} "
                  f"seed={res['seed']}: fp {pct(res['flagged'] / max(1, res['honest']))}, "
                  f"{len(res['quarantined'])} quarantined; {elapsed / 60:.1f} min elapsed, about "
                  f"{elapsed / i * (len(jobs) - i) / 60:.1f} min left", flush=True)
    runs.sort(key=lambda r: (r["task"], r["devices"], r["per_round"], r["seed"]))
    from fedguard.simulation import SimulationConfig
    defaults = SimulationConfig()
    report = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "wall_min": (time.perf_counter() - started) / 60, "workers": args.workers,
              "machine": simulation_machine(load_start), "rule": defaults.rule,
              "detection": defaults.detection, "rows": aggregate(runs), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(report))
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
