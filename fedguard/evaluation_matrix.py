"""``fedguard eval``: the attack x defence matrix, in process (issue 10, items 1 and 3), or ``--live`` through the
embedded pipeline (item 2, :mod:`fedguard.live_eval`).

Every cell (rule x detection x attack x fraction x seed) is one :func:`fedguard.simulation.simulate` run, i.e. the
live pipeline's own data split, local training, attacks, validation, detectors, reputation and rules, without Kafka.
Cells run on a small process pool (one torch thread per worker) behind one tqdm bar (rounds over every pending
cell, with tqdm's ETA). Each finished cell is written atomically to ``OUT/cells/<cell-key>.json`` as soon as it
finishes; a rerun with the same settings skips every cell whose file exists (the key holds a digest of the cell's
whole :class:`~fedguard.simulation.SimulationConfig`, so a changed setting never reuses a stale cell).

Then ``OUT/results.json`` (config + cells), ``OUT/results.md`` (mean and standard deviation over seeds), heat maps
``OUT/heatmap_<metric>_<detection>_f<fraction>.png`` (rule x attack) and curves ``OUT/curves/<group>.png`` (main
and backdoor accuracy per round, one line per seed). The attack ``none`` is the clean baseline: it runs once per
(rule, detection, seed), recorded with fraction 0. See docs/evaluation.md.

The pool (:func:`run_many`, :func:`calibrate`) is shared with the benchmarks (``bench/_simruns.py``).

This module is in the composition layer (it builds on :mod:`fedguard.simulation`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

# the simulation (torch, the services) is imported when a run starts: `fedguard --help` stays fast
if TYPE_CHECKING:
    from fedguard.simulation import SimulationConfig

__all__ = ["CLEAN", "add_eval_parser", "calibrate", "cell_key", "cmd_eval", "run_many", "run_matrix",
           "write_reports"]

#: the attack name of the clean baseline (no compromised device)
CLEAN = "none"
#: the per-round fields a cell keeps (the issue's shape, plus what explains a verdict or a carried-over round)
ROUND_FIELDS = ("round", "main_accuracy", "backdoor_accuracy", "malicious", "honest", "flagged_malicious",
                "flagged_honest", "rejected_malicious", "rejected_honest", "refused_malicious", "refused_honest",
                "quarantined_malicious", "quarantined_honest", "admitted", "skipped", "audit", "served",
                "attributed_malicious", "attributed_honest", "suspected_malicious", "suspected_honest",
                "candidate_backdoor_accuracy", "crafted", "flagged_crafted", "rejected_crafted")
#: (key in a cell, label) of the summary metrics, mean and std over seeds
METRICS = (("final_main_accuracy", "final main acc."), ("max_backdoor_accuracy", "max backdoor acc."),
           ("final_backdoor_accuracy", "final backdoor acc."), ("tp", "detection TP"),
           ("tp_crafted", "TP, crafted only"), ("fp", "detection FP"),
           ("carried_over", "rounds carried over"))
#: the heat maps: (metric, file name part, colour map, title)
HEATMAPS = (("final_main_accuracy", "main", "viridis", "final main accuracy"),
            ("max_backdoor_accuracy", "backdoor", "magma_r", "max backdoor accuracy"),
            ("tp", "tp", "viridis", "detection true-positive rate"),
            ("fp", "fp", "magma_r", "detection false-positive rate"))


# -- the process pool (shared with bench/) ----------------------------------------------------------------------

_progress_queue: Any = None


def _init(q: Any) -> None:
    global _progress_queue
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _progress_queue = q


def _run(index: int, config: SimulationConfig) -> tuple[int, dict[str, Any]]:
    from fedguard.simulation import simulate

    q = _progress_queue
    result = simulate(config, progress=(lambda _record: q.put(1)) if q is not None else None)
    return index, result


def default_workers(requested: int = 2) -> int:
    """``min(requested, cpu count)``, at least 1."""
    return max(1, min(int(requested), os.cpu_count() or 1))


def calibrate(config: SimulationConfig, rounds: int = 3) -> tuple[float, float]:
    """(set-up seconds, seconds per round) of ``config`` in this process (one torch thread): a 0-round run (data,
    model, evaluation set: the set-up), then a ``rounds``-round run; per round = (its time - set-up) / rounds.
    A warm-up run first, so that one-off process costs (imports, the data set's parsing) count in neither."""
    import torch

    from fedguard.simulation import SimulationConfig, simulate

    torch.set_num_threads(1)
    simulate(SimulationConfig(**{**config.__dict__, "rounds": 0}))  # warm-up
    t = time.perf_counter()
    simulate(SimulationConfig(**{**config.__dict__, "rounds": 0}))
    setup = time.perf_counter() - t
    t = time.perf_counter()
    simulate(SimulationConfig(**{**config.__dict__, "rounds": rounds}))
    return setup, max((time.perf_counter() - t - setup) / rounds, 1e-3)


def run_many(configs: list[SimulationConfig], workers: int = 2, desc: str = "rounds",
             on_result: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Every config's result, in the order given; longest runs start first. One tqdm bar counts rounds over every
    run (ETA: tqdm's, from the rate so far). ``on_result(index, result)`` is called in this process as each run
    finishes (e.g. to save it). ``workers <= 1`` runs here, one after the other; otherwise a spawn pool of
    ``workers`` processes with one torch thread each."""
    from tqdm import tqdm

    from fedguard.simulation import simulate

    total = sum(c.rounds for c in configs)
    order = sorted(range(len(configs)), key=lambda i: -configs[i].rounds)
    results: list[dict[str, Any] | None] = [None] * len(configs)
    bar = tqdm(total=total, desc=desc, unit="round", smoothing=0.05, dynamic_ncols=True)

    def done(i: int, res: dict[str, Any]) -> None:
        results[i] = res
        if on_result is not None:
            on_result(i, res)

    if workers <= 1 or len(configs) <= 1:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i in order:
                done(i, simulate(configs[i], progress=lambda _r: bar.update(1)))
        finally:
            torch.set_num_threads(before)
            bar.close()
        return results  # type: ignore[return-value]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        q = manager.Queue()
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init, initargs=(q,)) as pool:
            futures = [pool.submit(_run, i, configs[i]) for i in order]
            pending = set(futures)
            while pending:
                try:
                    bar.update(q.get(timeout=0.5))
                    while True:
                        bar.update(q.get_nowait())
                except queue.Empty:
                    pass
                for f in [f for f in pending if f.done()]:
                    pending.discard(f)
                    done(*f.result())
            while True:  # the last rounds' ticks
                try:
                    bar.update(q.get_nowait())
                except queue.Empty:
                    break
    bar.close()
    return results  # type: ignore[return-value]


# -- the matrix -----------------------------------------------------------------------------------------------

def _params_for(rule: str, rule_params: dict[str, Any]) -> dict[str, Any]:
    """``rule_params`` maps a rule to its parameters (``{"krum": {"f": 2}}``)."""
    value = rule_params.get(rule, {})
    if not isinstance(value, dict):
        raise ValueError(f"rule_params[{rule!r}] must be a JSON object, got {value!r}")
    return value


def cell_key(config: SimulationConfig) -> str:
    """``<rule>__<detection>__<attack>__f<fraction>__s<seed>__<digest>``; the digest covers the whole config (the
    audit's fields only when the audit is on, so the cells run before it existed keep their keys)."""
    fields = asdict(config)
    if fields.get("audit") == "none":
        fields = {k: v for k, v in fields.items() if not k.startswith("audit")}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]
    fraction = f"{config.fraction:g}" if config.attack else "0"
    return f"{config.rule}__{config.detection}__{config.attack or CLEAN}__f{fraction}__s{config.seed}__{digest}"


def plan(rules: Sequence[str], attacks: Sequence[str], fractions: Sequence[float], seeds: Sequence[int], rounds: int,
         task: str, detection: Sequence[str] = ("ensemble",), rule_params: dict[str, Any] | None = None,
         attack_start: int = 5, **overrides: Any) -> list[SimulationConfig]:
    """Every cell's config, in matrix order (rule, detection, attack, fraction, seed); ``none`` runs once per
    (rule, detection, seed). Raises ``ValueError`` (or the rule's ``RuleConfigError``) on a bad name or value."""
    from fedguard.simulation import DETECTION_MODES, SimulationConfig

    rule_params = rule_params or {}
    configs = []
    for rule in rules:
        params = json.dumps(_params_for(rule, rule_params), sort_keys=True) if _params_for(rule, rule_params) else ""
        for det in detection:
            if det not in DETECTION_MODES:
                raise ValueError(f"unknown detection {det!r} (one of {', '.join(DETECTION_MODES)})")
            for attack in attacks:
                for fraction in (fractions if attack != CLEAN else [0.0]):
                    for seed in seeds:
                        kw = dict(task=task, rounds=int(rounds), rule=rule, rule_params=params, detection=det,
                                  attack=None if attack == CLEAN else attack, seed=int(seed),
                                  attack_start=int(attack_start), **overrides)
                        if attack != CLEAN:
                            kw["fraction"] = float(fraction)
                        configs.append(SimulationConfig(**kw))
    return configs


def cell_record(config: SimulationConfig, result: dict[str, Any], key: str) -> dict[str, Any]:
    """The issue's cell shape (plus detection totals, backdoor accuracy at the end, set-up facts)."""
    det = result["detection"]
    return {
        "key": key, "rule": config.rule, "rule_params": json.loads(config.rule_params or "{}"),
        "detection": config.detection, "audit": config.audit, "attack": config.attack or CLEAN,
        "fraction": float(config.fraction) if config.attack else 0.0, "seed": config.seed,
        "rounds": [{k: r.get(k) for k in ROUND_FIELDS} for r in result["rounds"]],
        "final_main_accuracy": result["final_main_accuracy"],
        "max_backdoor_accuracy": result["max_backdoor_accuracy"],
        "final_backdoor_accuracy": result["final_backdoor_accuracy"],
        "initial": result["initial"], "compromised": result["compromised"],
        "detection_rates": {k: det.get(k) for k in ("tp", "fp", "tp_reject", "fp_reject", "malicious", "honest",
                                                    "flagged_malicious", "flagged_honest", "tp_crafted", "crafted",
                                                    "flagged_crafted")},
        "simulation": result["config"], "seconds": result["seconds"],
        "mode": "live" if result.get("live") else "in-process",
    }


def _write_json(path: Path, data: Any) -> None:
    """Atomically: a temporary file in the same directory, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run_matrix(rules: Sequence[str], attacks: Sequence[str], fractions: Sequence[float], seeds: Sequence[int],
               rounds: int, task: str, out_dir: str | Path, detection: Sequence[str] = ("ensemble",),
               rule_params: dict[str, Any] | None = None, attack_start: int = 5, workers: int = 2,
               overrides: dict[str, Any] | None = None, plots: bool = True, live: bool = False) -> dict[str, Any]:
    """Run every cell not yet in ``out_dir/cells``, then write the reports; returns ``results.json``'s content.
    ``overrides``: further :class:`SimulationConfig` fields for every cell (``num_devices``, ``per_round``, ...).
    ``live``: each cell runs through the real embedded pipeline instead (:mod:`fedguard.live_eval`), one after
    the other; its key ends in ``__live``, so live and in-process cells of the same config can share ``out_dir``."""
    out = Path(out_dir)
    overrides = dict(overrides or {})
    configs = plan(rules, attacks, fractions, seeds, rounds, task, detection, rule_params, attack_start, **overrides)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    keys = [cell_key(c) + ("__live" if live else "") for c in configs]
    todo = [i for i, k in enumerate(keys) if not (cells_dir / f"{k}.json").exists()]
    if len(todo) < len(configs):
        print(f"fedguard eval: {len(configs) - len(todo)} of {len(configs)} cells already in {cells_dir}, "
              f"{len(todo)} to run", file=sys.stderr)

    def save(j: int, result: dict[str, Any]) -> None:
        i = todo[j]
        _write_json(cells_dir / f"{keys[i]}.json", cell_record(configs[i], result, keys[i]))

    if todo and live:
        run_live([configs[i] for i in todo], out / "live", [keys[i] for i in todo], on_result=save)
    elif todo:
        run_many([configs[i] for i in todo], workers=min(default_workers(workers), len(todo)), desc="eval",
                 on_result=save)
    cells = [json.loads((cells_dir / f"{k}.json").read_text()) for k in keys]
    results = {
        "config": {"mode": "live" if live else "in-process", "rules": list(rules), "detection": list(detection),
                   "attacks": list(attacks),
                   "fractions": [float(f) for f in fractions], "seeds": [int(s) for s in seeds],
                   "rounds": int(rounds), "task": task, "attack_start": int(attack_start),
                   "rule_params": {r: _params_for(r, rule_params or {}) for r in rules}, "overrides": overrides,
                   "cells": len(cells), "written": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "cells": cells,
    }
    _write_json(out / "results.json", results)
    write_reports(results, out, plots=plots)
    return results


def run_live(configs: list[SimulationConfig], work_dir: Path, keys: list[str],
             on_result: Callable[[int, dict[str, Any]], None]) -> None:
    """Run ``configs`` through the embedded pipeline one after the other (each starts its own broker, Redis and
    services: two at once would share two cores between eight processes), behind one bar over every round. A
    finished cell's stack data (model store, Redis) is deleted; its logs stay in ``work_dir/<key>/logs``."""
    import shutil

    from tqdm import tqdm

    from fedguard.live_eval import run_live_cell

    with tqdm(total=sum(c.rounds for c in configs), desc="eval --live", unit="round", dynamic_ncols=True) as bar:
        for j, (config, key) in enumerate(zip(configs, keys)):
            bar.set_postfix_str(key.split("__")[0] + " / " + (config.attack or CLEAN))
            result = run_live_cell(config, work_dir / key, progress=lambda _r: bar.update(1))
            shutil.rmtree(work_dir / key / "data", ignore_errors=True)
            on_result(j, result)


# -- reports --------------------------------------------------------------------------------------------------

def _metric(cell: dict[str, Any], name: str) -> float | None:
    if name in ("tp", "fp", "tp_crafted"):
        return cell["detection_rates"].get(name)  # tp_crafted: missing from cells recorded before it existed
    if name == "carried_over":  # rounds whose parameters carried over (too few admitted updates, a precondition)
        return float(sum(r["skipped"] is not None for r in cell["rounds"]))
    return cell[name]


def _group_key(cell: dict[str, Any]) -> tuple[str, str, str, float]:
    return cell["rule"], cell["detection"], cell["attack"], cell["fraction"]


def summarize(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (rule, detection, attack, fraction): mean and std (sample; 0 for one seed) of each metric over
    the seeds that have a value (None when none has)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault(_group_key(c), []).append(c)
    rows = []
    for (rule, det, attack, fraction), members in groups.items():
        row: dict[str, Any] = {"rule": rule, "detection": det, "attack": attack, "fraction": fraction,
                               "seeds": [c["seed"] for c in members]}
        for name, _ in METRICS:
            values = [v for v in (_metric(c, name) for c in members) if v is not None]
            row[name] = ({"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1
                          else 0.0, "n": len(values)} if values else None)
        rows.append(row)
    return rows


def _fmt(stat: dict[str, Any] | None, percent: bool = True) -> str:
    if stat is None:
        return "–"
    if not percent:
        return f"{stat['mean']:.1f} ± {stat['std']:.1f}"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def results_markdown(results: dict[str, Any], rows: list[dict[str, Any]], images: list[str]) -> str:
    cfg = results["config"]
    lines = [
        "# fedguard eval", "",
        f"Task `{cfg['task']}`, {cfg['rounds']} rounds, attack from round {cfg['attack_start']}, seeds "
        f"{', '.join(map(str, cfg['seeds']))}; {cfg['cells']} cells (`results.json`). Values in %: mean ± standard "
        "deviation over seeds. Detection TP = malicious window members whose verdict is not accept / malicious "
        "members, FP = likewise for honest members, over the rounds from the attack's start (clean runs: every "
        "round). Rounds carried over: the rule got too few admitted updates or its precondition failed, so the "
        "parameters did not change (a count, not %). `none` is the clean baseline (fraction 0)."
        + (" Every cell ran through the real embedded pipeline (`--live`: broker, Redis, processors, aggregator, "
           "fleet; fedguard/live_eval.py)." if cfg.get("mode") == "live" else ""), "",
        "| rule | detection | attack | fraction | seeds | " + " | ".join(label for _, label in METRICS) + " |",
        "|---|---|---|---:|---:|" + "---:|" * len(METRICS),
    ]
    for r in rows:
        lines.append(f"| {r['rule']} | {r['detection']} | {r['attack']} | {r['fraction']:g} | {len(r['seeds'])} | "
                     + " | ".join(_fmt(r[name], name != "carried_over") for name, _ in METRICS) + " |")
    if cfg.get("overrides"):
        lines += ["", "Simulation settings: " + ", ".join(f"`{k}={v}`" for k, v in cfg["overrides"].items())]
    if images:
        lines += ["", "## Heat maps", ""] + [f"![{Path(p).stem}]({p})" for p in images]
    return "\n".join(lines) + "\n"


def _heatmaps(rows: list[dict[str, Any]], cfg: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by = {(r["rule"], r["detection"], r["attack"], r["fraction"]): r for r in rows}
    rules, attacks = cfg["rules"], cfg["attacks"]
    written = []
    for det in cfg["detection"]:
        for fraction in cfg["fractions"]:
            for metric, part, cmap, title in HEATMAPS:
                grid = np.full((len(rules), len(attacks)), np.nan)
                for i, rule in enumerate(rules):
                    for j, attack in enumerate(attacks):
                        row = by.get((rule, det, attack, 0.0 if attack == CLEAN else float(fraction)))
                        if row is not None and row[metric] is not None:
                            grid[i, j] = row[metric]["mean"]
                fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(attacks), 2.4 + 0.45 * len(rules)))
                im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
                ax.set_xticks(range(len(attacks)), attacks, rotation=40, ha="right")
                ax.set_yticks(range(len(rules)), rules)
                for i in range(len(rules)):
                    for j in range(len(attacks)):
                        if not math.isnan(grid[i, j]):
                            ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", fontsize=8,
                                    color="white" if (grid[i, j] < 0.5) == (cmap == "viridis") else "black")
                if metric in ("tp", "fp"):
                    ax.set_xlabel("(blank: no malicious / honest window member, e.g. the clean baseline's TP)",
                                  fontsize=7)
                ax.set_title(f"{title} (%), detection {det}, fraction {fraction:g}", fontsize=9)
                fig.colorbar(im, ax=ax, fraction=0.04)
                fig.tight_layout()
                name = f"heatmap_{part}_{det}_f{fraction:g}.png"
                fig.savefig(out / name, dpi=110)
                plt.close(fig)
                written.append(name)
    return written


def _curves(cells: list[dict[str, Any]], out: Path, attack_start: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault(_group_key(c), []).append(c)
    (out / "curves").mkdir(exist_ok=True)
    written = []
    for (rule, det, attack, fraction), members in groups.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for c in members:
            xs = [r["round"] for r in c["rounds"]]
            ax.plot(xs, [r["main_accuracy"] for r in c["rounds"]], color="tab:blue", alpha=0.8,
                    label=f"main, seed {c['seed']}")
            bd = [(r["round"], r["backdoor_accuracy"]) for r in c["rounds"] if r["backdoor_accuracy"] is not None]
            if bd:
                ax.plot(*zip(*bd), color="tab:red", alpha=0.8, linestyle="--", label=f"backdoor, seed {c['seed']}")
        if attack != CLEAN:
            ax.axvline(attack_start, color="grey", linewidth=0.8, linestyle=":", label="attack starts")
        ax.set_ylim(0, 1.02)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{rule}, detection {det}, {attack}" + (f" at {fraction:g}" if attack != CLEAN else ""),
                     fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        name = f"curves/{rule}__{det}__{attack}__f{fraction:g}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written


def write_reports(results: dict[str, Any], out: str | Path, plots: bool = True) -> dict[str, list[str]]:
    """``results.md``, the heat maps and the curves from ``results.json``'s content; the files written."""
    out = Path(out)
    rows = summarize(results["cells"])
    images = _heatmaps(rows, results["config"], out) if plots else []
    curves = _curves(results["cells"], out, results["config"]["attack_start"]) if plots else []
    (out / "results.md").write_text(results_markdown(results, rows, images))
    return {"heatmaps": images, "curves": curves}


# -- the command line -----------------------------------------------------------------------------------------

def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def add_eval_parser(subparsers: Any, common: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """The ``eval`` subcommand; ``common`` adds the shared settings flags (``--task``, ``--devices``, ...)."""
    p = subparsers.add_parser("eval", help="the attack x defence matrix, in process (or --live): results.json/.md, heat maps",
                              description="Every cell (rule x detection x attack x fraction x seed) runs the "
                              "pipeline's own code in process (fedguard.simulation), on a process pool, resumable "
                              "(finished cells in OUT/cells are not rerun). Outputs: docs/evaluation.md.")
    common(p)
    p.add_argument("--rules", help="comma-separated rules (default: --rule or the configured rule)")
    p.add_argument("--attacks", default=CLEAN, help="comma-separated attacks; 'none' is the clean baseline "
                   "(default: none)")
    p.add_argument("--fractions", default="0.2", help="comma-separated shares of compromised devices (default 0.2)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--detection", default="ensemble", help="comma-separated: ensemble, none (default ensemble)")
    p.add_argument("--attack-start", type=int, default=5, help="first attacked round (default 5)")
    p.add_argument("--audit", choices=("none", "neural_cleanse"), default="none",
                   help="the aggregator's model audit on every candidate version (aggregator/auditing.py; adds "
                   "~1.3 s per round on Fashion-MNIST); run twice into two --out directories to compare a defence "
                   "with and without it (default none)")
    p.add_argument("--out", default="eval-results", help="output directory (default eval-results)")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2, at most the CPU count)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("--live", action="store_true",
                   help="run the cells through the real embedded pipeline (its own broker, Redis and services per "
                   "cell, one cell at a time; ~3x slower than in process) instead of in process; live cells are "
                   "kept beside in-process ones (key suffix __live)")
    p.set_defaults(func=cmd_eval)
    return p


def _usage(message: str) -> int:
    print(f"fedguard eval: {message}", file=sys.stderr)
    return 2


def cmd_eval(args: argparse.Namespace) -> int:
    from aggregator.rules import RULES, RuleConfigError
    from fedguard.settings import from_env
    from fedguard.simulation import DETECTION_MODES
    from producers.attacks.registry import ATTACKS

    settings = from_env().with_overrides(**{k: getattr(args, k, None) for k in (
        "task", "num_devices", "devices_per_round", "dirichlet_alpha", "local_epochs", "local_lr",
        "local_batch_size", "rule")})
    rules = _split(args.rules) or [settings.rule]
    attacks = _split(args.attacks) or [CLEAN]
    detection = _split(args.detection) or ["ensemble"]
    for rule in rules:
        if rule not in RULES:
            return _usage(f"unknown rule {rule!r}; one of: {', '.join(RULES)}")
    for attack in attacks:
        if attack != CLEAN and attack not in ATTACKS:
            return _usage(f"unknown attack {attack!r}; one of: {', '.join(ATTACKS)}, or none (clean baseline)")
    for det in detection:
        if det not in DETECTION_MODES:
            return _usage(f"unknown detection {det!r}; one of: {', '.join(DETECTION_MODES)}")
    try:
        fractions = [float(f) for f in _split(args.fractions)]
        seeds = [int(s) for s in _split(args.seeds)]
    except ValueError as exc:
        return _usage(f"--fractions takes numbers and --seeds integers, comma-separated ({exc})")
    if not seeds or (any(a != CLEAN for a in attacks) and not fractions):
        return _usage("--seeds and --fractions need at least one value")
    if any(not 0 < f <= 1 for f in fractions):
        return _usage("every fraction must be in (0, 1], e.g. --fractions 0.1,0.2")
    if args.rounds < 1 or args.workers < 1:
        return _usage("--rounds and --workers must be >= 1")
    rule_params: dict[str, Any] = {}
    if getattr(args, "rule_params", None):
        try:
            given = json.loads(args.rule_params)
        except json.JSONDecodeError as exc:
            return _usage(f"--rule-params is not JSON ({exc}); e.g. '{{\"krum\": {{\"f\": 2}}}}'")
        if not isinstance(given, dict):
            return _usage("--rule-params must be a JSON object")
        # {"krum": {"f": 2}, ...} per rule; a flat object applies to every rule
        rule_params = given if given and set(given) <= set(RULES) else {r: given for r in rules}
    overrides = {"num_devices": settings.num_devices, "per_round": settings.devices_per_round,
                 "alpha": settings.dirichlet_alpha, "local_epochs": settings.local_epochs,
                 "local_lr": settings.local_lr, "local_batch_size": settings.local_batch_size}
    if getattr(args, "audit", "none") != "none":
        overrides["audit"] = args.audit
    try:
        plan(rules, attacks, fractions, seeds, args.rounds, settings.task, detection, rule_params, args.attack_start,
             **overrides)
    except (ValueError, RuleConfigError) as exc:
        return _usage(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    started = time.perf_counter()
    results = run_matrix(rules, attacks, fractions, seeds, args.rounds, settings.task, args.out, detection,
                         rule_params, args.attack_start, args.workers, overrides=overrides, plots=not args.no_plots,
                         live=args.live)
    print(f"{len(results['cells'])} cells in {time.perf_counter() - started:.0f} s: {Path(args.out) / 'results.md'}, "
          f"results.json, heat maps and curves/ in {args.out}")
    return 0
