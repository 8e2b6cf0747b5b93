"""``fedguard demo``: the embedded stack for R rounds, watched from the outside through its topics."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer
from tqdm import tqdm

from fedguard import records
from fedguard.settings import Settings
from fedguard.topicio import consumer_from_beginning
from fedguard.stack import EmbeddedStack


@dataclass
class RoundLine:
    round: int
    version: int
    members: int
    accepted: int
    rejected: int
    accuracy: float
    loss: float
    seconds: float


@dataclass
class Watcher:
    """Follows fl.models, fl.windows and fl.updates.rejected from their beginning."""

    settings: Settings
    since: float
    consumer: KafkaConsumer = field(init=False)
    models: dict[int, dict[str, Any]] = field(default_factory=dict)
    windows: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: Counter = field(default_factory=Counter)
    rejected_total: int = 0

    def __post_init__(self) -> None:
        t = self.settings.topics
        self.consumer = consumer_from_beginning(self.settings, (t.models, t.windows, t.rejected), "fedguard-demo")

    def poll(self, timeout_ms: int = 500) -> None:
        t = self.settings.topics
        for tp, messages in self.consumer.poll(timeout_ms=timeout_ms).items():
            for m in messages:
                value = records.loads(m.value)
                if tp.topic == t.models and value.get("created_at", 0) >= self.since:
                    self.models[value["version"]] = value
                elif tp.topic == t.windows and value.get("closed_at", 0) >= self.since:
                    self.windows[value["window_id"]] = value
                elif tp.topic == t.rejected and value.get("rejected_at", 0) >= self.since:
                    self.rejected[value["reason"]] += 1
                    self.rejected_total += 1

    def close(self) -> None:
        self.consumer.close()


def plot_accuracy(lines: list[RoundLine], initial_accuracy: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [0] + [line.round for line in lines]
    ys = [initial_accuracy] + [line.accuracy for line in lines]
    ax.plot(xs, ys, marker="o", markersize=3)
    ax.axhline(0.8, color="grey", linestyle="--", linewidth=0.8, label="80%")
    ax.set_xlabel("round (global model version)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(settings: Settings, rounds: int, plot: str | Path, fresh: bool = True,
             round_timeout_s: float = 180.0) -> int:
    if fresh and settings.models_dir.exists():
        shutil.rmtree(settings.models_dir)  # the demo's own model versions; keys and logs are kept
    started = time.time()
    stack = EmbeddedStack(settings, own_broker=not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
                          own_redis=not os.environ.get("REDIS_URL"))
    print(f"fedguard demo: {settings.task}, {settings.num_devices} devices, {settings.devices_per_round} per round, "
          f"alpha {settings.dirichlet_alpha}, {rounds} rounds, rule {settings.rule}; logs in {stack.log_dir}")
    lines: list[RoundLine] = []
    with stack:
        watcher = Watcher(settings, since=started - 1)
        try:
            lines, initial = _follow(stack, watcher, rounds, round_timeout_s)
        finally:
            watcher.close()
    elapsed = time.time() - started
    if not lines:
        print("demo: no round completed", file=sys.stderr)
        return 1
    plot = Path(plot)
    plot_accuracy(lines, initial["metrics"]["accuracy"], plot,
                  f"fedguard demo: {initial.get('task', settings.task)}, {settings.rule}")
    summary = {
        "task": initial.get("task", settings.task), "rounds": len(lines), "seconds": round(elapsed, 1),
        "final_accuracy": lines[-1].accuracy, "best_accuracy": max(line.accuracy for line in lines),
        "first_round_at_80": next((line.round for line in lines if line.accuracy >= 0.8), None),
        "updates_accepted": sum(line.accepted for line in lines),
        "rejected_by_reason": dict(watcher.rejected),
        "settings": {"devices": settings.num_devices, "per_round": settings.devices_per_round,
                     "alpha": settings.dirichlet_alpha, "rule": settings.rule, "seed": settings.seed},
        "rounds_detail": [asdict(line) for line in lines],
    }
    plot.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"\n{len(lines)} rounds in {elapsed:.0f}s: final accuracy {summary['final_accuracy']:.4f}, "
          f"best {summary['best_accuracy']:.4f}, first >= 80% at round {summary['first_round_at_80']}")
    print(f"updates aggregated {summary['updates_accepted']}, rejected {watcher.rejected_total} "
          f"{dict(watcher.rejected) if watcher.rejected else ''}")
    print(f"plot: {plot}  summary: {plot.with_suffix('.json')}")
    return 0 if len(lines) == rounds else 1


def _follow(stack: EmbeddedStack, watcher: Watcher, rounds: int,
            round_timeout_s: float) -> tuple[list[RoundLine], dict[str, Any]]:
    lines: list[RoundLine] = []
    deadline = time.monotonic() + round_timeout_s
    while 0 not in watcher.models:
        _check(stack, deadline, "the initial model")
        watcher.poll()
    initial = watcher.models[0]
    last_time, rejected_before = time.monotonic(), 0
    bar = tqdm(total=rounds, desc="rounds", unit="round", dynamic_ncols=True)
    try:
        while len(lines) < rounds:
            version = len(lines) + 1
            deadline = last_time + round_timeout_s
            while version not in watcher.models:
                _check(stack, deadline, f"version {version}")
                watcher.poll()
            meta = watcher.models[version]
            now = time.monotonic()
            line = RoundLine(round=version, version=version, members=meta["members"], accepted=meta["accepted"],
                             rejected=watcher.rejected_total - rejected_before,
                             accuracy=meta["metrics"]["accuracy"], loss=meta["metrics"]["loss"],
                             seconds=round(now - last_time, 2))
            rejected_before, last_time = watcher.rejected_total, now
            lines.append(line)
            bar.update(1)
            bar.set_postfix(acc=f"{line.accuracy:.3f}")
            tqdm.write(f"round {line.round:>3}  v{line.version:<4} window {line.members:>3}  accepted "
                       f"{line.accepted:>3}  rejected {line.rejected:>3}  accuracy {line.accuracy:.4f}  "
                       f"loss {line.loss:.4f}  ({line.seconds:.1f}s)")
    finally:
        bar.close()
    return lines, initial


def _check(stack: EmbeddedStack, deadline: float, waiting_for: str) -> None:
    dead = stack.check_alive()
    if dead:
        raise RuntimeError(f"{', '.join(dead)} exited while waiting for {waiting_for}; see {stack.log_dir}")
    if time.monotonic() > deadline:
        raise TimeoutError(f"timed out waiting for {waiting_for}; see {stack.log_dir}")
