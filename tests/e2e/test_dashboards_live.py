"""Every panel of the four Grafana dashboards, live (issue 11, item 3): the real embedded stack (its own Tansu broker
and Redis, processors, aggregator, fleet, the infrastructure exporter) scraped by a real Prometheus.

No Grafana server can be installed on these machines (../shared/BROKER.md), so each panel query is sent to that
Prometheus exactly as Grafana would send it, with Grafana's interval variables replaced by durations:

* after a few clean rounds and once an attack runs, every target of every panel returns at least one series with a
  number (not only NaN);
* the attack-facing panels move: before the attack and while a Sybil campaign runs (4 of 10 devices sending
  identical poisoned updates), the active attack, the malicious updates sent, the detector flags, the rejected
  verdicts and the flagged / quarantined security events go from their clean value to a higher one, and the
  quarantined-devices panel from 0 to at least one device;
* the window-size panel's max reads the configured window size exactly (issue 11: windows of 10 read 9.75).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from fedguard import prometheus, registry
from fedguard.modelstore import ModelStore
from fedguard.settings import Settings
from fedguard.stack import EmbeddedStack, free_port
from producers import campaign
from tests.conftest import wait_until
from tests.unit.test_monitoring import skip_unless_ci

pytestmark = pytest.mark.e2e

DASHBOARDS_DIR = Path(__file__).resolve().parents[2] / "monitoring" / "grafana" / "dashboards"
# Grafana's variables as this short run needs them: 1m of 5 s scrapes holds a dozen samples and several rounds.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
WARM_UP = 3  # clean versions before the attack
ATTACKERS = ["dev-0001", "dev-0004", "dev-0007", "dev-0008"]

# (dashboard file, panel title, legend of the target) whose value must rise while the attack runs.
RISES_UNDER_ATTACK = [
    ("fedguard-model.json", "Malicious updates sent per minute, by kind", "{{kind}}"),
    ("fedguard-defences.json", "Detector flags per minute, by detector", "{{detector}}"),
    ("fedguard-defences.json", "Verdicts per minute", "{{verdict}}"),
    ("fedguard-defences.json", "Security events per minute, by type", "{{type}}"),
    ("fedguard-defences.json", "Quarantined devices", "Quarantined devices"),
]
ACTIVE_ATTACK = ("fedguard-model.json", "Active attack", "{{kind}}")


def panel_targets() -> list[tuple[str, str, str, str]]:
    """(dashboard file, panel title, legend, expr with Grafana's variables replaced) of every panel target."""
    found = []
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"] + [p for row in dashboard["panels"] for p in row.get("panels", [])]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                found.append((path.name, panel["title"], target.get("legendFormat", ""), expr))
    return found


def target_expr(dashboard: str, title: str, legend: str) -> str:
    return next(e for d, t, lg, e in panel_targets() if (d, t, lg) == (dashboard, title, legend))


def values(url: str, expr: str) -> dict[str, float]:
    """series (its labels, as text) -> value, of an instant query."""
    return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in prometheus.query(url, expr)}


def total(url: str, expr: str) -> float:
    """Sum over the series of a query, NaN counted as 0 (a rate over no windows yet)."""
    return sum(v for v in values(url, expr).values() if not math.isnan(v))


def has_number(url: str, expr: str) -> bool:
    return any(not math.isnan(v) for v in values(url, expr).values())


def stack_settings(tmp_path: Path) -> Settings:
    """A small, fast stack with its own broker and Redis (the infrastructure panels read their processes)."""
    return Settings(data_dir=tmp_path / "data", task="synthetic", num_devices=10, devices_per_round=5, window_size=5,
                    window_deadline_s=6.0, round_timeout_s=15.0, broker_port=free_port(), redis_port=free_port(),
                    processors_web_port=free_port(), processors_metrics_port=free_port(),
                    aggregator_metrics_port=free_port(), fleet_metrics_port=free_port(),
                    infra_metrics_port=free_port(), prometheus_port=free_port())


def test_every_panel_has_data_and_the_attack_panels_move(tmp_path):
    if shutil.which("prometheus") is None:
        skip_unless_ci("prometheus is not on PATH (Debian package prometheus)")
    settings = stack_settings(tmp_path)
    store = ModelStore(settings.models_dir)
    with EmbeddedStack(settings, prometheus=True) as stack:
        url = stack.prometheus_url

        def version() -> int:
            assert stack.check_alive() == [], f"{stack.check_alive()} died; logs in {stack.log_dir}"
            return store.versions()[-1] if store.versions() else -1

        wait_until(lambda: version() >= WARM_UP, 180, what=f"{WARM_UP} clean versions")
        jobs = {"fedguard-processors", "fedguard-aggregator", "fedguard-fleet", "fedguard-infra", "prometheus"}
        wait_until(lambda: {r["metric"]["job"] for r in prometheus.query(url, "up == 1")} >= jobs, 60,
                   what="Prometheus scraping every job")
        # A clean minute's rates need two scrapes of windows and versions: the round's latency panels have numbers.
        wait_until(lambda: has_number(url, target_expr("fedguard-pipeline.json", "Window size", "max")), 60,
                   what="a closed window in Prometheus")
        active = target_expr(*ACTIVE_ATTACK)
        assert [json.loads(k)["kind"] for k in values(url, active)] == ["none"]
        before = {key: total(url, target_expr(*key)) for key in RISES_UNDER_ATTACK}

        campaign.start(registry.connect(settings), settings, "sybil", 0.0, devices=ATTACKERS)
        wait_until(lambda: [json.loads(k)["kind"] for k in values(url, active)] == ["sybil"], 90,
                   what="the active attack panel to show sybil")
        for key in RISES_UNDER_ATTACK:
            wait_until(lambda: total(url, target_expr(*key)) > before[key], 150,
                       what=f"{key[1]!r} to rise above {before[key]} during the attack")

        size = values(url, target_expr("fedguard-pipeline.json", "Window size", "max"))
        assert list(size.values()) == [settings.window_size], size

        # Every target of every panel, now that the pipeline has run clean and attacked.
        empty = [(d, t, lg, e) for d, t, lg, e in panel_targets() if not has_number(url, e)]
        assert not empty, "panel targets without data:\n" + "\n".join(f"{d} {t!r} [{lg}]: {e}" for d, t, lg, e in empty)
