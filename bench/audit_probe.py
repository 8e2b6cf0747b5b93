"""First measurement of the model audit (``aggregator/audit.py``): false alarms, detection round, attribution, time.

In one process, no Kafka (the FedAvg loop of ``bench/fedavg_sim.py``: Fashion-MNIST, 100 devices, Dirichlet 0.9,
10 per round, ``DEFAULT_TRAINING``, sample-count weights capped at 2x the mean shard):

1. ``--warmup`` clean rounds (no audit) give the starting model.
2. **clean**: ``--clean-versions`` further clean rounds; every version is audited, with the parent's audit as the
   differential reference. Any flag is a false alarm. For every version the attribution is also run, forced, on the
   class with the highest anomaly index: the share of honest members it would blame if the audit had fired there.
3. **attack** (passive: every version is served): from the warm-up model, persistent constrain-and-scale
   (``producers.attacks.live.craft_round("constrain_and_scale", {})``: backdoor training with the anomaly-evasion loss,
   every update scaled to the median honest norm; 4x4 pixel pattern, target 0) by ``--fraction`` of the devices, in
   every round they are sampled. Each version: the audit's verdict (reference: the parent), backdoor accuracy with the
   true trigger (which the audit never sees), and, when flagged, attribution of the window members.
4. **respond** (a preview of issue 14's response, not the pipeline's): same attack, but a flagged version is not
   served (the next round starts again from the last served version; the differential reference is the per-class
   median of the last ``--ref-window`` served versions' audits) and the attributed members are quarantined (never
   sampled again). Reports the served versions' backdoor/main accuracy and who ended quarantined.
5. **rollback**: as respond, and on each attribution the served lineage is also cut back to the last version to
   which no quarantined device contributed (the audit sees a backdoor only once it is strong; the versions before
   carry part of it).

Example (about 11 minutes on the shared 2-core dev machine; ~1.2 s of CPU per audit)::

    python bench/audit_probe.py --clean-versions 100 --attack-rounds 30 --out /tmp/audit_probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.audit import AuditConfig, attribute, audit_model, median_reference, select_audit_set  # noqa: E402
from bench._machine import cpu_model  # noqa: E402
from fedguard.tasks import (DEFAULT_TRAINING, backdoor_eval_set, build_model, dirichlet_split, evaluate,  # noqa: E402
                            get_flat_params, load_task, local_train, model_spec, pixel_pattern, set_flat_params,
                            target_rate)
from producers.attacks.live import AttackContext, craft_round  # noqa: E402


class Sim:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.task = load_task("fashion-mnist", seed=args.seed)
        self.hp = dict(DEFAULT_TRAINING[self.task.name])
        rng = np.random.default_rng(args.seed)
        self.shards = dirichlet_split(self.task.y_train, args.clients, 0.9, rng, min_size=10)
        self.cap = int(round(2 * np.mean([len(s) for s in self.shards])))
        self.spec = model_spec(self.task)
        self.model = build_model(self.spec, seed=args.seed)
        self.scratch = build_model(self.spec, seed=args.seed)
        self.trigger = pixel_pattern(self.task)  # 4x4 bottom-right, target 0: measurement only
        self.x_bd = backdoor_eval_set(self.task, self.trigger)
        n_bad = int(round(args.fraction * args.clients))
        self.compromised = set(np.random.default_rng([args.seed, 7]).permutation(args.clients)[:n_bad].tolist())
        # the server's clean audit set: class-balanced, from the training set (disjoint from the test set)
        self.audit_idx = select_audit_set(self.task.x_train, self.task.y_train, args.audit_pool, seed=args.seed)
        self.x_audit = self.task.x_train[self.audit_idx]
        self.config = AuditConfig(audit_size=args.audit_size, steps=args.steps, time_budget_s=args.time_budget,
                                  seed=args.seed)

    def honest(self, c: int, base: np.ndarray, rnd: int) -> tuple[np.ndarray, int]:
        set_flat_params(self.scratch, base)
        idx = self.shards[c]
        local_train(self.scratch, self.task.x_train[idx], self.task.y_train[idx], epochs=self.hp["epochs"],
                    lr=self.hp["lr"], batch_size=self.hp["batch_size"], momentum=self.hp["momentum"],
                    seed=self.args.seed * 1_000_003 + rnd * 1009 + c)
        return get_flat_params(self.scratch) - base, len(idx)

    def window(self, base: np.ndarray, rnd: int, chosen: np.ndarray, attack: bool, arng: np.random.Generator,
               round_index: int) -> tuple[list[int], np.ndarray, np.ndarray, list[bool]]:
        bad = [int(c) for c in chosen if attack and int(c) in self.compromised]
        crafted = {}
        if bad:
            ctx = AttackContext(base=base, version=rnd - 1, round_index=round_index, devices=bad,
                                honest_delta=lambda i: self.honest(i, base, rnd),
                                shard=lambda i: (self.task.x_train[self.shards[i]], self.task.y_train[self.shards[i]]),
                                task=self.task, model=self.scratch, training=dict(self.hp), window_size=len(chosen),
                                rng=arng)
            crafted = craft_round("constrain_and_scale", {}, ctx)
        deltas, weights, mal = [], [], []
        for c in (int(c) for c in chosen):
            d, n = crafted[c][0] if c in crafted else self.honest(c, base, rnd)
            deltas.append(np.asarray(d, dtype=np.float32))
            weights.append(min(n, self.cap))
            mal.append(c in crafted)
        return [int(c) for c in chosen], np.stack(deltas), np.asarray(weights, dtype=np.float64), mal

    def measure(self, params: np.ndarray) -> tuple[float, float]:
        set_flat_params(self.model, params)
        acc, _ = evaluate(self.model, self.task.x_test, self.task.y_test)
        return acc, target_rate(self.model, self.x_bd, self.trigger.target)

    def audit(self, params: np.ndarray, reference):
        set_flat_params(self.model, params)
        return audit_model(self.model, self.x_audit, self.config, reference)


def fedavg(base: np.ndarray, deltas: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (base + (w[:, None] * deltas).sum(0) / w.sum()).astype(np.float32)


def attribution_counts(att, members: list[int], mal: list[bool]) -> dict:
    flagged = set(att.flagged)
    return {"attackers": int(sum(mal)),
            "attackers_flagged": int(sum(1 for m, b in zip(members, mal) if b and m in flagged)),
            "honest": int(len(mal) - sum(mal)),
            "honest_flagged": int(sum(1 for m, b in zip(members, mal) if not b and m in flagged)),
            "scores": {str(m): round(att.scores[m], 3) for m in members}}


def reference(history: list) -> np.ndarray:
    return median_reference(history)


def phase_clean(sim: Sim, base: np.ndarray, start: int, n: int, log) -> list[dict]:
    rows, history = [], [sim.audit(base, None)]
    srng = np.random.default_rng([sim.args.seed, 1, start])
    for rnd in range(start, start + n):
        chosen = np.sort(srng.choice(sim.args.clients, sim.args.per_round, replace=False))
        members, deltas, w, mal = sim.window(base, rnd, chosen, False, None, 0)
        cand = fedavg(base, deltas, w)
        res = sim.audit(cand, reference(history[-sim.args.ref_window:]))
        acc, bd = sim.measure(cand)
        # forced attribution on the most anomalous class: what the honest members would suffer on a false alarm
        t = int(np.argmax(res.anomaly))
        att = attribute(base, dict(zip(members, deltas)), sim.model, res.trigger_for(t), sim.x_audit)
        row = {"round": rnd, "acc": acc, "bd": bd, "flagged": res.flagged, "reasons": res.reasons,
               "max_anomaly": float(res.anomaly.max()), "min_ratio": float(res.ratios.min()),
               "max_diff_anomaly": float(res.diff_anomaly.max()), "seconds": res.seconds,
               "cpu_seconds": res.cpu_seconds, "truncated": res.truncated,
               "forced_attr_class": t, "forced_attr_honest_flagged": len(att.flagged),
               "norms": res.norms.round(2).tolist()}
        rows.append(row)
        log(f"clean r{rnd:3d} acc {acc:.4f} bd {bd:.3f} flag {res.flagged} {res.reasons} "
            f"maxAI {row['max_anomaly']:.2f} "
            f"minratio {row['min_ratio']:.2f} maxZ {row['max_diff_anomaly']:.2f} forced-attr {len(att.flagged)}/10 "
            f"{res.seconds:.2f}s")
        base = cand
        history.append(res)
    return rows


def phase_attack(sim: Sim, base: np.ndarray, start: int, n: int, mode: str, log) -> dict:
    """Persistent constrain-and-scale from round ``start``. ``mode``: ``"passive"`` (every version served),
    ``"respond"`` (a flagged version is not served, the attributed members are quarantined) or ``"rollback"``
    (as respond, and the served lineage is also cut back to the last version to which no quarantined device
    contributed)."""
    respond = mode != "passive"
    # the served lineage: (round, params, audit, devices whose updates went into it)
    chain: list[tuple[int, np.ndarray, object, set[int]]] = [(start - 1, base, sim.audit(base, None), set())]
    srng = np.random.default_rng([sim.args.seed, 1, start])
    arng = np.random.default_rng([sim.args.seed, 2])
    quarantined: set[int] = set()
    rows = []
    for i, rnd in enumerate(range(start, start + n)):
        served = chain[-1][1]
        history = [c[2] for c in chain[-sim.args.ref_window:]]
        pool = np.array([c for c in range(sim.args.clients) if c not in quarantined])
        chosen = np.sort(srng.choice(pool, min(sim.args.per_round, len(pool)), replace=False))
        members, deltas, w, mal = sim.window(served, rnd, chosen, True, arng, i)
        cand = fedavg(served, deltas, w)
        res = sim.audit(cand, reference(history))
        acc, bd = sim.measure(cand)
        row = {"round": rnd, "attackers": int(sum(mal)), "acc": acc, "bd": bd, "flagged": res.flagged,
               "reasons": res.reasons, "anomaly_0": float(res.anomaly[0]), "ratio_0": float(res.ratios[0]),
               "diff_anomaly_0": float(res.diff_anomaly[0]), "norm_0": float(res.norms[0]), "seconds": res.seconds,
               "cpu_seconds": res.cpu_seconds, "truncated": res.truncated, "norms": res.norms.round(2).tolist(),
               "served": True, "rolled_back_to": None}
        if res.flagged is not None:
            att = attribute(served, dict(zip(members, deltas)), sim.model, res.trigger, sim.x_audit)
            row["attribution"] = attribution_counts(att, members, mal)
            row["attribution"]["parent_success"] = round(att.parent_success, 3)
            if respond:
                quarantined.update(att.flagged)
                row["served"] = False
                if mode == "rollback":
                    cut = next((j for j, c in enumerate(chain) if c[3] & quarantined), None)
                    if cut is not None and cut >= 1:
                        del chain[cut:]
                        row["rolled_back_to"] = chain[-1][0]
        if not respond or res.flagged is None:
            chain.append((rnd, cand, res, set(members)))
        row["quarantined_attackers"] = len(quarantined & sim.compromised)
        row["quarantined_honest"] = len(quarantined - sim.compromised)
        a = row.get("attribution")
        log(f"{mode} r{rnd:3d} k={row['attackers']} acc {acc:.4f} bd {bd:.3f} "
            f"flag {res.flagged} {res.reasons} AI0 {row['anomaly_0']:.2f} ratio0 {row['ratio_0']:.2f} "
            f"z0 {row['diff_anomaly_0']:.2f} n0 {row['norm_0']:.1f}"
            + (f" attr {a['attackers_flagged']}/{a['attackers']} bad, {a['honest_flagged']}/{a['honest']} honest"
               if a else "")
            + (f" | quarantined {row['quarantined_attackers']} bad {row['quarantined_honest']} honest"
               if respond else "")
            + (f" | rolled back to r{row['rolled_back_to']}" if row["rolled_back_to"] is not None else "")
            + f" {res.seconds:.2f}s")
        rows.append(row)
    return {"rows": rows, "quarantined": sorted(quarantined)}


def summarise(clean: list[dict], attack: dict, responses: dict[str, dict], fraction: float, clients: int) -> dict:
    secs = np.array([r["seconds"] for r in clean] + [r["seconds"] for r in attack["rows"]])
    cpu = np.array([r["cpu_seconds"] for r in clean] + [r["cpu_seconds"] for r in attack["rows"]])
    out = {
        "clean_versions": len(clean),
        "false_alarms": sum(r["flagged"] is not None for r in clean),
        "false_alarms_absolute": sum("absolute" in r["reasons"] for r in clean),
        "false_alarms_differential": sum("differential" in r["reasons"] for r in clean),
        "clean_max_anomaly": max(r["max_anomaly"] for r in clean),
        "clean_min_ratio": min(r["min_ratio"] for r in clean),
        "forced_attr_honest_flagged": sum(r["forced_attr_honest_flagged"] for r in clean),
        "forced_attr_honest_total": 10 * len(clean),
        "audit_seconds": {"median": float(np.median(secs)), "p95": float(np.percentile(secs, 95)),
                          "max": float(secs.max())},
        "audit_cpu_seconds": {"median": float(np.median(cpu)), "p95": float(np.percentile(cpu, 95)),
                              "max": float(cpu.max())},
        "truncated": sum(bool(r.get("truncated")) for r in clean + attack["rows"]),
    }
    rows = attack["rows"]
    first = lambda pred: next((r["round"] for r in rows if pred(r)), None)  # noqa: E731
    out["attack"] = {
        "first_bd_over_10": first(lambda r: r["bd"] > 0.10),
        "first_flag": first(lambda r: r["flagged"] is not None),
        "first_flag_absolute": first(lambda r: "absolute" in r["reasons"]),
        "first_flag_differential": first(lambda r: "differential" in r["reasons"]),
        "flagged_versions": sum(r["flagged"] is not None for r in rows),
        "versions_bd_over_10": sum(r["bd"] > 0.10 for r in rows),
        "missed_bd_over_10": [r["round"] for r in rows if r["bd"] > 0.10 and r["flagged"] is None],
        "flag_class_0": sum(r["flagged"] == 0 for r in rows),
    }
    attr = [r["attribution"] for r in rows if "attribution" in r]
    for name, sel in (("attribution_all_flagged", attr),
                      ("attribution_first_flag", attr[:1])):
        a = sum(x["attackers"] for x in sel)
        out["attack"][name] = {"attackers": a, "attackers_flagged": sum(x["attackers_flagged"] for x in sel),
                               "honest": sum(x["honest"] for x in sel),
                               "honest_flagged": sum(x["honest_flagged"] for x in sel)}
    for mode, resp in responses.items():
        rr = resp["rows"]
        served = [r for r in rr if r["served"]]
        attr_r = [r["attribution"] for r in rr if "attribution" in r]
        by_round = {r["round"]: r["quarantined_attackers"] for r in rr}
        n_bad = int(round(fraction * clients))
        out[mode] = {
            "first_flag": next((r["round"] for r in rr if not r["served"]), None),
            "flagged_versions": sum(not r["served"] for r in rr),
            "served_versions": len(served),
            "rollbacks": [(r["round"], r["rolled_back_to"]) for r in rr if r["rolled_back_to"] is not None],
            "attribution": {k: sum(x[k] for x in attr_r) for k in ("attackers", "attackers_flagged", "honest",
                                                                     "honest_flagged")},
            "served_bd_over_5": [r["round"] for r in served if r["bd"] > 0.05],
            "max_served_bd": max((r["bd"] for r in served), default=None),
            "final_served_bd": served[-1]["bd"] if served else None,
            "final_served_acc": served[-1]["acc"] if served else None,
            "quarantined_attackers": rr[-1]["quarantined_attackers"],
            "quarantined_honest": rr[-1]["quarantined_honest"],
            "attackers_total": n_bad,
            "round_90pct_quarantined": next((k for k, v in by_round.items() if v >= 0.9 * n_bad), None),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--warmup", type=int, default=4, help="clean rounds before auditing; the attack starts after them")
    p.add_argument("--clean-versions", type=int, default=100)
    p.add_argument("--attack-rounds", type=int, default=30)
    p.add_argument("--respond", nargs="*", choices=("respond", "rollback"), default=["respond", "rollback"],
                   help="response phases to run after the passive one (none: just the passive one)")
    p.add_argument("--audit-pool", type=int, default=256, help="clean audit inputs held by the server")
    p.add_argument("--audit-size", type=int, default=AuditConfig.audit_size)
    p.add_argument("--steps", type=int, default=AuditConfig.steps)
    p.add_argument("--time-budget", type=float, default=AuditConfig.time_budget_s)
    p.add_argument("--ref-window", type=int, default=3,
                   help="differential reference: per-class median of the last N served versions' audits")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    t0 = time.time()
    sim = Sim(args)
    log = lambda s: print(f"[{time.time() - t0:6.1f}s] {s}", flush=True)  # noqa: E731
    log(f"task {sim.task.name}, {sim.spec.num_params} params, audit set {len(sim.x_audit)} train images "
        f"(first {args.audit_size} for reverse engineering), {args.steps} steps, compromised {sorted(sim.compromised)}")
    base = get_flat_params(sim.model)
    srng = np.random.default_rng([args.seed, 1, 1])
    for rnd in range(1, args.warmup + 1):
        chosen = np.sort(srng.choice(args.clients, args.per_round, replace=False))
        _, deltas, w, _ = sim.window(base, rnd, chosen, False, None, 0)
        base = fedavg(base, deltas, w)
    acc, bd = sim.measure(base)
    log(f"warm-up: {args.warmup} rounds, acc {acc:.4f} bd {bd:.3f}")
    start = args.warmup + 1
    clean = phase_clean(sim, base, start, args.clean_versions, log)
    attack = phase_attack(sim, base, start, args.attack_rounds, "passive", log)
    responses = {mode: phase_attack(sim, base, start, args.attack_rounds, mode, log) for mode in args.respond}
    summary = summarise(clean, attack, responses, args.fraction, args.clients)
    summary.update({"cpu": cpu_model(), "torch_threads": torch.get_num_threads(), "wall_s": time.time() - t0,
                    "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}})
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "clean": clean, "attack": attack, **responses},
                                       indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
