"""Issue 10's targets against the committed matrix: writes ``bench/results/eval.md``.

Reads the cells ``bench/eval.sh`` wrote (``<dir>/cells/*.json``, so a partial run reports what it has) in three
directories (and the anchor's two): ``eval-default-audit`` (robust_lr + ensemble + the model audit: the default
configuration of ``fedguard up``, seeds 0-2), ``eval-default`` (the same without the audit) and ``eval`` (every
rule, with and without detection, seed 0). Each target of issue 10, item 5, is checked on the runs it names:

* the attack reproduced: fedavg without detection, single-shot model replacement, backdoor accuracy >= 90% at some
  round (Bagdasaryan et al. 2020: close to 100%);
* the default defence keeps backdoor accuracy <= 5% at every round under single-shot model replacement, persistent
  constrain-and-scale (model replacement with the anomaly-evasion loss, every round), slow drift and the Sybil
  backdoor, with final main accuracy within 1 point of clean fedavg (fedavg, no detection, no attack, seed 0);
* under ALIE, IPM, min-max, min-sum, sign flip and Gaussian the default defence keeps >= 95% of clean fedavg's final
  main accuracy;
* detection: the ensemble's false-positive rate <= 1% of honest members, and a true-positive rate >= 95% per attack
  that a per-window detector can see by design (:data:`NOT_DETECTABLE` says which cannot, and why), over the
  crafted members of compromised devices where the cells recorded them (an honest copy, such as a lone ALIE
  colluder's or model replacement's after its single shot, is not counted).

Usage: ``python bench/eval_report.py [--results bench/results] [--out bench/results/eval.md]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

BACKDOORS = {"model_replacement": "single-shot model replacement",
             "constrain_and_scale": "persistent constrain-and-scale",
             "slow_drift": "slow drift", "sybil": "Sybil backdoor"}
UNTARGETED = ("alie", "ipm", "min_max", "min_sum", "sign_flip", "gaussian")
#: attacks built to look like honest updates in every window (the detection target does not apply; THREATS.md)
NOT_DETECTABLE = {
    "constrain_and_scale": "trained with the anomaly-evasion loss, sent at the honest median norm: the library's "
                           "version scales its small delta *up* to that norm, which the behaviour detector sees "
                           "(docs/detection.md); sent at its own norm it is not seen",
    "slow_drift": "an honest update plus a push of 0.1-0.3 of the honest norm",
    "badnets": "honest training on a shard with a few triggered samples (data poisoning)",
}
MAX_BACKDOOR = 0.05
MAX_MAIN_DROP = 0.01
MIN_CLEAN_SHARE = 0.95
MAX_FP = 0.01
MIN_TP = 0.95
DIRS = {"audit": "eval-default-audit", "default": "eval-default", "matrix": "eval", "anchor": "eval-anchor",
        "anchor_default": "eval-anchor-default"}
#: the round bench/eval.sh's anchor run injects model replacement (a converged model, as in the paper)
ANCHOR_ROUND = 20


def load_cells(directory: Path) -> list[dict[str, Any]]:
    """Every finished cell of one eval output directory (none if it does not exist)."""
    cells_dir = Path(directory) / "cells"
    return [json.loads(p.read_text()) for p in sorted(cells_dir.glob("*.json"))] if cells_dir.is_dir() else []


def pick(cells: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [c for c in cells if all(c.get(k) == v for k, v in match.items())]


def pct(x: float | None, nd: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{nd}f} %"


def max_backdoor(cell: dict[str, Any]) -> float | None:
    vals = [r["backdoor_accuracy"] for r in cell["rounds"] if r.get("backdoor_accuracy") is not None]
    return max(vals) if vals else None


def _max_backdoors(cells: list[dict[str, Any]]) -> str:
    return ", ".join(f"seed {c['seed']}: {pct(max_backdoor(c))}" for c in cells) or "not run yet"


def anchor(matrix: list[dict[str, Any]], anchor_cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Met on the anchor run (injected into a converged model, as the paper does); the matrix's injection at round 5
    is shown beside it."""
    early = pick(matrix, rule="fedavg", detection="none", attack="model_replacement")
    cells = pick(anchor_cells, rule="fedavg", detection="none", attack="model_replacement")
    got = [max_backdoor(c) for c in cells]
    return {"target": "fedavg + single-shot model replacement reaches >= 90 % backdoor accuracy",
            "measured": f"injected at round {ANCHOR_ROUND} (converged): {_max_backdoors(cells)}; at round 5 (the "
                        f"matrix, still learning): {_max_backdoors(early)}",
            "met": bool(got) and all(b is not None and b >= 0.9 for b in got)}


def anchor_defended(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The default defence with the audit against the anchor's attack: backdoor <= 5 % at every round."""
    got = [max_backdoor(c) for c in cells]
    return {"target": f"default defence with the audit: backdoor <= 5 % at every round under the anchor's attack "
                      f"(model replacement at round {ANCHOR_ROUND})",
            "measured": _max_backdoors(cells) if cells else "not run yet",
            "met": bool(got) and all(b is not None and b <= MAX_BACKDOOR for b in got)}


def clean_fedavg(matrix: list[dict[str, Any]]) -> float | None:
    cells = pick(matrix, rule="fedavg", detection="none", attack="none", seed=0)
    return cells[0]["final_main_accuracy"] if cells else None


def backdoor_target(default: list[dict[str, Any]], clean: float | None, label: str) -> dict[str, Any]:
    parts, met = [], clean is not None
    for attack, name in BACKDOORS.items():
        cells = pick(default, attack=attack)
        if not cells:
            parts.append(f"{name}: not run yet")
            met = False
            continue
        worst = max(max_backdoor(c) or 0.0 for c in cells)
        drops = [] if clean is None else [clean - c["final_main_accuracy"] for c in cells]
        drop = max(drops) if drops else None  # the worst seed decides
        ok = worst <= MAX_BACKDOOR and drop is not None and drop <= MAX_MAIN_DROP
        met = met and ok
        main = "–" if drop is None else f"{-100 * drop:+.2f} pp worst seed ({-100 * sum(drops) / len(drops):+.2f} mean)"
        parts.append(f"{name}: backdoor max {pct(worst)} over {len(cells)} seed(s), main {main}"
                     + ("" if ok else " (**not met**)"))
    return {"target": f"{label}: backdoor <= 5 % at every round under the backdoor attacks, final main within 1 point "
                      "of clean fedavg (every seed)", "measured": "; ".join(parts), "met": met}


def robustness_target(default: list[dict[str, Any]], clean: float | None, label: str) -> dict[str, Any]:
    parts, met = [], clean is not None
    for attack in UNTARGETED:
        cells = pick(default, attack=attack)
        if not cells or clean is None:
            parts.append(f"{attack}: {'not run yet' if not cells else 'no clean fedavg yet'}")
            met = False
            continue
        share = min(c["final_main_accuracy"] for c in cells) / clean
        met = met and share >= MIN_CLEAN_SHARE
        parts.append(f"{attack} {100 * share:.1f} %")
    return {"target": f"{label}: >= 95 % of clean fedavg's accuracy under {', '.join(UNTARGETED)} (worst seed)",
            "measured": "; ".join(parts), "met": met}


def detection_targets(default: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    honest = sum(c["detection_rates"]["honest"] for c in default)
    fp = sum(c["detection_rates"]["flagged_honest"] for c in default)
    rows = [{"target": f"{label}: ensemble false positives <= 1 % of honest members",
             "measured": f"{pct(fp / honest if honest else None, 2)} ({fp} of {honest} honest members, every cell)",
             "met": bool(honest) and fp / honest <= MAX_FP}]
    parts, met = [], True
    attacks = sorted({c["attack"] for c in default} - {"none"})
    for attack in attacks:
        cells = pick(default, attack=attack)
        bad = sum(c["detection_rates"]["malicious"] for c in cells)
        tp = sum(c["detection_rates"]["flagged_malicious"] for c in cells)
        rate = tp / bad if bad else None
        # Judged over the crafted members when every cell recorded them: an honest copy (a lone ALIE colluder,
        # model replacement after its shot; fedguard.simulation.honest_copy) is nothing a detector should flag.
        crafted = [c["detection_rates"].get("crafted") for c in cells]
        if crafted and all(k is not None for k in crafted):
            made = sum(crafted)
            hit = sum(c["detection_rates"]["flagged_crafted"] for c in cells)
            all_members = f"{pct(rate)} of all {bad} members of compromised devices"
            rate = hit / made if made else None
            shown = f"{attack} {pct(rate)}" + ("" if made == bad else
                                               f" of {made} crafted ({all_members}, {bad - made} honest copies)")
        else:
            shown = f"{attack} {pct(rate)} (of all members of compromised devices: crafted not recorded)"
        if attack in NOT_DETECTABLE:
            parts.append(f"{shown} (not detectable by design)")
            continue
        met = met and rate is not None and rate >= MIN_TP
        parts.append(shown + ("" if rate is not None and rate >= MIN_TP else " (**not met**)"))
    rows.append({"target": f"{label}: ensemble true positives >= 95 % per detectable attack",
                 "measured": "; ".join(parts) or "not run yet", "met": bool(attacks) and met})
    return rows


def report(results_dir: Path) -> dict[str, Any]:
    cells = {name: load_cells(results_dir / d) for name, d in DIRS.items()}
    clean = clean_fedavg(cells["matrix"])
    targets = [anchor(cells["matrix"], cells["anchor"]), anchor_defended(cells["anchor_default"])]
    for name, label in (("audit", "default defence with the audit"), ("default", "default defence, audit off")):
        targets += [backdoor_target(cells[name], clean, label), robustness_target(cells[name], clean, label)]
    targets += detection_targets(cells["audit"], "default defence with the audit")
    return {"counts": {name: len(c) for name, c in cells.items()}, "clean_fedavg": clean, "targets": targets}


def planned_cells() -> dict[str, int]:
    """Cells each run of bench/eval.sh makes: every attack of the library and the clean baseline; the matrix has
    every rule, with the ensemble and without."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from aggregator.rules import RULES
    from producers.attacks.registry import ATTACKS

    attacks = len(ATTACKS) + 1
    return {"audit": 3 * attacks, "default": 3 * attacks, "matrix": 2 * len(RULES) * attacks, "anchor": 3,
            "anchor_default": 3}


def render(rep: dict[str, Any]) -> str:
    counts = rep["counts"]
    planned = planned_cells()
    lines = [
        "# The attack x defence matrix (issue 10)", "",
        "Produced by `bash bench/eval.sh` (resumable `fedguard eval` runs; see the script) and "
        "`python bench/eval_report.py`. Fashion-MNIST, 100 devices, 10 per round, Dirichlet(0.9), 20 % compromised "
        "from round 5, 30 rounds, every attack of the library with its default parameters.", "",
        "| run | directory | cells finished |", "|---|---|---:|",
        f"| default defence + audit (robust_lr, ensemble, Neural Cleanse), seeds 0-2 | `{DIRS['audit']}/` | "
        f"{counts['audit']} of {planned['audit']} |",
        f"| default defence, audit off, seeds 0-2 | `{DIRS['default']}/` | "
        f"{counts['default']} of {planned['default']} |",
        f"| every rule x detection on/off, audit off, seed 0 | `{DIRS['matrix']}/` | "
        f"{counts['matrix']} of {planned['matrix']} |",
        f"| the anchor: fedavg, no detection, model replacement at round {ANCHOR_ROUND}, seeds 0-2 | "
        f"`{DIRS['anchor']}/` | {counts['anchor']} of {planned['anchor']} |",
        f"| the default defence + audit against the anchor's attack, seeds 0-2 | `{DIRS['anchor_default']}/` | "
        f"{counts['anchor_default']} of {planned['anchor_default']} |",
        "",
        "Every cell of `eval/` is current: the ensemble cells of the 13 other rules were re-run on 2026-12-04 "
        "03:07-03:48 with the behaviour detector (docs/detection.md), and the `robust_lr` cells (the default "
        "threshold ceil(0.5 n)) added. Every target below reads the default defence's runs (re-run "
        "2026-12-04 with robust_lr's default threshold ceil(0.5 n), the behaviour detector and its quarantine rule) "
        "or cells without detection. `eval-robust-lr/` compares robust_lr with its earlier threshold ceil(0.4 n) "
        "and norm_clip under every attack, seeds 0-1.", "",
        "Each directory's `results.md` has the full table (final main accuracy, maximum and final backdoor accuracy, "
        "detection rates, mean ± sd over seeds) and its heat maps and per-cell curves (written when its run "
        "completes).", "",
        f"Clean fedavg (no detection, no attack, seed 0): "
        f"{pct(rep['clean_fedavg'], 2) if rep['clean_fedavg'] is not None else 'not run yet'}.", "",
        "## Targets", "", "| target | measured | met |", "|---|---|---|",
    ]
    for t in rep["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'met' if t['met'] else '**NOT met**'} |")
    lines += ["", "Not detectable by design (no detection target): "
              + "; ".join(f"{k} ({v})" for k, v in NOT_DETECTABLE.items()) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    rep = report(args.results)
    out = args.out or args.results / "eval.md"
    out.write_text(render(rep))
    for t in rep["targets"]:
        print(f"  [{'met' if t['met'] else 'NOT MET'}] {t['target']}: {t['measured']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
