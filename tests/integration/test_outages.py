"""Redis outages lose nothing (issue 12, item 3): a stalled, killed or restarted Redis pauses validation, and every
honest record is accepted once Redis answers again; ``internal_error`` is left for bugs.

A real redis-server of the test's own (SIGSTOP, SIGKILL and a restart on the same port and append-only file need a
process the test owns), and a Validator driven directly, as the Faust agent drives it
(tests/integration/test_validator_redis.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedguard import registry
from fedguard.reasons import Reason
from fedguard.settings import Settings
from fedguard.stack import free_port, redis_command, wait_for_port, wait_for_redis
from processors import admission
from processors.validation import ValidUpdate, Validator
from tests.hostile import Fleet

pytestmark = pytest.mark.integration
N = 32  # parameters per update
DEVICES = 12


class RedisServer:
    """A redis-server on a fixed port with its append-only file in ``directory``: stop, kill and start it again."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(redis_command(self.port, self.directory, appendonly=True),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port, 15, self.proc)
        wait_for_redis(self.url)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def signal_after(self, sig: int, delay_s: float) -> threading.Timer:
        timer = threading.Timer(delay_s, lambda: os.kill(self.proc.pid, sig))
        timer.start()
        return timer

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def server(tmp_path):
    s = RedisServer(tmp_path / "redis")
    s.start()
    yield s
    s.close()


@pytest.fixture
def world(server, tmp_path):
    settings = Settings(redis_url=server.url, redis_prefix=f"fgo-{uuid.uuid4().hex[:8]}", model_id="mo",
                        data_dir=tmp_path / "data", max_update_norm=100.0, rate_device_capacity=1000.0,
                        rate_global_capacity=100000.0)
    server_key = X25519PrivateKey.generate()
    client = redis.Redis.from_url(server.url, decode_responses=True)
    client.set(registry.model_version_key(settings), 0)
    fleet = Fleet(settings, N, server_public=server_key.public_key())
    ids = [f"dev-{i:02d}" for i in range(DEVICES)]
    for device_id in ids:
        fleet.enroll(device_id)
    return settings, server_key, fleet, ids


def validator(settings: Settings, server_key, **client_options) -> Validator:
    # Short client timeouts: before the fix, the validator's retries (4 back-offs, ~4 s) gave up after ~9 s of a stall.
    client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True, **client_options)
    return Validator(settings, server_key, N, client)


def codes(outcomes) -> list[str]:
    return ["ok" if isinstance(o, ValidUpdate) else o.reason.value for o in outcomes]


def honest_batch(fleet: Fleet, ids: list[str], base: int, start: int) -> list:
    """One honest update per device for base version ``base`` (one seat per device per window)."""
    return [(fleet.seal(d, base=base), d.encode(), f"0:{start + i}") for i, d in enumerate(ids)]


def paused_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fedguard.validation" and "Redis" in r.getMessage()]


def test_a_redis_stall_pauses_validation_and_every_honest_update_is_accepted(world, server, caplog):
    """SIGSTOP the Redis while batches are validated (once with the key cache cold: the registry read stalls; once
    warm: the admission call stalls), SIGCONT after 12 s: every honest record is accepted, none internal_error, each
    device's sequence number advanced once per update, and the pause was logged a few times, not once per retry."""
    settings, server_key, fleet, ids = world
    caplog.set_level(logging.WARNING, logger="fedguard.validation")
    stall_s = 12.0

    async def scenario():
        v = validator(settings, server_key, socket_timeout=1, socket_connect_timeout=1)
        try:
            results = []
            for base, warm in ((0, False), (1, True)):
                if warm:
                    await v.validate_batch([(fleet.seal("dev-00", base=0), b"dev-00", "9:0")])  # warm the key cache
                    fleet.redis.set(registry.model_version_key(settings), base)
                batch = honest_batch(fleet, ids, base, start=100 * (base + 1))
                os.kill(server.proc.pid, signal.SIGSTOP)
                timer = server.signal_after(signal.SIGCONT, stall_s)
                started = time.monotonic()
                outcomes = await v.validate_batch(batch)
                results.append((codes(outcomes), time.monotonic() - started))
                timer.join()
            return results
        finally:
            await v.redis.aclose()

    (cold, cold_s), (warm, warm_s) = asyncio.run(scenario())
    assert cold == ["ok"] * DEVICES, cold
    assert warm == ["ok"] * DEVICES, warm
    assert cold_s >= stall_s - 1 and warm_s >= stall_s - 1  # it waited for Redis, it did not give up
    for device_id in ids:  # the last accepted update of each device is the one of the warm batch
        assert admission.admission_state(fleet.redis, settings, device_id)["window_base"] == "1"
    lines = paused_lines(caplog)
    assert any("validation resumes" in line for line in lines), lines
    assert 2 <= len(lines) <= 2 * (2 * stall_s / 5 + 3), lines  # a few lines per stall, not one per retry


def test_a_redis_restart_pauses_validation_and_it_resumes_on_the_same_state(world, server):
    """Redis killed (SIGKILL) and started again on the same port and append-only file 6 s later, while a batch waits:
    the batch completes with every honest record accepted; the state from before the crash was kept (an update
    accepted before the crash is still a replay after it, and a fresh validator finds every device's key)."""
    settings, server_key, fleet, ids = world
    first = honest_batch(fleet, ids, 0, start=0)
    second = honest_batch(fleet, ids, 1, start=100)

    async def scenario():
        v = validator(settings, server_key)
        try:
            before = codes(await v.validate_batch(first))
            fleet.redis.set(registry.model_version_key(settings), 1)  # the aggregator published version 1
            time.sleep(1.2)  # (appendfsync everysec; a crash of the process alone loses nothing anyway)
            server.kill()
            restart = threading.Timer(6.0, server.start)
            restart.start()
            started = time.monotonic()
            during = codes(await v.validate_batch(second))
            waited = time.monotonic() - started
            restart.join()
            replay = codes(await v.validate_batch([(first[0][0], first[0][1], "7:7")]))
            fresh = validator(settings, server_key)
            cold = codes(await fresh.validate_batch([(fleet.seal(ids[1], base=1), ids[1].encode(), "7:8")]))
            await fresh.redis.aclose()
            return before, during, waited, replay, cold
        finally:
            await v.redis.aclose()

    before, during, waited, replay, cold = asyncio.run(scenario())
    assert before == ["ok"] * DEVICES
    assert during == ["ok"] * DEVICES, during
    assert waited >= 5.0
    assert replay == ["replay"]
    assert cold == ["window_duplicate"]  # known (key read from the registry), and its seat for version 1 is taken


def test_a_bug_is_still_internal_error(world, monkeypatch):
    """What is not a Redis outage is a bug: the batch's records get internal_error, nothing waits or escapes."""
    settings, server_key, fleet, ids = world

    async def broken(self, pending):
        raise ValueError("a bug (test)")

    monkeypatch.setattr(Validator, "_start_admission", broken)

    async def scenario():
        v = validator(settings, server_key)
        try:
            return await asyncio.wait_for(v.validate_batch([(fleet.seal(ids[0]), ids[0].encode(), "0:0"),
                                                            (b"junk", None, "0:1")]), 10)
        finally:
            await v.redis.aclose()

    outcomes = asyncio.run(scenario())
    assert codes(outcomes) == ["internal_error", "malformed"]
    assert "a bug (test)" in outcomes[0].detail and outcomes[0].reason is Reason.INTERNAL_ERROR


def test_a_redis_response_error_that_is_not_an_outage_is_a_bug_and_one_that_is_waits(world):
    from redis.exceptions import BusyLoadingError, OutOfMemoryError, ResponseError

    from processors.admission import redis_outage

    assert redis_outage(BusyLoadingError("Redis is loading the dataset in memory"))
    assert redis_outage(OutOfMemoryError("command not allowed when used memory > 'maxmemory'"))
    assert redis_outage(ResponseError("MISCONF Errors writing to the AOF file"))
    assert not redis_outage(ResponseError("ERR Error running script: attempt to compare nil with number"))
    assert not redis_outage(ValueError("a bug"))


# -- the fleet counts only what the broker acknowledged -----------------------------------------------------------

def test_the_fleet_counts_and_logs_only_sends_the_broker_acknowledged(settings, tmp_path, caplog):
    """A round while the broker runs: every update counted as sent. The broker killed, another round: nothing is
    counted in ``fedguard_fleet_updates_sent_total`` nor logged as sent; the failures are logged and counted."""
    import dataclasses

    from kafka import KafkaProducer
    from prometheus_client import REGISTRY

    from fedguard.modelstore import ModelStore
    from fedguard.stack import broker_binary, initialize
    from fedguard.tasks import get_flat_params
    from producers.fleet import Fleet

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    broker = subprocess.Popen([broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                               "--storage-engine", "memory://tansu/"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    fleet = None
    try:
        wait_for_port("127.0.0.1", port, 30, broker)
        settings = dataclasses.replace(settings, kafka_bootstrap=f"127.0.0.1:{port}")
        initialize(settings)
        fleet = Fleet(settings)
        # The fleet's producer, with delivery bounded to a few seconds (default 2 minutes) to keep the test short.
        fleet.producer.close(timeout=5)
        fleet.producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5,
                                       max_request_size=settings.max_payload_bytes, request_timeout_ms=1500,
                                       delivery_timeout_ms=3000, max_block_ms=3000)
        params = get_flat_params(fleet.model)
        meta = ModelStore(settings.models_dir).save(0, params, {"model_id": settings.model_id, "parent": None})

        def sent() -> float:
            return REGISTRY.get_sample_value("fedguard_fleet_updates_sent_total") or 0.0

        def failed() -> float:
            return REGISTRY.get_sample_value("fedguard_fleet_send_failures_total") or 0.0

        caplog.set_level(logging.INFO, logger="fedguard.fleet")
        before = sent()
        assert fleet.run_round(meta) == settings.devices_per_round
        assert sent() - before == settings.devices_per_round
        # sampled again on the same version: a device the broker took an update from does not send a second one
        # (equivocation would cost it its seat); the others of the new draw do
        again = set(fleet.select(0, 1)) - set(fleet.select(0, 0))
        assert len(again) < settings.devices_per_round  # the draws overlap
        assert fleet.run_round(meta, attempt=1) == len(again)
        assert set(fleet.last_base) == {fleet.ids[i] for i in set(fleet.select(0, 0)) | again}
        # ... and after a restart: the fleet remembers it per model store (a store started afresh reuses versions)
        restarted = Fleet(settings)
        restarted.producer.close(timeout=5)
        restarted.producer = fleet.producer
        assert restarted.last_base == fleet.last_base
        assert restarted.run_round(meta) == 0
        client = registry.connect(settings)
        store = client.get(registry.model_store_key(settings))
        client.set(registry.model_store_key(settings), "another-store")
        assert restarted.load_sent() == {}
        if store:
            client.set(registry.model_store_key(settings), store)
        else:
            client.delete(registry.model_store_key(settings))
        restarted.models.close()

        broker.kill()
        broker.wait(10)
        before, failed_before = sent(), failed()
        caplog.clear()
        meta = ModelStore(settings.models_dir).save(1, params, {"model_id": settings.model_id, "parent": 0})
        assert fleet.run_round(meta, attempt=1) == 0
        assert sent() == before
        assert failed() - failed_before == settings.devices_per_round
        lines = [r.getMessage() for r in caplog.records if r.name == "fedguard.fleet"]
        assert any("were not acknowledged by the broker" in line for line in lines), lines
        assert any("0 updates sent" in line for line in lines), lines
    finally:
        if fleet is not None:
            fleet.producer.close(timeout=1)
            fleet.models.close()
        if broker.poll() is None:
            broker.kill()
            broker.wait(10)
