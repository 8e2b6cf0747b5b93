"""``fedguard eval --live``: a cell of the matrix run through the real embedded pipeline (issue 10, item 2).

:func:`run_live_cell` takes the cell's :class:`~fedguard.simulation.SimulationConfig`, starts a fresh embedded stack
(its own broker, Redis and data directory under ``work_dir``, free ports) configured as the cell says, compromises
the very devices the in-process run compromises (:func:`fedguard.simulation.compromised_devices`) with a campaign
from the same round, follows ``fl.models`` and ``fl.windows`` for ``config.rounds`` versions, and returns a result of
:func:`fedguard.simulation.simulate`'s shape, so that ``fedguard eval`` writes live cells as it writes the others.

What the two runs share: the data split, each device's training seed, the sampling of each round, the attack's
crafting (``producers.attacks.live``), the rule, and, for comparability, the sketch seed (set in Redis before the
processors start, from the cell's seed as the simulation derives it) and the DP noise seed
(``aggregation_experiment_seed``). Both are secrets in a deployment; a live cell is an experiment. What differs:
the order in which a window's members arrive (the aggregate's float sums), attacks that draw random numbers (the
fleet draws them from the OS), and timing (a window can close on its deadline with fewer members). The agreement on
one cell is tested in ``tests/e2e/test_eval_live.py``.

Not attributed to rounds live: updates refused before the window (``refused_*`` are ``None``: the dead letters do
not name a base version).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fedguard import registry
from fedguard.settings import Settings, from_env
from fedguard.stack import SERVICES, EmbeddedStack, free_port

if TYPE_CHECKING:  # (the simulation imports torch: loaded when a cell runs)
    from fedguard.simulation import SimulationConfig

__all__ = ["live_settings", "run_live_cell"]

#: the ports an embedded stack binds (each cell gets free ones, so a running `fedguard up` is left alone)
PORTS = ("broker_port", "redis_port", "processors_web_port", "processors_metrics_port", "aggregator_metrics_port",
         "fleet_metrics_port", "infra_metrics_port", "prometheus_port")


def live_settings(config: "SimulationConfig", data_dir: Path, base: Settings | None = None) -> Settings:
    """The settings that run ``config`` live: the cell's task, fleet, rule, detection, audit and training, one window
    per round of ``per_round`` members, free ports, everything in ``data_dir``."""
    base = base or from_env()
    ports = {name: free_port() for name in PORTS}
    return dataclasses.replace(
        base, kafka_bootstrap=None, redis_url=None, data_dir=Path(data_dir), **ports,
        task=config.task, seed=config.seed, num_devices=config.num_devices, devices_per_round=config.per_round,
        window_size=config.per_round, dirichlet_alpha=config.alpha, local_epochs=config.local_epochs,
        local_lr=config.local_lr, local_batch_size=config.local_batch_size, rule=config.rule,
        rule_params=config.rule_params, detection=config.detection, detector_sketch_k=config.sketch_k,
        sample_count_cap=config.sample_count_cap, backdoor_eval=config.backdoor_eval,
        max_update_norm=config.max_update_norm, quarantine_probation_s=config.probation_s, audit=config.audit,
        audit_time_budget_s=config.audit_time_budget_s, audit_reference_versions=config.audit_reference_versions,
        audit_warmup_versions=config.audit_warmup_versions, aggregation_experiment_seed=config.seed)


def run_live_cell(config: "SimulationConfig", work_dir: str | Path, progress: Callable[[dict], None] | None = None,
                  round_timeout_s: float = 180.0) -> dict[str, Any]:
    """Run ``config`` through the embedded pipeline in ``work_dir`` (emptied first); returns the result in
    :func:`fedguard.simulation.simulate`'s shape (``rounds``, ``initial``, ``final_main_accuracy``, ...)
    with ``"live": true``. ``progress`` is called with each round's record. Raises ``RuntimeError`` /
    ``TimeoutError`` when a service dies or a version does not come (the stack's logs are in ``work_dir/logs``)."""
    from dataclasses import asdict

    from fedguard.demo import Watcher
    from fedguard.simulation import VOTES, compromised_devices, detection_rates, sketch_seed
    from producers import campaign
    from producers.enroll import device_ids

    work = Path(work_dir)
    if work.exists():
        shutil.rmtree(work)
    settings = live_settings(config, work / "data")
    started = time.perf_counter()
    ids = device_ids(config.num_devices)
    bad = compromised_devices(config.num_devices, config.fraction, config.seed) if config.attack else []
    bad_ids = {ids[i] for i in bad}
    stack = EmbeddedStack(settings, services=(), log_dir=work / "logs")
    with stack:
        client = registry.connect(settings)
        client.set(registry.sketch_seed_key(settings), str(sketch_seed(config.seed)))  # before the processors
        if config.attack:
            campaign.start(client, settings, config.attack, config.fraction, params=config.attack_params,
                           start_version=config.attack_start - 1, rounds=config.attack_rounds,
                           devices=sorted(bad_ids))
        for name in SERVICES:
            stack.start_service(name)
        watcher = Watcher(settings, since=0.0)
        try:
            rounds, initial = _follow(stack, watcher, config, bad_ids, round_timeout_s, progress,
                                      lambda: {e["update_id"] for e in campaign.ledger(client, settings)}, VOTES)
        finally:
            watcher.close()
    backdoor = [r["backdoor_accuracy"] for r in rounds if r["backdoor_accuracy"] is not None]
    result = {
        "config": asdict(config), "live": True, "task": config.task,
        "compromised": list(bad),
        "initial": {"main_accuracy": float(initial["metrics"]["accuracy"]),
                    "backdoor_accuracy": initial["metrics"].get("backdoor_accuracy")},
        "rounds": rounds,
        "final_main_accuracy": rounds[-1]["main_accuracy"] if rounds else float(initial["metrics"]["accuracy"]),
        "max_backdoor_accuracy": max(backdoor) if backdoor else None,
        "final_backdoor_accuracy": backdoor[-1] if backdoor else None,
        "detection": detection_rates(rounds, config.attack_start if config.attack else 1),
        "seconds": time.perf_counter() - started,
    }
    return json.loads(json.dumps(result))


def _follow(stack: EmbeddedStack, watcher: Any, config: "SimulationConfig", bad_ids: set[str], round_timeout_s: float,
            progress: Callable[[dict], None] | None, ledger: Callable[[], set[str]],
            votes: tuple[str, ...]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One record per version 1..rounds, as the simulation records a round (what the topics tell)."""
    initial, _ = watcher.version_and_window(stack, 0, time.monotonic() + round_timeout_s)
    rounds: list[dict[str, Any]] = []
    for version in range(1, config.rounds + 1):
        meta, window = watcher.version_and_window(stack, version, time.monotonic() + round_timeout_s)
        record = round_record(version, meta, window or {"members": []}, ledger(), bad_ids, votes)
        rounds.append(record)
        if progress is not None:
            progress(record)
    return rounds, initial


def round_record(version: int, meta: dict[str, Any], window: dict[str, Any], malicious: set[str],
                 bad_ids: set[str], votes: tuple[str, ...]) -> dict[str, Any]:
    """A version's record in the simulation's round shape, from its metadata and its window's record (pure).
    A member is malicious when the campaign's ledger names its update."""
    count = {"malicious": 0, "honest": 0}
    flagged = {"malicious": 0, "honest": 0}
    rejected = {"malicious": 0, "honest": 0}
    tally: dict[str, dict[str, int]] = {"malicious": {v: 0 for v in votes}, "honest": {v: 0 for v in votes}}
    for m in window.get("members", []):
        who = "malicious" if m["update_id"] in malicious else "honest"
        count[who] += 1
        flagged[who] += m.get("verdict", "accept") != "accept"
        rejected[who] += m.get("verdict") == "reject"
        for f in m.get("flags", []):
            if f in tally[who]:
                tally[who][f] += 1
    audit = meta.get("audit") or {}
    metrics = meta.get("metrics") or {}
    return {
        "round": version, "version": version, "main_accuracy": float(metrics["accuracy"]),
        "backdoor_accuracy": metrics.get("backdoor_accuracy"), "loss": metrics.get("loss"),
        "malicious": count["malicious"], "honest": count["honest"],
        "flagged_malicious": flagged["malicious"], "flagged_honest": flagged["honest"],
        "rejected_malicious": rejected["malicious"], "rejected_honest": rejected["honest"],
        "refused_malicious": None, "refused_honest": None, "quarantined_malicious": None,
        # whether an attacker's member was an honest copy is known in process only (fedguard.simulation.honest_copy)
        "crafted": None, "flagged_crafted": None, "rejected_crafted": None,
        "quarantined_honest": None, "admitted": meta.get("accepted"), "skipped": (meta.get("rule_info") or {}).get(
            "skipped"), "votes_malicious": tally["malicious"], "votes_honest": tally["honest"],
        "devices": [int(m["device_id"].rsplit("-", 1)[1]) for m in window.get("members", [])],
        "audit": audit.get("verdict"), "served": audit.get("verdict") != "flagged",
        "attributed_malicious": len(set(audit.get("attributed") or []) & bad_ids),
        "attributed_honest": len(set(audit.get("attributed") or []) - bad_ids),
    }
