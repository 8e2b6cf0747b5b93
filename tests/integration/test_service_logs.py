"""Service logs are for people: the processors' log (what `fedguard up` writes to logs/processors.log) holds
lines, not the frames and cursor codes of Faust's terminal spinner."""

from __future__ import annotations

import urllib.request

from fedguard.stack import EmbeddedStack
from tests.conftest import wait_until


def _serves(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return b"fedguard_updates_received_total" in reply.read()
    except OSError:
        return False


def test_processors_log_has_no_terminal_escape_codes(settings):
    stack = EmbeddedStack(settings, services=("processors", "aggregator", "fleet"), own_broker=False,
                          own_redis=False)
    with stack:
        wait_until(lambda: _serves(stack.endpoints()["processors"]), 60, what="the processors' metrics")
        # A few rounds flow, so the worker went through start-up and its agents logged whatever they log.
        wait_until(lambda: b"fedguard_updates_valid_total 0.0" not in urllib.request.urlopen(
            stack.endpoints()["processors"], timeout=2).read(), 90, what="validated updates")
    log = (stack.log_dir / "processors.log").read_bytes()
    assert b"processors worker starting" in log, log[-400:]
    assert b"\x1b" not in log and b"\r" not in log, log[-400:]
