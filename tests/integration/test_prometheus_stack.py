"""Prometheus inside the embedded stack (issue 11): a real Prometheus scraping the real services, the infrastructure
exporter and itself, with the alert rules of monitoring/alerts.yml loaded, supervised like the services and gone
after ``stop()``.

The stack here owns its broker and its Redis, as ``fedguard up`` does, so the exporter has a broker process to
measure. The pure parts of fedguard/prometheus.py and fedguard/infra_metrics.py are tested first, without processes.
``prometheus`` / ``promtool`` come with the Debian package ``prometheus``: missing, these tests skip on a developer's
machine and fail under CI.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import urllib.request

import psutil
import pytest

from fedguard import infra_metrics
from fedguard import prometheus
from fedguard.settings import Settings
from fedguard.stack import EmbeddedStack, free_port, port_in_use, processors_metrics_ports
from tests.conftest import wait_until
from tests.unit.test_monitoring import PROMETHEUS_YML, load_yaml, promtool, skip_unless_ci
from tests.unit.test_alert_rules import alert_names

pytestmark = pytest.mark.integration

STACK_JOBS = {"fedguard-processors", "fedguard-aggregator", "fedguard-fleet", "fedguard-infra", "prometheus"}


def require_prometheus() -> None:
    if shutil.which("prometheus") is None:
        skip_unless_ci("prometheus is not on PATH (Debian package prometheus)")


def own_stack_settings(tmp_path) -> Settings:
    """A stack with its own broker and Redis on free ports, the synthetic task and a small fleet."""
    return Settings(data_dir=tmp_path / "data", task="synthetic", num_devices=4, devices_per_round=2, window_size=2,
                    window_deadline_s=4.0, round_timeout_s=20.0, broker_port=free_port(), redis_port=free_port(),
                    processors_web_port=free_port(), processors_metrics_port=free_port(),
                    aggregator_metrics_port=free_port(), fleet_metrics_port=free_port(),
                    infra_metrics_port=free_port(), prometheus_port=free_port())


# -- the config (no processes) -------------------------------------------------------------------------------------

def test_config_uses_the_compose_job_names_and_the_settings_ports(tmp_path):
    settings = own_stack_settings(tmp_path)
    targets = prometheus.scrape_targets(settings, ("processors", "aggregator", "fleet", "infra"))
    assert set(targets) == STACK_JOBS
    compose_jobs = {job["job_name"] for job in load_yaml(PROMETHEUS_YML)["scrape_configs"]}
    assert compose_jobs <= set(targets), "the embedded stack's jobs must be named as in monitoring/prometheus.yml"
    assert targets["fedguard-aggregator"] == [f"127.0.0.1:{settings.aggregator_metrics_port}"]
    assert targets["fedguard-infra"] == [f"127.0.0.1:{settings.infra_metrics_port}"]
    assert targets["prometheus"] == [f"127.0.0.1:{settings.prometheus_port}"]
    assert "fedguard-fleet" not in prometheus.scrape_targets(settings, ("processors", "aggregator"))
    compose_global = load_yaml(PROMETHEUS_YML)["global"]
    config = prometheus.config(settings, ("aggregator",), ["alerts.yml"])
    assert config["global"]["scrape_interval"] == compose_global["scrape_interval"]
    assert config["global"]["evaluation_interval"] == compose_global["evaluation_interval"]


def test_every_processors_worker_of_a_pool_is_a_target(tmp_path):
    settings = own_stack_settings(tmp_path).with_overrides(processors_workers=3)
    ports = processors_metrics_ports(settings)
    assert len(set(ports)) == 3 and ports[0] == settings.processors_metrics_port
    config = prometheus.config(settings, ("processors", "aggregator"), [], processors_ports=ports)
    (processors_job,) = [job for job in config["scrape_configs"] if job["job_name"] == "fedguard-processors"]
    assert processors_job["static_configs"] == [{"targets": [f"127.0.0.1:{port}" for port in ports]}]
    single = own_stack_settings(tmp_path)
    assert processors_metrics_ports(single) == [single.processors_metrics_port]


def test_scrape_host_reaches_what_the_services_bind():
    assert prometheus.scrape_host("0.0.0.0") == "127.0.0.1"
    assert prometheus.scrape_host("127.0.0.1") == "127.0.0.1"
    assert prometheus.scrape_host("::") == "[::1]"
    assert prometheus.scrape_host("fe80::1") == "[fe80::1]"


def test_written_config_passes_promtool_with_the_rules(tmp_path):
    settings = own_stack_settings(tmp_path)
    path = prometheus.write_config(settings, ("processors", "aggregator", "fleet", "infra"))
    assert path.parent == settings.data_dir / "prometheus"
    assert (path.parent / "alerts.yml").read_text() == prometheus.ALERTS_FILE.read_text()
    result = promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


def test_command_keeps_prometheus_on_loopback_and_its_tsdb_in_the_data_dir(tmp_path):
    require_prometheus()
    settings = own_stack_settings(tmp_path)
    argv = prometheus.command(settings, settings.data_dir / "prometheus" / "prometheus.yml")
    assert f"--web.listen-address=127.0.0.1:{settings.prometheus_port}" in argv
    assert f"--storage.tsdb.path={(settings.data_dir / 'prometheus' / 'data').resolve()}" in argv
    assert any(arg.startswith("--storage.tsdb.retention.time=") for arg in argv)


def test_missing_binary_is_one_line_with_a_hint(monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match=r"bash scripts/setup\.sh") as raised:
        prometheus.binary()
    assert "\n" not in str(raised.value)


# -- the exporter's parts (no processes) ---------------------------------------------------------------------------

def test_parse_vmrss():
    assert infra_metrics.parse_vmrss("Name:\ttansu\nVmRSS:\t   20480 kB\nThreads:\t4\n") == 20480 * 1024
    assert infra_metrics.parse_vmrss("Name:\tzombie\nState:\tZ (zombie)\n") is None


def test_resident_bytes_of_this_process_matches_psutil():
    mine = infra_metrics.resident_bytes(os.getpid())
    rss = psutil.Process().memory_info().rss
    assert mine is not None and 0.5 * rss < mine < 2 * rss
    gone = psutil.Popen(["true"])
    gone.wait()
    assert infra_metrics.resident_bytes(gone.pid) is None


def test_bootstrap_addresses_and_reachability():
    assert infra_metrics.bootstrap_addresses("a:9092, b:9093") == [("a", 9092), ("b", 9093)]
    assert infra_metrics.bootstrap_addresses("[::1]:9092") == [("::1", 9092)]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert infra_metrics.reachable([("127.0.0.1", free_port()), ("127.0.0.1", port)])
    assert not infra_metrics.reachable([("127.0.0.1", port)])


def test_redis_reading_from_info():
    reading = infra_metrics.redis_reading({"used_memory": 1000, "used_memory_rss": 4000, "connected_clients": 3,
                                           "aof_enabled": 1, "aof_last_write_status": "err"})
    assert reading == {"used_memory": 1000.0, "rss": 4000.0, "clients": 3.0, "aof_enabled": 1.0,
                       "aof_last_write_ok": 0.0}
    assert math.isnan(infra_metrics.redis_reading({"used_memory": 1})["aof_last_write_ok"])


def test_directory_bytes(tmp_path):
    assert infra_metrics.directory_bytes(tmp_path / "missing") == 0
    (tmp_path / "m" / "a").mkdir(parents=True)
    (tmp_path / "m" / "v1.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "m" / "a" / "v1.json").write_bytes(b"y" * 24)
    (tmp_path / "m" / "link").symlink_to(tmp_path / "m" / "v1.safetensors")  # not counted twice
    assert infra_metrics.directory_bytes(tmp_path / "m") == 1024


def test_cached_value_is_computed_again_only_after_its_ttl():
    now = [0.0]
    computed = []

    def compute() -> float:
        computed.append(now[0])
        return float(len(computed))

    cached = infra_metrics.Cached(compute, ttl_s=5.0, clock=lambda: now[0])
    assert cached.get() == 1.0
    now[0] = 4.9
    assert cached.get() == 1.0
    now[0] = 5.0
    assert cached.get() == 2.0


def test_pid_file_round_trip(tmp_path):
    path = tmp_path / "pids.json"
    assert infra_metrics.read_pids(path) == {}
    infra_metrics.write_pid(path, "broker", 10)
    infra_metrics.write_pid(path, "redis", 11)
    infra_metrics.write_pid(path, "broker", 12)  # restarted
    assert infra_metrics.read_pids(path) == {"broker": 12, "redis": 11}
    infra_metrics.write_pid(path, "redis", None)
    assert infra_metrics.read_pids(path) == {"broker": 12}
    path.write_text("{half")
    assert infra_metrics.read_pids(path) == {}


def test_unknown_values_are_left_out_of_the_exposition(tmp_path, redis_url):
    """An external broker (no pid) and a missing data dir: those gauges are absent, not 0 or NaN."""
    from prometheus_client import generate_latest

    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}", redis_url=redis_url, data_dir=tmp_path / "none")
    text = generate_latest(infra_metrics.serving_registry(settings)).decode()
    samples = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    assert samples["fedguard_broker_up"] == 0
    assert samples["fedguard_redis_up"] == 1 and samples["fedguard_redis_used_memory_bytes"] > 0
    assert "fedguard_broker_resident_memory_bytes" not in samples
    assert "fedguard_data_dir_free_bytes" not in samples
    assert not any(math.isnan(value) for value in samples.values())


# -- the stack ------------------------------------------------------------------------------------------------------

def values_by(url: str, promql: str, label: str) -> dict[str, float]:
    return {row["metric"].get(label, ""): float(row["value"][1]) for row in prometheus.query(url, promql)}


def single_value(url: str, promql: str) -> float | None:
    rows = prometheus.query(url, promql)
    return float(rows[0]["value"][1]) if rows else None


def test_stack_runs_prometheus_scraping_every_service_with_the_alert_rules(tmp_path):
    require_prometheus()
    settings = own_stack_settings(tmp_path)
    stack = EmbeddedStack(settings, prometheus=True)
    assert stack.prometheus_url == f"http://127.0.0.1:{settings.prometheus_port}"
    assert EmbeddedStack(settings).prometheus_url is None
    with stack:
        url = stack.prometheus_url

        def every_job_up():
            assert not stack.check_alive(), f"{stack.check_alive()} died; logs in {stack.log_dir}"
            up = values_by(url, "up", "job")
            return set(up) == STACK_JOBS and all(value == 1 for value in up.values())

        wait_until(every_job_up, 120, what=f"up == 1 for {sorted(STACK_JOBS)}")
        assert {"infra", "prometheus"} <= set(stack.endpoints())
        for name, endpoint in stack.endpoints().items():  # what `fedguard up` prints answers
            with urllib.request.urlopen(endpoint, timeout=10) as response:
                assert response.status == 200, name

        # The infrastructure, as Prometheus scraped it.
        wait_until(lambda: (single_value(url, "fedguard_model_store_bytes") or 0) > 0, 60,
                   what="the aggregator's version 0 in the model store size")
        update_store = single_value(url, "fedguard_update_store_bytes")  # exported; 0 before the first update
        assert update_store is not None and update_store >= 0
        assert single_value(url, "fedguard_broker_up") == 1
        assert single_value(url, "fedguard_broker_resident_memory_bytes") > 0
        assert single_value(url, "fedguard_redis_up") == 1
        assert single_value(url, "fedguard_redis_used_memory_bytes") > 0
        assert single_value(url, "fedguard_redis_connected_clients") >= 1
        assert single_value(url, "fedguard_redis_aof_enabled") == 1  # the stack's Redis persists
        assert single_value(url, "fedguard_redis_aof_last_write_ok") == 1
        assert single_value(url, "fedguard_data_dir_free_bytes") > 0

        # The alert rules of the repository are loaded, every one of them.
        loaded = {rule["name"] for group in prometheus.rules(url) for rule in group["rules"]
                  if rule["type"] == "alerting"}
        assert loaded == set(alert_names())
        assert all(rule["health"] != "err" for group in prometheus.rules(url) for rule in group["rules"])

        # Supervised like a service: killed, it is started again on the same port and TSDB.
        restart_by_supervision(stack, "prometheus")
        prometheus.wait_ready(url, 60)
        assert prometheus.query(url, "vector(1)")[0]["value"][1] == "1"
        pids = {name: proc.pid for name, proc in stack.procs.items() if name in ("prometheus", "infra")}
    # Stopped: neither keeps running, and the port is free again.
    for name, pid in pids.items():
        assert not psutil.pid_exists(pid), f"{name} (pid {pid}) still runs after stop()"
    assert not port_in_use(settings.prometheus_port)
    assert not port_in_use(settings.infra_metrics_port)
    assert stack.procs == {}


def scrape(endpoint: str) -> dict[str, float]:
    """The unlabelled samples of a metrics endpoint."""
    with urllib.request.urlopen(endpoint, timeout=10) as response:
        text = response.read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#") and "{" not in line}


def restart_by_supervision(stack: EmbeddedStack, name: str) -> None:
    old = stack.procs[name]
    old.send_signal(signal.SIGKILL)
    old.wait()
    wait_until(lambda: stack.supervise() is not None and stack.procs[name] is not old, 60, 0.2,
               what=f"the restart of {name}")


def test_exporter_follows_the_broker_across_a_restart_and_is_restarted_itself(tmp_path):
    require_prometheus()
    settings = own_stack_settings(tmp_path)
    with EmbeddedStack(settings, services=(), prometheus=True) as stack:
        endpoint = stack.endpoints()["infra"]
        before = scrape(endpoint)
        assert before["fedguard_broker_up"] == 1 and before["fedguard_broker_resident_memory_bytes"] > 0

        old = stack.procs["broker"]
        old.send_signal(signal.SIGKILL)
        old.wait()
        down = scrape(endpoint)
        assert down["fedguard_broker_up"] == 0
        assert "fedguard_broker_resident_memory_bytes" not in down, "the RSS of a dead broker"
        wait_until(lambda: stack.supervise() is not None and stack.procs["broker"] is not old, 60, 0.2,
                   what="the restart of the broker")
        after = scrape(endpoint)  # the same exporter process: it read the new broker's pid from the pid file
        assert after["fedguard_broker_up"] == 1 and after["fedguard_broker_resident_memory_bytes"] > 0

        restart_by_supervision(stack, "infra")
        assert scrape(endpoint)["fedguard_redis_up"] == 1


def test_taken_prometheus_port_fails_before_anything_starts(tmp_path):
    require_prometheus()
    settings = own_stack_settings(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", settings.prometheus_port))
        squatter.listen()
        stack = EmbeddedStack(settings, prometheus=True)
        with pytest.raises(RuntimeError, match="FEDGUARD_PROMETHEUS_PORT") as raised:
            stack.start()
    assert "\n" not in str(raised.value)
    assert stack.procs == {}
