"""In-process FedAvg simulation (no Kafka) used to pick fedguard's default training hyperparameters.

It mirrors what the pipeline does each round: sample ``--per-round`` of ``--clients`` devices uniformly without
replacement (seeded), each trains the current global model on its Dirichlet(alpha) shard with
``fedguard.tasks.local_train`` and reports its delta; the global model moves by the weighted mean of the deltas,
weights = sample counts capped at ``--cap`` (default: 2x the mean shard size); then the global model is
evaluated on the whole test set.

Example (the Fashion-MNIST demo configuration)::

    python bench/fedavg_sim.py --task fashion-mnist --rounds 30 --clients 100 --per-round 10 --alpha 0.9 \
        --seed 0 1 2 --out /tmp/fmnist.json

Unset training flags default to ``fedguard.tasks.DEFAULT_TRAINING[task]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedguard.tasks import (  # noqa: E402
    DEFAULT_TRAINING,
    TASKS,
    build_model,
    dirichlet_split,
    evaluate,
    get_flat_params,
    load_task,
    local_train,
    model_spec,
    set_flat_params,
)


def run(args: argparse.Namespace, seed: int, hp: dict) -> dict:
    data = load_task(args.task, seed=seed)
    rng = np.random.default_rng(seed)
    shards = dirichlet_split(data.y_train, args.clients, args.alpha, rng, min_size=args.min_size)
    sizes = np.array([len(s) for s in shards])
    cap = args.cap if args.cap is not None else int(round(2 * sizes.mean()))
    spec = model_spec(data, hp["hidden"])
    model = build_model(spec, seed=seed)
    global_flat = get_flat_params(model)
    sample_rng = np.random.default_rng([seed, 1])

    t0 = time.process_time()
    acc, loss = evaluate(model, data.x_test, data.y_test)
    history = [{"round": 0, "acc": acc, "loss": loss, "train_s": 0.0, "eval_s": time.process_time() - t0}]
    first_80 = None
    print(f"[{data.name} seed={seed}] round   0  acc={acc:.4f}  loss={loss:.4f}  (initial model; "
          f"{spec.num_params} params, shards {sizes.min()}..{sizes.max()} samples, weight cap {cap})", flush=True)
    bar = tqdm(range(1, args.rounds + 1), desc=f"{data.name} seed={seed}", leave=False, disable=args.no_progress)
    for rnd in bar:
        chosen = np.sort(sample_rng.choice(args.clients, size=args.per_round, replace=False))
        deltas, weights, dev_loss = [], [], []
        t_train = time.process_time()
        for c in chosen:
            set_flat_params(model, global_flat)
            idx = shards[c]
            res = local_train(
                model,
                data.x_train[idx],
                data.y_train[idx],
                epochs=hp["epochs"],
                lr=hp["lr"],
                batch_size=hp["batch_size"],
                momentum=hp["momentum"],
                weight_decay=args.weight_decay,
                seed=seed * 1_000_003 + rnd * 1009 + int(c),
            )
            deltas.append(get_flat_params(model) - global_flat)
            weights.append(min(len(idx), cap))
            dev_loss.append(res["loss"])
        train_s = time.process_time() - t_train
        w = np.asarray(weights, dtype=np.float64)
        global_flat = (global_flat + (w[:, None] * np.stack(deltas)).sum(0) / w.sum()).astype(np.float32)
        set_flat_params(model, global_flat)
        t_eval = time.process_time()
        acc, loss = evaluate(model, data.x_test, data.y_test)
        eval_s = time.process_time() - t_eval
        if first_80 is None and acc >= 0.80:
            first_80 = rnd
        history.append(
            {"round": rnd, "acc": acc, "loss": loss, "train_s": train_s, "eval_s": eval_s,
             "client_loss": float(np.mean(dev_loss))}
        )
        line = (
            f"[{data.name} seed={seed}] round {rnd:3d}  acc={acc:.4f}  loss={loss:.4f}  "
            f"client_loss={np.mean(dev_loss):.4f}  train={train_s:.2f}s ({train_s / len(chosen):.3f}s/device)  "
            f"eval={eval_s:.2f}s"
        )
        if args.no_progress:
            print(line, flush=True)
        else:
            bar.write(line)
    return {
        "task": data.name,
        "seed": seed,
        "cap": cap,
        "mean_shard": float(sizes.mean()),
        "min_shard": int(sizes.min()),
        "max_shard": int(sizes.max()),
        "num_params": spec.num_params,
        "final_acc": history[-1]["acc"],
        "best_acc": max(h["acc"] for h in history),
        "first_round_80": first_80,
        "mean_round_s": float(np.mean([h["train_s"] + h["eval_s"] for h in history[1:]])) if args.rounds else 0.0,
        "history": history,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="fashion-mnist")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--hidden", type=str, help="comma-separated hidden sizes, e.g. 200 or 256,128")
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds (one run each)")
    p.add_argument("--cap", type=int, help="sample-count weight cap (default: 2x the mean shard size)")
    p.add_argument("--min-size", type=int, default=10, help="dirichlet_split min samples per client")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a pipeline device)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar; print per-round lines directly")
    p.add_argument("--out", type=Path, help="write the runs (config + per-round history) as JSON here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    probe = load_task(args.task, seed=args.seed[0])
    hp = dict(DEFAULT_TRAINING[probe.name])
    for key, val in (("epochs", args.epochs), ("lr", args.lr), ("batch_size", args.batch_size),
                     ("momentum", args.momentum)):
        if val is not None:
            hp[key] = val
    if args.hidden is not None:
        hp["hidden"] = tuple(int(h) for h in args.hidden.split(",") if h.strip())
    print(f"config: task={probe.name} clients={args.clients} per_round={args.per_round} alpha={args.alpha} "
          f"rounds={args.rounds} weight_decay={args.weight_decay} threads={args.threads} {hp}", flush=True)

    runs = [run(args, seed, hp) for seed in args.seed]
    print("\nseed  final_acc  best_acc  first_round>=80%  mean_round_s(train+eval, CPU)  cap")
    for r in runs:
        print(f"{r['seed']:4d}  {r['final_acc']:.4f}     {r['best_acc']:.4f}    {str(r['first_round_80']):>16}"
              f"  {r['mean_round_s']:.2f}  {r['cap']}")
    finals = [r["final_acc"] for r in runs]
    print(f"final acc: mean={np.mean(finals):.4f} min={np.min(finals):.4f} max={np.max(finals):.4f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.out.write_text(json.dumps({"config": cfg, "hyperparameters": hp, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
