"""The infrastructure exporter: broker, Redis and disk as Prometheus gauges (``python -m fedguard.infra_metrics``).

The embedded stack runs it as one more supervised process when it runs Prometheus (job ``fedguard-infra``, port
``infra_metrics_port``). Every value is read when Prometheus scrapes, so it is as fresh as the scrape:

* broker: ``fedguard_broker_up`` (the first reachable bootstrap address accepts a TCP connection) and
  ``fedguard_broker_resident_memory_bytes`` (RSS of the embedded broker process, from ``/proc``; absent when the
  broker is an external Kafka, whose process is not ours to read). The embedded broker's memory engine keeps every
  record and ignores retention: its RSS grows with the traffic and is the number to watch.
* Redis: ``fedguard_redis_up`` (PING), and from one ``INFO``: used and resident memory, connected clients, whether
  the append-only file is on and its last write succeeded (absent while Redis is down).
* disk: ``fedguard_model_store_bytes`` (every model version under ``<data dir>/models``),
  ``fedguard_update_store_bytes`` (the validated tensors waiting for their window under ``<data dir>/updates``,
  fedguard/updatestore.py; bounded by the aggregator's retention), each directory walk cached for a few seconds, and
  ``fedguard_data_dir_free_bytes``.

The broker's and Redis' process ids come from a small JSON file the stack rewrites whenever it starts either of
them (:func:`pid_file`), so a broker restarted by the supervisor is followed without restarting this exporter.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.registry import Collector

from fedguard.settings import Settings, from_env

log = logging.getLogger("fedguard.infra_metrics")

DIRECTORY_CACHE_S = 5.0  # a scrape every 5 s must not walk a large model store every time
PROBE_TIMEOUT_S = 1.0  # a scrape times out at 10 s by default: each probe stays far below it

# Set on every scrape by InfraCollector; a NaN value means "unknown" and is left out of the exposition.
GAUGES = CollectorRegistry(auto_describe=True)
BROKER_UP = Gauge("fedguard_broker_up", "1 if a Kafka bootstrap address accepts a TCP connection", registry=GAUGES)
BROKER_RSS = Gauge("fedguard_broker_resident_memory_bytes",
                   "Resident memory of the embedded broker process (absent for an external broker)", registry=GAUGES)
REDIS_UP = Gauge("fedguard_redis_up", "1 if Redis answers PING", registry=GAUGES)
REDIS_USED_MEMORY = Gauge("fedguard_redis_used_memory_bytes", "Memory Redis' allocator holds (INFO used_memory)",
                          registry=GAUGES)
REDIS_RSS = Gauge("fedguard_redis_resident_memory_bytes", "Resident memory of Redis (INFO used_memory_rss)",
                  registry=GAUGES)
REDIS_CLIENTS = Gauge("fedguard_redis_connected_clients", "Client connections to Redis", registry=GAUGES)
REDIS_AOF_ENABLED = Gauge("fedguard_redis_aof_enabled", "1 if Redis persists to an append-only file",
                          registry=GAUGES)
REDIS_AOF_LAST_WRITE_OK = Gauge("fedguard_redis_aof_last_write_ok",
                                "1 if Redis' last append-only file write succeeded (0: writes are failing, e.g. a "
                                "full disk)", registry=GAUGES)
MODEL_STORE_BYTES = Gauge("fedguard_model_store_bytes", "Bytes of every model version under <data dir>/models",
                          registry=GAUGES)
UPDATE_STORE_BYTES = Gauge("fedguard_update_store_bytes",
                           "Bytes of the validated update tensors under <data dir>/updates (the update store)",
                           registry=GAUGES)
DATA_DIR_FREE = Gauge("fedguard_data_dir_free_bytes", "Free bytes on the file system of the data dir",
                      registry=GAUGES)


# -- process ids, written by the stack -------------------------------------------------------------------------------

def pid_file(settings: Settings) -> Path:
    return settings.data_dir / "stack-pids.json"


def read_pids(path: Path) -> dict[str, int]:
    """name -> pid; empty if the file is missing or half-written."""
    try:
        return {name: int(pid) for name, pid in json.loads(Path(path).read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def write_pid(path: Path, name: str, pid: int | None) -> None:
    """Record (or, with None, forget) one process id; atomic, so a scrape never reads half a file."""
    pids = read_pids(path)
    if pid is None:
        pids.pop(name, None)
    else:
        pids[name] = pid
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(pids))
    os.replace(tmp, path)


# -- readings (small pure functions where possible) ------------------------------------------------------------------

def parse_vmrss(status: str) -> int | None:
    """Resident bytes from the text of ``/proc/<pid>/status`` (``VmRSS:  12345 kB``)."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            return int(value) * 1024 if unit == "kB" else int(value)
    return None


def resident_bytes(pid: int) -> int | None:
    """RSS of a running process, None if it is gone (or a zombie, which has no VmRSS)."""
    try:
        return parse_vmrss(Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None


def bootstrap_addresses(bootstrap: str) -> list[tuple[str, int]]:
    """``"a:9092,b:9093"`` -> ``[("a", 9092), ("b", 9093)]``."""
    addresses = []
    for entry in bootstrap.split(","):
        host, _, port = entry.strip().rpartition(":")
        addresses.append((host.strip("[]"), int(port)))
    return addresses


def reachable(addresses: Iterable[tuple[str, int]], timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    for host, port in addresses:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return True
        except OSError:
            continue
    return False


def redis_reading(info: dict) -> dict[str, float]:
    """The Redis gauges from an ``INFO`` reply (redis-py's parsed dict)."""
    aof_ok = info.get("aof_last_write_status")
    return {
        "used_memory": float(info["used_memory"]),
        "rss": float(info.get("used_memory_rss", math.nan)),
        "clients": float(info.get("connected_clients", math.nan)),
        "aof_enabled": float(info.get("aof_enabled", math.nan)),
        "aof_last_write_ok": math.nan if aof_ok is None else float(aof_ok == "ok"),
    }


def directory_bytes(path: Path) -> int:
    """Total size of the regular files under ``path`` (0 if it does not exist); files vanishing meanwhile are
    skipped (the aggregator replaces files by rename)."""
    total = 0
    stack = [Path(path)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


def free_bytes(path: Path) -> float:
    try:
        return float(shutil.disk_usage(path).free)
    except OSError:
        return math.nan


@dataclass
class Cached:
    """``compute()``'s value, computed again at most every ``ttl_s`` seconds."""
    compute: Callable[[], float]
    ttl_s: float
    clock: Callable[[], float] = time.monotonic
    _value: float = math.nan
    _at: float | None = None

    def get(self) -> float:
        now = self.clock()
        if self._at is None or now - self._at >= self.ttl_s:
            self._value, self._at = self.compute(), now
        return self._value


# -- the collector -----------------------------------------------------------------------------------------------------

class InfraCollector(Collector):
    """Reads the infrastructure on every scrape and exposes :data:`GAUGES`, leaving unknown (NaN) values out."""

    def __init__(self, settings: Settings, pids_path: Path | None = None) -> None:
        import redis

        self.settings = settings
        self.pids_path = pids_path or pid_file(settings)
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=PROBE_TIMEOUT_S,
                                          socket_connect_timeout=PROBE_TIMEOUT_S)
        self.model_store = Cached(lambda: float(directory_bytes(settings.data_dir / "models")), DIRECTORY_CACHE_S)
        self.update_store = Cached(lambda: float(directory_bytes(settings.update_store_dir)), DIRECTORY_CACHE_S)
        self._lock = threading.Lock()  # scrapes may overlap: each sets and reads the gauges as a whole

    def refresh(self) -> None:
        BROKER_UP.set(reachable(bootstrap_addresses(self.settings.kafka_bootstrap)))
        pid = read_pids(self.pids_path).get("broker")
        rss = resident_bytes(pid) if pid is not None else None
        BROKER_RSS.set(math.nan if rss is None else rss)
        self.refresh_redis()
        MODEL_STORE_BYTES.set(self.model_store.get())
        UPDATE_STORE_BYTES.set(self.update_store.get())
        DATA_DIR_FREE.set(free_bytes(self.settings.data_dir))

    def refresh_redis(self) -> None:
        import redis

        try:
            self.redis.ping()
            reading = redis_reading(self.redis.info())
            REDIS_UP.set(1)
        except redis.exceptions.RedisError:  # down, loading its append-only file, or refusing us
            REDIS_UP.set(0)
            reading = dict.fromkeys(("used_memory", "rss", "clients", "aof_enabled", "aof_last_write_ok"), math.nan)
        REDIS_USED_MEMORY.set(reading["used_memory"])
        REDIS_RSS.set(reading["rss"])
        REDIS_CLIENTS.set(reading["clients"])
        REDIS_AOF_ENABLED.set(reading["aof_enabled"])
        REDIS_AOF_LAST_WRITE_OK.set(reading["aof_last_write_ok"])

    def collect(self):
        with self._lock:
            self.refresh()
            families = list(GAUGES.collect())
        for family in families:
            family.samples = [s for s in family.samples if not math.isnan(s.value)]
            if family.samples:
                yield family


def serving_registry(settings: Settings, pids_path: Path | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)  # (describing would scrape: collect() is the only way in)
    registry.register(InfraCollector(settings, pids_path))
    return registry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedguard.infra_metrics", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, help="default: $FEDGUARD_INFRA_METRICS_PORT (19467)")
    parser.add_argument("--pid-file", type=Path, help="default: <data dir>/stack-pids.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = from_env()
    port = args.port or settings.infra_metrics_port
    try:
        start_http_server(port, addr=settings.metrics_host, registry=serving_registry(settings, args.pid_file))
    except OSError as exc:
        print(f"fedguard infra-metrics: cannot listen on {settings.metrics_host}:{port} ({exc.strerror}); "
              f"set FEDGUARD_INFRA_METRICS_PORT to a free port", file=sys.stderr)
        return 1
    log.info("infrastructure metrics on http://%s:%d/metrics", settings.metrics_host, port)
    threading.Event().wait()  # the HTTP server's thread serves; SIGTERM ends the process
    return 0


if __name__ == "__main__":
    sys.exit(main())
