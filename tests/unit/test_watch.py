"""``fedguard watch`` and ``up``'s round lines (issue 11, item 4): the pure parts on hand-made snapshots, and the I/O
parts against ports nothing listens on (every source down: shown, never raised)."""

from __future__ import annotations

import io
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server

from fedguard import records
from fedguard.settings import Settings
from fedguard.stack import free_port
from fedguard.watch import (BLOCKS, CLEAR, SOURCES, AttackView, Counts, ModelsFeed, RoundReporter, Snapshot,
                            VersionPoint, WatchState, collect, counter_by_label, counter_changes, fit_items,
                            metrics_endpoints, render, run_watch, sparkline, status_line, status_lines, summed_counter,
                            version_point)

AT = 1_700_000_000.0
ALL_UP = dict.fromkeys(SOURCES, True)


def point(version: int, accuracy: float | None = 0.8, backdoor: float | None = 0.02, members: int = 10,
          accepted: int = 10, downweighted: int = 0, note: str = "") -> VersionPoint:
    return VersionPoint(version=version, round=version, accuracy=accuracy, backdoor_accuracy=backdoor,
                        members=members, accepted=accepted, downweighted=downweighted, rule="norm_clip", note=note)


def snapshot(**overrides) -> Snapshot:
    values = dict(model_id="fedguard", at=AT, sources=dict(ALL_UP), versions=(), current_version=None,
                  configured_rule="norm_clip", rejections=Counts({}), detector_flags=Counts({}), verdicts=Counts({}),
                  devices=0, trust=(), quarantined=(), attack=None)
    values.update(overrides)
    return Snapshot(**values)


SYBIL = AttackView(kind="sybil", devices=2, fraction=0.2, start_version=5, fired=3, rounds=None, stopped=False)


# -- sparkline ----------------------------------------------------------------------------------------------------
def test_sparkline_scales_from_the_lowest_to_the_highest_block():
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7], 8) == BLOCKS
    assert sparkline([3.0, 1.0], 8) == "█▁"


def test_sparkline_keeps_the_last_width_values():
    assert sparkline([7, 7, 0, 0, 7], 2) == "▁█"
    assert sparkline([1, 2, 3], 10) == "▁▅█"  # fewer values than the width: no padding
    assert sparkline([1, 2], 0) == "" and sparkline([], 5) == ""


def test_sparkline_shows_missing_and_non_finite_values_as_spaces():
    assert sparkline([0.0, None, float("nan"), 1.0, float("inf")], 5) == "▁  █ "
    assert sparkline([None, float("nan")], 5) == "  "


def test_sparkline_of_a_constant_series_sits_at_mid_height():
    line = sparkline([0.5] * 6, 10)
    assert line == BLOCKS[3] * 6


def test_sparkline_on_a_fixed_scale_clamps_values_outside_it():
    assert sparkline([0.0, 0.5, 1.0], 3, lo=0.0, hi=1.0) == "▁▅█"
    assert sparkline([0.02, 0.03], 2, lo=0.0, hi=1.0) == "▁▁"  # noise near zero stays flat
    assert sparkline([-1.0, 2.0], 2, lo=0.0, hi=1.0) == "▁█"


# -- fitting lists ------------------------------------------------------------------------------------------------
def test_fit_items_shows_what_fits_and_counts_the_rest():
    ids = [f"dev-{i:04d}" for i in range(50)]
    text = fit_items(ids, 40)
    assert len(text) <= 40 and text.startswith("dev-0000, dev-0001") and text.endswith("more")
    shown = text.count("dev-")
    assert f"+{50 - shown} more" in text
    assert fit_items(ids[:2], 40) == "dev-0000, dev-0001"
    assert fit_items([], 10) == ""
    assert len(fit_items(ids, 5)) <= 5


# -- status lines -------------------------------------------------------------------------------------------------
def test_status_line_of_a_new_version_has_every_field():
    before = snapshot(versions=(point(11, accuracy=0.849),))
    after = snapshot(versions=(point(11, accuracy=0.849),
                               point(12, accuracy=0.853, backdoor=0.031, accepted=8, downweighted=1)),
                     quarantined=("dev-0003",), attack=SYBIL)
    assert status_line(before, after) == ("round 12  v12  acc 0.853 (+0.004)  backdoor 0.031  members 10 (2 rejected, "
                                          "1 down-weighted)  quarantined 1  attack sybil(2 dev)")


def test_status_line_is_none_without_a_new_version():
    same = snapshot(versions=(point(0), point(1)))
    assert status_line(same, same) is None
    assert status_line(None, snapshot()) is None
    assert status_line(None, snapshot(versions=(point(0),))) is None  # version 0 is not a round


def test_status_lines_give_one_line_per_new_round_oldest_first():
    prev = snapshot(versions=(point(0), point(1)))
    now = snapshot(versions=(point(0), point(1), point(2), point(3)))
    lines = status_lines(prev, now)
    assert [line.split()[1] for line in lines] == ["2", "3"]
    assert status_line(prev, now) == lines[-1]


def test_status_line_without_redis_or_accuracy_says_unknown_and_notes_a_skipped_rule():
    now = snapshot(versions=(point(4, accuracy=None, backdoor=None, accepted=0, note="rule skipped"),),
                   sources={**ALL_UP, "redis": False}, quarantined=None, trust=None, devices=None)
    line = status_line(None, now)
    assert line == ("round 4  v4  acc ?  members 10 (10 rejected, 0 down-weighted)  quarantined ?  attack ?  "
                    "[rule skipped]")


def test_a_finished_or_stopped_campaign_is_no_active_attack():
    done = AttackView(kind="model_replacement", devices=3, fraction=0.3, start_version=4, fired=1, rounds=1,
                      stopped=False)
    stopped = AttackView(kind="sybil", devices=2, fraction=0.2, start_version=4, fired=2, rounds=None, stopped=True)
    for attack in (done, stopped, None):
        assert status_line(None, snapshot(versions=(point(5),), attack=attack)).endswith("attack none")


# -- render -------------------------------------------------------------------------------------------------------
def full_snapshot() -> Snapshot:
    versions = tuple(point(v, accuracy=0.5 + 0.03 * v, backdoor=0.9 if v >= 8 else 0.02, accepted=8, downweighted=1)
                     for v in range(13))
    return snapshot(versions=versions, current_version=12, interval_s=2.0,
                    rejections=Counts({"malformed": 4, "window_duplicate": 10, "stale": 0},
                                      {"malformed": 1, "window_duplicate": 2, "stale": 0}),
                    detector_flags=Counts({"sybil": 4, "magnitude": 1, "direction": 0},
                                          {"sybil": 2, "magnitude": 0, "direction": 0}),
                    verdicts=Counts({"downweight": 3, "reject": 4}, {"downweight": 0, "reject": 2}),
                    devices=10, trust=(0.9, 0.85, 0.2, 0.1), quarantined=("dev-0003",), attack=SYBIL)


def test_render_shows_the_model_the_attack_rejections_flags_trust_and_quarantine():
    text = render(full_snapshot())
    assert "model fedguard  v12 (round 12)  rule norm_clip" in text
    assert "sybil on 2 devices (20% of the fleet) from v5, fired in 3 rounds, running" in text
    assert "services    broker up  redis up  processors up  aggregator up  fleet up" in text
    assert "accuracy    0.860  +0.030" in text and "v0..v12 0.500..0.860" in text
    assert "backdoor    0.900" in text and "▁▁▁▁▁▁▁▁▇▇▇▇▇" in text  # the backdoor's jump, on a 0..1 scale
    assert "last round  v12: 10 members, 2 rejected, 1 down-weighted" in text
    assert "rejections  14 total, +3 since the last refresh (1.50/s)" in text
    lines = text.splitlines()
    reasons = [line.split()[0] for line in lines if line.startswith("  ") and "/s)" in line]
    assert reasons == ["window_duplicate", "malformed"]  # largest first, zero counts left out
    assert "stale" not in text
    assert "flags     sybil 4 (+2)  magnitude 1 (+0)" in text and "direction" not in text
    assert "members down-weighted 3 (+0), rejected 4 (+2)" in text
    assert "4/10 devices rated  min 0.100  median 0.525  max 0.900  below 0.3: 2  below 0.15: 1" in text
    assert "quarantined 1: dev-0003" in text


def test_render_of_an_empty_stack():
    text = render(snapshot())
    assert "no version yet" in text and "no model version on the models topic yet" in text
    assert "rejections  0 total" in text and "no flags" in text
    assert "0/0 devices rated (no window judged yet)" in text and "quarantined 0" in text
    assert "attack      none" in text
    assert "DOWN" not in text


def test_render_with_every_source_down_says_so_for_each_section():
    down = snapshot(sources=dict.fromkeys(SOURCES, False),
                    errors={"broker": "not reachable", "redis": "connection refused",
                            "processors": "connection refused", "aggregator": "timed out"},
                    rejections=None, detector_flags=None, verdicts=None, devices=None, trust=None, quarantined=None)
    text = render(down)
    assert "broker DOWN  redis DOWN  processors DOWN  aggregator DOWN  fleet DOWN" in text
    for line in ("broker down: not reachable", "redis down: connection refused", "aggregator down: timed out",
                 "fleet down"):
        assert line in text
    assert "broker down: no versions read" in text
    assert "rejections  ? (processors down: connection refused)" in text
    assert "trust       ? (redis down: connection refused)" in text
    assert "attack      ? (redis down)" in text


def test_render_with_only_the_processors_down_keeps_the_model_from_the_topic():
    s = full_snapshot()
    text = render(snapshot(versions=s.versions, sources={**ALL_UP, "processors": False}, rejections=None,
                           detector_flags=None, verdicts=None))
    assert "v12 (round 12)" in text and "rejections  ? (processors down)" in text


def test_render_shows_missing_accuracies_as_gaps():
    versions = (point(1, accuracy=0.5, backdoor=None), point(2, accuracy=float("nan"), backdoor=None),
                point(3, accuracy=None, backdoor=None), point(4, accuracy=0.7, backdoor=None))
    text = render(snapshot(versions=versions))
    assert "▁  █" in text
    assert "backdoor    not measured" in text
    no_value = render(snapshot(versions=(point(1, accuracy=None),)))
    assert "accuracy       ?" in no_value


@pytest.mark.parametrize("width", [30, 60, 100, 160])
def test_render_fits_the_width_with_a_long_quarantine_list_and_history(width):
    versions = tuple(point(v, accuracy=0.5 + (v % 7) / 20) for v in range(400))
    quarantined = tuple(f"dev-{i:04d}" for i in range(300))
    text = render(snapshot(versions=versions, quarantined=quarantined, trust=(0.1,) * 300, devices=1000,
                           attack=SYBIL), width)
    assert all(len(line) <= width for line in text.splitlines())
    line = next(line for line in text.splitlines() if line.startswith("quarantined 300"))
    assert "more" in line or width < 40
    if width >= 60:
        assert "dev-0000" in line


def test_the_sparkline_grows_with_the_history_up_to_the_width():
    short = render(snapshot(versions=tuple(point(v, accuracy=v / 10) for v in range(3))), 100)
    long = render(snapshot(versions=tuple(point(v, accuracy=(v % 10) / 10) for v in range(300))), 100)
    spark = lambda text: max(len([c for c in line if c in BLOCKS]) for line in text.splitlines())
    assert spark(short) == 3
    assert 3 < spark(long) <= 100


# -- parsing ------------------------------------------------------------------------------------------------------
def test_counter_by_label_reads_the_exposition_prometheus_client_writes():
    registry = CollectorRegistry()
    rejected = Counter("fedguard_updates_rejected_total", "x", ["reason"], registry=registry)
    rejected.labels("malformed").inc(3)
    rejected.labels("stale").inc(0)
    other = Counter("fedguard_detector_flags_total", "x", ["detector"], registry=registry)
    other.labels("sybil").inc()
    text = generate_latest(registry).decode()
    assert counter_by_label(text, "fedguard_updates_rejected_total", "reason") == {"malformed": 3.0, "stale": 0.0}
    assert counter_by_label(text, "fedguard_detector_flags_total", "detector") == {"sybil": 1.0}
    assert counter_by_label(text, "fedguard_nothing_total", "reason") == {}


def test_counter_changes_count_a_reset_counter_as_all_new():
    assert counter_changes(None, {"a": 3.0}) is None
    assert counter_changes({"a": 3.0, "b": 1.0}, {"a": 5.0, "b": 1.0, "c": 2.0}) == {"a": 2.0, "b": 0.0, "c": 2.0}
    assert counter_changes({"a": 10.0}, {"a": 4.0}) == {"a": 4.0}  # the processors restarted


def test_version_point_from_the_aggregators_record():
    meta = {"version": 7, "round": 7, "parent": 6, "rule": "norm_clip", "members": 5, "accepted": 4,
            "metrics": {"accuracy": 0.81, "loss": 0.5, "backdoor": {"pixel_pattern:0": 0.03},
                        "backdoor_accuracy": 0.03},
            "rule_info": {"selected": ["dev-0001"], "member_weights": {"dev-0001": 1.0, "dev-0002": 0.25}}}
    assert version_point(meta) == VersionPoint(version=7, round=7, accuracy=0.81, backdoor_accuracy=0.03, members=5,
                                               accepted=4, downweighted=1, rule="norm_clip", note="")
    failed = {**meta, "rule_info": {"selected": [], "failed": "offsets not found", "params_from": 6}}
    assert version_point(failed).note == "window failed"
    skipped = {**meta, "metrics": {"accuracy": 0.8, "backdoor_accuracy": None}, "rule_info": {"skipped": "x"}}
    p = version_point(skipped)
    assert p.note == "rule skipped" and p.backdoor_accuracy is None and p.downweighted == 0
    assert version_point({"metrics": {}}) is None and version_point({"version": "x"}) is None


def test_the_models_feed_keeps_a_bounded_history_of_its_own_model_and_restarts_it_on_a_new_version_zero():
    feed = ModelsFeed(Settings(model_id="mine"), history=3)
    record = lambda v, created=1.0: records.dumps({"model_id": "mine", "version": v, "round": v, "created_at": created,
                                                   "metrics": {"accuracy": v / 10}})
    for v in range(5):
        feed._add(b"mine", record(v))
    feed._add(b"other", records.dumps({"model_id": "other", "version": 9, "metrics": {"accuracy": 1.0}}))
    feed._add(b"mine", b"not json")
    feed._add(b"mine", None)
    assert [p.version for p in feed.versions()] == [2, 3, 4] and feed.lineage == 0
    feed._add(b"mine", record(0))  # version 0 published again by a restarted aggregator: the same version
    assert [p.version for p in feed.versions()] == [2, 3, 4] and feed.lineage == 0  # (0 is older than the history)
    feed._add(b"mine", record(0, created=2.0))  # a model store started afresh: a new history
    assert [p.version for p in feed.versions()] == [0] and feed.lineage == 1


def test_metrics_endpoints_use_loopback_for_a_wildcard_host_and_take_overrides():
    s = Settings(metrics_host="0.0.0.0", processors_metrics_port=1, aggregator_metrics_port=2, fleet_metrics_port=3)
    assert metrics_endpoints(s) == {"processors": ["http://127.0.0.1:1/metrics"],
                                    "aggregator": ["http://127.0.0.1:2/metrics"],
                                    "fleet": ["http://127.0.0.1:3/metrics"]}
    inside = metrics_endpoints(s, "processors=http://processors-1:19464/metrics, processors=http://processors-2:19464"
                                  "/metrics,fleet=http://fleet:19466/metrics")
    assert inside["processors"] == ["http://processors-1:19464/metrics", "http://processors-2:19464/metrics"]
    assert inside["fleet"] == ["http://fleet:19466/metrics"] and inside["aggregator"] == ["http://127.0.0.1:2/metrics"]
    with pytest.raises(ValueError, match="expected <processors|aggregator|fleet>=<url>"):
        metrics_endpoints(s, "broker=http://x")


def test_summed_counter_adds_up_the_workers_of_a_pool():
    texts = []
    for rejected in ({"malformed": 2}, {"malformed": 1, "stale": 4}):
        registry = CollectorRegistry()
        counter = Counter("fedguard_updates_rejected_total", "x", ["reason"], registry=registry)
        for reason, n in rejected.items():
            counter.labels(reason).inc(n)
        texts.append(generate_latest(registry).decode())
    assert summed_counter(texts, "fedguard_updates_rejected_total", "reason") == {"malformed": 3.0, "stale": 4.0}


# -- nothing listening: every source down, shown, never raised -----------------------------------------------------
def nothing_listens() -> Settings:
    return Settings(broker_port=free_port(), redis_port=free_port(), processors_metrics_port=free_port(),
                    aggregator_metrics_port=free_port(), fleet_metrics_port=free_port(), model_id="nowhere")


def test_run_watch_once_with_nothing_running_prints_every_source_down():
    out = io.StringIO()
    snap = run_watch(nothing_listens(), threading.Event(), once=True, out=out)
    text = out.getvalue()
    assert snap.sources == dict.fromkeys(SOURCES, False)
    assert "broker DOWN  redis DOWN  processors DOWN  aggregator DOWN  fleet DOWN" in text
    assert "redis down: connection refused" in text and "processors down: connection refused" in text
    assert CLEAR not in text and "Traceback" not in text


def test_collect_counts_a_pool_with_one_worker_answering_and_rates_between_snapshots():
    registry = CollectorRegistry()
    rejected = Counter("fedguard_updates_rejected_total", "x", ["reason"], registry=registry)
    flags = Counter("fedguard_detector_flags_total", "x", ["detector"], registry=registry)
    rejected.labels("malformed").inc(2)
    flags.labels("sybil").inc(1)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    settings = nothing_listens()
    state = WatchState(endpoints={"processors": [f"http://127.0.0.1:{port}/metrics",
                                                 f"http://127.0.0.1:{free_port()}/metrics"],
                                  "aggregator": [f"http://127.0.0.1:{free_port()}/metrics"]})
    try:
        first = collect(settings, state)
        rejected.labels("malformed").inc(3)
        second = collect(settings, state)
    finally:
        state.close()
        server.shutdown()
        server.server_close()
    assert first.sources["processors"] and not first.sources["aggregator"] and not first.sources["broker"]
    assert first.errors["processors"] == "1 of 2 down" and first.errors["aggregator"] == "connection refused"
    assert first.rejections == Counts({"malformed": 2.0}, None) and first.detector_flags.totals == {"sybil": 1.0}
    assert second.rejections == Counts({"malformed": 5.0}, {"malformed": 3.0}) and second.interval_s > 0
    text = render(second)
    assert "malformed          5 (+3, " in text and "  processors: 1 of 2 down" in text


def test_round_reporter_with_nothing_running_returns_no_lines():
    reporter = RoundReporter(nothing_listens())
    try:
        assert reporter.poll() == [] and reporter.poll() == []
    finally:
        reporter.close()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class StopAfter(io.StringIO):
    """Output that sets ``stop`` once it has received ``frames`` frames."""

    def __init__(self, stop: threading.Event, frames: int):
        super().__init__()
        self.stop, self.frames, self.writes = stop, frames, 0

    def write(self, text: str) -> int:
        self.writes += 1
        if self.writes >= self.frames:
            self.stop.set()
        return super().write(text)


def test_run_watch_clears_a_terminal_and_separates_plain_frames_with_a_rule():
    tty = Terminal()
    run_watch(nothing_listens(), threading.Event(), once=True, out=tty)
    assert tty.getvalue().startswith(CLEAR)

    stop = threading.Event()
    plain = StopAfter(stop, frames=2)
    run_watch(nothing_listens(), stop, interval_s=0.01, out=plain)
    text = plain.getvalue()
    assert plain.writes == 2 and CLEAR not in text
    frames = text.split("-" * 100 + "\n")
    assert len(frames) == 2 and all(frame.startswith("fedguard watch") for frame in frames)
