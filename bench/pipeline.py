"""End-to-end pipeline throughput through the real broker, 1 vs 2 workers, and window -> version latency (issue 12,
item 8).

One run, side by side, on a broker (Tansu, memory engine) and a ``redis-server`` this script starts on free loopback
ports and stops at the end (also on Ctrl-C):

* **floor**: a plain aiokafka consumer (the client the Faust workers use; it read these records faster than
  kafka-python in a trial) in its own consumer group, reading the pre-filled raw topic from the beginning:
  records/s, the least any consumer of that topic waits for.
* **validated**: 1, then 2 processors workers as real processes (``python -m fedguard.cli processors`` with the
  bench's settings as ``FEDGUARD_*`` variables, each worker its own ``--web-port`` and ``--metrics-port``) on the
  same pre-filled raw topic. The clock starts once every worker has validated a record (start-up, group join and
  the first fetch excluded) and stops when the workers' ``fedguard_updates_valid_total`` +
  ``fedguard_updates_rejected_total`` reach the record count; the rate is the records validated in between over
  that time. Afterwards every raw record must be on the index (valid) or dead-letter topic exactly as often as it
  was sent, none rejected. CPU seconds of every worker, the broker, Redis, this script and the whole machine are
  read (psutil) over the same interval. The update store is in the steady state of a running deployment: the
  aggregator's retention has left as many spare files as the run writes (fedguard/updatestore.py: pruned files are
  written over, not new ones made); one more one-worker run per repeat starts from an empty store, as the first
  versions after a fresh start do.
* **window -> version**: an ``AggregatorService`` (in a thread of this process, default rule ``norm_clip`` and the
  default evaluation and audit) reads windows of n members from ``fl.windows``, reads their tensors from the update
  store (fedguard/updatestore.py) and publishes versions to ``fl.models``: from sending a window record to reading
  its version on ``fl.models``, with the split into fetch / aggregate / evaluate / audit / persist / publish timed
  around the service's own calls.

Each repeat fills a fresh raw topic (fresh topics, model id, Redis namespace and enrolment, records sealed again,
so replay and clock checks pass) and measures floor, then the worker configurations in alternating order. Medians
over repeats; ratios are medians of each repeat's ratio.

    python bench/pipeline.py --count 2000 --repeat 3 --latency-repeat 20 --out bench/results/pipeline.md
    python bench/pipeline.py --quick   # ~1-2 minute smoke run (small counts, one repeat)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiokafka  # noqa: E402
import kafka  # noqa: E402
import psutil  # noqa: E402
import redis  # noqa: E402
from aiokafka import AIOKafkaConsumer  # noqa: E402
from kafka import KafkaConsumer, KafkaProducer  # noqa: E402
from kafka.admin import KafkaAdminClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from tqdm import tqdm  # noqa: E402

from fedguard import envelope, records, registry  # noqa: E402
from fedguard.codec import encode_tensor  # noqa: E402
from fedguard.envelope import UpdateHeader  # noqa: E402
from fedguard.keys import load_or_create_server_key, private_from_hex  # noqa: E402
from fedguard.settings import Settings, Topics, to_env  # noqa: E402
from fedguard.stack import broker_binary, create_topics, free_port, initialize, redis_binary  # noqa: E402
from fedguard.stack import _die_with_parent, temporary_redis, wait_for_port  # noqa: E402
from fedguard.tasks import model_spec  # noqa: E402
from fedguard.topicio import consumer_from_beginning, read_until_idle  # noqa: E402
from fedguard.updatestore import SPARE_DIR, UpdateStore  # noqa: E402
from processors import windows as W  # noqa: E402
from producers.keystore import Keystore  # noqa: E402
from _machine import cpu_model  # bench/ is on sys.path when a bench script runs

TASK = "fashion-mnist"
PRETRAIN_EPOCHS = 1  # the first latency window trains the model (trained_delta)
HIDDEN = "126"  # FEDGUARD_MODEL_HIDDEN: the MLP 784-126-10 has 100,180 parameters, the d = 100k
DEVICES = 1024
TARGET_ONE_WORKER = 0.5  # of the floor
# Validated runs: workers, and whether the update store is in its steady state (spares) or empty (fresh start).
CONFIGS = {"1": (1, True), "2": (2, True), "1e": (1, False)}
TARGET_SPEEDUP = 1.5  # two workers over one
TARGET_LATENCY_S = 2.0
POLL_S = 0.1  # metrics scrape interval while workers run: the clock's resolution
STALL_S = 180.0  # no record validated for this long: the run failed
FETCH_BYTES = 64 * 1024 * 1024 + 1024 * 1024  # the worker's own fetch size (max_payload_bytes + 1 MiB)
OTHER = "other (not this benchmark)"
NOISE_CORES = 0.25  # CPU of other processes above this (cores, median) makes the run a noisy one, said so in results


class BenchError(RuntimeError):
    """A measurement that cannot go on; main prints it as one line with a hint."""


# -- pure helpers (tests/unit/test_bench_pipeline.py) -----------------------------------------------------------------
def outputs_in(metrics_text: str) -> tuple[int, dict[str, int]]:
    """From one worker's Prometheus text: records validated (valid + rejected) and the rejections by reason."""
    valid, rejected = 0.0, {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "fedguard_updates_valid_total":
                valid += sample.value
            elif sample.name == "fedguard_updates_rejected_total" and sample.value:
                rejected[sample.labels["reason"]] = int(sample.value)
    return int(valid) + sum(rejected.values()), rejected


def timed_interval(samples: list[tuple[float, list[int]]], count: int) -> tuple[int, int] | None:
    """Indices (start, end) of the timed part of a run, from samples (time, records done per worker): it starts at
    the first sample where every worker has validated a record (start-up and group join over) and ends at the first
    where all ``count`` records are done. None if no such part exists (a worker never validated anything before
    the others finished everything, or the run never finished)."""
    start = next((i for i, (_, done) in enumerate(samples) if all(d > 0 for d in done)), None)
    end = next((i for i, (_, done) in enumerate(samples) if sum(done) >= count), None)
    if start is None or end is None or end <= start:
        return None
    return start, end


def rate_between(samples: list[tuple[float, list[int]]], start: int, end: int) -> tuple[float, int]:
    """Records/s between two samples, and how many records that rate is made of."""
    records_done = sum(samples[end][1]) - sum(samples[start][1])
    return records_done / (samples[end][0] - samples[start][0]), records_done


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("no values")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median_or_none(values: list[float | None]) -> float | None:
    """Median of the values that were measured (None: the run had no valid measurement)."""
    measured = [v for v in values if v is not None]
    return statistics.median(measured) if measured else None


def speedup_ceiling(cores: int, cpu_seconds_per_record: float, one_worker_rate: float) -> float:
    """The most any number of workers could gain over one on ``cores`` cores, if everything the pipeline spends per
    record (workers, broker, Redis) ran in parallel with nothing else on the machine: the cores' capacity in
    records/s over the one-worker rate."""
    return cores / cpu_seconds_per_record / one_worker_rate


def verdict(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "NOT met"


def run_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run's numbers."""
    if args.quick:
        return f"python bench/pipeline.py --quick --out {args.out}"
    return (f"python bench/pipeline.py --count {args.count} --repeat {args.repeat} --latency-repeat "
            f"{args.latency_repeat} --members {args.members} --out {args.out}")


# -- infrastructure ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def running_broker(log_path: Path):
    """A Tansu broker (memory engine) on a free loopback port for the block: yields (bootstrap, pid)."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                                 "--storage-engine", "memory://tansu/"], stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
    try:
        wait_for_port("127.0.0.1", port, 30, proc)
        yield f"127.0.0.1:{port}", proc.pid
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def redis_pid(url: str) -> int:
    return int(redis.Redis.from_url(url).info("server")["process_id"])


def bench_settings(bootstrap: str, redis_url: str, data_dir: Path, tag: str, count: int, **extra: Any) -> Settings:
    """Settings of one measurement: its own topics, model id and Redis namespace, so nothing carries over. Rate
    limits are raised so they admit every record (the bucket arithmetic still runs); many records per device and
    base version are allowed (one_update_per_window off: 1,024 devices send ``count`` records at version 0)."""
    topics = Topics(**{name: f"{tag}.{value}" for name, value in Topics().__dict__.items()})
    return Settings(kafka_bootstrap=bootstrap, redis_url=redis_url, data_dir=data_dir, topics=topics,
                    redis_prefix=f"bench-{tag}", model_id=f"bench-{tag}", task=TASK, num_devices=DEVICES,
                    rate_device_capacity=float(count), rate_global_capacity=2.0 * count,
                    one_update_per_window=False, model_hidden=HIDDEN, **extra)


def delete_measurement_topics(settings: Settings, tag: str) -> None:
    """Drop a measurement's topics (the memory engine keeps every record until its topic is deleted)."""
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="fedguard-bench")
    try:
        names = [n for n in admin.list_topics()
                 if n.startswith(f"{tag}.") or n.startswith(f"fedguard-processors-{settings.model_id}-")]
        if names:
            admin.delete_topics(names)
    finally:
        admin.close()


# -- the pre-filled raw topic -----------------------------------------------------------------------------------------
def device_keys(settings: Settings) -> dict[str, bytes]:
    """The sealing key of every enrolled device (the fleet's side of the key agreement)."""
    server_public = load_or_create_server_key(settings.server_key_path).public_key()
    store = Keystore.load(settings.keystore_path)
    return {d: envelope.derive_key(private_from_hex(k.private_key), server_public, d)
            for d, k in store.devices.items()}


def fill_raw_topic(settings: Settings, num_params: int, count: int, desc: str) -> int:
    """Seal ``count`` updates (``DEVICES`` devices in turn, base version 0) and publish them to the raw topic keyed
    by device id, as the fleet does. Returns the record size in bytes. Each update is its own N(0, 1e-3) noise
    (seeded: the same records in every measurement), not one tensor for all: the window stage quarantines
    near-identical updates of different devices at once (processors.detectors.sybil), which would turn a device's
    later records into ``quarantined``."""
    rng = np.random.default_rng(0)
    keys = device_keys(settings)
    devices = sorted(keys)[:DEVICES]
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5,
                             max_request_size=FETCH_BYTES, client_id="fedguard-bench-fill")
    size = 0
    try:
        for i in tqdm(range(count), desc=desc, unit="rec", leave=False):
            device = devices[i % len(devices)]
            header = UpdateHeader.new(device_id=device, seq=i // len(devices) + 1, base_version=0, num_samples=100,
                                      model_id=settings.model_id)
            payload = encode_tensor(rng.normal(0, 1e-3, num_params).astype(np.float32))
            sealed = envelope.seal(header, payload, keys[device])
            size = len(sealed)
            producer.send(settings.topics.raw, key=device.encode(), value=sealed)
        producer.flush()
    finally:
        producer.close()
    return size


def prepare_store(settings: Settings, count: int, num_params: int, steady: bool) -> int:
    """The update store before a validated run: ``steady``, ``count`` spare files, as the aggregator's retention
    leaves them in a running deployment (files of ``count`` tensors written under a retired model id and pruned,
    with room for all of them); else no spare at all, as after a fresh start. Returns the spares there."""
    spare_dir = settings.update_store_dir / SPARE_DIR
    shutil.rmtree(spare_dir, ignore_errors=True)
    if not steady:
        return 0
    store = UpdateStore(settings.update_store_dir, spare_bytes=count * num_params * 4)
    retired = f"{settings.model_id}-retired"
    zeros = np.zeros(num_params, dtype=np.float32)
    for i in range(count):
        store.put(retired, 0, f"device-{i}", zeros)
    store.prune(retired, 1)
    return len(os.listdir(spare_dir))


def prepare_measurement(bootstrap: str, redis_url: str, data_dir: Path, tag: str, count: int,
                        num_params: int) -> tuple[Settings, int]:
    """Topics, server key, operator credential and 1,024 enrolled devices in a fresh namespace (``fedguard init``),
    the model version key at 0 (as the aggregator sets it), and the raw topic filled."""
    settings = bench_settings(bootstrap, redis_url, data_dir, tag, count)
    initialize(settings)
    registry.connect(settings).set(registry.model_version_key(settings), 0)
    return settings, fill_raw_topic(settings, num_params, count, f"fill {tag}")


# -- floor: the broker's raw consume rate -----------------------------------------------------------------------------
async def _consume_all(settings: Settings, count: int, pids: dict[str, int]) -> dict[str, Any]:
    consumer = AIOKafkaConsumer(settings.topics.raw, bootstrap_servers=settings.kafka_bootstrap,
                                group_id=f"fedguard-bench-floor-{uuid.uuid4().hex[:8]}", auto_offset_reset="earliest",
                                enable_auto_commit=False, max_partition_fetch_bytes=FETCH_BYTES,
                                fetch_max_bytes=FETCH_BYTES, session_timeout_ms=6000, heartbeat_interval_ms=2000,
                                check_crcs=False)  # as the workers' consumer (processors/app.py): the fastest read
    await consumer.start()
    try:
        seen, first, started, last_new = 0, 0, None, time.monotonic()
        while seen < count:
            got = sum(len(batch) for batch in (await consumer.getmany(timeout_ms=500)).values())
            if got:
                last_new = time.monotonic()
            elif time.monotonic() - last_new > STALL_S:
                raise BenchError(f"the floor consumer read {seen} of {count} records and then nothing for "
                                 f"{STALL_S:.0f}s")
            if got and started is None:  # the clock starts after the first fetch (group join and fetch excluded)
                started, first, cpu_before = time.perf_counter(), got, cpu_seconds(pids)
            seen += got
        seconds, cpu_after = time.perf_counter() - started, cpu_seconds(pids)
        return {"per_s": (seen - first) / seconds, "records_timed": seen - first, "seconds": seconds,
                "cpu_seconds": {name: cpu_after[name] - cpu_before[name] for name in cpu_after}}
    finally:
        await consumer.stop()


def floor_rate(settings: Settings, count: int, infra_pids: dict[str, int]) -> dict[str, Any]:
    """The raw consume rate, and the CPU the broker, Redis and the consumer (``bench``) spent meanwhile."""
    return asyncio.run(_consume_all(settings, count, {**infra_pids, "bench": os.getpid()}))


# -- validated: processors workers as real processes ------------------------------------------------------------------
@dataclass
class Worker:
    proc: subprocess.Popen
    metrics_url: str
    log_path: Path


def start_workers(settings: Settings, count: int, log_dir: Path, tag: str,
                  profile: tuple[Path, int] | None = None) -> list[Worker]:
    """``count`` processors workers; with ``profile`` (where, records), the one worker runs under cProfile
    (:data:`PROFILED_WORKER`)."""
    env = {**os.environ, **to_env(settings)}
    workers = []
    for i in range(count):
        metrics_port, log_path = free_port(), log_dir / f"{tag}-worker{i}.log"
        launcher = ["-m", "fedguard.cli"] if profile is None else ["-c", PROFILED_WORKER, str(profile[0]),
                                                                    str(profile[1])]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, *launcher, "processors", "--web-port",
                                     str(free_port()), "--metrics-port", str(metrics_port)],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    preexec_fn=_die_with_parent)  # no worker outlives a killed benchmark
        workers.append(Worker(proc, f"http://127.0.0.1:{metrics_port}/metrics", log_path))
    return workers


# Only the two counters the clock reads (prometheus_client's ``name[]`` filter): a whole scrape of a worker's
# registry took 11 % of the worker's CPU at this script's 10 scrapes/s (py-spy, d = 159k), a filtered one a fifth.
OUTPUT_COUNTERS = "?name[]=fedguard_updates_valid_total&name[]=fedguard_updates_rejected_total"


def scrape(worker: Worker) -> tuple[int, dict[str, int]]:
    """Records the worker has validated and its rejections by reason (0 while its endpoint is not up yet)."""
    try:
        with urllib.request.urlopen(worker.metrics_url + OUTPUT_COUNTERS, timeout=2) as response:
            return outputs_in(response.read().decode())
    except (OSError, http.client.HTTPException):
        return 0, {}


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) of each process so far, and of the whole machine (``machine``: all cores busy)."""
    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            out[name] = math.nan
    total = psutil.cpu_times()
    out["machine"] = sum(total) - total.idle - getattr(total, "iowait", 0.0)
    return out


def run_workers(settings: Settings, workers_count: int, count: int, log_dir: Path, infra_pids: dict[str, int],
                tag: str, profile_to: Path | None = None) -> dict[str, Any]:
    """Start the workers on the pre-filled raw topic, follow their metrics until every record is validated, stop
    them; the rate over the timed part of the run (:func:`timed_interval`) and the CPU seconds spent in it."""
    workers = start_workers(settings, workers_count, log_dir, tag,
                            None if profile_to is None else (profile_to, count))
    pids = {**infra_pids, **{f"worker{i}": w.proc.pid for i, w in enumerate(workers)}, "bench": os.getpid()}
    samples: list[tuple[float, list[int]]] = []
    cpu: list[dict[str, float]] = []
    rejected: dict[str, int] = {}
    bar = tqdm(total=count, desc=f"validate {tag}", unit="rec", leave=False)
    try:
        last_progress, last_total = time.monotonic(), 0
        while True:
            for i, w in enumerate(workers):
                if w.proc.poll() is not None:
                    raise BenchError(f"processors worker {i} exited with code {w.proc.returncode} (log: {w.log_path})")
            scraped = [scrape(w) for w in workers]
            now = time.perf_counter()
            samples.append((now, [done for done, _ in scraped]))
            cpu.append(cpu_seconds(pids))
            total = sum(samples[-1][1])
            bar.update(total - bar.n)
            if total > last_total:
                last_progress, last_total = time.monotonic(), total
            elif time.monotonic() - last_progress > STALL_S:
                raise BenchError(f"{total} of {count} records validated, then none for {STALL_S:.0f}s "
                                 f"(logs: {', '.join(str(w.log_path) for w in workers)})")
            if total >= count:
                rejected = {reason: n for _, by_reason in scraped for reason, n in by_reason.items()}
                break
            time.sleep(POLL_S)
    finally:
        bar.close()
        for w in workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in workers:
            stop_process(w.proc)
    if rejected:
        raise BenchError(f"records were rejected {rejected}: every record must be admitted (see the worker logs in "
                         f"{log_dir})")
    return summarise_run(samples, cpu, count, workers_count)


def summarise_run(samples, cpu, count: int, workers_count: int) -> dict[str, Any]:
    interval = timed_interval(samples, count)
    if interval is None:
        return {"workers": workers_count, "per_s": None, "records_timed": 0,
                "problem": "a worker validated nothing before the others finished every record: use a larger --count"}
    start, end = interval
    rate, timed = rate_between(samples, start, end)
    wall = samples[end][0] - samples[start][0]
    spent = {name: cpu[end][name] - cpu[start][name] for name in cpu[end]}
    return {"workers": workers_count, "per_s": rate, "records_timed": timed, "seconds": wall,
            "records_before_clock": sum(samples[start][1]), "cpu_seconds": spent}


def check_conservation(settings: Settings, count: int) -> dict[str, int]:
    """Every raw record on the index (valid) or the dead-letter topic: distinct raw positions and duplicates."""
    seen = []
    for topic in (settings.topics.valid_index, settings.topics.rejected):
        for message in read_until_idle(settings, topic, 1.5, timeout_s=120, client_id="fedguard-bench-check"):
            raw = records.loads(message.value)["raw"]
            seen.append((raw["partition"], raw["offset"]))
    distinct = len(set(seen))
    if distinct != count:
        raise BenchError(f"{distinct} of {count} raw records reached the valid or rejected topic")
    return {"distinct": distinct, "duplicates": len(seen) - distinct}


# -- profile: where one worker's CPU goes ------------------------------------------------------------------------------
# A processors worker (``fedguard processors``, unchanged) under cProfile, profiled from its first validation batch
# to its last record indexed, so start-up, imports and the group join are left out. argv: stats file, records
# expected, then the CLI's arguments. The stats and the count of records profiled are written when the worker exits.
PROFILED_WORKER = """
import atexit, cProfile, json, sys
from processors.app import ValidationPipeline
from fedguard.cli import main

stats_path, expected = sys.argv[1], int(sys.argv[2])
profiler, started, finished = cProfile.Profile(), [], [0]
submit, finish = ValidationPipeline.submit, ValidationPipeline._finish

async def profiled_submit(self, events):
    if not started:
        started.append(True)
        profiler.enable()
    return await submit(self, events)

async def profiled_finish(self, events, *args, **kwargs):
    try:
        return await finish(self, events, *args, **kwargs)
    finally:
        finished[0] += len(events)
        if finished[0] >= expected:
            profiler.disable()

def dump():
    profiler.disable()
    profiler.dump_stats(stats_path)
    with open(stats_path + ".json", "w") as f:
        json.dump({"records": finished[0]}, f)

ValidationPipeline.submit, ValidationPipeline._finish = profiled_submit, profiled_finish
atexit.register(dump)
sys.exit(main(sys.argv[3:]))
"""


def function_label(key: tuple[str, int, str]) -> str:
    """``file:line(function)`` of a pstats key, the file shortened to the part after site-packages or the repo."""
    filename, line, name = key
    for marker in ("site-packages/", f"{Path(__file__).resolve().parents[1]}/"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
            break
    return f"{filename}:{line}({name})" if line else name


def profile_rows(stats: dict, records: int, column: str, top: int) -> list[tuple[float, float, float, str]]:
    """The ``top`` functions of pstats' ``stats`` dict by ``column`` (``"tottime"``: own time, ``"cumtime"``: with
    callees), each as (own ms, cumulative ms, calls) per record and its label."""
    index = {"tottime": 2, "cumtime": 3}[column]
    ranked = sorted(stats.items(), key=lambda item: item[1][index], reverse=True)[:top]
    return [(tt * 1000 / records, ct * 1000 / records, nc / records, function_label(key))
            for key, (_cc, nc, tt, ct, _callers) in ranked]


def profile_table(stats: dict, records: int, top: int) -> str:
    """Both rankings as Markdown tables, in ms per record."""
    total = sum(v[2] for v in stats.values()) * 1000 / records
    lines = [f"{records:,} records profiled; {total:.2f} ms of profiled time per record (cProfile's overhead "
             "included: Python-heavy code is inflated more than C calls).", ""]
    for column, title in (("cumtime", "by cumulative time (with callees)"), ("tottime", "by own time")):
        lines += [f"### Top {top} {title}", "", "| own ms/rec | cum ms/rec | calls/rec | function |",
                  "|---:|---:|---:|---|"]
        lines += [f"| {tt:.3f} | {ct:.3f} | {nc:.2f} | `{label}` |"
                  for tt, ct, nc, label in profile_rows(stats, records, column, top)]
        lines.append("")
    return "\n".join(lines)


def profile_worker(args: argparse.Namespace, workdir: Path) -> str:
    """One worker under cProfile on a pre-filled raw topic of ``args.count`` records: the report (Markdown), with
    the CPU the profiled worker spent per record (psutil). The raw stats stay in ``args.profile``."""
    import pstats

    log_dir = workdir / "logs"
    log_dir.mkdir(parents=True)
    num_params = model_spec(TASK, Settings(model_hidden=HIDDEN).hidden_widths()).num_params
    stats_path = Path(args.profile).resolve()
    (workdir / "redis").mkdir()
    with running_broker(log_dir / "broker.log") as (bootstrap, broker_pid), \
            temporary_redis(workdir / "redis") as redis_url:
        infra = {"broker": broker_pid, "redis": redis_pid(redis_url)}
        settings, record_bytes = prepare_measurement(bootstrap, redis_url, workdir / "data", "prof", args.count,
                                                     num_params)
        prepare_store(settings, args.count, num_params, steady=True)
        run = run_workers(settings, 1, args.count, log_dir, infra, "prof", profile_to=stats_path)
    if not stats_path.exists():
        raise BenchError(f"the profiled worker wrote no stats to {stats_path}")
    records = json.loads(Path(f"{stats_path}.json").read_text())["records"]
    stats = pstats.Stats(str(stats_path)).stats
    worker_ms = cpu_per_record(run, ("worker0",)) * 1000 if run["per_s"] else math.nan
    head = [f"# One processors worker under cProfile: {args.count:,} records of {num_params:,} float32 parameters "
            f"({record_bytes:,} bytes sealed)", "",
            f"Worker CPU (psutil, profiled run): {worker_ms:.2f} ms per record; rate {run['per_s'] or 0:.0f}/s "
            f"(profiling slows it down). Stats: `{stats_path}` (`python -m pstats`).", ""]
    return "\n".join(head) + profile_table(stats, records, args.profile_top)


# -- window -> version ------------------------------------------------------------------------------------------------
class StepTimer:
    """Seconds spent in each wrapped call of one window; :meth:`finish` hands a window's split to the reader."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.windows: queue.Queue = queue.Queue()

    def wrap(self, step: str, func: Callable) -> Callable:
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.seconds[step] += time.perf_counter() - started
        return timed

    def finish(self, func: Callable) -> Callable:
        """Wrap the per-window entry point: after it returns, its split (and its own total) go to the queue. What
        was timed before it began (the service's start-up: version 0) is not part of any window."""
        timed = self.wrap("handle_window", func)

        def handled(*args, **kwargs):
            self.seconds.clear()
            try:
                return timed(*args, **kwargs)
            finally:
                self.windows.put(dict(self.seconds))
        return handled


class TimedRule:
    """The service's configured rule with its calls timed (everything else passes through)."""

    def __init__(self, rule, timer: StepTimer) -> None:
        self._rule, self._call = rule, timer.wrap("aggregate", rule)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._rule, name)


def instrument(service, timer: StepTimer) -> None:
    """Time the service's own steps of a window (the real calls run; only a clock is put around them)."""
    service.fetch_updates = timer.wrap("fetch", service.fetch_updates)
    service.rule = TimedRule(service.rule, timer)
    service._evaluate = timer.wrap("evaluate", service._evaluate)
    service.auditor.audit_candidate = timer.wrap("audit", service.auditor.audit_candidate)
    service.store.save = timer.wrap("persist", service.store.save)
    service._publish = timer.wrap("publish", service._publish)
    service.handle_window = timer.finish(service.handle_window)


def publish_valid_updates(settings: Settings, members: int, num_params: int, base_version: int,
                          offset: np.ndarray | None = None) -> list[dict[str, Any]]:
    """``members`` validated updates as the validator leaves them: each tensor (distinct, of honest size, plus
    ``offset`` if given) in the update store and its record on ``fl.updates.valid``; returns their index entries
    (what the window stage seats), with where each landed and its tensor's reference."""
    rng, store = np.random.default_rng(0), UpdateStore(settings.update_store_dir)
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", max_request_size=FETCH_BYTES,
                             client_id="fedguard-bench-valid")
    entries = []
    try:
        for i in range(members):
            device = f"dev-{i:04d}"
            tensor = rng.normal(0, 1e-3, num_params).astype(np.float32)
            if offset is not None:
                tensor += offset
            norm = float(np.linalg.norm(tensor))
            ref = store.put(settings.model_id, base_version, device, tensor)
            meta = {"update_id": uuid.uuid4().hex, "device_id": device, "model_id": settings.model_id,
                    "base_version": base_version, "seq": 1, "num_samples": 100, "timestamp": time.time(), "norm": norm,
                    "raw": {"partition": 0, "offset": i}, "tensor": ref, "checks": []}
            sent = producer.send(settings.topics.valid, key=device.encode(), value=records.dumps(meta)).get(timeout=60)
            entries.append({**{k: meta[k] for k in ("update_id", "device_id", "base_version", "num_samples", "norm",
                                                     "raw", "tensor")}, "valid": {"partition": sent.partition,
                                                                        "offset": sent.offset}})
    finally:
        producer.close()
    return entries


def window_of(settings: Settings, entries: list[dict[str, Any]], base_version: int) -> dict[str, Any]:
    """The ``fl.windows`` record the window stage writes for these members, every one accepted with weight 1."""
    members = [{**e, "base_version": base_version} for e in entries]
    judged = [{"scores": {}, "flags": [], "verdict": "accept", "weight": 1.0, "reasons": [], "evidence": "accept",
               "trust": None} for _ in members]
    now = time.time()
    return W.window_record({"opened_at": now, "members": members}, judged, {"detection": "bench"},
                           model_id=settings.model_id, base_version=base_version, now=now, size=len(members))


def wait_for_version(watcher: KafkaConsumer, version: int, thread: threading.Thread, failure: list) -> dict:
    """The ``fl.models`` record of ``version`` as soon as a reader sees it."""
    deadline = time.monotonic() + STALL_S
    while time.monotonic() < deadline:
        if failure:
            raise BenchError(f"the aggregator stopped: {failure[0]!r}")
        if not thread.is_alive():
            raise BenchError("the aggregator thread stopped")
        for messages in watcher.poll(timeout_ms=100).values():
            for message in messages:
                meta = records.loads(message.value)
                if meta["version"] == version:
                    return meta
    raise BenchError(f"version {version} did not appear on fl.models within {STALL_S:.0f}s")


def trained_delta(params: np.ndarray) -> np.ndarray:
    """The update that trains the bench's model from ``params`` for ``PRETRAIN_EPOCHS`` epochs on the task's
    training set (the task's tuned local training otherwise), so that the windows after the first are audited on a
    trained model, as in a running deployment (the audit of an untrained model runs to its time budget)."""
    from fedguard.tasks import DEFAULT_TRAINING, build_model, get_flat_params, load_task, local_train, set_flat_params

    task = load_task(TASK, seed=0)
    model = build_model(model_spec(task, Settings(model_hidden=HIDDEN).hidden_widths()))
    set_flat_params(model, params)
    hp = DEFAULT_TRAINING[TASK]
    local_train(model, task.x_train, task.y_train, epochs=PRETRAIN_EPOCHS, lr=hp["lr"], batch_size=hp["batch_size"],
                momentum=hp.get("momentum", 0.0), seed=0)
    return get_flat_params(model) - np.asarray(params, dtype=np.float32)


def window_latency(bootstrap: str, redis_url: str, data_dir: Path, members: int, repeat: int) -> list[dict]:
    """Window -> version ``repeat`` + 1 times: send a window of ``members`` members, read its version on fl.models.
    The first window also waits for the aggregator's group join on fl.windows (start-up, not steady state): it is
    returned first, and reported apart. Its members carry :func:`trained_delta` (plus their noise), so every later
    window is aggregated and audited on a trained model."""
    from aggregator.service import AggregatorService
    from fedguard.tasks import configure_torch

    configure_torch()  # as `fedguard aggregator` does
    settings = bench_settings(bootstrap, redis_url, data_dir / "latency", "lat", members, window_size=members)
    create_topics(settings)
    num_params = model_spec(TASK, Settings(model_hidden=HIDDEN).hidden_widths()).num_params
    service = AggregatorService(settings)
    timer = StepTimer()
    instrument(service, timer)
    stop, failure = threading.Event(), []

    def serve() -> None:
        try:
            service.run(stop)
        except BaseException as exc:  # noqa: BLE001 - reported by the waiting side
            failure.append(exc)

    thread = threading.Thread(target=serve, name="aggregator", daemon=True)
    watcher = consumer_from_beginning(settings, [settings.topics.models], "fedguard-bench-watch",
                                      fetch_max_wait_ms=20)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", client_id="fedguard-bench-windows")
    runs = []
    try:
        thread.start()
        base = wait_for_version(watcher, 0, thread, failure)["version"]
        pretrain = trained_delta(service.current.params)
        for i in tqdm(range(repeat + 1), desc="window -> version", unit="window", leave=False):
            # The members of each window are validated updates on its base version (retention deletes older ones).
            window = window_of(settings, publish_valid_updates(settings, members, num_params, base,
                                                               pretrain if i == 0 else None), base)
            started = time.perf_counter()
            producer.send(settings.topics.windows, key=settings.model_id.encode(),
                          value=records.dumps(window)).get(timeout=60)
            meta = wait_for_version(watcher, base + 1, thread, failure)
            total = time.perf_counter() - started
            split = timer.windows.get(timeout=STALL_S)
            info = meta["rule_info"]
            if "failed" in info or "skipped" in info or meta["accepted"] != members:
                raise BenchError(f"window of version {base + 1} was not aggregated: {info.get('failed') or info}")
            steps = {f"{k}_s": v for k, v in split.items()}
            runs.append({"total_s": total, **steps, "delivery_s": total - steps["handle_window_s"]})
            base += 1
    finally:
        stop.set()
        thread.join(30)
        service.close()
        watcher.close()
        producer.close()
    return runs


# -- the whole run ----------------------------------------------------------------------------------------------------
def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    log_dir = workdir / "logs"
    log_dir.mkdir(parents=True)
    num_params = model_spec(TASK, Settings(model_hidden=HIDDEN).hidden_widths()).num_params
    configs = list(CONFIGS)
    out: dict[str, Any] = {"num_params": num_params, "repeats": []}
    (workdir / "redis").mkdir()
    with running_broker(log_dir / "broker.log") as (bootstrap, broker_pid), \
            temporary_redis(workdir / "redis") as redis_url:
        infra = {"broker": broker_pid, "redis": redis_pid(redis_url)}
        progress = tqdm(total=args.repeat * 2 * len(configs) + 1, desc="pipeline bench", unit="step")
        for r in range(args.repeat):
            repeat: dict[str, Any] = {"floor": [], "validated": {}}
            for config in configs if r % 2 == 0 else list(reversed(configs)):  # alternate the order
                workers, steady = CONFIGS[config]
                tag = f"w{config}r{r}"
                settings, out["record_bytes"] = prepare_measurement(bootstrap, redis_url, workdir / "data", tag,
                                                                    args.count, num_params)
                progress.set_postfix_str(f"{tag}: floor")
                repeat["floor"].append(floor_rate(settings, args.count, infra))
                progress.update(1)
                progress.set_postfix_str(f"{tag}: {workers} worker(s)")
                spares = prepare_store(settings, args.count, num_params, steady)
                run = run_workers(settings, workers, args.count, log_dir, infra, tag)
                run["spares_before"] = spares
                if run["per_s"] is not None:
                    run["conservation"] = check_conservation(settings, args.count)
                repeat["validated"][config] = run
                delete_measurement_topics(settings, tag)
                shutil.rmtree(settings.update_store_dir, ignore_errors=True)  # as retention would: GBs otherwise
                progress.update(1)
            out["repeats"].append(repeat)
        progress.set_postfix_str("window -> version")
        first, *out["latency"] = window_latency(bootstrap, redis_url, workdir, args.members, args.latency_repeat)
        out["latency_first_window"] = first
        progress.update(1)
        progress.close()
    return out


def summarise(measured: dict[str, Any]) -> dict[str, Any]:
    """Medians over repeats, the targets' verdicts and the two-worker ceiling from measured CPU time."""
    repeats = measured["repeats"]
    floors = [statistics.median(f["per_s"] for f in r["floor"]) for r in repeats]
    one = [r["validated"]["1"]["per_s"] for r in repeats]
    two = [r["validated"]["2"]["per_s"] for r in repeats]
    empty = [r["validated"]["1e"]["per_s"] for r in repeats]
    ratio_one = [o / f if o else None for o, f in zip(one, floors)]
    ratio_empty = [e / f if e else None for e, f in zip(empty, floors)]
    speedups = [t / o if t and o else None for t, o in zip(two, one)]
    cpu = {w: cpu_shares([r["validated"][w] for r in repeats]) for w in CONFIGS}
    cpu["floor"] = cpu_shares([f for r in repeats for f in r["floor"]])
    per_record = [pipeline_cpu_per_record(r["validated"]["1"]) for r in repeats if r["validated"]["1"]["per_s"]]
    floor_per_record = [cpu_per_record(f, ("broker", "bench")) for r in repeats for f in r["floor"]]
    consumer_per_record = [cpu_per_record(f, ("bench",)) for r in repeats for f in r["floor"]]
    worker_per_record = [cpu_per_record(r["validated"]["1"], ("worker0",)) for r in repeats
                         if r["validated"]["1"]["per_s"]]
    empty_worker_per_record = [cpu_per_record(r["validated"]["1e"], ("worker0",)) for r in repeats
                               if r["validated"]["1e"]["per_s"]]
    ceiling = (speedup_ceiling(os.cpu_count() or 1, statistics.median(per_record), median_or_none(one))
               if per_record else None)
    latency = [run["total_s"] for run in measured["latency"]]
    steps = sorted({k for run in measured["latency"] for k in run if k != "total_s"})
    summary = {
        "floor_per_s": statistics.median(floors), "one_worker_per_s": median_or_none(one),
        "two_workers_per_s": median_or_none(two), "ratio_one_to_floor": median_or_none(ratio_one),
        "speedup": median_or_none(speedups), "ratios_one_to_floor": ratio_one, "speedups": speedups,
        "one_worker_empty_store_per_s": median_or_none(empty), "one_worker_empty_store_runs": empty,
        "ratio_empty_store_to_floor": median_or_none(ratio_empty), "ratios_empty_store_to_floor": ratio_empty,
        "worker_cpu_s_per_record_empty_store": (statistics.median(empty_worker_per_record)
                                                if empty_worker_per_record else None),
        "floor_runs": floors, "one_worker_runs": one, "two_worker_runs": two, "cpu_share": cpu,
        "pipeline_cpu_s_per_record_one_worker": statistics.median(per_record) if per_record else None,
        "floor_cpu_s_per_record": statistics.median(floor_per_record),
        "floor_consumer_cpu_s_per_record": statistics.median(consumer_per_record),
        "worker_cpu_s_per_record": statistics.median(worker_per_record) if worker_per_record else None,
        "speedup_ceiling": ceiling,
        "busy_with_other_work": max((shares.get(OTHER, 0.0) for shares in cpu.values()), default=0.0) > NOISE_CORES,
        "latency_median_s": statistics.median(latency), "latency_p95_s": percentile(latency, 95),
        "latency_split_median_s": {k: statistics.median(run.get(k, 0.0) for run in measured["latency"])
                                   for k in steps},
    }
    summary["met"] = {
        "one_worker": None if summary["ratio_one_to_floor"] is None
        else summary["ratio_one_to_floor"] >= TARGET_ONE_WORKER,
        "two_workers": None if summary["speedup"] is None else summary["speedup"] >= TARGET_SPEEDUP,
        "latency": summary["latency_median_s"] < TARGET_LATENCY_S,
    }
    summary["two_workers_explained"] = (summary["met"]["two_workers"] is False and ceiling is not None
                                        and ceiling < TARGET_SPEEDUP)
    return summary


def cpu_shares(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Median share of one core each process used during the timed part of the runs (1.0 = one core busy)."""
    timed = [run for run in runs if run.get("per_s")]
    if not timed:
        return {}
    names = sorted({name for run in timed for name in run["cpu_seconds"]})
    shares = {name: statistics.median(run["cpu_seconds"].get(name, 0.0) / run["seconds"] for run in timed)
              for name in names}
    ours = sum(v for k, v in shares.items() if k != "machine")
    shares[OTHER] = max(0.0, shares.get("machine", 0.0) - ours)
    return shares


def cpu_per_record(run: dict[str, Any], processes: tuple[str, ...]) -> float:
    """CPU seconds ``processes`` spent per record of the run's timed part."""
    return sum(v for k, v in run["cpu_seconds"].items() if k in processes) / run["records_timed"]


def pipeline_cpu_per_record(run: dict[str, Any]) -> float:
    """CPU seconds the pipeline (workers, broker, Redis; not this script's polling) spent per record validated."""
    return cpu_per_record(run, ("broker", "redis", *(k for k in run["cpu_seconds"] if k.startswith("worker"))))


def machine() -> dict[str, str]:
    import faust

    server = subprocess.run([redis_binary(), "--version"], capture_output=True, text=True).stdout.strip()
    tansu = subprocess.run([broker_binary(), "--version"], capture_output=True, text=True).stdout.strip()
    memory = psutil.virtual_memory().total / 2**30
    return {"nproc": str(os.cpu_count()), "cpu": cpu_model(), "memory_gib": f"{memory:.0f}",
            "python": platform.python_version(), "platform": platform.platform(), "faust": faust.__version__,
            "aiokafka": aiokafka.__version__, "kafka-python": kafka.__version__, "numpy": np.__version__,
            "broker": tansu, "redis-server": server.split(" sha=")[0]}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_results(args: argparse.Namespace, measured: dict[str, Any], summary: dict[str, Any], out: Path) -> None:
    info = machine()
    s, met = summary, summary["met"]
    lines = ["# Pipeline throughput through the real broker, and window -> version latency", ""]
    if args.quick:
        lines += ["**Smoke run (`--quick`), not the committed measurement**: few records, one repeat, on a machine "
                  "shared with other work. It shows the benchmark runs end to end; the numbers are not the "
                  "measurement. Run the full command (below, without `--quick`) on a quiet machine to replace it.", ""]
    lines += [
        f"Command: `{run_command(args)}`" + ("" if not args.quick else
                                             f" (full: `python bench/pipeline.py --count 2000 --repeat 3 "
                                             f"--latency-repeat 20 --out {args.out}`)"),
        "",
        f"Machine: {info['nproc']} vCPUs, {info['cpu']}, {info['memory_gib']} GiB; {info['platform']}.",
        f"Versions: Python {info['python']}, faust-streaming {info['faust']}, aiokafka {info['aiokafka']}, "
        f"kafka-python {info['kafka-python']}, numpy {info['numpy']}, {info['broker']} (memory engine, loopback), "
        f"{info['redis-server']} (loopback).",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')}; {args.count:,} records per measurement of "
        f"{measured['num_params']:,} float32 parameters ({measured['record_bytes']:,} bytes sealed); "
        f"medians of {args.repeat} repeat(s), configurations in alternating order; window -> version: "
        f"{args.latency_repeat} windows of {args.members} members.",
        "",
        "| target (issue 12, item 8) | required | measured | |",
        "|---|---:|---:|---|",
        f"| one worker, validated updates/s over the floor | >= {TARGET_ONE_WORKER:.0%} | "
        f"**{_fmt(s['ratio_one_to_floor'], '.0%')}** | {verdict(met['one_worker'])} |",
        f"| two workers over one | >= {TARGET_SPEEDUP:.1f}x | **{_fmt(s['speedup'], '.2f')}x** | "
        f"{verdict(met['two_workers'])}"
        + ("; the measured ceiling of this machine is below it (see below)" if s["two_workers_explained"] else "")
        + " |",
        f"| window -> version, n = {args.members}, median (p95) | < {TARGET_LATENCY_S:g} s | "
        f"**{s['latency_median_s']:.2f} s** ({s['latency_p95_s']:.2f} s) | {verdict(met['latency'])} "
        f"(p95: {verdict(s['latency_p95_s'] < TARGET_LATENCY_S)}) |",
        "",
        "## Throughput",
        "",
        "| | records/s (median) | per repeat |",
        "|---|---:|---|",
        f"| floor: aiokafka consumer, own group, raw topic from the beginning | {s['floor_per_s']:,.0f} | "
        + ", ".join(f"{v:,.0f}" for v in s["floor_runs"]) + " |",
        f"| 1 processors worker: validated | {_fmt(s['one_worker_per_s'], ',.0f')} | "
        + ", ".join(_fmt(v, ",.0f") for v in s["one_worker_runs"]) + " |",
        f"| 2 processors workers: validated | {_fmt(s['two_workers_per_s'], ',.0f')} | "
        + ", ".join(_fmt(v, ",.0f") for v in s["two_worker_runs"]) + " |",
        f"| 1 processors worker, empty update store (no spares: a fresh start) | "
        f"{_fmt(s['one_worker_empty_store_per_s'], ',.0f')} | "
        + ", ".join(_fmt(v, ",.0f") for v in s["one_worker_empty_store_runs"]) + " |",
        "",
        "Per-repeat ratios: one worker / floor " + ", ".join(_fmt(v, ".2f") for v in s["ratios_one_to_floor"])
        + "; two / one " + ", ".join(_fmt(v, ".2f") for v in s["speedups"])
        + "; one worker on an empty store / floor "
        + ", ".join(_fmt(v, ".2f") for v in s["ratios_empty_store_to_floor"])
        + f" (median {_fmt(s['ratio_empty_store_to_floor'], '.0%')}).",
        "",
        "The 1- and 2-worker runs start with as many spare files in the update store as they write: the steady "
        "state of a running deployment, where the aggregator's retention turns the files of every pruned base "
        "version into spares that the validators write over (fedguard/updatestore.py; the first versions after a "
        "fresh start have none: the last row).",
        "",
        "CPU during the timed part of the runs (median share of one core; 1.00 = one core busy all the time):",
        "",
        "| process | floor | 1 worker | 2 workers | 1 worker, empty store |",
        "|---|---:|---:|---:|---:|",
    ]
    shares = s["cpu_share"]
    for name in sorted(set().union(*(shares[c] for c in ("floor", *CONFIGS))), key=_process_order):
        lines.append(f"| {_process_label(name)} | "
                     + " | ".join(_fmt(shares[c].get(name), ".2f") for c in ("floor", *CONFIGS)) + " |")
    if s["busy_with_other_work"]:
        lines += ["", f"**Other processes used more than {NOISE_CORES:g} of a core during these runs**: the machine "
                  "was not quiet, and these numbers measure the contention as much as the pipeline."]
    lines += ["", *one_worker_reading(s), "", *two_worker_reading(s, int(info["nproc"])), ""]
    lines += ["## Window -> version", "",
              "| step | median s |", "|---|---:|",
              f"| **total: window sent -> version read on fl.models** | **{s['latency_median_s']:.3f}** |"]
    split = s["latency_split_median_s"]
    for step, label in (("fetch_s", "read the members' tensors from the update store"),
                        ("aggregate_s", "aggregate (norm_clip)"), ("evaluate_s", "evaluate (test set and backdoor)"),
                        ("audit_s", "audit the candidate (Neural Cleanse, aggregator/auditing.py)"),
                        ("persist_s", "persist (model store)"), ("publish_s", "publish (Redis key, fl.models)"),
                        ("handle_window_s", "the service's whole window (the above and the rest)"),
                        ("delivery_s", "delivery: the window to the aggregator's poll, the version to this reader")):
        if step in split:
            lines.append(f"| {label} | {split[step]:.3f} |")
    first = measured["latency_first_window"]
    lines += ["", f"Not counted above: the first window after the aggregator started took {first['total_s']:.2f} s, "
              f"{first['delivery_s']:.2f} s of it delivery (the aggregator's consumer group joins fl.windows at its "
              "first poll; the broker holds a join for half the session timeout, BROKER.md).", ""]
    lines += reading_notes(measured, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"smoke_run": bool(args.quick), "command": run_command(args), "machine": info, "summary": summary,
         "measured": measured}, indent=1, default=str))


def one_worker_reading(s: dict[str, Any]) -> list[str]:
    """Where one worker stands against the floor, in CPU per record."""
    if s["worker_cpu_s_per_record"] is None:
        return []
    worker_ms, consumer_ms = s["worker_cpu_s_per_record"] * 1000, s["floor_consumer_cpu_s_per_record"] * 1000
    text = (f"One worker spends {worker_ms:.2f} ms of CPU (its own process) per record it validates; the floor's "
            f"consumer spends {consumer_ms:.2f} ms per record it reads. With a core to itself a worker could "
            f"therefore validate at most {1000 / worker_ms:,.0f} records/s, "
            f"{1000 / worker_ms / s['floor_per_s']:.0%} of the floor's median rate.")
    if s.get("worker_cpu_s_per_record_empty_store") is not None:
        text += (f" On an empty update store it spends {s['worker_cpu_s_per_record_empty_store'] * 1000:.2f} ms: "
                 "every tensor goes to a new file, whose pages the kernel must allocate.")
    return [text]


def two_worker_reading(s: dict[str, Any], cores: int) -> list[str]:
    """What the CPU numbers say about the two-worker target."""
    if s["pipeline_cpu_s_per_record_one_worker"] is None or s["speedup_ceiling"] is None:
        return ["No one-worker run was timed, so no CPU ceiling could be computed."]
    per_record_ms = s["pipeline_cpu_s_per_record_one_worker"] * 1000
    busy_two = s["cpu_share"]["2"].get("machine")
    text = (f"Reading the raw topic alone (the floor) costs {s['floor_cpu_s_per_record'] * 1000:.2f} ms of CPU per "
            f"record (broker and consumer). With one worker the pipeline (worker, broker, Redis) spends "
            f"{per_record_ms:.2f} ms of CPU per record. "
            f"{cores} vCPUs can therefore do at most {cores / s['pipeline_cpu_s_per_record_one_worker']:,.0f} "
            f"records/s with any number of workers, {s['speedup_ceiling']:.2f}x the one-worker rate, if all of it "
            "ran in parallel and nothing else used the machine")
    if busy_two is not None:
        text += (f"; with two workers the machine was {busy_two / cores:.0%} busy "
                 f"({busy_two:.2f} of {cores} cores, this script's polling and other work included)")
    text += "."
    if s["two_workers_explained"]:
        text += (f" That ceiling is below the {TARGET_SPEEDUP:.1f}x target: on this {cores}-vCPU machine the second "
                 "worker has no free core to run on, since the broker and Redis take the rest.")
    return [text]


def reading_notes(measured: dict[str, Any], args: argparse.Namespace) -> list[str]:
    repeats = measured["repeats"]
    before = [r["validated"][w].get("records_before_clock", 0) for r in repeats for w in CONFIGS]
    dupes = [r["validated"][w]["conservation"]["duplicates"] for r in repeats for w in CONFIGS
             if "conservation" in r["validated"][w]]
    problems = [r["validated"][w]["problem"] for r in repeats for w in CONFIGS if "problem" in r["validated"][w]]
    notes = [
        "Reading the numbers:", "",
        f"* **d**: {measured['num_params']:,} parameters, the issue's d = 100k: {TASK} with the MLP's hidden "
        f"layer set to {HIDDEN} (`FEDGUARD_MODEL_HIDDEN={HIDDEN}`, which every service reads; the demo's default "
        "is 200, 159,010 parameters). The floor is measured on the same records.",
        "* **Admission**: every record is admitted. 1,024 enrolled devices (`fedguard init`) send the records in "
        "turn, all at base version 0, so a device sends more than one per version: the bench settings turn "
        "`one_update_per_window` off and raise both token buckets' capacities to "
        "the record count. Every other check runs as deployed. Each measurement has its own topics, model id and "
        "Redis namespace, and its records are sealed for it (fresh sequence numbers and timestamps). Each record's "
        "tensor is its own N(0, 1e-3) noise: copies of one tensor from different devices are Sybils, which the "
        "window stage quarantines at once.",
        "* **Clock**: each validated run starts its workers on the filled topic; the clock starts at the first "
        f"metrics scrape (every {POLL_S:g} s) at which every worker has validated a record, so start-up, the group "
        "join and the first fetch are not timed, and it stops at the scrape where valid + rejected reach the count. "
        f"Records validated before the clock started, per run: {', '.join(str(b) for b in before)}. The floor's "
        "clock likewise starts after its first fetch.",
        "* **Conservation**: after each run every raw record was found on the index (valid) or dead-letter topic; "
        f"re-deliveries per run: {', '.join(str(d) for d in dupes) or '-'}.",
        "* **Window -> version** runs the real `AggregatorService` (default settings: rule norm_clip, evaluation on "
        "the test set with the default backdoor check) in a thread of this script, on valid records in the "
        "validator's format (tensors in the update store, `fedguard/updatestore.py`; JSON records naming them) and "
        "window records built by `processors.windows.window_record`, every member accepted with weight 1. The split "
        "is timed around the service's own calls. The first window's members carry the update that trains the "
        f"model for {PRETRAIN_EPOCHS} epoch(s) on the training set (plus their noise), so the timed windows are "
        "aggregated and audited on a trained model, as in a running deployment; the members of the timed windows "
        "are noise of honest size around it (N(0, 1e-3) per coordinate).",
    ]
    if problems:
        notes.append(f"* **Runs without a timed part**: {'; '.join(problems)}.")
    return notes + [""]


def _process_order(name: str) -> tuple[int, str]:
    order = ["worker0", "worker1", "broker", "redis", "bench", OTHER, "machine"]
    return (order.index(name), name) if name in order else (len(order), name)


def _process_label(name: str) -> str:
    return {"worker0": "processors worker 1", "worker1": "processors worker 2", "broker": "broker (Tansu)",
            "redis": "redis-server", "bench": "this script (floor: the consumer; runs: metrics polling)",
            "machine": "**whole machine (all processes)**"}.get(name, name)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="sealed updates on the raw topic per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="repeats of floor, 1 worker and 2 workers")
    parser.add_argument("--members", type=int, default=100, help="members per window (window -> version)")
    parser.add_argument("--latency-repeat", type=int, default=20, help="windows timed (window -> version)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 400 records, 1 repeat, 5 windows")
    parser.add_argument("--out", default="bench/results/pipeline.md")
    parser.add_argument("--profile", metavar="STATS", help="instead of the benchmark: run one worker under cProfile "
                        "on --count records, write its stats to STATS and print where its time goes per record")
    parser.add_argument("--profile-top", type=int, default=30, help="functions listed per ranking (--profile)")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.repeat, args.latency_repeat = 400, 1, 5
    signal.signal(signal.SIGTERM, _interrupt)  # stop what was started, as on Ctrl-C
    workdir = Path(tempfile.mkdtemp(prefix="fedguard-bench-pipeline-"))  # kept when a run fails: its logs
    try:
        if args.profile:
            report = profile_worker(args, workdir)
            shutil.rmtree(workdir, ignore_errors=True)
            print(report)
            return 0
        measured = measure(args, workdir)
    except KeyboardInterrupt:
        print(f"bench/pipeline.py: interrupted; the broker, Redis and workers it started are stopped (logs in "
              f"{workdir / 'logs'})", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench/pipeline.py: {exc}; hint: the logs are kept in {workdir / 'logs'}", file=sys.stderr)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    summary = summarise(measured)
    write_results(args, measured, summary, Path(args.out))
    print(Path(args.out).read_text())
    met = summary["met"]
    return 0 if met["one_worker"] and met["latency"] and (met["two_workers"] or summary["two_workers_explained"]) else 1


if __name__ == "__main__":
    sys.exit(main())
