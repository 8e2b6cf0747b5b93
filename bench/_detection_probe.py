"""Probe: false positives of the detection ensemble on honest Fashion-MNIST updates, and what it catches.

Two steps (the first is slow, the second is seconds, so thresholds can be tuned on a fixed corpus)::

    python bench/_detection_probe.py generate --rounds 40 --out /tmp/fgprobe/corpus.npz
    python bench/_detection_probe.py evaluate --corpus /tmp/fgprobe/corpus.npz

``generate`` runs honest FedAvg (the demo configuration: 100 devices, Dirichlet(0.9), 10 per round,
``DEFAULT_TRAINING["fashion-mnist"]``) exactly as ``bench/fedavg_sim.py`` does and stores every round's chosen
device ids and deltas (float32). ``evaluate`` replays the rounds through ``processors.ensemble.score_window`` with
per-device histories, once on the honest windows (false positives) and once per attack injected into the same
windows (true positives; the attackers replace some honest members of the window, the rest stay honest).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedguard.sketch import sketch_rows  # noqa: E402


def generate(args: argparse.Namespace) -> None:
    import torch

    from fedguard.tasks import (DEFAULT_TRAINING, build_model, dirichlet_split, evaluate, get_flat_params,
                                load_task, local_train, model_spec, set_flat_params)

    torch.set_num_threads(1)
    seed = args.seed
    hp = DEFAULT_TRAINING["fashion-mnist"]
    data = load_task("fashion-mnist", seed=seed)
    rng = np.random.default_rng(seed)
    shards = dirichlet_split(data.y_train, args.clients, args.alpha, rng, min_size=10)
    sizes = np.array([len(s) for s in shards])
    cap = int(round(2 * sizes.mean()))
    model = build_model(model_spec(data, hp["hidden"]), seed=seed)
    global_flat = get_flat_params(model)
    sample_rng = np.random.default_rng([seed, 1])
    chosen_all, deltas_all, weights_all, accs = [], [], [], []
    for rnd in range(1, args.rounds + 1):
        t0 = time.time()
        chosen = np.sort(sample_rng.choice(args.clients, size=args.per_round, replace=False))
        deltas, weights = [], []
        for c in chosen:
            set_flat_params(model, global_flat)
            idx = shards[c]
            local_train(model, data.x_train[idx], data.y_train[idx], epochs=hp["epochs"], lr=hp["lr"],
                        batch_size=hp["batch_size"], momentum=hp["momentum"],
                        seed=seed * 1_000_003 + rnd * 1009 + int(c))
            deltas.append(get_flat_params(model) - global_flat)
            weights.append(min(len(idx), cap))
        w = np.asarray(weights, dtype=np.float64)
        global_flat = (global_flat + (w[:, None] * np.stack(deltas)).sum(0) / w.sum()).astype(np.float32)
        set_flat_params(model, global_flat)
        acc, _ = evaluate(model, data.x_test, data.y_test)
        chosen_all.append(chosen)
        deltas_all.append(np.stack(deltas).astype(np.float32))
        weights_all.append(w)
        accs.append(acc)
        print(f"round {rnd:3d} acc={acc:.4f} ({time.time() - t0:.1f}s)", flush=True)
    np.savez(args.out, chosen=np.stack(chosen_all), deltas=np.stack(deltas_all), weights=np.stack(weights_all),
             acc=np.array(accs), sizes=sizes)
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--rounds", type=int, default=40)
    g.add_argument("--clients", type=int, default=100)
    g.add_argument("--per-round", type=int, default=10)
    g.add_argument("--alpha", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", type=Path, required=True)
    e = sub.add_parser("evaluate")
    e.add_argument("--corpus", type=Path, nargs="+", required=True)
    e.add_argument("--json", type=Path)
    e.add_argument("--k", type=int, default=1024)
    e.add_argument("--sketch-seed", type=int, default=2024, help="fixed for reproducibility (production: secret)")
    e.add_argument("--drift", type=float, default=DRIFT, help="drift size, in window median norms")
    e.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    args = p.parse_args(argv)
    if args.cmd == "generate":
        generate(args)
    else:
        evaluate(args)
    return 0


DRIFT = 0.3  # slow drift: honest update + DRIFT x the window's median norm along a fixed direction (THREATS.md)
SCENARIOS = ("honest", "sign_flip", "scale10", "copies", "colluders_noisy", "drift_lone", "drift_colluding",
             "majority_copies", "majority_noisy", "majority_diverse")


SCORE_KEYS = ("norm", "magnitude_z", "cos_centre", "cos_pairwise", "krum", "distance_z", "flame_outlier", "density",
              "foolsgold_alpha", "history_z", "trust")


def _attack(kind: str, honest: np.ndarray, own: np.ndarray, m: float, mean_dir: np.ndarray,
            dirs: dict[str, np.ndarray], dev: int, rng: np.random.Generator) -> np.ndarray:
    """One attacker's update. ``own`` = what this device would have sent honestly; ``m`` = the window's honest
    median norm; ``mean_dir`` = unit mean of the window's honest updates (the attacker is given it: worst case)."""
    if kind == "sign_flip":
        return -own
    if kind == "scale10":
        return 10.0 * own
    if kind in ("copies", "majority_copies"):
        return (-m * mean_dir).astype(np.float32)  # identical for every attacker of the window
    if kind in ("colluders_noisy", "majority_noisy", "majority_diverse"):
        noise = rng.standard_normal(own.size)
        # mutual cosine ~0.9 (noise 0.33): similar, not near-identical; ~0.5 (noise 1.0): below the 0.7 ramp
        noise *= (1.0 if kind == "majority_diverse" else 0.33) / np.linalg.norm(noise)
        v = -mean_dir + noise
        return (m * v / np.linalg.norm(v)).astype(np.float32)
    if kind == "drift_lone":
        return (own + DRIFT * m * dirs[f"lone{dev}"]).astype(np.float32)
    if kind == "drift_colluding":
        return (own + DRIFT * m * dirs["shared"]).astype(np.float32)
    raise ValueError(kind)


def run_scenario(corpus: dict, kind: str, cfg, spec, seed: int) -> dict:
    from processors.detectors import updated
    from processors.ensemble import score_window
    from processors.reputation import Reputation, expectation, observe

    deltas, chosen, weights = corpus["deltas"], corpus["chosen"], corpus["weights"]
    rounds, n, d = deltas.shape
    rng = np.random.default_rng([seed, 7])
    compromised = set(rng.choice(100, size=20, replace=False).tolist()) if kind != "honest" else set()
    dirs: dict[str, np.ndarray] = {}
    for dev in compromised:
        u = rng.standard_normal(d)
        dirs[f"lone{dev}"] = u / np.linalg.norm(u)
    u = rng.standard_normal(d)
    dirs["shared"] = u / np.linalg.norm(u)
    hist: dict[int, object] = {}
    reps: dict[int, Reputation] = {}
    prev = None
    out = {"honest": [], "attacker": [], "quarantined_honest": set(), "quarantined_attacker": set(),
           "windows": 0, "attack_windows": 0}
    for r in range(rounds):
        devs = [int(c) for c in chosen[r]]
        x = deltas[r].astype(np.float32).copy()
        honest_norms = np.linalg.norm(x.astype(np.float64), axis=1)
        m = float(np.median(honest_norms))
        mean = x.astype(np.float64).mean(0)
        mean_dir = mean / np.linalg.norm(mean)
        if kind.startswith("majority"):
            bad = list(range(6))  # members 0-5 of every window are attackers, with their own device ids
            devs = [1000 + i for i in bad] + devs[6:]
        else:
            bad = [i for i, dev in enumerate(devs) if dev in compromised]
        for i in bad:
            x[i] = _attack(kind, x, x[i], m, mean_dir, dirs, devs[i], rng)
        norms = np.linalg.norm(x.astype(np.float64), axis=1)
        sk = sketch_rows(x, spec)
        trust = np.array([expectation(reps.get(dev, Reputation())) for dev in devs])
        res = score_window(norms, sk, [hist.get(dev) for dev in devs], prev, trust, cfg)
        out["windows"] += 1
        out["attack_windows"] += bool(bad)
        for i, (dev, mv) in enumerate(zip(devs, res.members)):
            who = "attacker" if i in bad else "honest"
            out[who].append({"round": r + 1, "device": dev, "verdict": mv.verdict, "flags": mv.flags,
                             "weight": mv.weight, "bad_in_window": len(bad),
                             "scores": {k: mv.scores.get(k) for k in SCORE_KEYS},
                             "norm_ratio": float(norms[i] / np.median(norms))})
            rep, events = observe(reps.get(dev, Reputation()), mv.evidence, now=float(r))
            reps[dev] = rep
            if "quarantined" in events:
                out[f"quarantined_{who}"].add(dev)
            hist[dev] = updated(hist.get(dev), sk[i])
        w = np.array([mv.weight for mv in res.members]) * weights[r]
        agg = (w[:, None] * x.astype(np.float64)).sum(0) / max(w.sum(), 1e-12)
        prev = sketch_rows(agg[None, :], spec)[0]
    return out


def _rates(rows: list[dict]) -> dict:
    from processors.ensemble import DETECTORS

    n = len(rows)
    if n == 0:
        return {"n": 0}
    res = {"n": n}
    for v in ("accept", "downweight", "reject"):
        res[v] = sum(r["verdict"] == v for r in rows) / n
    for det in (*DETECTORS, "low_trust"):
        res[f"vote_{det}"] = sum(det in r["flags"] for r in rows) / n
    res["flame_outlier"] = sum(bool(r["scores"]["flame_outlier"]) for r in rows) / n
    for key in ("foolsgold_alpha", "history_z", "cos_centre", "cos_pairwise"):
        vals = [r["scores"][key] for r in rows if r["scores"][key] is not None]
        if vals:
            res[f"{key}_p5_p50_p95"] = [round(float(v), 3) for v in np.percentile(vals, [5, 50, 95])]
    return res


def evaluate(args: argparse.Namespace) -> None:
    global DRIFT
    from fedguard.sketch import SketchSpec

    DRIFT = args.drift
    from processors.ensemble import DETECTORS, EnsembleConfig

    cfg = EnsembleConfig()
    corpora = [dict(np.load(p)) for p in args.corpus]
    report: dict = {}
    for kind in args.scenarios:
        agg: dict = {"honest": [], "attacker": [], "q_h": 0, "q_a": 0, "windows": 0, "attack_windows": 0}
        for ci, corpus in enumerate(corpora):
            spec = SketchSpec(corpus["deltas"].shape[2], args.k, args.sketch_seed + ci)
            t0 = time.time()
            out = run_scenario(corpus, kind, cfg, spec, seed=ci)
            agg["honest"] += out["honest"]
            agg["attacker"] += out["attacker"]
            agg["q_h"] += len(out["quarantined_honest"])
            agg["q_a"] += len(out["quarantined_attacker"])
            agg["windows"] += out["windows"]
            agg["attack_windows"] += out["attack_windows"]
            print(f"  {kind} corpus {ci}: {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
        h, a = _rates(agg["honest"]), _rates(agg["attacker"])
        report[kind] = {"honest": h, "attacker": a, "honest_devices_quarantined": agg["q_h"],
                        "attacker_devices_quarantined": agg["q_a"], "windows": agg["windows"]}
        if kind == "honest":
            per_dev: dict[int, int] = {}
            for row in agg["honest"]:
                per_dev[row["device"]] = per_dev.get(row["device"], 0) + (row["verdict"] != "accept")
            report[kind]["most_flagged_device_count"] = max(per_dev.values())
            report[kind]["examples"] = [r for r in agg["honest"] if r["verdict"] != "accept"][:20]
        fmt = lambda d: " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items()
                                 if k == "n" or (isinstance(v, float) and v > 0) or isinstance(v, list))
        print(f"{kind:16s} honest:   {fmt(h)}")
        print(f"{'':16s} attacker: {fmt(a)}  (quarantined: honest {agg['q_h']}, attacker {agg['q_a']})",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=list))


if __name__ == "__main__":
    raise SystemExit(main())
