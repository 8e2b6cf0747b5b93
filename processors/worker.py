"""Entry point of the processors: one Faust worker (:func:`run_worker`), or a pool of them (:func:`run_workers`).

``fedguard processors --workers N`` (N > 1) runs a parent process that starts N worker processes (each
``fedguard processors --workers 1`` with its own Faust web port and metrics port), restarts one that exits after a
short back-off, forwards SIGTERM / SIGINT to them and waits for them. The workers join one consumer group and share
the partitions; a worker that dies hands its partitions over to the others (docs/operations.md, "Two processors
workers"). The parent owns no metrics: each worker exports its own on its own port.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import faust
from prometheus_client import start_http_server

from fedguard.settings import Settings, to_env
from processors.allocator import keep_freed_memory
from processors.app import create_app

log = logging.getLogger("fedguard.processors")


def run_worker(settings: Settings, *, web_port: int | None = None, metrics_port: int | None = None,
               loglevel: str = "warning") -> None:
    keep_freed_memory()  # see processors/allocator.py: plaintext buffers are reused instead of page-faulted again
    start_http_server(metrics_port or settings.processors_metrics_port, addr=settings.metrics_host)
    app = create_app(settings, web_port=web_port)
    log.info("processors worker starting: %s -> %s / %s, metrics on port %d", settings.topics.raw,
             settings.topics.valid, settings.topics.rejected, metrics_port or settings.processors_metrics_port)
    worker = faust.Worker(app, loglevel=loglevel)
    if not wants_spinner(worker.stdout):
        worker.spinner = None  # its frames and cursor codes would fill a log file (`up` writes logs/processors.log)
    worker.execute_from_commandline()


def wants_spinner(stream) -> bool:
    """Faust draws a progress spinner on its stdout; only a terminal should get one."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


# -- a pool of workers --------------------------------------------------------------------------------------------
RESTART_FIRST_S = 1.0  # back-off before restarting a worker that exited, doubling per exit in a row ...
RESTART_MAX_S = 10.0  # ... up to this (short: the other workers hold its partitions meanwhile, and lag grows)
RESTART_RESET_AFTER_S = 60.0  # a worker that ran this long before it exited starts the back-off over
STOP_TIMEOUT_S = 12.0  # SIGTERM to SIGKILL for a worker that does not stop (`up` gives the parent 15 s)
POLL_S = 0.5


def restart_delay(quick_exits: int) -> float:
    """The wait before restart number ``quick_exits + 1`` in a row: 1, 2, 4, 8, 10, 10 ... seconds."""
    return min(RESTART_MAX_S, RESTART_FIRST_S * 2 ** min(quick_exits, 16))


def other_ports(settings: Settings) -> set[int]:
    """The ports the settings give the stack's other processes, which a worker's port must not take."""
    return {settings.broker_port, settings.redis_port, settings.aggregator_metrics_port, settings.fleet_metrics_port,
            settings.infra_metrics_port, settings.prometheus_port}


def worker_ports(base: int, count: int, taken: set[int]) -> list[int]:
    """One port per worker: ``base``, ``base + 1`` ... skipping the ports in ``taken`` (with the default settings
    the metrics ports after 19464 are the aggregator's, the fleet's and the infrastructure exporter's)."""
    ports: list[int] = []
    port = base
    while len(ports) < count:
        if port not in taken:
            ports.append(port)
        port += 1
    return ports


def pool_ports(settings: Settings, count: int, web_port: int | None = None,
               metrics_port: int | None = None) -> tuple[list[int], list[int]]:
    """The Faust web ports and the metrics ports of ``count`` workers: from the given bases (default: the settings'
    processors ports) up, clear of the other processes' ports and of each other."""
    taken = other_ports(settings)
    webs = worker_ports(web_port or settings.processors_web_port, count, taken)
    return webs, worker_ports(metrics_port or settings.processors_metrics_port, count, taken | set(webs))


def worker_command(web_port: int, metrics_port: int) -> list[str]:
    """One worker of the pool: a single-worker ``fedguard processors`` (its settings come in the environment)."""
    return [sys.executable, "-m", "fedguard.cli", "processors", "--workers", "1", "--web-port", str(web_port),
            "--metrics-port", str(metrics_port)]


def _die_with(parent_pid: int):
    """In the worker before exec: get SIGTERM when the parent dies, even by SIGKILL (Linux prctl; the signal follows
    the thread that forked, so the parent starts workers from its main thread only)."""
    def prepare() -> None:
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            return
        if os.getppid() != parent_pid:  # the parent died before prctl: nobody would send the signal
            os._exit(1)
    return prepare


@dataclass
class PoolWorker:
    index: int
    web_port: int
    metrics_port: int
    proc: subprocess.Popen | None = None
    started_at: float = 0.0  # monotonic
    quick_exits: int = 0  # exits in a row, each after less than RESTART_RESET_AFTER_S of running
    restart_at: float | None = None  # monotonic time of the scheduled restart

    def start(self, env: dict[str, str]) -> None:
        # Its own process group: a terminal's Ctrl-C reaches the parent only, which forwards it once.
        self.proc = subprocess.Popen(worker_command(self.web_port, self.metrics_port), env=env,
                                     stdin=subprocess.DEVNULL, preexec_fn=_die_with(os.getpid()), process_group=0)
        self.started_at = time.monotonic()
        self.restart_at = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def supervise_pool(pool: list[PoolWorker], env: dict[str, str], now: float) -> None:
    """One supervision step: schedule the restart of a worker that exited, and do the restarts that are due."""
    for worker in pool:
        if worker.restart_at is None and not worker.alive():
            if now - worker.started_at >= RESTART_RESET_AFTER_S:
                worker.quick_exits = 0
            delay = restart_delay(worker.quick_exits)
            worker.quick_exits += 1
            worker.restart_at = now + delay
            log.warning("processors worker %d exited (code %s); restarting in %gs", worker.index,
                        worker.proc.returncode if worker.proc else None, delay)
        elif worker.restart_at is not None and worker.restart_at <= now:
            try:
                worker.start(env)
            except OSError as exc:  # e.g. no memory to fork: tried again after the next back-off step
                delay = restart_delay(worker.quick_exits)
                worker.quick_exits += 1
                worker.restart_at = now + delay
                log.warning("restarting processors worker %d failed (%s); trying again in %gs", worker.index, exc,
                            delay)
                continue
            log.warning("processors worker %d restarted (pid %d)", worker.index, worker.proc.pid)


def stop_pool(pool: list[PoolWorker], signum: int, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Send ``signum`` to every running worker, wait for them to stop, and kill those still running after
    ``timeout_s`` (a killed worker's records are re-delivered to the next owner: at-least-once)."""
    running = [w.proc for w in pool if w.alive()]
    for proc in running:
        proc.send_signal(signum)
    deadline = time.monotonic() + timeout_s
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("processors worker (pid %d) did not stop within %gs: killing it", proc.pid, timeout_s)
            proc.kill()
            proc.wait()


def run_workers(settings: Settings, count: int, web_port: int | None = None,
                metrics_port: int | None = None) -> int:
    """Run ``count`` workers until SIGTERM or SIGINT, which is forwarded to them; returns the exit code (0)."""
    received: list[int] = []
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    webs, metrics = pool_ports(settings, count, web_port, metrics_port)
    pool = [PoolWorker(i, web, metric) for i, (web, metric) in enumerate(zip(webs, metrics))]
    env = {**os.environ, **to_env(settings)}
    log.info("processors: %d workers sharing the partitions; Faust web ports %s, metrics ports %s", count,
             ", ".join(map(str, webs)), ", ".join(map(str, metrics)))
    try:
        for worker in pool:
            worker.start(env)
            log.info("processors worker %d started (pid %d), metrics on port %d", worker.index, worker.proc.pid,
                     worker.metrics_port)
        while not stop.wait(POLL_S):
            supervise_pool(pool, env, time.monotonic())
    finally:
        stop_pool(pool, received[0] if received else signal.SIGTERM)
    return 0
