"""Detection benchmark (issue 9 item 6): false positives on clean windows, true positives per attack, slow drift vs
quarantine, and the cost of one window at n = 100, d = 1M.

Everything runs through :func:`fedguard.simulation.simulate`, i.e. the live pipeline's own sampling, training,
attacks, validation rules, sketch, ensemble, reputation and aggregation, in process. The demo's configuration:
Fashion-MNIST, 100 devices, Dirichlet(0.9), 10 per round, the tuned local training (``DEFAULT_TRAINING``), the
live defaults for everything else (the default rule, ``Settings.rule``, detection ``ensemble``, sketch k = 1024,
sample cap 1000).

* **Clean windows**: ``--clean-seeds`` x ``--clean-rounds`` rounds, no attack. FP of the ensemble = honest members
  whose verdict is not ``accept`` (``fp``) / is ``reject`` (``fp_reject``); per detector = honest members it
  voted against (a vote alone does not reject: see docs/detection.md).
* **Attacks**: every kind of ``producers.attacks.registry.ATTACKS`` at 20 % compromised devices from round 5 on,
  ``--attack-rounds`` rounds, ``--attack-seeds``; ``model_replacement`` is single-shot (one round per run), so it
  is run ``--replacement-runs`` times (seeds 0, 1, ...) for 7 rounds each; ``slow_drift`` runs
  ``--drift-rounds``. ``--variants`` adds settings of an attack (e.g. model replacement trained with
  constrain-and-scale's anomaly-evasion loss, ``model_replacement:class_weight=0.7``). TP = malicious *window
  members* flagged (``tp``) / rejected (``tp_reject``); over crafted members only (``tp_crafted``: not a lone
  colluder's honest copy). Updates refused
  before the window (a second update of a device in a window: window stuffing's copies) are counted apart.
* **Cost**: ``--cost-repeats`` repeats (median) of sketching 100 updates of 1M float32 parameters and judging the
  window (``score_window`` with a 10-round history per member and a previous global sketch, then reputation and
  history updates).

Usage (the committed results)::

    python bench/detection.py --attack-seeds 0 1 --variants model_replacement:class_weight=0.7 \
        --out bench/results/detection.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import simulation_machine  # noqa: E402
from _simruns import calibrate, run_many  # noqa: E402

from fedguard.simulation import VOTES, SimulationConfig, detection_rates  # noqa: E402
from producers.attacks.registry import ATTACKS  # noqa: E402

TASK = "fashion-mnist"
FRACTION = 0.2
START = 5
TARGET_FP = 0.01
TARGET_TP = 0.95
TP_TARGETED = ("model_replacement", "sign_flip", "gaussian", "sybil", "window_stuffing")


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f} %"


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """``"kind:key=value,key=value"`` -> (label, kind, params); values are JSON (``1.0``, ``true``, ``"x"``)."""
    kind, _, rest = text.partition(":")
    if kind not in ATTACKS:
        raise SystemExit(f"--variants: unknown attack {kind!r}")
    params = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        params[key] = json.loads(value)
    return f"{kind} ({rest})" if rest else kind, kind, params


def jobs(args: argparse.Namespace) -> list[tuple[str, SimulationConfig]]:
    """(label, config) of every run: the clean ones, then each attack (and variant)."""
    out: list[tuple[str, SimulationConfig]] = []
    for s in args.clean_seeds:
        out.append(("clean", SimulationConfig(task=TASK, rounds=args.clean_rounds, seed=s)))
    for label, kind, params in [(k, k, {}) for k in args.attacks] + [parse_variant(v) for v in args.variants]:
        common = dict(task=TASK, attack=kind, attack_params=params, fraction=FRACTION, attack_start=START)
        if ATTACKS[kind].schedule == "single":
            out += [(label, SimulationConfig(rounds=START + 2, seed=s, **common)) for s in range(args.replacement_runs)]
            continue
        rounds = args.drift_rounds if kind == "slow_drift" else args.attack_rounds
        out += [(label, SimulationConfig(rounds=rounds, seed=s, **common)) for s in args.attack_seeds]
    return out


def measure_cost(repeats: int, n: int = 100, d: int = 1_000_000, k: int = 1024) -> dict[str, Any]:
    """Median wall seconds of the window stage's work on one window of n members of d parameters."""
    import torch

    from fedguard.sketch import SketchSpec, _hash, sketch_rows
    from processors.detectors import updated
    from processors.ensemble import score_window
    from processors.reputation import Reputation, observe
    from processors.validation import finite_norm

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    common = rng.standard_normal(d).astype(np.float32)
    updates = (0.2 * common[None, :] + rng.standard_normal((n, d), dtype=np.float32)) * 1e-3
    spec = SketchSpec(d, k, 12345)
    t = time.perf_counter()
    _hash(spec)  # the hash of a deployment's seed: computed once per process
    hash_s = time.perf_counter() - t
    hist_sk = rng.standard_normal((n, 10, k)) * 1e-3
    histories = []
    for i in range(n):
        h = None
        for j in range(10):
            h = updated(h, hist_sk[i, j])
        histories.append(h)
    previous = rng.standard_normal(k).astype(np.float32)
    trust = rng.uniform(0.5, 0.95, n)
    # the validator's loss probe on a model of about d parameters (MLP 784-h-10, h chosen so), 256 server rows
    from fedguard.tasks import ModelSpec, build_model, get_flat_params
    from fedguard.tasks.server_data import SERVER_SET_SIZE, LossProbe
    hidden = max(1, round((d - 10) / (784 + 1 + 10)))
    model = build_model(ModelSpec("cost", 784, 10, (hidden,)))
    base = get_flat_params(model)
    probe = LossProbe(model, rng.standard_normal((SERVER_SET_SIZE, 784)).astype(np.float32),
                      rng.integers(0, 10, SERVER_SET_SIZE), lambda version: base)
    probe_updates = (rng.standard_normal((n, base.size), dtype=np.float32) * 1e-3)
    probe(0, probe_updates[0])  # the base version's loss: once per version
    times: dict[str, list[float]] = {"norms": [], "sketch": [], "loss": [], "judge": []}
    for _ in range(repeats):
        t = time.perf_counter()
        norms = np.array([finite_norm(u, 1e4) for u in updates])
        times["norms"].append(time.perf_counter() - t)
        t = time.perf_counter()
        sketches = sketch_rows(updates, spec)
        times["sketch"].append(time.perf_counter() - t)
        t = time.perf_counter()
        losses = [probe(0, u)[0] for u in probe_updates]
        times["loss"].append(time.perf_counter() - t)
        t = time.perf_counter()
        verdict = score_window(norms, sketches, histories, previous, trust, losses=losses)
        for i, m in enumerate(verdict.members):
            observe(Reputation(), m.evidence, 0.0)
            updated(histories[i], sketches[i])
        times["judge"].append(time.perf_counter() - t)
    med = {key: statistics.median(v) for key, v in times.items()}
    return {"n": n, "d": d, "k": k, "repeats": repeats, "hash_once_s": hash_s, "median_s": med,
            "all_s": times, "total_median_s": med["sketch"] + med["loss"] + med["judge"],
            "loss_params": int(base.size), "loss_rows": SERVER_SET_SIZE}


def crafted(a: dict[str, Any]) -> str:
    """TP over the crafted members only (not a lone colluder's honest copy: ``simulation.honest_copy``), with their
    count; "-" for results recorded before the simulation told them apart."""
    if a.get("tp_crafted") is None:
        return "-"
    return f"{pct(a['tp_crafted'])} of {a['crafted']}"


def summarise(tagged: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for kind, res in tagged:
        by_kind.setdefault(kind, []).append(res)
    out: dict[str, Any] = {}
    for kind, runs in by_kind.items():
        start = 1 if kind == "clean" else START
        rows = [r for res in runs for r in res["rounds"]]
        det = detection_rates(rows, start)
        sampled = sum(r["sampled_malicious"] for r in rows if r["round"] >= start)
        compromised_seen = sum(len({d for r in res["rounds"] for d in r["devices"] if d in res["compromised"]})
                               for res in runs)
        quarantined = sum(res["rounds"][-1]["quarantined_malicious"] for res in runs)
        quarantined_honest = sum(len({d for r in res["rounds"] for d in r["quarantined_now"]
                                      if d not in res["compromised"]}) for res in runs)
        backdoor = [res["max_backdoor_accuracy"] for res in runs]
        out[kind] = {
            "kind": runs[0]["config"]["attack"] or "clean", "runs": len(runs), "seeds": [res["config"]["seed"] for res in runs],
            "rounds": [res["config"]["rounds"] for res in runs], "windows": len(rows),
            "windows_scored": sum(1 for r in rows if r["round"] >= start),
            "sampled_malicious": sampled, "compromised_devices_seen": compromised_seen,
            "attackers_quarantined_at_end": quarantined, "honest_devices_quarantined": quarantined_honest,
            "max_backdoor_accuracy": max(b for b in backdoor if b is not None) if any(
                b is not None for b in backdoor) else None,
            "final_main_accuracy": [res["final_main_accuracy"] for res in runs],
            **det,
        }
    return out


def slow_drift_story(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for res in runs:
        rounds = res["rounds"]
        first_q = next((r["round"] for r in rounds if any(d in res["compromised"] for d in r["quarantined_now"])),
                       None)
        first_bd = next((r["round"] for r in rounds if r["round"] >= START and (r["backdoor_accuracy"] or 0) > 0.10),
                        None)
        out.append({"seed": res["config"]["seed"], "rounds": len(rounds), "first_attacker_quarantined": first_q,
                    "attackers_quarantined_at_end": rounds[-1]["quarantined_malicious"],
                    "first_backdoor_above_10pct": first_bd, "max_backdoor_accuracy": res["max_backdoor_accuracy"],
                    "final_backdoor_accuracy": res["final_backdoor_accuracy"],
                    "tp": res["detection"]["tp"], "tp_reject": res["detection"]["tp_reject"]})
    return out


def compact(kind: str, res: dict[str, Any]) -> dict[str, Any]:
    keys = ("round", "main_accuracy", "backdoor_accuracy", "malicious", "honest", "flagged_malicious",
            "flagged_honest", "rejected_malicious", "rejected_honest", "quarantined_malicious", "quarantined_honest",
            "refused_malicious", "sampled_malicious", "skipped", "crafted", "flagged_crafted", "rejected_crafted")
    return {"kind": kind, "seed": res["config"]["seed"], "compromised": res["compromised"],
            "initial": res["initial"], "seconds": res["seconds"],
            "rounds": columns([{k: r[k] for k in keys} for r in res["rounds"]])}


def dump(report: dict[str, Any]) -> str:
    """The report as JSON: indented, except one line per run."""
    runs = report.get("runs", [])
    text = json.dumps({**report, "runs": "@RUNS@"}, indent=1)
    return text.replace('"@RUNS@"', "[\n" + ",\n".join(json.dumps(r, separators=(",", ":")) for r in runs) + "\n]")


def columns(rows: list[dict[str, Any]] | dict[str, list]) -> dict[str, list]:
    """Per-round records as one list per field (floats to 4 digits): the JSON stays small."""
    if isinstance(rows, dict):
        return rows
    keys = list(rows[0]) if rows else []
    return {k: [round(r[k], 4) if isinstance(r[k], float) else r[k] for r in rows] for k in keys}


def render(report: dict[str, Any]) -> str:
    s = report["summary"]
    clean = s["clean"]
    lines = [
        "# Detection: false positives, true positives per attack, slow drift, cost",
        "",
        f"Produced by `{report['command']}` on {report['date']} in {report['wall_min']:.1f} min "
        f"({report['workers']} worker processes, 1 torch thread each)."
        + (f" Text re-rendered from the JSON by `{report['rerendered']}` (same numbers)."
           if report.get("rerendered") else ""),
        "",
        "## Machine and method",
        "",
        f"* CPU: {report['machine']['cpu']}, nproc = {report['machine']['nproc']}; Python "
        f"{report['machine']['python']}, numpy {report['machine']['numpy']}, torch {report['machine']['torch']}; "
        f"load average at start {report['machine']['load_start']}, at end {report['machine']['load_end']}.",
        "* `fedguard.simulation.simulate`: the live pipeline's own sampling (`producers.sampling`), local training "
        "(`DEFAULT_TRAINING`: 5 epochs, lr 0.02, momentum 0.9, batch 32, MLP 784-200-10), attacks "
        "(`producers.attacks.live.craft_round`), validation rules (norm bound, one update per device per window), "
        "CountSketch k = 1024, ensemble (`processors.ensemble.score_window`, default `EnsembleConfig`), beta "
        f"reputation and quarantine (`processors.reputation`), the live default rule (`{report['rule']}`"
        f"{', params ' + report['rule_params'] if report['rule_params'] else ''}) over the admitted members with "
        "the aggregator's weights, evaluation with `aggregator.evaluation.Evaluator`.",
        "* Fashion-MNIST, 100 devices, Dirichlet(0.9), 10 devices per round (one window per round). Attacks: "
        "20 % of the fleet compromised (a fixed seeded sample), from round 5 on, the library's default "
        "parameters. The sketch seed is derived from the run's seed (reproducible; live it is a secret).",
        f"* Calibration before the run (3 attacked rounds, constrain-and-scale, in the main process): set-up "
        f"{report['calibration']['setup_s']:.1f} s, {report['calibration']['round_s']:.2f} s per round; planned "
        f"{report['planned_rounds']} rounds, estimated {report['estimated_min']:.1f} min.",
        "* Definitions: a member is *flagged* when its verdict is not `accept` (downweight or reject) and "
        "*rejected* when it is `reject`; FP rates are over honest window members, TP rates over malicious window "
        "members. A detector's rate is the share of members it voted against (one vote downweights; rejection "
        "needs a strong signal or votes of two detector families).",
        "",
        f"## False positives: {clean['windows']} clean windows ({clean['honest']} honest members; seeds "
        f"{', '.join(map(str, clean['seeds']))}, {clean['rounds'][0]} rounds each)",
        "",
        "| | flagged (not accept) | rejected |",
        "|---|---:|---:|",
        f"| **ensemble** | **{pct(clean['fp'], 2)}** ({clean['flagged_honest']}) | "
        f"**{pct(clean['fp_reject'], 2)}** ({clean['rejected_honest']}) |",
    ]
    for det in VOTES:
        lines.append(f"| {det} (votes) | {pct(clean['votes_fp'][det], 2)} | |")
    lines += [
        "",
        f"Honest devices quarantined: {clean['honest_devices_quarantined']}. Final main accuracy: "
        f"{', '.join(f'{a:.4f}' for a in clean['final_main_accuracy'])}.",
        "",
        f"## True positives at {int(100 * FRACTION)} % compromised devices",
        "",
        "| attack | runs x rounds | malicious members | TP flagged | TP rejected | TP flagged, crafted only "
        "| refused before the window "
        "| honest FP (flagged / rejected) | attackers quarantined at end / compromised devices in windows | max backdoor "
        "| final main acc |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in report["attacks"]:
        a = s.get(kind)
        if a is None:
            continue
        bd = pct(a["max_backdoor_accuracy"]) if ATTACKS[a["kind"]].targeted else "–"
        lines.append(
            f"| {kind} | {a['runs']} x {a['rounds'][0]} | {a['malicious']} | {pct(a['tp'])} | {pct(a['tp_reject'])} "
            f"| {crafted(a)} | {a['refused_malicious']} | {pct(a['fp'])} / {pct(a['fp_reject'])} "
            f"| {a['attackers_quarantined_at_end']} / {a['compromised_devices_seen']} | {bd} "
            f"| {statistics.mean(a['final_main_accuracy']):.4f} |")
    lines += ["", "Per detector: share of malicious members each detector voted against.", "",
              "| attack | " + " | ".join(VOTES) + " |", "|---|" + "---:|" * len(VOTES)]
    for kind in report["attacks"]:
        a = s.get(kind)
        if a is None:
            continue
        lines.append(f"| {kind} | " + " | ".join(pct(a["votes_tp"][d], 0) for d in VOTES) + " |")
    lines += ["", "## Slow drift: quarantine vs backdoor", "",
              "| seed | rounds | first attacker quarantined (round) | attackers quarantined at end | first round "
              "backdoor > 10 % | max backdoor | final backdoor | TP flagged / rejected |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d in report["slow_drift"]:
        lines.append(f"| {d['seed']} | {d['rounds']} | {d['first_attacker_quarantined'] or 'never'} "
                     f"| {d['attackers_quarantined_at_end']} | {d['first_backdoor_above_10pct'] or 'never'} "
                     f"| {pct(d['max_backdoor_accuracy'])} | {pct(d['final_backdoor_accuracy'])} "
                     f"| {pct(d['tp'])} / {pct(d['tp_reject'])} |")
    c = report["cost"]
    m = c["median_s"]
    lines += [
        "", f"## Cost of one window: n = {c['n']} members, d = {c['d']:,} parameters, k = {c['k']}", "",
        f"Median of {c['repeats']} repeats, one thread, wall seconds.", "",
        "| step | where it runs live | median s |", "|---|---|---:|",
        f"| exact L2 norms of the 100 updates | validator, per update | {m['norms']:.3f} |",
        f"| CountSketch of the 100 updates | validator, per update | {m['sketch']:.3f} |",
        *([f"| loss on the server's {c.get('loss_rows', 256)} rows after each of the 100 updates (MLP of "
           f"{c.get('loss_params', 0):,} parameters) | validator, per update | {m['loss']:.3f} |"]
          if "loss" in m else []),
        f"| `score_window` + reputation + history updates | window stage, once per window | {m['judge']:.3f} |",
        f"| **sketching + loss + judging (the detection cost)** | | **{c['total_median_s']:.3f}** |",
        f"| the sketch hash for d = 1M (once per process and seed) | validator start-up | {c['hash_once_s']:.3f} |",
        "", "## Targets (issue 9)", "",
        "| target | measured | met |", "|---|---|---|",
    ]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
    lines += ["", "## Reading", ""] + [f"* {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def targets(summary: dict[str, Any], drift: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    c = summary["clean"]
    out.append({"target": "ensemble FP <= 1 % of honest members (clean windows)",
                "measured": f"{pct(c['fp'], 2)} flagged, {pct(c['fp_reject'], 2)} rejected",
                "met": c["fp"] is not None and c["fp"] <= TARGET_FP})
    for kind in TP_TARGETED:
        a = summary.get(kind)
        if a is None:
            continue
        measured = f"{pct(a['tp'])} flagged, {pct(a['tp_reject'])} rejected of {a['malicious']} members"
        if kind == "window_stuffing":
            sent = a["malicious"] + a["refused_malicious"]
            stopped = a["refused_malicious"] + a["flagged_malicious"]
            measured += (f"; of all {sent} updates sent, {pct(stopped / sent if sent else None)} refused or "
                         f"flagged")
        out.append({"target": f"TP >= 95 % for {kind}", "measured": measured,
                    "met": a["tp"] is not None and a["tp"] >= TARGET_TP})
    for d in drift:
        q, b = d["first_attacker_quarantined"], d["first_backdoor_above_10pct"]
        ok = q is not None and (b is None or q < b)
        out.append({"target": f"slow drift (seed {d['seed']}): quarantined before backdoor > 10 %",
                    "measured": f"first quarantine: {q or 'never'}; backdoor > 10 %: round {b or 'never'} "
                                f"(max {pct(d['max_backdoor_accuracy'])})", "met": ok})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clean-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--clean-rounds", type=int, default=100)
    p.add_argument("--attack-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--attack-rounds", type=int, default=24, help="rounds per attack run (attack from round 5)")
    p.add_argument("--replacement-runs", type=int, default=16)
    p.add_argument("--drift-rounds", type=int, default=40)
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    p.add_argument("--variants", nargs="*", default=[],
                   help='extra attack settings, e.g. "model_replacement:class_weight=0.7"')
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cost-repeats", type=int, default=5)
    p.add_argument("--no-calibrate", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench/results/detection.md"))
    p.add_argument("--rerender", type=Path, metavar="JSON",
                   help="only write --out again from a results JSON of this script (e.g. after a wording change)")
    p.add_argument("--rule", help="with --rerender: the rule the runs used, if the JSON predates the 'rule' field")
    args = p.parse_args(argv)
    if args.rerender:
        report = json.loads(args.rerender.read_text())
        report.setdefault("rule", args.rule)
        report.setdefault("rule_params", "")
        for run in report.get("runs", []):
            run["rounds"] = columns(run["rounds"])
        report["rerendered"] = ("python bench/detection.py --rerender " + str(args.rerender)
                                + (f" --rule {args.rule}" if args.rule else "") + f" --out {args.out}")
        report["targets"] = targets(report["summary"], report["slow_drift"])
        report["notes"] = notes(report)
        args.out.write_text(render(report))
        args.out.with_suffix(".json").write_text(dump(report))
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
        return 0
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/detection.py", *(argv or sys.argv[1:])])
    started = time.perf_counter()
    load_start = tuple(round(x, 2) for x in os.getloadavg())

    todo = jobs(args)
    total_rounds = sum(c.rounds for _, c in todo)
    if args.no_calibrate:
        setup, per_round = 5.0, 1.5
    else:
        print("calibrating: 3 rounds of an attacked run in this process ...", flush=True)
        setup, per_round = calibrate(SimulationConfig(task=TASK, seed=0, attack="constrain_and_scale",
                                                      attack_start=1))
    estimate = ((total_rounds * per_round + len(todo) * setup) / max(1, args.workers) + 10) / 60  # + cold start
    print(f"{len(todo)} runs, {total_rounds} rounds; set-up {setup:.1f} s, {per_round:.2f} s/round -> "
          f"estimated {estimate:.1f} min on {args.workers} workers (+ the cost measurement)", flush=True)

    results = run_many([c for _, c in todo], workers=args.workers, desc="detection rounds")
    tagged = [(kind, res) for (kind, _), res in zip(todo, results)]
    print("measuring the cost of one window (n = 100, d = 1M) ...", flush=True)
    cost = measure_cost(args.cost_repeats)

    summary = summarise(tagged)
    drift = slow_drift_story([res for kind, res in tagged if kind == "slow_drift"])
    report: dict[str, Any] = {
        "command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_min": (time.perf_counter() - started) / 60, "workers": args.workers,
        "machine": simulation_machine(load_start),
        "calibration": {"setup_s": setup, "round_s": per_round}, "planned_rounds": total_rounds,
        "estimated_min": estimate, "rule": todo[0][1].rule, "rule_params": todo[0][1].rule_params,
        "attacks": list(dict.fromkeys(label for label, _ in todo if label != "clean")),
        "summary": summary, "slow_drift": drift, "cost": cost,
    }
    report["targets"] = targets(summary, drift)
    report["runs"] = [compact(kind, res) for kind, res in tagged]
    report["notes"] = notes(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(report))
    args.out.with_suffix(".json").write_text(dump(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')} in {report['wall_min']:.1f} min")
    for t in report["targets"]:
        print(f"  [{'met' if t['met'] else 'NOT MET'}] {t['target']}: {t['measured']}")
    return 0


def clean_at(report: dict[str, Any], rnd: int, seeds: list[int]) -> str:
    """Mean main accuracy of the clean runs with these seeds at round ``rnd`` (from the stored runs)."""
    accs = [r["rounds"]["main_accuracy"][rnd - 1] for r in report.get("runs", [])
            if r["kind"] == "clean" and r["seed"] in seeds and len(r["rounds"]["main_accuracy"]) >= rnd]
    return f"{statistics.mean(accs):.4f}" if accs else "–"


def quarantine_rounds(run: dict[str, Any]) -> list[int]:
    """The rounds of a stored run in which its count of quarantined honest devices went up."""
    q, rounds = run["rounds"]["quarantined_honest"], run["rounds"]["round"]
    return [rounds[i] for i in range(len(q)) if q[i] > (q[i - 1] if i else 0)]


def notes(report: dict[str, Any]) -> list[str]:
    """What the numbers say, each with the figures it rests on (computed from the summary)."""
    s = report["summary"]
    get = lambda kind, key: s[kind][key] if kind in s else None  # noqa: E731
    out = []
    missed = [t["target"] for t in report["targets"] if not t["met"]]
    out.append("Targets not met: " + ("; ".join(missed) if missed else "none") + ".")
    if "clean" in s:
        c = s["clean"]
        voters = [d for d, r in c["votes_fp"].items() if r > 0]
        out.append("Clean windows: the honest members flagged were voted against by "
                   + (", ".join(f"{d} ({pct(c['votes_fp'][d], 2)})" for d in voters) or "no detector")
                   + " (the size family: honest norm spikes; behaviour: an honest update whose loss on the server's "
                     f"clean rows is above 2.5x the window's median member); {c['rejected_honest']} of {c['honest']} "
                     "honest members rejected.")
        quarantined = {k: v["honest_devices_quarantined"] for k, v in s.items() if v["honest_devices_quarantined"]}
        out.append("Honest devices quarantined: " + (
            "none in any run of this benchmark." if not quarantined else
            ", ".join(f"{n} in the {k} runs" for k, n in quarantined.items())
            + " (quarantined by the strike rule, 3 flagged windows in a row, or at once when a member is rejected on "
              "the behaviour detector's strong signal, evidence `harmful`; the rounds they were quarantined in: "
            + "; ".join(f"{r['kind']} seed {r['seed']}: rounds " + ", ".join(map(str, quarantine_rounds(r)))
                        for r in report.get("runs", []) if r["kind"] == "clean" and quarantine_rounds(r))
            + ")."))
    if "window_stuffing" in s:
        a = s["window_stuffing"]
        out.append(f"window_stuffing: every copy after a device's first was refused before the window "
                   f"({a['refused_malicious']} updates, `window_duplicate`), so a stuffer holds one seat; the seat is "
                   f"the base attack's update (default `backdoor`: plain backdoor training at the honest scale, the "
                   f"same blind spot as badnets below), and the copies are equivocation: "
                   f"{pct(a['votes_tp'].get('equivocation', 0.0))} of the seats were rejected for it "
                   f"({pct(a['tp_reject'])} rejected in all; {a['attackers_quarantined_at_end']} of "
                   f"{a['compromised_devices_seen']} stuffers quarantined by "
                   f"the end).")
    if "model_replacement" in s:
        a = s["model_replacement"]
        line = (f"model_replacement (the paper's: plain backdoor training, class_weight 1.0) is single-shot: "
                f"{a['runs']} runs, {a['malicious']} malicious members, each sending gamma / k = 10 / k times its "
                f"delta (k = colluders in the window): {pct(a['tp'])} flagged, {pct(a['tp_reject'])} rejected, "
                f"max backdoor {pct(a['max_backdoor_accuracy'])}.")
        evasive = next((k for k in s if k.startswith("model_replacement (")), None)
        if evasive:
            b = s[evasive]
            line += (f" Trained with constrain-and-scale's anomaly-evasion loss instead ({evasive}), its delta is "
                     f"small: with k >= 2 each colluder's share was about 2x the honest norms in the windows "
                     f"inspected, under the magnitude cut (3.08x the centre; docs/detection.md; magnitude votes "
                     f"{pct(b['votes_tp']['magnitude'], 0)}), but what it does to the model on clean data is not "
                     f"(behaviour votes {pct(b['votes_tp'].get('behaviour', 0.0), 0)}): {pct(b['tp'])} flagged, "
                     f"{pct(b['tp_reject'])} rejected, max backdoor {pct(b['max_backdoor_accuracy'])}.")
        out.append(line)
    if "sign_flip" in s:
        a = s["sign_flip"]
        out.append(f"sign_flip (default scale 4): flagged {pct(a['tp'])}, rejected {pct(a['tp_reject'])}. A flipped "
                   f"non-IID update is nearly orthogonal to the others anyway (direction votes "
                   f"{pct(a['votes_tp']['direction'], 0)}), and 4x a small honest norm is an ordinary norm (magnitude "
                   f"votes {pct(a['votes_tp']['magnitude'], 0)}, reject needs 5x the centre); what it does to the model "
                   f"is not ordinary: applied alone it takes the loss on the server's clean rows far above the "
                   f"window's median member (behaviour votes {pct(a['votes_tp'].get('behaviour', 0.0), 0)}). "
                   f"Final main accuracy {statistics.mean(a['final_main_accuracy']):.4f} at round "
                   f"{a['rounds'][0]}, clean runs at that round {clean_at(report, a['rounds'][0], a['seeds'])}.")
    if all(k in s for k in ("alie", "min_max", "min_sum")):
        out.append(f"alie / min_max / min_sum with partial knowledge: the colluders of a window send one identical "
                   f"vector, so the Sybil detector rejects them (sybil votes {pct(get('alie', 'votes_tp')['sybil'], 0)}); "
                   f"a colluder alone in its window has no spread to hide in and sends its honest delta (the library's "
                   f"rule), which is accepted: that is the {pct(1 - (get('alie', 'tp') or 0))} not flagged "
                   f"(of the crafted updates: {crafted(s['alie'])} flagged).")
    if "slow_drift" in s:
        d = report["slow_drift"]
        out.append("slow_drift (beta 0.3): no detector separates it per window or over the histories "
                   f"({pct(get('slow_drift', 'tp'))} flagged); no attacker was quarantined, and the backdoor grows "
                   "slowly: " + "; ".join(f"seed {x['seed']}: > 10 % at round {x['first_backdoor_above_10pct'] or 'never'}, "
                                         f"max {pct(x['max_backdoor_accuracy'])}" for x in d) + ".")
    trained = [k for k in ("constrain_and_scale", "badnets") if k in s]
    seen = [k for k in trained if s[k]["tp"] >= 0.5]
    hidden = [k for k in trained if s[k]["tp"] < 0.5]
    if seen:
        out.append("Backdoors trained, not crafted, at the honest norm and direction, that the update's effect on "
                   "clean data still gives away: " + "; ".join(
                       f"{k} flagged {pct(s[k]['tp'])} (behaviour votes "
                       f"{pct(s[k]['votes_tp'].get('behaviour', 0.0), 0)}), max backdoor "
                       f"{pct(s[k]['max_backdoor_accuracy'])}" for k in seen)
                   + ". The anomaly-evasion loss keeps constrain_and_scale's trained delta small, and the library's "
                     "attack then scales it *up* to the median honest norm (by 1.7-2.9x, measured in rounds 5-9 of "
                     "seed 0): that amplified step along the backdoor, applied alone, raises the loss on balanced "
                     "clean data far more than an honest non-IID update does. The same training sent at its own norm "
                     "(window_stuffing's seat) drew no behaviour vote, and badnets, a few poisoned samples in honest "
                     "training, is not seen either: an attacker that does not amplify trades backdoor strength per "
                     "round for stealth.")
    if hidden:
        out.append("Not detectable per window (THREATS.md): " + "; ".join(
            f"{k} flagged {pct(s[k]['tp'])}, max backdoor {pct(s[k]['max_backdoor_accuracy'])}" for k in hidden)
            + ". These updates are honest training on a shard with a few triggered samples: norm, direction and "
              "their loss on clean data are an honest member's; what can see them is an audit of the model "
              "(issue 14), not of the updates.")
    c = report["cost"]
    out.append(f"Cost: {c['total_median_s']:.2f} s per window of 100 x 1M (sketching {c['median_s']['sketch']:.2f} s "
               f"and the loss probe {c['median_s'].get('loss', 0.0):.2f} s, spread over the arrivals in the "
               f"validator; judging {c['median_s']['judge']:.2f} s at the close), one thread.")
    return [n for n in out if n]


if __name__ == "__main__":
    raise SystemExit(main())
