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
from typing import Any, Callable

from kafka import KafkaConsumer
from tqdm import tqdm

from fedguard import records, registry
from fedguard.settings import Settings
from fedguard.topicio import consumer_from_beginning
from fedguard.stack import EmbeddedStack
from producers import campaign


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
    backdoor_accuracy: float | None = None  # max over the configured triggers (aggregator/evaluation.py)
    attackers: int = 0  # members of the window that the campaign's ledger names as malicious
    attackers_rejected: int = 0
    attackers_downweighted: int = 0
    honest_rejected: int = 0
    audit: str | None = None  # the model audit's verdict on the window's candidate (aggregator/auditing.py)
    served_from: int | None = None  # a flagged candidate is not served: the version these parameters came from
    audit_attackers: int = 0  # devices the audit quarantined with this version that the ledger names as malicious
    audit_honest: int = 0  # ... and the others (attributed, screened out of the window, or found by the look-back)
    attackers_screened: int = 0  # attackers of this window screened out against a remembered trigger


def audit_of(meta: dict[str, Any], bad_devices: set[str]) -> dict[str, Any]:
    """What the model audit did with one version (its metadata): verdict, where a flagged version's parameters
    came from, and the devices it quarantined (attributed, screened, found by the look-back), split by the ledger."""
    audit = meta.get("audit") or {}
    screened = set((audit.get("screened") or {}).get("screened") or [])
    found = set(audit.get("attributed") or []) | screened | set((audit.get("look_back") or {}).get("screened") or {})
    flagged = audit.get("verdict") == "flagged"
    return {"audit": audit.get("verdict"),
            "served_from": (meta.get("rule_info") or {}).get("params_from") if flagged else None,
            "audit_attackers": len(found & bad_devices), "audit_honest": len(found - bad_devices),
            "attackers_screened": len(screened & bad_devices)}


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

    def version_and_window(self, stack: EmbeddedStack, version: int,
                           deadline: float) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Poll until ``version``'s metadata and the window it was built from (if any) have arrived; raises as
        :func:`_check` does when a process dies or ``deadline`` (monotonic) passes."""
        while version not in self.models:
            _check(stack, deadline, "the initial model" if version == 0 else f"version {version}")
            self.poll()
        meta = self.models[version]
        while meta.get("window_id") and meta["window_id"] not in self.windows:
            _check(stack, deadline, f"window {meta['window_id']}")
            self.poll()
        return meta, self.windows.get(meta.get("window_id"))

    def close(self) -> None:
        self.consumer.close()


def plot_accuracy(lines: list[RoundLine], initial: dict[str, Any], path: Path, title: str,
                  attack_rounds: list[int] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [0] + [line.round for line in lines]
    ys = [initial["metrics"]["accuracy"]] + [line.accuracy for line in lines]
    ax.plot(xs, ys, marker="o", markersize=3, label="main-task accuracy")
    backdoor = [initial["metrics"].get("backdoor_accuracy")] + [line.backdoor_accuracy for line in lines]
    if any(b is not None for b in backdoor):
        ax.plot(xs, [float("nan") if b is None else b for b in backdoor], marker="x", markersize=3, color="tab:red",
                label="backdoor accuracy")
    for i, r in enumerate(sorted(attack_rounds or [])):
        ax.axvspan(r - 0.5, r + 0.5, color="tab:red", alpha=0.12, linewidth=0,
                   label="attackers in the window" if i == 0 else None)
    for i, r in enumerate(line.round for line in lines if line.audit == "flagged"):
        ax.axvline(r, color="black", linestyle=":", linewidth=1.2,
                   label="audit flagged the candidate (not served)" if i == 0 else None)
    ax.axhline(0.8, color="grey", linestyle="--", linewidth=0.8, label="80%")
    ax.set_xlabel("round (global model version)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class AttackPlan:
    """``fedguard demo --attack``: a campaign started once the stack is up (see producers/campaign.py)."""

    kind: str
    fraction: float
    start_round: int = 5
    rounds: int | None = None
    params: dict[str, Any] = field(default_factory=dict)


def run_demo(settings: Settings, rounds: int, plot: str | Path, fresh: bool = True,
             round_timeout_s: float = 180.0, attack: AttackPlan | None = None, monitor: bool = False) -> int:
    own_redis = not os.environ.get("REDIS_URL")
    if fresh and settings.models_dir.exists():
        shutil.rmtree(settings.models_dir)  # the demo's own model versions; keys and logs are kept
    if fresh and own_redis and (settings.data_dir / "redis").exists():
        # A fresh experiment: no reputation, quarantine, history or campaign carried over from an earlier run (the
        # embedded Redis persists to the data dir).
        shutil.rmtree(settings.data_dir / "redis")
    started = time.time()
    stack = EmbeddedStack(settings, own_broker=not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
                          own_redis=own_redis, prometheus=monitor)
    print(f"fedguard demo: {settings.task}, {settings.num_devices} devices, {settings.devices_per_round} per round, "
          f"alpha {settings.dirichlet_alpha}, {rounds} rounds, rule {settings.rule}; logs in {stack.log_dir}")
    lines: list[RoundLine] = []
    with stack:
        if stack.prometheus_url:
            print(f"prometheus: {stack.prometheus_url} (alerts: {stack.prometheus_url}/alerts; dashboards: "
                  f"monitoring/grafana/dashboards)")
        client = registry.connect(settings)
        if attack is not None:
            started_campaign = campaign.start(client, settings, attack.kind, attack.fraction, params=attack.params,
                                              start_version=attack.start_round - 1, rounds=attack.rounds)
            print(f"attack: {attack.kind} on {len(started_campaign.devices)} compromised devices "
                  f"({attack.fraction:g} of the fleet) from round {attack.start_round}"
                  f"{'' if started_campaign.rounds is None else f' for {started_campaign.rounds} round(s)'}")
        else:
            campaign.stop(client, settings)
        watcher = Watcher(settings, since=started - 1)
        try:
            lines, initial = _follow(stack, watcher, rounds, round_timeout_s,
                                     malicious=lambda: {e["update_id"] for e in campaign.ledger(client, settings)})
        finally:
            watcher.close()
    elapsed = time.time() - started
    if not lines:
        print("demo: no round completed", file=sys.stderr)
        return 1
    plot = Path(plot)
    title = f"fedguard demo: {initial.get('task', settings.task)}, {settings.rule}"
    if attack is not None:
        title += f", {attack.kind} at {attack.fraction:g}"
    plot_accuracy(lines, initial, plot, title, attack_rounds=[line.round for line in lines if line.attackers])
    backdoor = [line.backdoor_accuracy for line in lines if line.backdoor_accuracy is not None]
    summary = {
        "task": initial.get("task", settings.task), "rounds": len(lines), "seconds": round(elapsed, 1),
        "final_accuracy": lines[-1].accuracy, "best_accuracy": max(line.accuracy for line in lines),
        "first_round_at_80": next((line.round for line in lines if line.accuracy >= 0.8), None),
        "updates_accepted": sum(line.accepted for line in lines),
        "max_backdoor_accuracy": max(backdoor) if backdoor else None,
        "final_backdoor_accuracy": backdoor[-1] if backdoor else None,
        "attack": None if attack is None else asdict(attack),
        "malicious_in_windows": sum(line.attackers for line in lines),
        "malicious_rejected": sum(line.attackers_rejected for line in lines),
        "malicious_downweighted": sum(line.attackers_downweighted for line in lines),
        "honest_rejected": sum(line.honest_rejected for line in lines),
        "audit_flagged_versions": [line.version for line in lines if line.audit == "flagged"],
        "audit_quarantined_attackers": sum(line.audit_attackers for line in lines),
        "audit_quarantined_others": sum(line.audit_honest for line in lines),
        "attackers_screened": sum(line.attackers_screened for line in lines),
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
    if backdoor:
        print(f"backdoor accuracy: max {summary['max_backdoor_accuracy']:.4f}, final "
              f"{summary['final_backdoor_accuracy']:.4f}")
    if attack is not None:
        print(f"malicious updates in windows {summary['malicious_in_windows']}: rejected "
              f"{summary['malicious_rejected']}, down-weighted {summary['malicious_downweighted']}; honest members "
              f"rejected {summary['honest_rejected']}")
        print(f"model audit: flagged versions {summary['audit_flagged_versions'] or 'none'}; quarantined "
              f"{summary['audit_quarantined_attackers']} attacker(s) ({summary['attackers_screened']} screened out "
              f"of a window) and {summary['audit_quarantined_others']} other device(s)")
    print(f"plot: {plot}  summary: {plot.with_suffix('.json')}")
    return 0 if len(lines) == rounds else 1


def _follow(stack: EmbeddedStack, watcher: Watcher, rounds: int, round_timeout_s: float,
            malicious: Callable[[], set[str]]) -> tuple[list[RoundLine], dict[str, Any]]:
    lines: list[RoundLine] = []
    initial, _ = watcher.version_and_window(stack, 0, time.monotonic() + round_timeout_s)
    last_time, rejected_before = time.monotonic(), 0
    bar = tqdm(total=rounds, desc="rounds", unit="round", dynamic_ncols=True)
    try:
        while len(lines) < rounds:
            version = len(lines) + 1
            meta, window = watcher.version_and_window(stack, version, last_time + round_timeout_s)
            now = time.monotonic()
            ledger = malicious()
            bad_devices = {m["device_id"] for w in watcher.windows.values() for m in w.get("members", [])
                           if m["update_id"] in ledger}
            line = RoundLine(round=version, version=version, members=meta["members"], accepted=meta["accepted"],
                             rejected=watcher.rejected_total - rejected_before,
                             accuracy=meta["metrics"]["accuracy"], loss=meta["metrics"]["loss"],
                             seconds=round(now - last_time, 2),
                             backdoor_accuracy=meta["metrics"].get("backdoor_accuracy"),
                             **_attackers(window, ledger),
                             **audit_of(meta, bad_devices))
            rejected_before, last_time = watcher.rejected_total, now
            lines.append(line)
            bar.update(1)
            bar.set_postfix(acc=f"{line.accuracy:.3f}")
            backdoor = "" if line.backdoor_accuracy is None else f"  backdoor {line.backdoor_accuracy:.4f}"
            attackers = "" if not line.attackers else (
                f"  attackers {line.attackers} (rejected {line.attackers_rejected}, down-weighted "
                f"{line.attackers_downweighted})")
            audit = ""
            if line.audit == "flagged":
                audit = f"  audit FLAGGED: not served (parameters of v{line.served_from})"
            if line.audit_attackers or line.audit_honest:
                audit += (f"  audit quarantined {line.audit_attackers} attacker(s)"
                          f"{f', {line.audit_honest} other(s)' if line.audit_honest else ''}"
                          f"{f' ({line.attackers_screened} screened out)' if line.attackers_screened else ''}")
            tqdm.write(f"round {line.round:>3}  v{line.version:<4} window {line.members:>3}  accepted "
                       f"{line.accepted:>3}  rejected {line.rejected:>3}  accuracy {line.accuracy:.4f}{backdoor}  "
                       f"loss {line.loss:.4f}{attackers}{audit}  ({line.seconds:.1f}s)")
    finally:
        bar.close()
    return lines, initial


def _attackers(window: dict[str, Any] | None, malicious: set[str]) -> dict[str, int]:
    """How many window members were malicious (by the ledger) and what the window stage decided about them."""
    out = {"attackers": 0, "attackers_rejected": 0, "attackers_downweighted": 0, "honest_rejected": 0}
    for member in (window or {}).get("members", []):
        bad = member["update_id"] in malicious
        verdict = member.get("verdict")
        out["attackers"] += bad
        out["attackers_rejected"] += bad and verdict == "reject"
        out["attackers_downweighted"] += bad and verdict == "downweight"
        out["honest_rejected"] += (not bad) and verdict == "reject"
    return out


def _check(stack: EmbeddedStack, deadline: float, waiting_for: str) -> None:
    dead = stack.check_alive()
    if dead:
        raise RuntimeError(f"{', '.join(dead)} exited while waiting for {waiting_for}; see {stack.log_dir}")
    if time.monotonic() > deadline:
        raise TimeoutError(f"timed out waiting for {waiting_for}; see {stack.log_dir}")
