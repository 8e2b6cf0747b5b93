"""Shared fixtures: a real Tansu broker and a real Redis for the session, fresh names and ports per test."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedguard import records
from fedguard.settings import Settings, Topics
from fedguard.stack import broker_binary, free_port, temporary_redis, wait_for_port
from fedguard.topicio import read_until_idle


# kafka-python logs every closed connection at ERROR; on a failure that would bury the assertion.
logging.getLogger("kafka").setLevel(logging.CRITICAL)


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """A Tansu broker (memory storage) on a free loopback port, for the whole session."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("broker") / "broker.log", "wb")
    proc = subprocess.Popen([broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                             "--storage-engine", "memory://tansu/"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, 30, proc)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on a free port (FEDGUARD_TEST_REDIS_URL to use one that is already running)."""
    if os.environ.get("FEDGUARD_TEST_REDIS_URL"):
        yield os.environ["FEDGUARD_TEST_REDIS_URL"]
        return
    with temporary_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


_counter = itertools.count()


@pytest.fixture
def settings(broker, redis_url, tmp_path) -> Settings:
    """Settings with this test's own topics, Redis namespace, model id, data dir and ports."""
    tag = f"t{next(_counter)}{uuid.uuid4().hex[:6]}"
    topics = Topics(**{name: f"{tag}.{value}" for name, value in Topics().__dict__.items()})
    return Settings(kafka_bootstrap=broker, redis_url=redis_url, data_dir=tmp_path / "data", topics=topics,
                    redis_prefix=f"fg-{tag}", model_id=f"m{tag}", task="synthetic", num_devices=6,
                    devices_per_round=3, window_size=3, window_deadline_s=5.0, round_timeout_s=20.0,
                    processors_web_port=free_port(), processors_metrics_port=free_port(),
                    aggregator_metrics_port=free_port(), fleet_metrics_port=free_port())


def read_topic(settings: Settings, topic: str, idle_s: float = 3.0, timeout_s: float = 60.0) -> list:
    """Every record of ``topic`` from the beginning, read until nothing new arrives for ``idle_s``."""
    return read_until_idle(settings, topic, idle_s, timeout_s=timeout_s, client_id="fedguard-tests",
                           max_partition_fetch_bytes=64 << 20, fetch_max_bytes=64 << 20)


def wait_until(predicate, timeout_s: float, interval_s: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


def json_values(messages) -> list[dict]:
    return [records.loads(m.value) for m in messages]


BENCH = Path(__file__).resolve().parents[1] / "bench"


@contextlib.contextmanager
def bench_script(name: str):
    """``bench/<name>.py`` imported as a module, with bench/ on ``sys.path`` as when the script runs (it imports
    bench/_machine.py); both undone afterwards. For tests of a benchmark's pure parts."""
    sys.path.insert(0, str(BENCH))
    module_name = f"bench_{name}"
    try:
        spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(module_name, None)
        sys.path.remove(str(BENCH))

