"""Model audit benchmark (issue 14, item 5): false alarms on clean versions, and persistent backdoors at 20 %
compromised devices with and without the audit, side by side, in one run.

Every run is :func:`fedguard.simulation.simulate` with ``audit="neural_cleanse"`` (or ``"none"`` for the named
reference), i.e. exactly what ``fedguard eval --audit neural_cleanse`` runs: the live pipeline's own sampling,
training, attacks, validation, detection ensemble, reputation, rule and :meth:`aggregator.auditing.Auditor.
audit_candidate` with the aggregator's response (a flagged candidate is not served, the attributed devices are
quarantined). The demo's configuration: Fashion-MNIST, 100 devices, Dirichlet(0.9), 10 per round, the
:class:`~fedguard.simulation.SimulationConfig` defaults (the live default rule and detection), the audit's live
defaults (time budget 2 s, reference = median of the last 3 served clean audits, 3 warm-up versions).

* **Clean**: ``--clean-seeds`` x ``--rounds`` rounds with the audit on. Only versions actually audited count (verdict
  ``clean`` or ``flagged``; the warm-up versions and carried-over parameters are ``skipped``). A false alarm is a
  flagged clean version. Also clean runs with the audit off for the attack seeds: the reference main accuracy.
* **Attacks** ``constrain_and_scale`` (persistent), ``slow_drift`` and ``sybil`` (its default base: the scaled
  backdoor) at ``--fraction`` from the simulation's default start (round 5), ``--attack-seeds``, each with the audit
  on and, as the reference, the same cell with ``audit="none"``.

Per attacked cell: the round the audit first flags; the round the *candidate's* backdoor accuracy first passes 10 %
(the version the rule produced, before the audit's response: the served version's accuracy when served, else the
flagged candidate's ``candidate_backdoor_accuracy``); the share of the compromised devices attributed and
quarantined (by the audit or by reputation) within 10 rounds of the attack's start and by the end; honest devices
wrongly attributed / quarantined; max and final backdoor accuracy of every served version (the true trigger, which
the audit never sees); final main accuracy against the clean run (same seed, audit off), in percentage points.

Usage (the committed results)::

    python bench/audit.py --out bench/results/audit.md

Smoke test (a few rounds, attack from round 2, nothing written unless ``--out`` is given)::

    python bench/audit.py --quick --out /tmp/audit_quick.md
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import simulation_machine  # noqa: E402

TASK = "fashion-mnist"
ATTACKS = ("constrain_and_scale", "slow_drift", "sybil")
AUDIT = "neural_cleanse"
#: "passes 10 %" (the issue's backdoor threshold) and the window after the attack's start for the quarantine target
BACKDOOR_PASS = 0.10
WITHIN = 10
#: the issue's targets
MAX_FALSE_ALARMS_PER_100 = 1.0
MAX_SERVED_BACKDOOR = 0.05
MIN_ATTACKERS_QUARANTINED = 0.90
MAX_HONEST_QUARANTINED = 0.02
MAX_MAIN_DROP_PP = 1.0
AUDITED = ("clean", "flagged")
#: per-round fields kept in the JSON
KEEP = ("round", "main_accuracy", "backdoor_accuracy", "malicious", "honest", "flagged_malicious", "flagged_honest",
        "quarantined_malicious", "quarantined_honest", "admitted", "skipped", "audit", "audit_class",
        "audit_seconds", "served", "attributed_malicious", "attributed_honest", "candidate_backdoor_accuracy",
        "sampled_malicious", "screened_malicious", "screened_honest", "looked_back_malicious", "looked_back_honest",
        "rolled_back_to")


# -- pure summaries (tests/unit/test_bench_audit.py) ----------------------------------------------------------

def audited(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rounds whose candidate was actually audited and judged (verdict clean or flagged)."""
    return [r for r in rounds if r.get("audit") in AUDITED]


def flagged_rounds(rounds: list[dict[str, Any]]) -> list[int]:
    return [r["round"] for r in rounds if r.get("audit") == "flagged"]


def first_flag(rounds: list[dict[str, Any]]) -> int | None:
    """The first round the audit flagged (None: never)."""
    flags = flagged_rounds(rounds)
    return flags[0] if flags else None


def candidate_backdoor(r: dict[str, Any]) -> float | None:
    """Backdoor accuracy of what the rule produced in round ``r``: the flagged candidate's when it was withheld,
    else the served version's (which is the candidate; a carried-over round: the parent's parameters)."""
    if r.get("served") is False:
        return r.get("candidate_backdoor_accuracy")
    return r.get("backdoor_accuracy")


def served_backdoor(r: dict[str, Any]) -> float | None:
    return r.get("backdoor_accuracy")


def first_above(rounds: list[dict[str, Any]], value=candidate_backdoor, threshold: float = BACKDOOR_PASS,
                from_round: int = 1) -> int | None:
    """The first round ``>= from_round`` whose ``value(r)`` is above ``threshold`` (None: never)."""
    for r in rounds:
        v = value(r)
        if r["round"] >= from_round and v is not None and v > threshold:
            return r["round"]
    return None


def _share(a: int, b: int) -> float | None:
    return a / b if b else None


def by_audit(record: dict[str, Any], who: str) -> int:
    """Devices of one round the audit found (``who``: malicious or honest): attributed by a flag, screened out of
    the window against a remembered trigger, or found by a flag's look-back in earlier windows (each device once:
    it is quarantined at once)."""
    return sum(record.get(f"{how}_{who}") or 0 for how in ("attributed", "screened", "looked_back"))


def device_shares(rounds: list[dict[str, Any]], compromised: list[int], num_devices: int, attack_start: int,
                  within: int = WITHIN, took_part: set[int] | None = None) -> dict[str, Any]:
    """Attribution and quarantine shares. "Within ``within`` rounds of the attack's start": rounds ``attack_start
    .. attack_start + within - 1``. An attributed device is quarantined at once and never sampled again, so the sum
    of the per-round ``attributed_*`` counts is the number of distinct devices attributed. Quarantine counts are
    the devices in quarantine after a round (by the audit or by reputation; no release within a short run), so
    "ever" is their maximum. ``took_part``: the compromised devices that were window members in the first
    ``within`` rounds of the attack (an attacker never sampled there cannot be caught there)."""
    n_bad = len(compromised)
    n_honest = num_devices - n_bad
    cutoff = attack_start + within - 1
    early = [r for r in rounds if r["round"] <= cutoff]
    att_bad_early = sum(by_audit(r, "malicious") for r in early)
    att_bad = sum(by_audit(r, "malicious") for r in rounds)
    att_honest = sum(by_audit(r, "honest") for r in rounds)
    q_bad_early = early[-1]["quarantined_malicious"] if early else 0
    q_bad = rounds[-1]["quarantined_malicious"] if rounds else 0
    q_honest = max((r["quarantined_honest"] for r in rounds), default=0)
    out = {"compromised": n_bad, "honest_devices": n_honest, "cutoff_round": cutoff,
           "attributed_malicious_within": att_bad_early, "attributed_malicious_end": att_bad,
           "quarantined_malicious_within": q_bad_early, "quarantined_malicious_end": q_bad,
           "attributed_honest": att_honest, "quarantined_honest_ever": q_honest,
           "share_attributed_within": _share(att_bad_early, n_bad), "share_attributed_end": _share(att_bad, n_bad),
           "share_quarantined_within": _share(q_bad_early, n_bad), "share_quarantined_end": _share(q_bad, n_bad),
           "share_honest_attributed": _share(att_honest, n_honest),
           "share_honest_quarantined": _share(q_honest, n_honest)}
    if took_part is not None:
        out["took_part_within"] = len(took_part)
    return out


def attack_cell(result: dict[str, Any], clean_main: float | None, within: int = WITHIN) -> dict[str, Any]:
    """The per-cell summary of one attacked run (``simulate``'s result; ``rounds`` may hold only :data:`KEEP`'s
    fields plus ``devices``). ``clean_main``: the final main accuracy of the clean run of the same seed."""
    cfg, rounds = result["config"], result["rounds"]
    start = cfg["attack_start"]
    bad = set(result["compromised"])
    took_part = {d for r in rounds if start <= r["round"] < start + within for d in r.get("devices", []) if d in bad}
    served = [v for v in (served_backdoor(r) for r in rounds) if v is not None]
    final_main = rounds[-1]["main_accuracy"] if rounds else None
    seconds = [r["audit_seconds"] for r in audited(rounds) if r.get("audit_seconds")]
    return {
        "attack": cfg["attack"], "audit": cfg["audit"], "seed": cfg["seed"], "attack_start": start,
        "rounds": len(rounds), "audited_versions": len(audited(rounds)), "flagged_rounds": flagged_rounds(rounds),
        "first_flag": first_flag(rounds),
        "first_candidate_above_10": first_above(rounds, candidate_backdoor),
        "first_served_above_10": first_above(rounds, served_backdoor),
        **device_shares(rounds, result["compromised"], cfg["num_devices"], start, within, took_part),
        "max_served_backdoor": max(served) if served else None,
        "final_served_backdoor": served[-1] if served else None,
        "max_candidate_backdoor": max((v for v in (candidate_backdoor(r) for r in rounds) if v is not None),
                                      default=None),
        "final_main_accuracy": final_main,
        "clean_main_accuracy": clean_main,
        "main_delta_pp": None if final_main is None or clean_main is None else 100 * (final_main - clean_main),
        "audit_seconds_median": statistics.median(seconds) if seconds else None,
    }


def clean_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """False alarms over the audited clean versions of every clean run with the audit on."""
    versions = sum(len(audited(res["rounds"])) for res in results)
    flags = sum(len(flagged_rounds(res["rounds"])) for res in results)
    honest_q = [max((r["quarantined_honest"] for r in res["rounds"]), default=0) for res in results]
    honest_att = sum(r.get("attributed_honest") or 0 for res in results for r in res["rounds"])
    n_honest = sum(res["config"]["num_devices"] for res in results)  # no compromised device in a clean run
    seconds = [r["audit_seconds"] for res in results for r in audited(res["rounds"]) if r.get("audit_seconds")]
    return {"runs": len(results), "seeds": [res["config"]["seed"] for res in results],
            "audited_versions": versions, "flagged": flags,
            "false_alarms_per_100": (100 * flags / versions) if versions else None,
            "flagged_rounds": {str(res["config"]["seed"]): flagged_rounds(res["rounds"]) for res in results},
            "honest_quarantined_per_run": honest_q, "honest_quarantined": sum(honest_q),
            "honest_attributed": honest_att,
            "share_honest_quarantined": _share(sum(honest_q), n_honest),
            "final_main_accuracy": {str(res["config"]["seed"]): res["rounds"][-1]["main_accuracy"]
                                    for res in results if res["rounds"]},
            "audit_seconds_median": statistics.median(seconds) if seconds else None}


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f} %"


def targets(clean: dict[str, Any], cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's five targets, measured over the clean runs and the attacked cells *with the audit on*. A target
    with nothing to measure is not met (``met`` False, ``measured`` says why)."""
    on = [c for c in cells if c["audit"] != "none"]
    out = []
    fa = clean.get("false_alarms_per_100")
    out.append({"target": f"<= {MAX_FALSE_ALARMS_PER_100:g} false alarm per 100 clean versions",
                "measured": "no audited clean version" if fa is None else
                f"{fa:.2f} per 100 ({clean['flagged']} of {clean['audited_versions']} audited versions)",
                "met": fa is not None and fa <= MAX_FALSE_ALARMS_PER_100})
    served = [c["max_served_backdoor"] for c in on if c["max_served_backdoor"] is not None]
    worst = max(on, key=lambda c: c["max_served_backdoor"] or 0.0) if served else None
    out.append({"target": f"every served version <= {100 * MAX_SERVED_BACKDOOR:g} % backdoor accuracy",
                "measured": "no attacked cell" if worst is None else
                f"max {pct(worst['max_served_backdoor'])} ({worst['attack']}, seed {worst['seed']}); per cell: "
                + ", ".join(f"{c['attack']} s{c['seed']} {pct(c['max_served_backdoor'])}" for c in on),
                "met": bool(served) and max(served) <= MAX_SERVED_BACKDOOR})
    q = [c["share_quarantined_within"] for c in on if c["share_quarantined_within"] is not None]
    out.append({"target": f">= {100 * MIN_ATTACKERS_QUARANTINED:g} % of the attacker devices quarantined within "
                          f"{WITHIN} rounds of the attack's start",
                "measured": "no attacked cell" if not q else
                f"min {pct(min(q), 0)}; per cell: " + ", ".join(
                    f"{c['attack']} s{c['seed']} {c['quarantined_malicious_within']}/{c['compromised']}"
                    + (f" (took part: {c['took_part_within']})" if c.get("took_part_within") is not None else "")
                    for c in on),
                "met": bool(q) and min(q) >= MIN_ATTACKERS_QUARANTINED})
    honest = [clean.get("share_honest_quarantined")] if clean.get("runs") else []
    honest += [c["share_honest_quarantined"] for c in on]
    honest = [h for h in honest if h is not None]
    out.append({"target": f"<= {100 * MAX_HONEST_QUARANTINED:g} % of the honest devices ever quarantined",
                "measured": "nothing measured" if not honest else
                f"max {pct(max(honest))} of a run's honest devices (clean runs: {clean.get('honest_quarantined', 0)} "
                f"devices; attacked: " + ", ".join(f"{c['attack']} s{c['seed']} {c['quarantined_honest_ever']}"
                                                  for c in on) + ")",
                "met": bool(honest) and max(honest) <= MAX_HONEST_QUARANTINED})
    drops = [c["main_delta_pp"] for c in on if c["main_delta_pp"] is not None]
    out.append({"target": f"main accuracy within {MAX_MAIN_DROP_PP:g} percentage point of a clean run",
                "measured": "no comparison" if not drops else
                f"worst {min(drops):+.2f} pp; per cell: " + ", ".join(
                    f"{c['attack']} s{c['seed']} {c['main_delta_pp']:+.2f}" for c in on
                    if c["main_delta_pp"] is not None),
                "met": bool(drops) and round(min(drops), 6) >= -MAX_MAIN_DROP_PP})
    return out


# -- the run ----------------------------------------------------------------------------------------------------

def jobs(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(label, config): clean with the audit, then each attack with and without it, then the clean references."""
    from fedguard.simulation import SimulationConfig

    start = {"attack_start": args.attack_start} if args.attack_start is not None else {}
    out: list[tuple[str, Any]] = []
    for s in args.clean_seeds:
        out.append(("clean", SimulationConfig(task=TASK, rounds=args.rounds, seed=s, audit=AUDIT)))
    for audit in (AUDIT, "none"):
        for kind in args.attacks:
            for s in args.attack_seeds:
                out.append((kind, SimulationConfig(task=TASK, rounds=args.rounds, seed=s, attack=kind,
                                                   fraction=args.fraction, audit=audit, **start)))
    for s in args.attack_seeds:
        out.append(("clean_reference", SimulationConfig(task=TASK, rounds=args.rounds, seed=s, audit="none")))
    return out


def compact(label: str, res: dict[str, Any]) -> dict[str, Any]:
    rounds = [{k: r.get(k) for k in KEEP} for r in res["rounds"]]
    keys = list(KEEP)
    return {"label": label, "attack": res["config"]["attack"], "audit": res["config"]["audit"],
            "seed": res["config"]["seed"], "compromised": res["compromised"], "initial": res["initial"],
            "seconds": res["seconds"],
            "rounds": {k: [round(r[k], 4) if isinstance(r[k], float) else r[k] for r in rounds] for k in keys}}


def dump(report: dict[str, Any]) -> str:
    """The report as JSON: indented, except one line per run."""
    runs = report.get("runs", [])
    text = json.dumps({**report, "runs": "@RUNS@"}, indent=1)
    return text.replace('"@RUNS@"', "[\n" + ",\n".join(json.dumps(r, separators=(",", ":")) for r in runs) + "\n]")


def rows_of(run: dict[str, Any]) -> list[dict[str, Any]]:
    """A compacted run's rounds back as one dict per round."""
    cols = run["rounds"]
    n = len(cols["round"])
    return [{k: cols[k][i] for k in cols} for i in range(n)]


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    attacks, seeds = report["attacks"], report["attack_seeds"]
    fig, axes = plt.subplots(len(seeds), len(attacks), figsize=(4.6 * len(attacks), 3.4 * len(seeds)),
                             squeeze=False, sharey=True)
    clean = {r["seed"]: rows_of(r) for r in runs if r["label"] == "clean_reference"}
    for i, seed in enumerate(seeds):
        for j, attack in enumerate(attacks):
            ax = axes[i][j]
            for audit, style in ((AUDIT, "-"), ("none", "--")):
                run = next((r for r in runs if r["label"] == attack and r["seed"] == seed and r["audit"] == audit),
                           None)
                if run is None:
                    continue
                rr = rows_of(run)
                xs = [r["round"] for r in rr]
                name = "audit" if audit == AUDIT else "no audit"
                ax.plot(xs, [r["backdoor_accuracy"] for r in rr], style, color="tab:red",
                        label=f"served backdoor, {name}")
                ax.plot(xs, [r["main_accuracy"] for r in rr], style, color="tab:blue", label=f"main, {name}")
                if audit == AUDIT:
                    fl = [r for r in rr if r["audit"] == "flagged"]
                    if fl:
                        ax.scatter([r["round"] for r in fl], [r["candidate_backdoor_accuracy"] or 0 for r in fl],
                                   marker="x", color="black", zorder=5, label="flagged (candidate's backdoor)")
                        for r in fl:
                            ax.axvline(r["round"], color="black", alpha=0.15, linewidth=3)
            if seed in clean:
                rr = clean[seed]
                ax.plot([r["round"] for r in rr], [r["main_accuracy"] for r in rr], ":", color="grey",
                        label="main, clean run")
            ax.axvline(report["attack_start"], color="grey", linewidth=0.8, linestyle="-.")
            ax.axhline(MAX_SERVED_BACKDOOR, color="tab:red", linewidth=0.6, alpha=0.5)
            ax.set_ylim(0, 1.02)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_title(f"{attack}, seed {seed}", fontsize=9)
            ax.set_xlabel("round")
            if j == 0:
                ax.set_ylabel("accuracy")
            if i == 0 and j == 0:
                ax.legend(fontsize=6, loc="center right")
    fig.suptitle(f"{TASK}, {int(100 * report['fraction'])} % compromised from round {report['attack_start']}\n"
                 "solid: audit on, dashed: audit off, x: flagged; thin red line: the 5 % target", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(report: dict[str, Any]) -> str:
    m, c = report["machine"], report["clean"]
    lines = [
        "# Model audit: false alarms, backdoors with and without the audit",
        "",
        f"Produced by `{report['command']}` on {report['date']} in {report['wall_min']:.1f} min "
        f"({report['workers']} worker processes, 1 torch thread each)."
        + (f" Text and plot re-rendered from the JSON by `{report['rerendered']}` (same runs)."
           if report.get("rerendered") else ""),
        "",
        "## Machine and method",
        "",
        f"* CPU: {m['cpu']}, nproc = {m['nproc']}; Python {m['python']}, numpy {m['numpy']}, torch {m['torch']}; "
        f"load average at start {m['load_start']}, at end {m['load_end']}.",
        f"* `fedguard.simulation.simulate` with `audit=\"{AUDIT}\"` (what `fedguard eval --audit {AUDIT}` runs): "
        f"{TASK}, 100 devices, Dirichlet(0.9), 10 per round, `DEFAULT_TRAINING`, the `SimulationConfig` defaults: "
        f"rule `{report['rule']}`, detection `{report['detection']}` with reputation; the audit's live defaults "
        f"(time budget {report['audit_time_budget_s']:g} s, reference = median of the last "
        f"{report['audit_reference_versions']} served clean audits, {report['audit_warmup_versions']} warm-up "
        "versions audited but not judged). A flagged candidate is not served; the flagged window and the last 6 "
        "served windows are screened with its trigger (the look-back: if a served one held a member pushing the "
        "trigger, the version gets the parameters of the oldest such window's base; those devices are "
        "quarantined, and if there were any the flag is confirmed: its trigger is remembered and its attributed "
        "devices are quarantined too, otherwise only those attributed with robust z >= 4); every later window's members are screened against the remembered triggers before the rule "
        "aggregates them (screened ones are left out and quarantined).",
        f"* Attacks at {int(100 * report['fraction'])} % compromised devices (a fixed seeded sample of 20 of 100) "
        f"from round {report['attack_start']}, the attack library's default parameters (`sybil`: base "
        "`model_replacement`, near-identical copies), every round a compromised device is sampled; "
        f"{report['rounds']} rounds; attack seeds {', '.join(map(str, report['attack_seeds']))}. The reference for "
        "each attacked cell is the same cell with `audit=\"none\"`. Main accuracy is compared with the clean run of "
        "the same seed with the audit off.",
        f"* Calibration (3 audited rounds of an attacked run in this process): set-up "
        f"{report['calibration']['setup_s']:.1f} s, {report['calibration']['round_s']:.2f} s per round; planned "
        f"{report['planned_rounds']} rounds, estimated {report['estimated_min']:.1f} min.",
        "* Definitions. *Audited*: verdict `clean` or `flagged` (warm-up and carried-over versions are `skipped` "
        "and not counted). *Candidate backdoor*: the backdoor accuracy (true trigger: the 4x4 pixel pattern, target "
        "0, which the audit never sees) of the version the rule produced, before the audit's response: a flagged "
        "candidate's `candidate_backdoor_accuracy`, otherwise the served version's. *Served backdoor*: of the "
        "version actually served in each round. *Within 10 rounds*: rounds "
        f"{report['attack_start']}-{report['attack_start'] + WITHIN - 1}. Shares of attackers are over all 20 "
        "compromised devices (in brackets: how many of them were window members in those 10 rounds: one not sampled "
        "cannot be caught). *Quarantined*: by the audit or by reputation; *attributed*: by the audit (a flag's "
        "attribution, its look-back over the last served windows, or the screening of later windows against the "
        "remembered trigger).",
        "",
        f"## Clean: {c['audited_versions']} audited versions ({c['runs']} seeds x {report['rounds']} rounds)",
        "",
        "| false alarms | per 100 audited versions | flagged rounds per seed | honest devices attributed | honest devices "
        "quarantined | final main accuracy per seed (audit on) |",
        "|---:|---:|---|---:|---:|---|",
        f"| {c['flagged']} | {c['false_alarms_per_100']:.2f} | "
        + "; ".join(f"s{s}: {', '.join(map(str, fl)) or 'none'}" for s, fl in c["flagged_rounds"].items())
        + f" | {c['honest_attributed']} | {c['honest_quarantined']} | "
        + ", ".join(f"s{s}: {pct(v, 2)}" for s, v in c["final_main_accuracy"].items()) + " |"
        if c["false_alarms_per_100"] is not None else "| – | – | – | – | – | – |",
        "",
        "Clean runs with the audit off (the main-accuracy reference): "
        + ", ".join(f"seed {s}: {pct(v, 2)}" for s, v in report["clean_reference"].items()) + ".",
        "",
        f"## Attacks at {int(100 * report['fraction'])} %: audit on vs off",
        "",
        "| attack | seed | audit | first flag | candidate backdoor > 10 % | served backdoor > 10 % | flagged rounds "
        "| attackers attributed (10 r / end) | attackers quarantined (10 r / end) | honest attributed / quarantined "
        "| served backdoor max / final | final main (vs clean) |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    never = lambda x: "never" if x is None else str(x)  # noqa: E731
    for cell in report["cells"]:
        on = cell["audit"] != "none"
        lines.append(
            f"| {cell['attack']} | {cell['seed']} | {'on' if on else 'off'} | "
            f"{never(cell['first_flag']) if on else '–'} | {never(cell['first_candidate_above_10'])} | "
            f"{never(cell['first_served_above_10'])} | "
            f"{(', '.join(map(str, cell['flagged_rounds'])) or 'none') if on else '–'} | "
            + (f"{cell['attributed_malicious_within']} / {cell['attributed_malicious_end']} of {cell['compromised']}"
               if on else "–")
            + f" | {cell['quarantined_malicious_within']} (took part: {cell.get('took_part_within', '–')}) / "
            f"{cell['quarantined_malicious_end']} of {cell['compromised']} | "
            f"{cell['attributed_honest'] if on else '–'} / {cell['quarantined_honest_ever']} of "
            f"{cell['honest_devices']} | {pct(cell['max_served_backdoor'])} / {pct(cell['final_served_backdoor'])} | "
            f"{pct(cell['final_main_accuracy'], 2)} ("
            + ("–" if cell["main_delta_pp"] is None else f"{cell['main_delta_pp']:+.2f} pp") + ") |")
    t = report["timing"]
    lines += [
        "",
        "## Targets (issue 14), audit on",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for tg in report["targets"]:
        lines.append(f"| {tg['target']} | {tg['measured']} | {'met' if tg['met'] else '**NOT met**'} |")
    lines += [
        "",
        "## Time per audited version",
        "",
        f"`audit_seconds` of every audited round (wall seconds of `Auditor.audit_candidate`, one torch thread, two "
        f"simulations sharing the two cores): median {t['median_s']:.2f} s, 90th percentile {t['p90_s']:.2f} s, "
        f"max {t['max_s']:.2f} s over {t['n']} audited versions (flagged versions include the attribution). The "
        "round record holds the wall time only, not the audit's CPU time (`AuditResult.cpu_seconds` is in the "
        "version's metadata, not in the simulation's round record); with one thread per process and two processes "
        "on two cores the wall time is an upper bound of the CPU time."
        if t["n"] else "No audited version.",
        "",
        f"![served backdoor and main accuracy per round, audit on and off]({report['plot']})" if report.get("plot")
        else "",
        "",
        "## Reading",
        "",
    ] + [f"* {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def notes(report: dict[str, Any]) -> list[str]:
    out = []
    missed = [t["target"] for t in report["targets"] if not t["met"]]
    out.append("Targets not met: " + ("; ".join(missed) if missed else "none") + ". Nothing was tuned for this run: "
               "the audit, the rule and the detection ran with their defaults.")
    for cell in report["cells"]:
        if cell["audit"] == "none":
            continue
        ref = next((x for x in report["cells"] if x["audit"] == "none" and x["attack"] == cell["attack"]
                    and x["seed"] == cell["seed"]), None)
        ff, fb = cell["first_flag"], cell["first_candidate_above_10"]
        if ff is None:
            order = "never flagged"
        elif fb is None:
            order = f"first flag at round {ff}, the candidate's backdoor never above 10 %"
        else:
            order = (f"first flag at round {ff}, the candidate's backdoor first above 10 % at round {fb} "
                     f"({'flagged before' if ff < fb else 'flagged at that round' if ff == fb else 'flagged after'})")
        line = (f"{cell['attack']} seed {cell['seed']}: {order}; served backdoor max "
                f"{pct(cell['max_served_backdoor'])} with the audit")
        if ref is not None:
            fs = ref["first_served_above_10"]
            line += (f", {pct(ref['max_served_backdoor'])} without ("
                     + ("never above 10 %)" if fs is None else f"first above 10 % at round {fs})"))
        out.append(line + ".")
    runs = [r for r in report.get("runs", []) if r["audit"] != "none" and r["attack"]]
    flagged = [x for run in runs for x in rows_of(run) if x["audit"] == "flagged"]
    if flagged:
        members = sum(x["malicious"] for x in flagged)
        got = sum(x["attributed_malicious"] or 0 for x in flagged)
        wrong = sum(x["attributed_honest"] or 0 for x in flagged)
        out.append(f"Attribution when flagged: {got} of the {members} attacker members of the {len(flagged)} flagged "
                   f"windows attributed, {wrong} honest members. What is missed is the versions judged clean.")
    leaked = [(run["attack"], run["seed"], x["round"], x["backdoor_accuracy"]) for run in runs for x in rows_of(run)
              if x["audit"] == "clean" and (x["backdoor_accuracy"] or 0) > MAX_SERVED_BACKDOOR]
    if leaked:
        worst = max(leaked, key=lambda t: t[3])
        out.append(f"Served versions judged clean with backdoor accuracy above {pct(MAX_SERVED_BACKDOOR, 0)}: "
                   f"{len(leaked)} (worst: {worst[0]} seed {worst[1]}, round {worst[2]}, {pct(worst[3])}): a "
                   "backdoor below the audit's sensitivity, before its first flag or between flags, is served.")
    rows = [x for run in runs for x in rows_of(run)]
    if any("screened_malicious" in x for x in rows):
        tot = {k: sum(x.get(k) or 0 for x in rows) for k in ("screened_malicious", "screened_honest",
                                                            "looked_back_malicious", "looked_back_honest")}
        rolled = [(run["attack"], run["seed"], x["round"], x["rolled_back_to"]) for run in runs
                  for x in rows_of(run) if x.get("rolled_back_to") is not None]
        out.append(f"Remembered triggers: {tot['screened_malicious']} attacker and {tot['screened_honest']} honest "
                   "members screened out of later windows; the look-back of a flag found "
                   f"{tot['looked_back_malicious']} attacker and {tot['looked_back_honest']} honest devices in the "
                   "served windows before it and served an older base "
                   + (f"{len(rolled)} times (" + "; ".join(f"{a} s{sd} round {r}: parameters of version {v}"
                                                           for a, sd, r, v in rolled) + ")." if rolled else
                      "never."))
    budget = report.get("audit_time_budget_s")
    secs = [x["audit_seconds"] for run in report.get("runs", []) for x in rows_of(run)
            if x["audit"] in AUDITED and x["audit_seconds"]]
    if budget and secs:
        at = sum(v >= budget for v in secs)
        out.append(f"Time budget: none of the {len(secs)} audited versions took the {budget:g} s budget even in "
                   f"wall time (max {max(secs):.2f} s); the budget counts the audit's CPU time, so none was cut "
                   "short." if not at else
                   f"Time budget: {at} of {len(secs)} audited versions took at least the {budget:g} s budget in wall "
                   "time (two simulations on two cores). The budget counts the audit's CPU time, which the round "
                   "record does not hold, so these were cut short (`truncated`, fewer optimisation steps than the "
                   "audit's 150) only if their CPU time reached it too.")
    if any(c["attack"] == "sybil" for c in report["cells"]):
        sy = [c for c in report["cells"] if c["attack"] == "sybil" and c["audit"] != "none"]
        off = {c["seed"]: c for c in report["cells"] if c["attack"] == "sybil" and c["audit"] == "none"}
        flagged = [c for c in sy if c["first_flag"] is not None]
        without = "; without the audit " + ", ".join(
            pct(off[c["seed"]]["max_served_backdoor"]) for c in sy if c["seed"] in off) if off else ""
        out.append("sybil (base model_replacement, near-identical copies): the detection ensemble stops most of it "
                   "(served backdoor max " + ", ".join(pct(c["max_served_backdoor"]) for c in sy) + without +
                   "; reputation quarantined " + ", ".join(f"{c['quarantined_malicious_end']}" for c in sy) +
                   " of 20 by the end); the audit flagged " +
                   (", ".join(f"seed {c['seed']} at round {c['first_flag']}" for c in flagged) if flagged
                    else "nothing") + ".")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clean-seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--attack-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--attack-start", type=int, default=None,
                   help="first attacked round (default: the simulation's default, 5)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-calibrate", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 clean seed, 1 attack seed, 5 rounds, attack from round 2")
    p.add_argument("--out", type=Path, default=None,
                   help="the .md to write (its .json and .png next to it); default bench/results/audit.md, "
                        "none with --quick")
    p.add_argument("--rerender", type=Path, metavar="JSON", help="only write --out again from a results JSON")
    args = p.parse_args(argv)
    if args.rerender:
        report = json.loads(args.rerender.read_text())
        out = args.out or Path("bench/results/audit.md")
        if report.get("plot"):
            plot(report, out.with_suffix(".png"))
            report["plot"] = out.with_suffix(".png").name
        report["notes"] = notes(report)  # the reading follows the code that renders it
        report["rerendered"] = f"python bench/audit.py --rerender {args.rerender} --out {out}"
        out.write_text(render(report))
        print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if report.get("plot") else ""))
        return 0
    if args.quick:
        args.clean_seeds, args.attack_seeds, args.rounds = args.clean_seeds[:1], args.attack_seeds[:1], 5
        if args.attack_start is None:
            args.attack_start = 2
    if args.out is None and not args.quick:
        args.out = Path("bench/results/audit.md")
    from _simruns import calibrate, run_many
    from fedguard.simulation import SimulationConfig

    command = "python " + " ".join(shlex.quote(a) for a in ["bench/audit.py", *(argv if argv is not None
                                                                                 else sys.argv[1:])])
    started = time.perf_counter()
    load_start = tuple(round(x, 2) for x in os.getloadavg())
    todo = jobs(args)
    total = sum(c.rounds for _, c in todo)
    if args.no_calibrate:
        setup, per_round = 1.0, 3.5
    else:
        print("calibrating: 3 audited rounds of an attacked run in this process ...", file=sys.stderr, flush=True)
        setup, per_round = calibrate(SimulationConfig(task=TASK, seed=0, attack="constrain_and_scale",
                                                      attack_start=1, audit=AUDIT))
    estimate = ((total * per_round + len(todo) * setup) / max(1, args.workers) + 10) / 60
    print(f"{len(todo)} runs, {total} rounds; set-up {setup:.1f} s, {per_round:.2f} s per audited round -> "
          f"estimated {estimate:.1f} min on {args.workers} workers (unaudited rounds are cheaper)", file=sys.stderr,
          flush=True)
    results = run_many([c for _, c in todo], workers=args.workers, desc="audit rounds")
    tagged = list(zip([label for label, _ in todo], results))

    clean_ref = {res["config"]["seed"]: res["final_main_accuracy"] for label, res in tagged
                 if label == "clean_reference"}
    clean = clean_summary([res for label, res in tagged if label == "clean"])
    cells = [attack_cell(res, clean_ref.get(res["config"]["seed"])) for label, res in tagged
             if label not in ("clean", "clean_reference")]
    cells.sort(key=lambda c: (args.attacks.index(c["attack"]), c["seed"], c["audit"] == "none"))
    secs = sorted(r["audit_seconds"] for label, res in tagged for r in audited(res["rounds"])
                  if r.get("audit_seconds"))
    timing = {"n": len(secs), "median_s": statistics.median(secs) if secs else None,
              "p90_s": secs[min(len(secs) - 1, int(0.9 * len(secs)))] if secs else None,
              "max_s": secs[-1] if secs else None}
    first = todo[0][1]
    report: dict[str, Any] = {
        "command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_min": (time.perf_counter() - started) / 60, "workers": args.workers,
        "machine": simulation_machine(load_start),
        "calibration": {"setup_s": setup, "round_s": per_round}, "planned_rounds": total, "estimated_min": estimate,
        "task": TASK, "rule": first.rule, "rule_params": first.rule_params, "detection": first.detection,
        "audit_time_budget_s": first.audit_time_budget_s, "audit_reference_versions": first.audit_reference_versions,
        "audit_warmup_versions": first.audit_warmup_versions, "rounds": args.rounds, "fraction": args.fraction,
        "attack_start": next((c.attack_start for _, c in todo if c.attack), first.attack_start),
        "attacks": list(args.attacks), "attack_seeds": list(args.attack_seeds), "clean_seeds": list(args.clean_seeds),
        "clean": clean, "clean_reference": {str(k): v for k, v in clean_ref.items()}, "cells": cells,
        "timing": timing,
    }
    report["targets"] = targets(clean, cells)
    report["runs"] = [compact(label, res) for label, res in tagged]
    report["notes"] = notes(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            plot(report, args.out.with_suffix(".png"))
            report["plot"] = args.out.with_suffix(".png").name
        except Exception as exc:  # noqa: BLE001 - the numbers matter more than the picture
            print(f"plot failed: {exc!r}", file=sys.stderr)
        args.out.write_text(render(report))
        args.out.with_suffix(".json").write_text(dump(report))
        print(f"wrote {args.out}, {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')} in "
              f"{report['wall_min']:.1f} min")
    else:
        print(render(report))
    for t in report["targets"]:
        print(f"  [{'met' if t['met'] else 'NOT MET'}] {t['target']}: {t['measured']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
