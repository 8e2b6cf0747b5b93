"""The whole pipeline on the real broker and Redis: devices -> Kafka -> Faust -> windows -> aggregator -> models.

While it trains, wire-level attacks are injected (tampered, replayed and garbage records) and the aggregator is
killed with SIGKILL and started again. Afterwards: accuracy rose, every raw record ended exactly once in valid or
rejected, each attack got its reason code, and the version chain has no gap and no window applied twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import psutil
import pytest

from aggregator.auditing import LOOKBACK_WINDOWS
from fedguard.modelstore import ModelStore
from fedguard.records import loads
from fedguard.settings import to_env
from fedguard.stack import EmbeddedStack
from fedguard.updatestore import UpdateStore, keep_from
from producers.inject import inject
from tests.conftest import free_port, json_values, read_topic, wait_until

pytestmark = pytest.mark.e2e


def test_pipeline_trains_rejects_attacks_and_survives_an_aggregator_crash(settings):
    store = ModelStore(settings.models_dir)
    stack = EmbeddedStack(settings, own_broker=False, own_redis=False)
    with stack:
        def at_version(v):
            if stack.check_alive():
                raise AssertionError(f"{stack.check_alive()} died; logs in {stack.log_dir}")
            return store.versions() and store.versions()[-1] >= v

        wait_until(lambda: at_version(2), 120, what="version 2")
        assert inject(settings, "tamper", 2) == 2
        assert inject(settings, "replay", 2) == 2
        assert inject(settings, "garbage", 3) == 3
        wait_until(lambda: at_version(4), 120, what="version 4 after the attacks")

        stack.procs["aggregator"].kill()  # SIGKILL: no chance to clean up
        stack.procs["aggregator"].wait()
        killed_at = store.versions()[-1]
        stack.start_service("aggregator")
        wait_until(lambda: at_version(killed_at + 3), 180, what="three versions after the restart")
    # Stopped: everything the stack wrote is on the topics now.

    raw = read_topic(settings, settings.topics.raw)
    valid = read_topic(settings, settings.topics.valid)
    rejected = json_values(read_topic(settings, settings.topics.rejected))
    windows = json_values(read_topic(settings, settings.topics.windows))

    # Accuracy rose.
    versions = store.versions()
    first, last = store.meta(versions[0]), store.meta(versions[-1])
    assert last["metrics"]["accuracy"] > first["metrics"]["accuracy"] + 0.2, (first["metrics"], last["metrics"])

    # Conservation: every raw record exactly once in valid or rejected.
    outcomes = Counter()
    for message in valid:
        meta = loads(message.value)  # JSON: the tensor is in the update store, named by meta["tensor"]
        outcomes[(meta["raw"]["partition"], meta["raw"]["offset"])] += 1
    for record in rejected:
        outcomes[(record["raw"]["partition"], record["raw"]["offset"])] += 1
    assert outcomes == Counter((m.partition, m.offset) for m in raw)

    # Each attack got its reason code, and honest traffic kept flowing.
    reasons = Counter(r["reason"] for r in rejected)
    assert reasons["auth_failed"] == 2 and reasons["replay"] == 2 and reasons["malformed"] == 3, reasons
    assert set(reasons) == {"auth_failed", "replay", "malformed"}, reasons

    # Exactly one version per window, across the restart: no gap, no window applied twice.
    assert versions == list(range(len(versions)))
    applied = [store.meta(v)["window_id"] for v in versions[1:]]
    assert applied == [f"{settings.model_id}:{v}" for v in range(len(applied))]
    assert [store.meta(v)["parent"] for v in versions[1:]] == versions[:-1]
    closed = {w["window_id"] for w in windows}
    assert set(applied) <= closed and len(closed - set(applied)) <= 1  # at most the last, still in flight at stop
    log = (stack.log_dir / "aggregator.log").read_text()
    assert f"resuming from persisted version {killed_at}" in log

    # The update store: the last window applied names tensors the aggregator read (still kept), and retention
    # deleted every base version no window can use any more.
    updates, latest = UpdateStore(settings.update_store_dir), store.load(versions[-1])
    last_window = next(w for w in windows if w["window_id"] == latest.meta["window_id"])
    for member in last_window["members"]:
        assert updates.get(member["tensor"], latest.params.size).shape == latest.params.shape
    kept = sorted(int(p.name) for p in (settings.update_store_dir / settings.model_id).iterdir())
    # (the audit's look-back keeps LOOKBACK_WINDOWS more base versions: aggregator/service.py)
    assert kept and kept[0] >= keep_from(versions[-1], settings.max_staleness + LOOKBACK_WINDOWS), kept
    assert kept[-1] <= versions[-1], kept


def test_up_stops_every_process_it_started_on_sigterm(tmp_path):
    env = {**os.environ, **to_env_for_up(tmp_path)}
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL"):
        env.pop(name, None)  # `up` must start its own broker and Redis here
    proc = subprocess.Popen([sys.executable, "-m", "fedguard.cli", "up", "--task", "synthetic", "--devices", "4",
                             "--per-round", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        launcher = psutil.Process(proc.pid)
        # broker, redis, processors, aggregator, fleet, the infrastructure exporter, Prometheus
        children = wait_until(lambda: len(launcher.children()) == 7 and launcher.children(), 60,
                              what="the seven processes")
        assert any("prometheus" in " ".join(c.cmdline()) for c in children)
        wait_until(lambda: (tmp_path / "data" / "models").exists(), 60, what="the aggregator to start")
        descendants = launcher.children(recursive=True)
        assert len(descendants) >= len(children)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out
        assert "fedguard stopped" in out
        gone, alive = psutil.wait_procs(descendants, timeout=10)
        assert alive == [], f"orphans left behind: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()


def to_env_for_up(tmp_path) -> dict[str, str]:
    from fedguard.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", broker_port=free_port(), redis_port=free_port(),
                        processors_web_port=free_port(), processors_metrics_port=free_port(),
                        aggregator_metrics_port=free_port(), fleet_metrics_port=free_port(),
                        prometheus_port=free_port(), infra_metrics_port=free_port())
    skip = ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL", "FEDGUARD_KAFKA_BOOTSTRAP", "FEDGUARD_REDIS_URL")
    return {k: v for k, v in to_env(settings).items() if k not in skip}


def test_demo_runs_rounds_prints_lines_and_writes_the_plot(tmp_path):
    env = {**os.environ, **to_env_for_up(tmp_path)}
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL"):
        env.pop(name, None)
    plot = tmp_path / "demo.png"
    out = subprocess.run([sys.executable, "-m", "fedguard.cli", "demo", "--rounds", "3", "--task", "synthetic",
                          "--devices", "6", "--per-round", "3", "--plot", str(plot)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [line.split()[1] for line in out.stdout.splitlines() if line.startswith("round ")] == ["1", "2", "3"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(plot.with_suffix(".json").read_text())
    assert summary["rounds"] == 3 and summary["task"] == "synthetic"
    assert [r["version"] for r in summary["rounds_detail"]] == [1, 2, 3]
