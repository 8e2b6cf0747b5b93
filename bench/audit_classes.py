"""Per-class Neural Cleanse scores of every audited version: why the absolute test needs a class to have *become*
small (docs/audit.md, "A class that is always small"; ``AuditConfig.abs_drop_ratio``).

Runs :func:`fedguard.simulation.simulate` with the audit on and records, for every candidate the aggregator's audit
judged, each class's trigger norm relative to the median class (``q``), its Neural Cleanse anomaly index and its
``q`` over the same in the audit's reference (the last 3 served audits: ``rel``), with the verdict. Three groups:

* **clean**: the default defence, Fashion-MNIST, ``--clean-seeds`` (false alarms);
* **digits**: persistent constrain-and-scale in the live test's configuration (``tests/e2e/test_audit_live.py``:
  digits, 10 devices, 5 per window, 40% compromised from round 5, 20 rounds), ``--digits-seeds`` (real flags);
* **passive**: Fashion-MNIST backdoors under fedavg without detection with the audit's verdicts recorded but not
  acted on (a flagged candidate is served as if clean), ``--passive-seeds``: the scores of a backdoor the audit
  does not stop, round after round;
* **slow drift** against **clean, long**: the default defence over ``--long-rounds`` (100) under the library's slow
  drift (20% compromised from round 5) and without an attacker, ``--long-seeds``: where the backdoor's target
  class stands among the clean runs' scores when its backdoor accuracy first passes 10% (issue 9's bound).

For each group it reports the versions that meet Neural Cleanse's two conditions (index > ``threshold``, norm <=
``abs_max_ratio`` of the median) and their ``rel``: the clean ones are false alarms unless ``rel`` rules them out.

Usage (the committed results)::

    python bench/audit_classes.py --out bench/results/audit_classes.md
    python bench/audit_classes.py --clean-seeds --digits-seeds --passive-seeds --long-seeds 0 1 \
        --out bench/results/audit_slow_drift.md
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import simulation_machine  # noqa: E402

DIGITS = {"task": "digits", "num_devices": 10, "per_round": 5, "attack": "constrain_and_scale", "fraction": 0.4,
          "rounds": 20}
PASSIVE = [("constrain_and_scale", {}), ("badnets", {}), ("model_replacement", {"attack_start": 20})]
GROUPS = ("clean", "digits", "passive", "clean-long", "slow-drift")
BACKDOOR_BOUND = 0.10  # issue 9: a slow drifter quarantined before its backdoor accuracy passes 10%


def run_one(job: tuple[str, dict[str, Any], bool]) -> dict[str, Any]:
    """One simulation with the audit on; every audit's scores recorded. ``passive``: a flagged verdict is recorded,
    then the candidate is served as if clean (to see how a backdoor the audit does not stop scores)."""
    import torch

    torch.set_num_threads(1)
    from aggregator import auditing
    from fedguard.simulation import SimulationConfig, simulate

    group, kw, passive = job
    audits: list[dict[str, Any]] = []
    judge = auditing.Auditor.audit_candidate

    def recorded(self, candidate, parent, members, reference=None, *, warmup=False):
        out = judge(self, candidate, parent, members, reference, warmup=warmup)
        audits.append({"verdict": out.verdict, "scores": out.scores})
        if passive and out.verdict == auditing.FLAGGED:
            return auditing.AuditOutcome(auditing.CLEAN, why="passive: flag recorded, not acted on",
                                         scores=out.scores, reference=True, seconds=out.seconds)
        return out

    auditing.Auditor.audit_candidate = recorded  # this worker process only (one job per process)
    config = SimulationConfig(audit="neural_cleanse", **kw)
    started = time.perf_counter()
    res = simulate(config)
    rows = []
    for i, a in enumerate(audits):
        s = a["scores"]
        if not s or not s.get("norms"):
            continue
        n = np.asarray(s["norms"], dtype=np.float64)
        rel = s.get("relative_ratios")
        rows.append({"round": i + 1, "verdict": a["verdict"], "reasons": s["reasons"], "flagged": s["flagged"],
                     "q": np.round(n / np.median(n), 4).tolist(), "anomaly": s["anomaly_index"],
                     "rel": rel, "backdoor": res["rounds"][i]["backdoor_accuracy"]})
    return {"group": group, "config": {k: v for k, v in kw.items()}, "passive": passive, "audits": rows,
            "seconds": round(time.perf_counter() - started, 1)}


def candidates(run: dict[str, Any], threshold: float, abs_max_ratio: float) -> list[dict[str, Any]]:
    """Judged versions (not warm-up) where some class meets Neural Cleanse's two conditions; the smallest such class."""
    out = []
    for a in run["audits"]:
        if a["verdict"] == "skipped" or a["rel"] is None:
            continue
        q = np.asarray(a["q"], dtype=np.float64)
        # the JSON holds None for an infinite index (zero spread): +inf below the median, -inf above it
        ai = np.asarray([(np.inf if qt < 1 else -np.inf) if v is None else v for v, qt in zip(a["anomaly"], q)])
        hit = (ai > threshold) & (q <= abs_max_ratio)
        if hit.any():
            t = int(np.argmin(np.where(hit, q, np.inf)))
            out.append({"round": a["round"], "class": t, "q": float(q[t]), "anomaly": float(ai[t]),
                        "rel": float(a["rel"][t]), "verdict": a["verdict"], "reasons": a["reasons"],
                        "backdoor": a["backdoor"]})
    return out


def crossing(run: dict[str, Any], bound: float = BACKDOOR_BOUND) -> dict[str, Any] | None:
    """The first audited version whose backdoor accuracy (served version, true trigger) exceeds ``bound``."""
    for a in run["audits"]:
        if a["backdoor"] is not None and a["backdoor"] > bound:
            return a
    return None


def slow_drift_lines(runs: list[dict[str, Any]]) -> list[str]:
    """Where the slow drift's target class sits among the clean long runs' scores of the same class."""
    slow = [r for r in runs if r["group"] == "slow-drift"]
    clean = [r for r in runs if r["group"] == "clean-long"]
    if not slow or not clean:
        return []
    from producers.attacks.registry import validate_params

    target = int(validate_params("slow_drift")["target"])  # the library's default, as the runs used
    judged = [a for r in clean for a in r["audits"] if a["verdict"] != "skipped"]
    q_clean = [a["q"][target] for a in judged]
    ai_clean = [a["anomaly"][target] for a in judged if a["anomaly"][target] is not None]
    # spelt "to": a span of anomaly indices can start below zero
    ai_span = f"{min(ai_clean):.2f} to {max(ai_clean):.2f}" if ai_clean else "-"
    out = ["", f"Slow drift (target class {target}) against clean runs of the same length: class {target}'s `q` in "
           f"{len(judged)} judged clean versions {span(q_clean)}, anomaly index {ai_span}.", "",
           f"| seed | rounds | first round backdoor > {BACKDOOR_BOUND:.0%} | class {target}'s q then | anomaly index "
           f"then | rel then | max backdoor | class {target}'s q at the last round | flagged versions |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in slow:
        a = crossing(r)
        last = r["audits"][-1]
        flagged = sum(1 for x in r["audits"] if x["verdict"] == "flagged")
        peak = max((x["backdoor"] for x in r["audits"] if x["backdoor"] is not None), default=float("nan"))
        if a is None:
            cells = "never | - | - | -"
        else:
            ai = a["anomaly"][target]
            rel = a["rel"][target] if a["rel"] else None
            cells = (f"{a['round']} | {a['q'][target]:.2f} | {'-' if ai is None else f'{ai:.2f}'} | "
                     f"{'-' if rel is None else f'{rel:.2f}'}")
        out.append(f"| {r['config']['seed']} | {len(r['audits'])} | {cells} | {peak:.1%} | "
                   f"{last['q'][target]:.2f} | {flagged} |")
    return out


def span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def render(report: dict[str, Any]) -> str:
    from aggregator.audit import AuditConfig

    cfg = AuditConfig()
    m = report["machine"]
    lines = ["# Per-class audit scores: a class that is always small", "",
             f"Produced by `{report['command']}` on {report['date']} in {report['wall_min']:.1f} min "
             f"({report['workers']} workers, 1 torch thread each); {m['cpu']}, torch {m['torch']}.", "",
             f"Neural Cleanse's absolute test: anomaly index > {cfg.threshold} and norm <= {cfg.abs_max_ratio} of the "
             f"median class. `q`: a class's norm over the median class's; `rel`: its `q` over the same in the "
             f"audit's reference (the last 3 served audits). The default also needs `rel` <= {cfg.abs_drop_ratio} "
             "(`AuditConfig.abs_drop_ratio`). Per group: the judged versions (warm-up excluded) where some class "
             "meets the two conditions, and that class's `q` and `rel`.", "",
             "| group | runs | judged versions | flagged (any test) | meet the two conditions | their classes | q | rel "
             "| backdoor accuracy of those (served version) |",
             "|---|---:|---:|---:|---:|---|---|---|---|"]
    for group in GROUPS:
        runs = [r for r in report["runs"] if r["group"] == group]
        if not runs:
            continue
        judged = sum(1 for r in runs for a in r["audits"] if a["verdict"] != "skipped")
        flagged = sum(1 for r in runs for a in r["audits"] if a["verdict"] == "flagged")
        hits = [c for r in runs for c in r["candidates"]]
        classes = sorted({c["class"] for c in hits})
        lines.append(f"| {group} | {len(runs)} | {judged} | {flagged} | {len(hits)} | {classes or '-'} | "
                     f"{span([c['q'] for c in hits])} | {span([c['rel'] for c in hits])} | "
                     f"{span([c['backdoor'] for c in hits if c['backdoor'] is not None])} |")
    lines += ["", "Per run (seed: rounds that meet the two conditions, with `rel`; `*` = flagged by the audit; passive: "
              "flags recorded, not acted on):", ""]
    for r in report["runs"]:
        cells = ", ".join(f"{c['round']}{'*' if c['verdict'] == 'flagged' else ''} ({c['rel']:.2f})"
                          for c in r["candidates"]) or "none"
        desc = r["config"].get("attack") or "clean"
        lines.append(f"* {r['group']} {desc} seed {r['config']['seed']}: {cells}")
    lines += slow_drift_lines(report["runs"])
    lines += ["", "Raw per-version scores: the JSON file beside this one."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clean-seeds", type=int, nargs="*", default=list(range(20)))
    p.add_argument("--digits-seeds", type=int, nargs="*", default=list(range(5)))
    p.add_argument("--passive-seeds", type=int, nargs="*", default=[0])
    p.add_argument("--long-seeds", type=int, nargs="*", default=[],
                   help="seeds of the long runs: slow drift and clean, --long-rounds each")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--long-rounds", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from aggregator.audit import AuditConfig

    cfg = AuditConfig()
    jobs: list[tuple[str, dict[str, Any], bool]] = [("clean", {"rounds": args.rounds, "seed": s}, False)
                                                    for s in args.clean_seeds]
    jobs += [("digits", {**DIGITS, "seed": s}, False) for s in args.digits_seeds]
    jobs += [("passive", {"rule": "fedavg", "detection": "none", "attack": kind, "rounds": args.rounds, "seed": s,
                          **extra}, True) for kind, extra in PASSIVE for s in args.passive_seeds]
    for s in args.long_seeds:
        jobs += [("slow-drift", {"attack": "slow_drift", "rounds": args.long_rounds, "seed": s}, False),
                 ("clean-long", {"rounds": args.long_rounds, "seed": s}, False)]
    if not jobs:
        p.error("no runs: give seeds to at least one group (e.g. --long-seeds 0 1)")
    import os

    load_start = os.getloadavg()
    started = time.perf_counter()
    runs = []
    with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        for i, run in enumerate(pool.imap_unordered(run_one, jobs), 1):
            run["candidates"] = candidates(run, cfg.threshold, cfg.abs_max_ratio)
            runs.append(run)
            elapsed = time.perf_counter() - started
            print(f"[{i}/{len(jobs)}] {run['group']} seed {run['config']['seed']}: {len(run['candidates'])} versions "
                  f"meet the two conditions; {elapsed / 60:.1f} min elapsed, about "
                  f"{elapsed / i * (len(jobs) - i) / 60:.1f} min left", flush=True)
    order = {g: i for i, g in enumerate(GROUPS)}
    runs.sort(key=lambda r: (order[r["group"]], r["config"].get("attack") or "", r["config"]["seed"]))
    report = {"command": "python bench/audit_classes.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "wall_min": (time.perf_counter() - started) / 60, "workers": args.workers,
              "machine": simulation_machine(load_start), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(report))
    args.out.with_suffix(".json").write_text(json.dumps(report) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
