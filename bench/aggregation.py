"""Benchmark of the aggregation rules (``aggregator.rules``) against Flower.

Every rule runs on ``n`` updates of ``d`` float32 parameters, for n in
{10, 50, 100} and d in {100_000, 1_000_000}.  Where Flower has the same rule
(``flwr.server.strategy.aggregate``: ``aggregate`` = FedAvg,
``aggregate_median``, ``aggregate_trimmed_avg``, ``aggregate_krum`` for Krum
and Multi-Krum, ``aggregate_bulyan``) it is timed in the same run on the same
data, and the speed-up ``flower_time / our_time`` is reported, with our rules
run both with the default worker threads and with one thread (Flower's code
is single-threaded numpy).

Method
------
* Data: ``f = max(1, n // 10)`` Byzantine rows (large random vectors) among
  honest rows ``c + N(0, 1)``, float32, seeded.  Ours get the ``(n, d)``
  array; Flower gets its native input ``[([row], num_examples), ...]``
  built from *views* of the same rows (no copy).
* Time: wall clock (``time.perf_counter``), the minimum over ``--repeats``
  runs, after one warm-up run that is also the memory run.  A case whose
  warm-up takes longer than ``--slow`` seconds is run only once and that
  single (traced) time is reported, marked ``*``.
* Memory: peak of ``tracemalloc`` during the warm-up run, i.e. the bytes
  allocated through Python's/numpy's allocators on top of the input (numpy
  reports its data buffers to tracemalloc); BLAS's internal work buffers and
  thread stacks are not included.
* Every Flower-comparable case also records ``max |ours - flower|``.

Usage::

    python bench/aggregation.py --out bench/results/aggregation.md
    python bench/aggregation.py --quick    # small sizes, a few seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator import rules  # noqa: E402
from aggregator.rules import get_num_threads, set_num_threads  # noqa: E402
from _machine import cpu_model  # bench/ is on sys.path when a bench script runs

try:
    import flwr
    from flwr.server.strategy import aggregate as flwr_agg
except ImportError:  # pragma: no cover - the bench extra installs it
    flwr = None
    flwr_agg = None

RULE_ORDER = [
    "fedavg",
    "norm_clip",
    "coordinate_median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "geometric_median",
    "bulyan",
    "centered_clipping",
    "fltrust",
    "flame",
    "dp_gaussian",
    "reputation_weighted",
]
FLOWER_NAMES = {
    "fedavg": "aggregate",
    "coordinate_median": "aggregate_median",
    "trimmed_mean": "aggregate_trimmed_avg(0.1)",
    "krum": "aggregate_krum(to_keep=0)",
    "multi_krum": "aggregate_krum(to_keep=n-f)",
    "bulyan": "aggregate_bulyan(aggregate_krum)",
}


@dataclass
class Measure:
    seconds: float
    runs: int
    peak_mb: float
    traced_only: bool


@dataclass
class Row:
    n: int
    d: int
    f: int
    rule: str
    ours: Measure
    ours_1t: Measure | None = None
    flower: Measure | None = None
    max_abs_diff: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        return None if self.flower is None else self.flower.seconds / self.ours.seconds

    @property
    def speedup_1t(self) -> float | None:
        if self.flower is None or self.ours_1t is None:
            return None
        return self.flower.seconds / self.ours_1t.seconds


def make_data(n: int, d: int, f: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x += rng.standard_normal(d, dtype=np.float32)  # shared component
    x[:f] *= 20.0
    counts = rng.integers(50, 500, size=n)
    return x, counts


def measure(fn: Callable[[], Any], repeats: int, slow: float) -> tuple[Measure, Any]:
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out = fn()
        t_traced = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if t_traced > slow or repeats <= 0:
        return Measure(t_traced, 1, peak / 2**20, True), out
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return Measure(best, repeats, peak / 2**20, False), out


def our_calls(x: np.ndarray, counts: np.ndarray, f: int) -> dict[str, Callable[[], rules.AggregateResult]]:
    n, d = x.shape
    server = x[f:].mean(axis=0, dtype=np.float64)  # a stand-in for FLTrust's root-data update
    trust = np.linspace(0.1, 1.0, n)
    return {
        "fedavg": lambda: rules.fedavg(x, counts),
        "norm_clip": lambda: rules.norm_clip(x),
        "coordinate_median": lambda: rules.coordinate_median(x),
        "trimmed_mean": lambda: rules.trimmed_mean(x, 0.1),
        "krum": lambda: rules.krum(x, f),
        # Flower's Multi-Krum weights by num_examples: same weights here
        "multi_krum": lambda: rules.multi_krum(x, f, n - f, weights=counts),
        "geometric_median": lambda: rules.geometric_median(x),
        "bulyan": lambda: rules.bulyan(x, f),
        "centered_clipping": lambda: rules.centered_clipping(x, np.zeros(d), tau=10.0, iters=1),
        "fltrust": lambda: rules.fltrust(x, server),
        "flame": lambda: rules.flame(x, 0.001, 0),
        "dp_gaussian": lambda: rules.dp_gaussian(x, 1.0, 1.0, 0),
        "reputation_weighted": lambda: rules.reputation_weighted(x, trust),
    }


def flower_calls(x: np.ndarray, counts: np.ndarray, f: int) -> dict[str, Callable[[], np.ndarray]]:
    if flwr_agg is None:
        return {}
    n = x.shape[0]
    results = [([x[i]], int(counts[i])) for i in range(n)]  # views, no copies
    return {
        "fedavg": lambda: flwr_agg.aggregate(results)[0],
        "coordinate_median": lambda: flwr_agg.aggregate_median(results)[0],
        "trimmed_mean": lambda: flwr_agg.aggregate_trimmed_avg(results, 0.1)[0],
        "krum": lambda: flwr_agg.aggregate_krum(results, f, 0)[0],
        "multi_krum": lambda: flwr_agg.aggregate_krum(results, f, n - f)[0],
        # aggregate_bulyan pops from the list it is given: hand it a copy
        "bulyan": lambda: flwr_agg.aggregate_bulyan(
            list(results), num_malicious=f, aggregation_rule=flwr_agg.aggregate_krum, to_keep=0
        )[0],
    }


def machine_info() -> dict[str, Any]:
    cpu = cpu_model()
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    blas = "unknown"
    try:
        from threadpoolctl import threadpool_info

        blas = ", ".join(
            f"{i['internal_api']} {i.get('version')} ({i['num_threads']} threads)"
            for i in threadpool_info()
            if i["user_api"] == "blas"
        )
    except ImportError:
        pass
    import sklearn

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "flwr": getattr(flwr, "__version__", "not installed"),
        "scikit-learn": sklearn.__version__,
        "blas": blas,
        "threads": get_num_threads(),
        "loadavg_start": os.getloadavg(),
    }


def fmt_s(m: Measure | None) -> str:
    if m is None:
        return "–"
    s = f"{m.seconds:.3f}" if m.seconds < 10 else f"{m.seconds:.1f}"
    return s + ("*" if m.traced_only else "")


def fmt_x(v: float | None) -> str:
    return "–" if v is None else (f"{v:.1f}×" if v < 100 else f"{v:.0f}×")


def fmt_mb(m: Measure | None) -> str:
    return "–" if m is None else f"{m.peak_mb:.1f}"


def targets(rows: list[Row], n: int, d: int) -> list[tuple[str, str, float | None, bool | None]]:
    by = {r.rule: r for r in rows if r.n == n and r.d == d}
    out = []
    for rule, need in [("krum", 10.0), ("multi_krum", 10.0), ("bulyan", 10.0), ("coordinate_median", 1.0),
                       ("trimmed_mean", 1.0)]:
        r = by.get(rule)
        sp = r.speedup if r else None
        sp1 = r.speedup_1t if r else None
        out.append((rule, f">= {need:g}×", sp, None if sp is None else sp >= need))
        out.append((rule + " (1 thread)", f">= {need:g}×", sp1, None if sp1 is None else sp1 >= need))
    return out


def write_markdown(path: Path, rows: list[Row], info: dict[str, Any], args: argparse.Namespace,
                   command: str, wall: float) -> None:
    sizes = sorted({(r.n, r.d) for r in rows}, key=lambda t: (t[1], t[0]))
    lines = [
        "# Aggregation rules vs Flower",
        "",
        f"Produced by `{command}` on {info['date']} in {wall / 60:.1f} min.",
        "",
        "## Machine",
        "",
        f"* CPU: {info['cpu']}, nproc = {info['nproc']}, memory {info['memory']}",
        f"* Python {info['python']}, numpy {info['numpy']}, flwr {info['flwr']}, "
        f"scikit-learn {info['scikit-learn']}; BLAS: {info['blas']}",
        f"* our worker threads: {info['threads']} (and 1 for the `ours 1T` column); "
        f"load average at start {tuple(round(v, 2) for v in info['loadavg_start'])}, "
        f"at end {tuple(round(v, 2) for v in info['loadavg_end'])}",
        "",
        "## Method",
        "",
        "* Updates: `n` rows of `d` float32 parameters, `f = max(1, n // 10)` of them Byzantine (20× larger), "
        "honest rows share a common component; seeded.",
        "* Ours (`aggregator.rules`) get the `(n, d)` array; Flower (`flwr.server.strategy.aggregate`) gets its native "
        "`[([row], num_examples), ...]` built from views of the same rows (no copy) and stacks them itself, as in its "
        "strategies.",
        "* Parameters: trimmed mean `beta = 0.1`; Krum/Bulyan `f`; Multi-Krum `m = n - f` weighted by `num_examples` "
        "(Flower's semantics); FedAvg weighted by `num_examples` (no cap); FLAME `lambda = 0.001`; "
        "DP `S = 1, sigma = 1`; "
        "centered clipping `tau = 10`, 1 iteration.",
        f"* Time: wall clock, minimum of {args.repeats} runs after a warm-up run. `*` = the warm-up took more than "
        f"{args.slow:g} s, so that single run (under tracemalloc) is reported (repeats = 1 for slow cases).",
        "* Memory: `tracemalloc` peak during the warm-up run = bytes allocated by Python/numpy on top of the input "
        "(numpy reports its buffers to tracemalloc); BLAS work buffers and thread stacks are not counted. The input "
        "itself is `n * d * 4` bytes (400 MB at n = 100, d = 1M).",
        "* Speed-up = Flower time / our time (`×`); `1T` = our rules with one worker thread "
        "(`aggregator.rules.set_num_threads(1)`), the like-for-like comparison with Flower's single-threaded numpy.",
        "* `max |Δ|` = largest coordinate difference between our and Flower's output on the same input.",
        "",
    ]
    for n, d in sizes:
        sub = [r for r in rows if r.n == n and r.d == d]
        f = sub[0].f
        load = sub[0].extra.get("load1")
        lines += [
            f"## n = {n}, d = {d:,} (f = {f})",
            "",
        ]
        if load:
            lines += [f"1-minute load average before / after this size: {load[0]} / {load[1]} (2 cores).", ""]
        lines += [
            "| rule | ours (s) | ours 1T (s) | Flower (s) | speed-up | speed-up 1T | ours peak MB | Flower peak MB "
            "| max \\|Δ\\| |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(sub, key=lambda r: RULE_ORDER.index(r.rule)):
            diff = "–" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}"
            lines.append(
                f"| {r.rule} | {fmt_s(r.ours)} | {fmt_s(r.ours_1t)} | {fmt_s(r.flower)} | {fmt_x(r.speedup)} | "
                f"{fmt_x(r.speedup_1t)} | {fmt_mb(r.ours)} | {fmt_mb(r.flower)} | {diff} |"
            )
        lines.append("")
    lines += ["## Targets (n = 100, d = 1,000,000)", ""]
    if (100, 1_000_000) in sizes:
        lines += ["| rule | target | speed-up | met |", "|---|---|---:|---|"]
        for rule, need, sp, ok in targets(rows, 100, 1_000_000):
            lines.append(f"| {rule} | {need} | {fmt_x(sp)} | {'–' if ok is None else ('yes' if ok else '**no**')} |")
    else:
        lines.append("Not measured in this run (the targets are defined at n = 100, d = 1,000,000).")
    lines += [
        "",
        "Flower function per rule: " + "; ".join(f"{k} ↔ `{v}`" for k, v in FLOWER_NAMES.items()) + ". "
        "Flower has no norm clipping, geometric median, centered clipping, FLTrust, FLAME, DP or reputation "
        "aggregation function in `flwr.server.strategy.aggregate`.",
        "",
    ]
    if args.notes:
        lines += ["## Notes", "", Path(args.notes).read_text().strip(), ""]
    if getattr(args, "render", None) is not None:
        lines += [f"_Rendered again from `{args.render}` with `--render` (same measurements)._", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def write_plot(path: Path, rows: list[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comparable = [r for r in RULE_ORDER if r in FLOWER_NAMES]
    sizes = sorted({(r.n, r.d) for r in rows}, key=lambda t: (t[1], t[0]))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(sizes)
    for k, (n, d) in enumerate(sizes):
        by = {r.rule: r for r in rows if r.n == n and r.d == d}
        ys = [by[r].speedup if r in by and by[r].speedup else np.nan for r in comparable]
        ax.bar(np.arange(len(comparable)) + k * width, ys, width, label=f"n={n}, d={d:,}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(10.0, color="r", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(comparable)) + 0.4 - width / 2, comparable)
    ax.set_ylabel("speed-up vs Flower (Flower time / ours)")
    ax.set_title("aggregator.rules vs flwr.server.strategy.aggregate (float32)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _measure_from(d: dict | None) -> Measure | None:
    return None if d is None else Measure(**d)


def render_from_json(args: argparse.Namespace) -> int:
    data = json.loads(args.render.read_text())
    rows = []
    for r in data["rows"]:
        rows.append(Row(r["n"], r["d"], r["f"], r["rule"], _measure_from(r["ours"]), _measure_from(r["ours_1t"]),
                        _measure_from(r["flower"]), r["max_abs_diff"], r.get("extra", {})))
    saved = data.get("args", {})
    args.repeats = saved.get("repeats", args.repeats)
    args.slow = saved.get("slow", args.slow)
    write_markdown(args.out, rows, data["machine"], args, data["command"], data["wall_seconds"])
    if args.plot is None or str(args.plot) != "none":
        write_plot(args.plot or args.out.with_suffix(".png"), rows)
    print(args.out.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="n in {10, 20}, d = 20_000: a smoke run")
    p.add_argument("--out", type=Path, default=Path("bench/results/aggregation.md"))
    p.add_argument("--json", type=Path, default=None, help="default: --out with .json")
    p.add_argument("--plot", type=Path, default=None, help="default: --out with .png; 'none' to skip")
    p.add_argument("--n", type=int, nargs="+", default=None)
    p.add_argument("--d", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slow", type=float, default=5.0, help="seconds: slower warm-ups are not repeated")
    p.add_argument("--rules", nargs="+", default=RULE_ORDER, choices=RULE_ORDER)
    p.add_argument("--no-flower", action="store_true")
    p.add_argument("--no-single-thread", action="store_true", help="skip the 1-thread run of our rules")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--notes", type=Path, default=None, help="markdown appended as a Notes section")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="do not run: re-render --out (and the plot) from a previous run's JSON")
    args = p.parse_args(argv)
    if args.render is not None:
        return render_from_json(args)

    ns = args.n or ([10, 20] if args.quick else [10, 50, 100])
    ds = args.d or ([20_000] if args.quick else [100_000, 1_000_000])
    use_flower = flwr_agg is not None and not args.no_flower
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    info = machine_info()
    info["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    default_threads = get_num_threads()

    cases = [(n, d) for d in ds for n in ns]
    per_case = len(args.rules) * (1 if args.no_single_thread else 2) + (
        len([r for r in args.rules if r in FLOWER_NAMES]) if use_flower else 0
    )
    bar = tqdm(total=len(cases) * per_case, unit="run", desc="aggregation bench")
    rows: list[Row] = []
    t_start = time.perf_counter()
    for n, d in cases:
        f = max(1, n // 10)
        x, counts = make_data(n, d, f, args.seed)
        ours = our_calls(x, counts, f)
        theirs = flower_calls(x, counts, f) if use_flower else {}
        ours["flame"]()  # import scikit-learn and start the thread pool outside the timings
        load_before = os.getloadavg()[0]
        first = len(rows)
        for rule in args.rules:
            bar.set_postfix_str(f"n={n} d={d} {rule} ours")
            set_num_threads(default_threads)
            m, res = measure(ours[rule], args.repeats, args.slow)
            bar.update()
            row = Row(n, d, f, rule, m, extra={"selected": int(res.selected.size)})
            if not args.no_single_thread:
                bar.set_postfix_str(f"n={n} d={d} {rule} ours 1T")
                set_num_threads(1)
                row.ours_1t, _ = measure(ours[rule], args.repeats, args.slow)
                set_num_threads(default_threads)
                bar.update()
            if rule in theirs:
                bar.set_postfix_str(f"n={n} d={d} {rule} flower")
                row.flower, ref = measure(theirs[rule], args.repeats, args.slow)
                row.max_abs_diff = float(np.max(np.abs(res.vector - np.asarray(ref, dtype=np.float64))))
                bar.update()
            rows.append(row)
        load_after = os.getloadavg()[0]
        for r in rows[first:]:
            r.extra["load1"] = [round(load_before, 2), round(load_after, 2)]
        del x, ours, theirs
        gc.collect()
    bar.close()
    set_num_threads(None)
    wall = time.perf_counter() - t_start
    info["loadavg_end"] = os.getloadavg()

    write_markdown(args.out, rows, info, args, command, wall)
    json_path = args.json or args.out.with_suffix(".json")
    json_path.write_text(
        json.dumps(
            {
                "command": command,
                "machine": info,
                "wall_seconds": wall,
                "args": {"repeats": args.repeats, "slow": args.slow},
                "rows": [
                    {**asdict(r), "speedup": r.speedup, "speedup_1t": r.speedup_1t} for r in rows
                ],
            },
            indent=1,
        )
    )
    if args.plot is None or str(args.plot) != "none":
        write_plot(args.plot or args.out.with_suffix(".png"), rows)
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
