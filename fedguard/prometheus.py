"""The embedded stack's Prometheus: its config, its command line, and two small HTTP helpers.

``fedguard up`` runs the Debian package's ``prometheus`` binary as one more supervised process, on loopback, scraping
every service of the stack plus the infrastructure exporter (fedguard/infra_metrics.py) and itself, with the alert
rules of ``monitoring/alerts.yml``. The job names are those of ``monitoring/prometheus.yml`` (the compose stack), so
the alert rules and the dashboards work unchanged against either.

Everything lives in ``<data dir>/prometheus``: the generated ``prometheus.yml``, a copy of ``alerts.yml`` next to it
(so the config's relative ``rule_files`` entry resolves as it does in compose) and the TSDB in ``data/``.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from fedguard.settings import Settings

# Same values as monitoring/prometheus.yml: a round takes a few seconds, finer is noise, coarser hides rounds.
SCRAPE_INTERVAL = "5s"
RETENTION = "2d"
INSTALL_HINT = "install Debian package prometheus: bash scripts/setup.sh"

# Service name in the stack -> (job name, the Settings field of its metrics port).
JOBS = {
    "processors": ("fedguard-processors", "processors_metrics_port"),
    "aggregator": ("fedguard-aggregator", "aggregator_metrics_port"),
    "fleet": ("fedguard-fleet", "fleet_metrics_port"),
    "infra": ("fedguard-infra", "infra_metrics_port"),
}
SELF_JOB = "prometheus"
ALERTS_FILE = Path(__file__).resolve().parents[1] / "monitoring" / "alerts.yml"


def binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise RuntimeError(f"no prometheus binary on PATH; {INSTALL_HINT} (or run without Prometheus: --no-prometheus)")
    return found


def url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.prometheus_port}"


def work_dir(settings: Settings) -> Path:
    return settings.data_dir / "prometheus"


def scrape_host(metrics_host: str) -> str:
    """Where a metrics endpoint bound to ``metrics_host`` is reached from this machine."""
    if metrics_host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if metrics_host == "::":
        return "[::1]"
    return f"[{metrics_host}]" if ":" in metrics_host else metrics_host


def scrape_targets(settings: Settings, services: tuple[str, ...],
                   processors_ports: list[int] | None = None) -> dict[str, list[str]]:
    """job name -> host:port targets, for the given stack services (and anything else in :data:`JOBS`, e.g.
    ``infra``). ``processors_ports``: one metrics port per processors worker when the service runs a pool of them
    (processors/worker.py); default the settings' single port."""
    host = scrape_host(settings.metrics_host)
    targets = {}
    for service in services:
        job, port_field = JOBS[service]
        ports = processors_ports if service == "processors" and processors_ports else [getattr(settings, port_field)]
        targets[job] = [f"{host}:{port}" for port in ports]
    targets[SELF_JOB] = [f"127.0.0.1:{settings.prometheus_port}"]
    return targets


def config(settings: Settings, services: tuple[str, ...], rule_files: list[str],
           processors_ports: list[int] | None = None) -> dict:
    """The Prometheus config (as a dict) for a stack running ``services``."""
    scrape_configs = [{"job_name": job, "static_configs": [{"targets": targets}]}
                      for job, targets in scrape_targets(settings, services, processors_ports).items()]
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL,
                   "external_labels": {"stack": "fedguard"}},
        "rule_files": rule_files,
        "scrape_configs": scrape_configs,
    }


def write_config(settings: Settings, services: tuple[str, ...], alerts_file: Path | None = ALERTS_FILE,
                 processors_ports: list[int] | None = None) -> Path:
    """Write ``prometheus.yml`` (and the copy of the alert rules) into the work dir; returns the config's path.

    JSON is YAML, so no YAML library is needed. ``alerts_file`` None (or missing: fedguard installed without its
    source tree) gives a Prometheus without alert rules.
    """
    directory = work_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    rule_files = []
    if alerts_file is not None and Path(alerts_file).is_file():
        shutil.copyfile(alerts_file, directory / "alerts.yml")
        rule_files.append("alerts.yml")
    path = directory / "prometheus.yml"
    path.write_text(json.dumps(config(settings, services, rule_files, processors_ports), indent=2) + "\n")
    return path


def command(settings: Settings, config_path: Path) -> list[str]:
    """The argv of a Prometheus on loopback with its TSDB in the work dir."""
    return [binary(), f"--config.file={Path(config_path).resolve()}",
            f"--storage.tsdb.path={(work_dir(settings) / 'data').resolve()}",
            f"--storage.tsdb.retention.time={RETENTION}",
            f"--web.listen-address=127.0.0.1:{settings.prometheus_port}"]


def _get_json(address: str, timeout_s: float = 5.0) -> dict:
    try:
        with urllib.request.urlopen(address, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # a bad query answers 400 with the reason in a JSON body
        try:
            return json.loads(exc.read())
        except ValueError:
            raise exc from None


def wait_ready(base_url: str, timeout_s: float = 60.0) -> None:
    """Until ``GET /-/ready`` answers 200 (the TSDB is open and the rules are loaded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"Prometheus at {base_url} not ready after {timeout_s}s")
        time.sleep(0.2)


def query(base_url: str, promql: str) -> list[dict]:
    """An instant query: the ``data.result`` list (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
    body = _get_json(f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus query {promql!r} failed: {body.get('error', body)}")
    return body["data"]["result"]


def rules(base_url: str) -> list[dict]:
    """The rule groups Prometheus has loaded (``GET /api/v1/rules``)."""
    return _get_json(f"{base_url}/api/v1/rules")["data"]["groups"]
