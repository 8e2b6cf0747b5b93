"""``fedguard watch`` and ``up``'s round lines (issue 11, item 4) on the real embedded stack: the real broker, Redis,
processors, aggregator and fleet on the synthetic task, under a live Sybil campaign and injected garbage.

Three devices, all sampled every round; two are compromised and send identical copies of one crafted update, which
the ensemble rejects together (a Sybil group), so reputation quarantines both after three windows. The view must
show every version, the attack, the rejections by reason, the detector flags and the quarantine; the reporter one
line per version, none twice, none missed; and with the services stopped the view says they are down.
"""

from __future__ import annotations

import io
import re
import threading
from collections import Counter

import pytest

from fedguard import registry
from fedguard.modelstore import ModelStore
from fedguard.stack import EmbeddedStack
from fedguard.watch import (RoundReporter, WatchState, collect, counter_by_label, metrics_endpoints, run_watch, scrape,
                            status_lines)
from processors.defence import quarantined_key
from producers import campaign
from producers.inject import inject
from tests.conftest import json_values, read_topic, wait_until

pytestmark = pytest.mark.e2e

ATTACKERS = ["dev-0000", "dev-0001"]
GARBAGE = 5


def rejected_so_far(settings) -> float:
    try:
        text = scrape(metrics_endpoints(settings)["processors"][0])
    except OSError:
        return 0.0
    return sum(counter_by_label(text, "fedguard_updates_rejected_total", "reason").values())


def frame(settings):
    out = io.StringIO()
    snap = run_watch(settings, threading.Event(), once=True, out=out)
    return snap, out.getvalue()


def reported_versions(lines: list[str]) -> list[int]:
    versions = []
    for line in lines:
        match = re.match(r"round (\d+)  v(\d+)  acc ", line)
        assert match and match.group(1) == match.group(2), line
        versions.append(int(match.group(2)))
    return versions


def test_watch_and_round_lines_follow_a_live_sybil_attack_and_show_a_stopped_stack_as_down(settings):
    settings = settings.with_overrides(num_devices=3, devices_per_round=3, window_size=3, window_deadline_s=10.0,
                                       round_timeout_s=15.0)
    store = ModelStore(settings.models_dir)
    client = registry.connect(settings)
    lines: list[str] = []
    with EmbeddedStack(settings, own_broker=False, own_redis=False) as stack:
        reporter = RoundReporter(settings)
        baseline = reporter.reported_upto
        assert baseline is not None  # Redis answered

        def version() -> int:
            assert stack.check_alive() == [], f"{stack.check_alive()} died; logs in {stack.log_dir}"
            lines.extend(reporter.poll())
            return store.versions()[-1] if store.versions() else -1

        wait_until(lambda: version() >= 1, 120, what="version 1")
        state = WatchState()  # what a running `fedguard watch` keeps between refreshes
        first = collect(settings, state)
        started = campaign.start(client, settings, "sybil", 0.0, devices=ATTACKERS)
        # Three attacked windows: the two copies are a Sybil group in the first, so both are quarantined.
        wait_until(lambda: version() >= started.start_version + 3, 240, what="three attacked rounds")
        wait_until(lambda: client.smembers(quarantined_key(settings)) == set(ATTACKERS), 60,
                   what="the attackers' quarantine")
        before = rejected_so_far(settings)
        assert inject(settings, "garbage", GARBAGE) == GARBAGE
        wait_until(lambda: rejected_so_far(settings) >= before + GARBAGE, 60, what="the garbage rejected")

        snap, text = frame(settings)
        second = collect(settings, state)
        state.close()
        wait_until(lambda: version() >= 0 and reporter.reported_upto >= snap.versions[-1].version, 60,
                   what="the reporter to catch up")
        reporter.close()

    # -- the view, live --------------------------------------------------------------------------------------------
    assert all(snap.sources.values()), (snap.sources, snap.errors)
    latest = snap.versions[-1].version
    assert latest >= started.start_version + 3
    assert [p.version for p in snap.versions] == list(range(latest + 1))  # every version, from the topic
    for p in snap.versions:
        assert p.accuracy == store.meta(p.version)["metrics"]["accuracy"]
    assert f"v{latest} (round {latest})" in text
    assert f"sybil on 2 devices (67% of the fleet) from v{started.start_version}" in text
    assert "running" in text.splitlines()[1]
    # Rejections by reason: the garbage's reasons as the dead-letter topic has them, each on its own line.
    reasons = Counter(r["reason"] for r in json_values(read_topic(settings, settings.topics.rejected)))
    garbage_reasons = {r for r in reasons if r not in ("quarantined", "window_duplicate", "stale")}
    assert garbage_reasons, reasons
    for reason, count in snap.rejections.totals.items():
        if count:
            assert re.search(rf"^  {reason} +{int(count)}\b", text, re.M), (reason, text)
    assert garbage_reasons <= {r for r, c in snap.rejections.totals.items() if c}
    # Detector flags and verdicts: the windows the attackers were rejected in.
    windows = json_values(read_topic(settings, settings.topics.windows))
    attacked = [m for w in windows for m in w["members"] if m["device_id"] in ATTACKERS
                and w["base_version"] >= started.start_version]
    # The two copies are rejected together in the first attacked window, and that window quarantines both (one window
    # in a Sybil group): no later window holds either.
    assert len([m for m in attacked if m["verdict"] == "reject"]) >= 2, [(m["verdict"], m["flags"]) for m in attacked]
    assert all("sybil" in m["flags"] for m in attacked), [(m["verdict"], m["flags"]) for m in attacked]
    assert snap.verdicts.totals["reject"] >= 2
    flags = {d: int(c) for d, c in snap.detector_flags.totals.items() if c}
    assert flags, snap.detector_flags
    flag_line = next(line for line in text.splitlines() if line.startswith("  flags"))
    for detector, count in flags.items():
        assert f"{detector} {count}" in flag_line, (detector, flag_line)
    assert "quarantined 2: dev-0000, dev-0001" in text
    # Trust: the attackers' is frozen since their quarantine (no window since), at the last value a window gave it,
    # and below the honest device's.
    attacker_trust = {m["device_id"]: m["trust"] for w in windows for m in w["members"] if m["device_id"] in ATTACKERS}
    assert sorted(t for t in snap.trust if t in attacker_trust.values()) == sorted(attacker_trust.values())
    assert f"3/3 devices rated  min {min(attacker_trust.values()):.3f}" in text

    # -- a running watch: the history grows, rates are counted between refreshes ------------------------------------
    assert [p.version for p in first.versions] == list(range(first.versions[-1].version + 1))
    assert [p.version for p in second.versions] == list(range(second.versions[-1].version + 1))
    assert second.versions[-1].version >= started.start_version + 3 > first.versions[-1].version
    assert second.interval_s > 0 and sum(second.rejections.delta.values()) >= GARBAGE
    assert reported_versions(status_lines(first, second)) == list(
        range(first.versions[-1].version + 1, second.versions[-1].version + 1))

    # -- the round lines ----------------------------------------------------------------------------------------
    versions = reported_versions(lines)
    assert versions == list(range(max(baseline, 0) + 1, reporter.reported_upto + 1)), versions  # no gap, no repeat
    by_version = dict(zip(versions, lines))
    first_attacked = by_version[started.start_version + 1]  # built from the first attacked window
    assert "members 3 (2 rejected" in first_attacked and "attack sybil(2 dev)" in first_attacked, first_attacked
    for v, line in by_version.items():
        meta = store.meta(v)
        assert f"acc {meta['metrics']['accuracy']:.3f}" in line, line
        assert f"members {meta['members']} ({meta['members'] - meta['accepted']} rejected" in line, line
        if v > started.start_version:
            assert "attack sybil(2 dev)" in line, line

    # -- the stack stopped: its services down, the broker's topic and Redis still read ---------------------------
    stopped, text = frame(settings)
    assert "broker up  redis up  processors DOWN  aggregator DOWN  fleet DOWN" in text, text
    assert "processors down: connection refused" in text and "rejections  ? (processors down" in text
    assert stopped.versions[-1].version >= latest and "quarantined 2: dev-0000, dev-0001" in text
    after = RoundReporter(settings)
    try:
        assert after.poll() == []  # nothing new since it started
    finally:
        after.close()
