"""Supervision (issue 12, item 1): a process of the stack that exits is restarted with back-off and the restart
is reported on one line; the others keep running; only Ctrl-C / SIGTERM stops ``fedguard up``.

Real processes on the real broker and Redis: :meth:`EmbeddedStack.supervise` driven directly, then ``fedguard up``
with its own broker and Redis, whose children are killed with SIGKILL.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from fedguard import registry
from fedguard.modelstore import ModelStore
from fedguard.stack import EmbeddedStack, restart_delay
from tests.conftest import wait_until
from tests.e2e.test_pipeline_e2e import to_env_for_up

pytestmark = pytest.mark.e2e


def test_restart_delays_double_up_to_thirty_seconds():
    assert [restart_delay(n) for n in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_supervise_restarts_a_killed_service_with_back_off_and_leaves_the_others_running(settings):
    lines: list[str] = []
    stack = EmbeddedStack(settings, services=("aggregator", "fleet"), own_broker=False, own_redis=False,
                          say=lines.append)
    with stack:
        wait_until(lambda: ModelStore(settings.models_dir).versions(), 60, what="the aggregator's version 0")
        fleet_pid = stack.procs["fleet"].pid

        def kill_and_wait_for_restart(expected_delay: int) -> float:
            old = stack.procs["aggregator"]
            old.kill()
            old.wait()
            died = time.monotonic()
            wait_until(lambda: stack.supervise() is not None and stack.procs["aggregator"] is not old, 30, 0.1,
                       what="the aggregator's restart")
            assert f"fedguard: aggregator exited (code -9); restarting in {expected_delay}s" in lines, lines
            return time.monotonic() - died

        assert kill_and_wait_for_restart(1) >= 0.9
        assert kill_and_wait_for_restart(2) >= 1.9  # it died again at once: twice the wait
        # A process that ran for a minute before it exited starts the back-off over.
        stack.supervision["aggregator"].started_at -= 61
        assert kill_and_wait_for_restart(1) < 1.9

        assert stack.procs["fleet"].pid == fleet_pid and stack.procs["fleet"].poll() is None
        assert stack.check_alive() == []
        restarted = [line for line in lines if line.startswith("fedguard: aggregator restarted")]
        assert len(restarted) == 3, lines
        # The restarted aggregator works: it resumed from the store and published its version again.
        wait_until(lambda: "resuming from persisted version" in (stack.log_dir / "aggregator.log").read_text(), 30,
                   what="the restarted aggregator to resume")


class Up:
    """``fedguard up`` in a child process with its own broker and Redis; its stdout lines collected as they come."""

    ARGS = ("--task", "synthetic", "--devices", "4", "--per-round", "2", "--window-size", "2", "--window-deadline", "4",
            "--no-prometheus")

    def __init__(self, tmp_path, args: tuple[str, ...] = ARGS, extra_env: dict[str, str] | None = None) -> None:
        # A short round timeout: after a broker restart, devices whose updates were accepted for the round that was
        # lost hold their seat for that version; the fleet samples others after the timeout (docs/operations.md).
        env = {**os.environ, **to_env_for_up(tmp_path), "FEDGUARD_ROUND_TIMEOUT_S": "8", **(extra_env or {})}
        for name in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL"):
            env.pop(name, None)
        self.env = env
        self.data_dir = tmp_path / "data"
        self.proc = subprocess.Popen([sys.executable, "-m", "fedguard.cli", "up", *args],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.launcher = psutil.Process(self.proc.pid)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))

    def output(self) -> list[str]:
        while not self._queue.empty():
            self.lines.append(self._queue.get())
        return self.lines

    def wait_for_line(self, text: str, timeout_s: float) -> None:
        wait_until(lambda: any(text in line for line in self.output()), timeout_s, 0.2, what=repr(text))

    def child(self, name: str) -> psutil.Process:
        """The child process running ``name`` (a service, or the broker / redis binary)."""
        for child in self.launcher.children():
            cmdline = child.cmdline()
            if name in ("broker", "redis"):
                if cmdline and (("broker" in cmdline and name == "broker") or
                                ("redis-server" in cmdline[0] and name == "redis")):
                    return child
            elif len(cmdline) > 3 and cmdline[1:4] == ["-m", "fedguard.cli", name]:
                return child
        raise LookupError(name)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(90)
        return "\n".join(self.output())

    def kill(self) -> None:
        if self.proc.poll() is None:
            for child in self.launcher.children(recursive=True):
                child.kill()
            self.proc.kill()


def settings_of(up: Up):
    from fedguard.settings import from_env

    saved = dict(os.environ)
    try:
        os.environ.update(up.env)
        return from_env()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_up_restarts_killed_processors_and_redis_and_keeps_the_rest_running(tmp_path):
    up = Up(tmp_path)
    try:
        wait_until(lambda: len(up.launcher.children()) == 5, 60, what="the five processes")
        up.wait_for_line("Ctrl-C stops everything", 60)
        # `up` prints a status line per round
        up.wait_for_line("round 1  v1  acc ", 90)
        others = {name: up.child(name).pid for name in ("broker", "aggregator", "fleet")}

        up.child("processors").kill()
        up.wait_for_line("fedguard: processors exited (code -9); restarting in 1s", 15)
        up.wait_for_line("fedguard: processors restarted", 15)
        assert up.proc.poll() is None

        settings = settings_of(up)
        client = registry.connect(settings)
        wait_until(lambda: client.get(registry.model_version_key(settings)) is not None, 60, what="version 0")
        from fedguard.operator import token_path
        from producers.enroll import revoke

        revoke(settings, "dev-0003", reason="test", token=token_path(settings).read_text().strip())
        time.sleep(1.2)  # appendfsync everysec (a crash of the process alone loses nothing anyway)
        up.child("redis").kill()
        up.wait_for_line("fedguard: redis exited (code -9); restarting in 1s", 15)
        up.wait_for_line("fedguard: redis restarted", 15)
        client = registry.connect(settings)
        assert registry.get_device(client, settings, "dev-0003")["status"] == registry.REVOKED
        assert client.get(registry.model_version_key(settings)) is not None

        assert up.proc.poll() is None
        assert up.child("broker").pid == others["broker"]
        out = up.stop()
        assert up.proc.returncode == 0, out
        assert "fedguard stopped" in out and "stopping the stack" not in out
    finally:
        up.kill()


def test_up_restarts_a_killed_broker_recreates_the_topics_and_training_resumes(tmp_path):
    up = Up(tmp_path)
    try:
        store = ModelStore(tmp_path / "data" / "models" / settings_of(up).model_id)
        wait_until(lambda: len(store.versions()) >= 2, 90, what="version 1")
        up.child("broker").kill()
        up.wait_for_line("fedguard: broker exited (code -9); restarting in 1s", 15)
        up.wait_for_line("fedguard: broker restarted empty", 60)
        restarted = [line for line in up.output() if "broker restarted empty" in line][-1]
        assert "processors, aggregator, fleet restarted" in restarted
        assert up.proc.poll() is None
        after = store.versions()[-1]
        wait_until(lambda: store.versions()[-1] >= after + 1, 90, what="a version after the broker's restart")
        out = up.stop()
        assert up.proc.returncode == 0, out
    finally:
        up.kill()
