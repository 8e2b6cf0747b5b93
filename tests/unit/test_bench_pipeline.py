"""The pure parts of bench/pipeline.py: reading worker metrics, the timed interval, statistics, the targets'
verdicts and the window -> version step timer (the benchmark itself runs the real broker; it is never a test)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.conftest import BENCH, bench_script


@pytest.fixture(scope="module")
def pipeline():
    with bench_script("pipeline") as module:
        yield module


METRICS = """\
# HELP fedguard_updates_valid_total Updates that passed validation
# TYPE fedguard_updates_valid_total counter
fedguard_updates_valid_total 5.0
fedguard_updates_valid_created 1.7e+09
# HELP fedguard_updates_rejected_total Records rejected by the validator, by reason code
# TYPE fedguard_updates_rejected_total counter
fedguard_updates_rejected_total{reason="replay"} 2.0
fedguard_updates_rejected_total{reason="auth_failed"} 0.0
fedguard_updates_rejected_created{reason="replay"} 1.7e+09
# HELP fedguard_updates_received_total Records read from the raw updates topic
# TYPE fedguard_updates_received_total counter
fedguard_updates_received_total 40.0
"""


def test_outputs_count_valid_and_rejected_not_received(pipeline):
    assert pipeline.outputs_in(METRICS) == (7, {"replay": 2})
    assert pipeline.outputs_in("") == (0, {})


def test_clock_starts_when_every_worker_has_validated_and_stops_at_the_count(pipeline):
    samples = [(0.0, [0, 0]), (1.0, [3, 0]), (2.0, [5, 2]), (3.0, [8, 6]), (4.0, [10, 10]), (5.0, [10, 10])]
    assert pipeline.timed_interval(samples, 20) == (2, 4)
    assert pipeline.rate_between(samples, 2, 4) == (6.5, 13)  # 13 records in 2 s, the 7 before not counted


def test_no_timed_part_when_a_worker_never_started_or_the_run_never_finished(pipeline):
    assert pipeline.timed_interval([(0.0, [0, 0]), (1.0, [20, 0])], 20) is None
    assert pipeline.timed_interval([(0.0, [1, 1]), (1.0, [5, 5])], 20) is None
    assert pipeline.timed_interval([(0.0, [20])], 20) is None  # finished at the first sample: nothing timed


def test_statistics(pipeline):
    values = [float(v) for v in range(1, 21)]
    assert pipeline.percentile(values, 95) == pytest.approx(float(np.percentile(values, 95)))
    assert pipeline.percentile([3.0], 95) == 3.0
    with pytest.raises(ValueError):
        pipeline.percentile([], 95)
    assert pipeline.median_or_none([None, 2.0, 4.0]) == 3.0
    assert pipeline.median_or_none([None]) is None


def test_speedup_ceiling_is_the_cores_capacity_over_the_one_worker_rate(pipeline):
    # 10 ms of CPU per record: 2 cores do at most 200 records/s, 4x a worker that does 50/s.
    assert pipeline.speedup_ceiling(2, 0.010, 50.0) == pytest.approx(4.0)


def _run(per_s, workers, cpu):
    return {"workers": workers, "per_s": per_s, "records_timed": 100, "seconds": 100 / per_s, "cpu_seconds": cpu}


def _measured(one, two, latency, worker_cpu, empty=80.0):
    floor = {"per_s": 200.0, "records_timed": 100, "seconds": 0.5, "cpu_seconds": {"broker": 0.2, "bench": 0.2,
                                                                                      "redis": 0.0, "machine": 0.4}}
    cpu = {"worker0": worker_cpu, "broker": 0.1, "redis": 0.1, "bench": 0.0, "machine": worker_cpu + 0.2}
    empty_cpu = {**cpu, "worker0": 2 * worker_cpu}  # an empty update store: new files cost the worker more
    return {"num_params": 10, "record_bytes": 100,
            "repeats": [{"floor": [floor, floor, floor], "validated": {
                "1": _run(one, 1, cpu), "2": _run(two, 2, cpu), "1e": _run(empty, 1, empty_cpu)}}],
            "latency": [{"total_s": t, "fetch_s": t / 2} for t in latency]}


def test_targets_met(pipeline):
    summary = pipeline.summarise(_measured(120.0, 200.0, [0.5, 0.7, 0.6], worker_cpu=0.5))
    assert summary["ratio_one_to_floor"] == pytest.approx(0.6)
    assert summary["speedup"] == pytest.approx(200 / 120)
    assert summary["met"] == {"one_worker": True, "two_workers": True, "latency": True}
    assert summary["latency_median_s"] == pytest.approx(0.6)
    assert summary["latency_split_median_s"] == {"fetch_s": pytest.approx(0.3)}
    assert summary["floor_cpu_s_per_record"] == pytest.approx(0.004)  # broker and consumer, per record read
    assert summary["floor_consumer_cpu_s_per_record"] == pytest.approx(0.002)
    assert summary["worker_cpu_s_per_record"] == pytest.approx(0.005)
    # the empty store's run is reported beside the target, not judged by it
    assert summary["ratio_empty_store_to_floor"] == pytest.approx(0.4)
    assert summary["worker_cpu_s_per_record_empty_store"] == pytest.approx(0.010)


def test_two_worker_target_missed_is_explained_only_by_a_measured_ceiling_below_it(pipeline):
    # 0.7 s of pipeline CPU per 100 records at 120/s: 2 cores do at most ~286/s, 2.4x: the ceiling does not explain it.
    missed = pipeline.summarise(_measured(120.0, 130.0, [2.5], worker_cpu=0.5))
    assert missed["met"] == {"one_worker": True, "two_workers": False, "latency": False}
    assert missed["speedup_ceiling"] == pytest.approx(2 / 0.007 / 120) and not missed["two_workers_explained"]
    # 1.4 s per 100 records: at most ~143/s, 1.19x the one-worker rate: this machine cannot show 1.5x.
    bound = pipeline.summarise(_measured(120.0, 130.0, [0.5], worker_cpu=1.2))
    assert bound["speedup_ceiling"] < 1.5 and bound["two_workers_explained"]


def test_runs_without_a_timed_part_are_left_out_of_the_medians(pipeline):
    measured = _measured(120.0, 200.0, [0.5], worker_cpu=0.5)
    measured["repeats"].append({**measured["repeats"][0], "validated": {
        "1": measured["repeats"][0]["validated"]["1"], "2": {"workers": 2, "per_s": None, "records_timed": 0},
        "1e": {"workers": 1, "per_s": None, "records_timed": 0}}})
    summary = pipeline.summarise(measured)
    assert summary["two_worker_runs"] == [200.0, None]
    assert summary["speedup"] == pytest.approx(200 / 120)
    assert summary["one_worker_empty_store_runs"] == [80.0, None]


def test_step_timer_splits_each_window_and_drops_what_came_before(pipeline):
    timer = pipeline.StepTimer()
    fetch = timer.wrap("fetch", lambda: "tensors")
    fetch()  # before any window: the service's start-up
    handle = timer.finish(lambda: fetch())
    assert handle() == "tensors"
    split = timer.windows.get_nowait()
    assert set(split) == {"fetch", "handle_window"} and split["handle_window"] >= split["fetch"]


def test_timed_rule_keeps_the_rules_attributes(pipeline):
    class Rule:
        name, min_updates = "norm_clip", 1

        def __call__(self, deltas):
            return len(deltas)

    timer = pipeline.StepTimer()
    rule = pipeline.TimedRule(Rule(), timer)
    assert (rule.name, rule.min_updates, rule([1, 2, 3])) == ("norm_clip", 1, 3)
    assert set(timer.seconds) == {"aggregate"}


def test_the_command_reproduces_the_run(pipeline):
    args = pipeline.argparse.Namespace(quick=False, count=2000, repeat=3, latency_repeat=20, members=100,
                                       out="bench/results/pipeline.md")
    assert pipeline.run_command(args) == ("python bench/pipeline.py --count 2000 --repeat 3 --latency-repeat 20 "
                                          "--members 100 --out bench/results/pipeline.md")
    args.quick = True
    assert pipeline.run_command(args) == "python bench/pipeline.py --quick --out bench/results/pipeline.md"


def test_profile_rows_rank_by_the_column_asked_in_ms_per_record(pipeline):
    # pstats' stats dict: (file, line, function) -> (primitive calls, calls, own s, cumulative s, callers)
    repo = str(BENCH.parent)
    stats = {(f"{repo}/fedguard/sketch.py", 124, "sketch"): (100, 100, 0.05, 0.08, {}),
             ("/x/site-packages/aiokafka/conn.py", 408, "send"): (200, 200, 0.01, 0.20, {}),
             ("~", 0, "<method 'decrypt'>"): (100, 100, 0.04, 0.04, {})}
    assert pipeline.profile_rows(stats, 100, "tottime", 2) == [(0.5, 0.8, 1.0, "fedguard/sketch.py:124(sketch)"),
                                                               (0.4, 0.4, 1.0, "<method 'decrypt'>")]
    assert [row[3] for row in pipeline.profile_rows(stats, 100, "cumtime", 1)] == ["aiokafka/conn.py:408(send)"]
    table = pipeline.profile_table(stats, 100, 3)
    assert "100 records profiled; 1.00 ms of profiled time per record" in table
    assert "| 0.100 | 2.000 | 2.00 | `aiokafka/conn.py:408(send)` |" in table


def test_the_steady_state_store_holds_a_spare_per_record_and_the_empty_one_none(pipeline, tmp_path):
    from fedguard.settings import Settings
    from fedguard.updatestore import SPARE_DIR, UpdateStore
    settings = Settings(data_dir=tmp_path, model_id="bench-w1r0")
    assert pipeline.prepare_store(settings, 7, 5, steady=True) == 7
    spare_dir = settings.update_store_dir / SPARE_DIR
    assert len(os.listdir(spare_dir)) == 7 and sorted(os.listdir(settings.update_store_dir)) == [SPARE_DIR,
                                                                                                   "bench-w1r0-retired"]
    ref = UpdateStore(settings.update_store_dir, spare_bytes=0).put("bench-w1r0", 0, "d", np.ones(5, np.float32))
    assert len(os.listdir(spare_dir)) == 6 and ref  # the worker's writes take them
    assert pipeline.prepare_store(settings, 7, 5, steady=False) == 0 and not spare_dir.exists()
