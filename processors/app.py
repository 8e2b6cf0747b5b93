"""The Faust app: validation agent, window stage and their metrics.

Two agents, each a short ``async for``:

* ``validate`` reads ``fl.updates.raw`` in small batches (``validate_batch_size`` records or what arrived within
  ``validate_batch_within_s``; one Redis round trip per batch) and writes every record to exactly one of
  ``fl.updates.valid`` (its metadata; the tensor goes to the update store, fedguard/updatestore.py) or
  ``fl.updates.rejected`` (reason code and detail); for a valid one it also writes a small pointer to
  ``fl.updates.valid.index``, keyed by model id. Security events (a device rate limited, the ingress bound hit, a
  replay), at most one per device per interval, go to ``fl.events``. The valid
  records and their index go through the stage's own producer, and the next batch is validated while the broker
  takes the one before (:class:`ValidationPipeline`); a raw record is acknowledged once its outputs are on the broker.
* ``collect`` reads that index in batches and keeps the open windows in a table keyed by model id (co-partitioned
  with the index; written once per batch, see ``COLLECT_BATCH_SIZE``), at most one member per device, closing each
  on count; a timer closes windows on their deadline. A closing
  window is judged by the detection ensemble and reputation (:mod:`processors.defence`, on the members' secret
  sketches, which the validator computes from the full tensors): every member gets a verdict (accept / downweight /
  reject), a weight and reasons; reputation is updated exactly once per window and may quarantine a device.
  Closed windows go to ``fl.windows``; flags, quarantines and releases to ``fl.events``. A timer releases devices
  whose quarantine probation is over.

Each agent only moves records between its stream, its table and the steps below, which can be run and tested alone
(tests/unit/test_app_steps.py): the records the validation stage writes (:func:`dead_letter_record`,
:func:`valid_meta`, :func:`index_record`, :func:`security_event_record`, pure), the routing of a validated batch
(:func:`route_validated`, to any topics with Faust's ``send``; :class:`ValidationPipeline`, the same steps one batch
overlapping the next), and the window stage's steps (:class:`WindowStage`:
seat a member, close a window, close the windows past their deadline, release devices), which take a model's window
state from the table and return the new one.

Delivery is at-least-once (the embedded broker cannot run Faust's exactly-once, see BROKER.md): every output carries
the raw record's position and update id so a consumer can tell a re-delivery from a new record.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import faust
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from kafka.partitioner.default import murmur2
from prometheus_client import Counter, Gauge, Histogram

from fedguard import records, registry
from fedguard import sketch as sketch_codec
from fedguard.keys import load_or_create_server_key
from fedguard.envelope import parse
from fedguard.reasons import Reason, RejectError
from fedguard.settings import Settings
from fedguard.sketch import SketchSpec, sketch
from fedguard.modelstore import ModelStore
from fedguard.tasks import ModelSpec, TaskData, build_model, configure_torch, load_task, model_spec
from fedguard.tasks.server_data import LossProbe, server_set
from fedguard.updatestore import UpdateStore
from processors.validation import CHECKS, ValidUpdate, Validator, byte_bounded
from processors import windows as W
from processors.defence import WindowDefence, quarantined_key
from processors.detectors import load_clustering
from processors.ensemble import DETECTORS

log = logging.getLogger("fedguard.processors")

RECEIVED = Counter("fedguard_updates_received_total", "Records read from the raw updates topic")
VALID = Counter("fedguard_updates_valid_total", "Updates that passed validation")
REJECTED = Counter("fedguard_updates_rejected_total", "Records rejected by the validator, by reason code", ["reason"])
SECURITY_EVENTS = Counter("fedguard_security_events_total", "Security events published on fl.events", ["type"])
STORE_ERRORS = Counter("fedguard_update_store_errors_total",
                       "Failed writes of a validated tensor to the update store (each is retried: validation waits)")
VALIDATE_SECONDS = Histogram("fedguard_validate_seconds", "Time to validate one record (batch time / records)",
                             buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
# Consumer lag of what this worker reads (fl.updates.raw, fl.updates.valid.index): the partition's end as the last
# fetch response reported it (its high watermark, which the embedded broker gives right, unlike its ListOffsets
# answer: ../shared/BROKER.md) minus the next offset the agent will process. It replaces the raw topic's last
# offset (a position, not a lag), which is no longer exported.
CONSUMER_LAG = Gauge("fedguard_consumer_lag_records", "Records on a partition this worker reads that it has not "
                     "processed yet (fetch high watermark minus next offset to process)", ["topic", "partition"])
WINDOWS_CLOSED = Counter("fedguard_windows_closed_total", "Windows closed", ["closed_by"])
# Window sizes are small integers: one bucket per integer up to 20, so a quantile lands in the bucket (k-1, k] of
# the true size k and ceil(histogram_quantile(...)) is exact (the dashboard plots that, with the mean and max).
SIZE_BUCKETS = (*range(1, 21), 30, 50, 100)
WINDOW_SIZE = Histogram("fedguard_window_members", "Members per closed window", buckets=SIZE_BUCKETS)
WINDOW_FLAGGED = Counter("fedguard_window_flagged_total", "Window members the ensemble did not accept, by verdict",
                         ["verdict"])
DETECTOR_FLAGS = Counter("fedguard_detector_flags_total", "Votes of each detector against window members",
                         ["detector"])
WINDOW_DEVICES = Histogram("fedguard_window_distinct_devices", "Distinct devices per closed window",
                           buckets=SIZE_BUCKETS)
WINDOW_SECONDS = Histogram("fedguard_window_judge_seconds", "Detection + reputation + publishing of one window",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
TRUST_BUCKETS = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
MEMBER_TRUST = Histogram("fedguard_member_trust", "Trust (beta reputation expectation) of window members after "
                         "their window", buckets=TRUST_BUCKETS)
QUARANTINED = Gauge("fedguard_devices_quarantined", "Devices quarantined by reputation")
DEVICE_DUPLICATES = Counter("fedguard_window_device_duplicates_total",
                            "Valid updates not seated because their device already had one in the window")
LATE_UPDATES = Counter("fedguard_window_late_updates_total", "Valid updates whose base version's window had closed")
OPEN_WINDOWS = Gauge("fedguard_windows_open", "Windows currently open")


# Create every labelled series at zero, so the first burst of each reason is visible to rate() and increase().
for _reason in Reason:
    REJECTED.labels(_reason.value)
for _closed_by in ("count", "deadline"):
    WINDOWS_CLOSED.labels(_closed_by)
for _verdict in ("downweight", "reject"):
    WINDOW_FLAGGED.labels(_verdict)
for _detector in DETECTORS:
    DETECTOR_FLAGS.labels(_detector)
for _event in ("rate_limited", "ingress_limited", "replay", "flagged", "quarantined", "released"):
    SECURITY_EVENTS.labels(_event)


class ConsumerPositions:
    """The next offset an agent will process on each (topic, partition) it read from: the offsets of the records it
    processed, counted here because the broker's own "latest offset" answer cannot be trusted (BROKER.md)."""

    def __init__(self) -> None:
        self.next_offset: dict[tuple[str, int], int] = {}

    def processed(self, topic: str, events: list) -> None:
        for event in events:
            self.next_offset[(topic, event.message.partition)] = event.message.offset + 1

    def forget(self, keys: list[tuple[str, int]]) -> None:
        """Partitions this worker no longer reads: another worker's position, not ours, counts from now on."""
        for key in keys:
            self.next_offset.pop(key, None)


POSITIONS = ConsumerPositions()


def consumer_lag(end: int | None, next_offset: int | None) -> int | None:
    """Records not processed yet: the partition's end minus the next offset to process (None if either is unknown;
    never negative, the end is only as fresh as the last fetch response)."""
    if end is None or next_offset is None:
        return None
    return max(0, end - next_offset)


async def export_consumer_lag(consumer, positions: ConsumerPositions, topics: tuple[str, ...],
                              exported: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """Set ``fedguard_consumer_lag_records`` for every assigned partition of ``topics``, and drop the series of the
    partitions no longer assigned to this worker (their new owner exports them). Returns what is exported now."""
    assigned = {(tp.topic, tp.partition): tp for tp in consumer.assignment() if tp.topic in topics}
    positions.forget([key for key in positions.next_offset if key[0] in topics and key not in assigned])
    for topic, partition in exported - set(assigned):
        CONSUMER_LAG.remove(topic, str(partition))
    now_exported = set()
    for key, tp in assigned.items():
        try:
            next_offset = positions.next_offset.get(key)
            if next_offset is None:  # nothing processed here since this worker started: where it will start
                next_offset = await consumer.position(tp)
            lag = consumer_lag(consumer.highwater(tp), next_offset)
        except Exception as exc:  # noqa: BLE001 - a partition revoked meanwhile: the next tick sees the new assignment
            log.debug("consumer lag of %s: %r", tp, exc)
            lag = None
        if lag is not None:
            CONSUMER_LAG.labels(key[0], str(key[1])).set(lag)
            now_exported.add(key)
        elif key in exported:
            now_exported.add(key)
    return now_exported


def key_partition(key: bytes, partitions: int) -> int:
    """The partition the producers' default partitioner (murmur2) gives a keyed record: where the index topic and the
    window table's changelog put a model id."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class WindowPartitions:
    """The index partitions whose windows this worker may close on their deadline: assigned to it, and read to the
    end once since they were. A worker that lost a partition keeps that model's window state in its table's memory
    store (Faust forgets only keys it recovered from the changelog) and must not close those windows again; a worker
    that was just given a partition holds the state the changelog had, which may lag the index (the previous owner
    died after closing a window on count, before its table update reached the broker): the re-delivered index
    records must be seated first, so the window closes again with the same members (judged once), not on its
    deadline with fewer. Every rebalance (``generation``: Faust's rebalance count) starts over."""

    def __init__(self) -> None:
        self.ready: set[int] = set()
        self.generation: int | None = None

    async def refresh(self, consumer, positions: ConsumerPositions, topic: str, generation: int) -> set[int]:
        if generation != self.generation:
            self.ready, self.generation = set(), generation
        assigned = {tp.partition: tp for tp in consumer.assignment() if tp.topic == topic}
        self.ready &= set(assigned)
        for partition, tp in assigned.items():
            if partition in self.ready:
                continue
            try:
                next_offset = positions.next_offset.get((topic, partition))
                if next_offset is None:
                    next_offset = await consumer.position(tp)
                if consumer_lag(consumer.highwater(tp), next_offset) == 0:
                    self.ready.add(partition)
            except Exception as exc:  # noqa: BLE001 - revoked meanwhile: the next tick sees the new assignment
                log.debug("window partition %s: %r", tp, exc)
        return self.ready


def observe_window(record: dict) -> None:
    """The metrics of one closed window (once per window, not per re-delivery)."""
    WINDOWS_CLOSED.labels(record["closed_by"]).inc()
    WINDOW_SIZE.observe(len(record["members"]))
    WINDOW_DEVICES.observe(record["distinct_devices"])
    for member in record["members"]:
        if member["verdict"] != "accept":
            WINDOW_FLAGGED.labels(member["verdict"]).inc()
        for detector in member.get("flags", []):
            if detector in DETECTORS:
                DETECTOR_FLAGS.labels(detector).inc()
        if member.get("trust") is not None:
            MEMBER_TRUST.observe(member["trust"])


# -- the validation stage's steps --------------------------------------------------------------------------------------
def raw_position(event) -> dict:
    """Where a record sits on the raw topic: every output names it, so a consumer can tell a re-delivery."""
    return {"partition": event.message.partition, "offset": event.message.offset}


def dead_letter_record(err: RejectError, position: dict, raw: bytes | None, now: float) -> dict:
    """The ``fl.updates.rejected`` record of a raw record rejected with ``err``; the device id is the authenticated
    one if there is one, else the one the record claims (for operators, not for trust)."""
    return {"raw": position, "device_id": err.device_id or _claimed_device(raw), "authenticated": err.authenticated,
            "reason": err.reason.value, "detail": err.detail, "rejected_at": now}


def security_event_record(event: dict, position: dict) -> dict:
    """The ``fl.events`` record of a security event the validator raised on the raw record at ``position``."""
    return {**event, "raw": position}


def valid_meta(update: ValidUpdate, position: dict, tensor_ref: str) -> dict:
    """The ``fl.updates.valid`` record of ``update``; its tensor is in the update store at ``tensor_ref``
    (fedguard/updatestore.py: the claim check)."""
    h = update.header
    return {"update_id": h.update_id, "device_id": h.device_id, "model_id": h.model_id,
            "base_version": h.base_version, "seq": h.seq, "num_samples": h.num_samples,
            "timestamp": h.timestamp, "norm": update.norm, "raw": position, "tensor": tensor_ref,
            "checks": list(CHECKS)}


def index_record(update: ValidUpdate, position: dict, valid: dict, tensor_ref: str, sketch_spec: SketchSpec,
                 probe: LossProbe | None = None) -> dict:
    """The ``fl.updates.valid.index`` record of ``update``, once the broker holds it at ``valid`` (``partition`` and
    ``offset`` on the valid topic): what the window stage needs, with the update's secret sketch, where its tensor
    is (``tensor_ref``, which the window record passes on to the aggregator) and, given the ``probe``, its
    ``loss`` on the server's clean rows applied alone to its base version, with the base's own ``base_loss``
    (the ``behaviour`` detector's input; ``None`` when the base version's weights cannot be read)."""
    h = update.header
    measured = probe(h.base_version, update.tensor) if probe is not None else None
    return {"update_id": h.update_id, "device_id": h.device_id, "base_version": h.base_version,
            "num_samples": h.num_samples, "norm": update.norm, "raw": position, "tensor": tensor_ref,
            "sketch": sketch_codec.encode(sketch(update.tensor, sketch_spec)), "valid": valid,
            "loss": None if measured is None else measured[0], "base_loss": None if measured is None else measured[1]}


# A full or failing disk is an outage, not the record's fault: the stage waits for the store instead of rejecting.
STORE_RETRY_S = (0.1, 10.0)  # first and longest wait between attempts


def _put_valid(store: UpdateStore, outcomes: list, refs: list) -> None:
    """Write the tensor of every valid update in ``outcomes`` that has no reference in ``refs`` yet (in place: a
    failed call keeps what it wrote, and the next one goes on from there)."""
    for i, outcome in enumerate(outcomes):
        if refs[i] is None and isinstance(outcome, ValidUpdate):
            h = outcome.header
            refs[i] = store.put(h.model_id, h.base_version, h.device_id, outcome.tensor)


async def store_tensors(store: UpdateStore, outcomes: list) -> list[str | None]:
    """Write the tensors of the valid updates of a batch to the update store, in a thread (a file write releases
    the GIL, so the worker validates the next batch meanwhile: at d = 100k a write costs 0.3-1 ms, as much as opening
    the envelope); returns their references, ``None`` for a rejected record. Retries with backoff, for ever, while
    the store cannot be written, so an outage pauses validation and loses nothing."""
    refs: list[str | None] = [None] * len(outcomes)
    delay, longest = STORE_RETRY_S
    while True:
        try:
            await asyncio.to_thread(_put_valid, store, outcomes, refs)
            return refs
        except OSError as exc:
            STORE_ERRORS.inc()
            log.warning("update store %s not writable (%s); retrying in %.1f s", store.root, exc, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, longest)


@dataclass(frozen=True)
class ValidationOutputs:
    """Where the validation stage writes: topics (anything with Faust's ``async send(key=, value=, force=)``, whose
    result awaits the broker's acknowledgement), the sketch the index carries, the update store the tensors go
    to, and the loss probe that measures each update on the server's clean rows (``None``: not measured)."""

    valid: Any
    rejected: Any
    index: Any
    events: Any
    sketch_spec: SketchSpec
    store: UpdateStore
    probe: LossProbe | None = None


async def dead_letter(out: ValidationOutputs, event, err: RejectError) -> None:
    """Send a rejected record to ``fl.updates.rejected``, and its security event, if any, to ``fl.events``."""
    position = raw_position(event)
    REJECTED.labels(err.reason.value).inc()
    await out.rejected.send(key=event.key, value=records.dumps(dead_letter_record(err, position, event.value,
                                                                                  time.time())), force=True)
    if err.event is not None:  # bounded in Redis: at most one per device (or globally) per interval
        SECURITY_EVENTS.labels(err.event["type"]).inc()
        await out.events.send(key=(err.device_id or "").encode(),
                              value=records.dumps(security_event_record(err.event, position)), force=True)


Accepted = tuple[ValidUpdate, dict, str, Any]  # a valid update, its raw position, its tensor's reference, its
# pending acknowledgement


async def send_outcomes(out: ValidationOutputs, events: list, outcomes: list,
                        refs: list[str | None]) -> list[Accepted]:
    """Send every record of a validated batch to exactly one of ``fl.updates.valid`` and ``fl.updates.rejected``, in
    order, once the batch's tensors are in the update store (``refs``, from :func:`store_tensors`); returns the valid
    ones with their raw position, the reference of their tensor and their pending acknowledgement on the valid
    topic."""
    accepted = []
    for event, outcome, ref in zip(events, outcomes, refs):
        if isinstance(outcome, RejectError):
            await dead_letter(out, event, outcome)
            continue
        position = raw_position(event)
        accepted.append((outcome, position, ref, await out.valid.send(
            key=outcome.header.device_id.encode(), value=records.dumps(valid_meta(outcome, position, ref)),
            force=True)))
    return accepted


async def index_accepted(out: ValidationOutputs, accepted: list[Accepted]) -> None:
    """Index the valid records :func:`send_outcomes` sent, each only once the broker has acknowledged it on the valid
    topic; returns once the broker holds every index record (then the raw records may be acknowledged)."""
    indexed = []
    for outcome, position, ref, pending in accepted:
        sent = await pending
        indexed.append(await out.index.send(key=outcome.header.model_id.encode(), value=records.dumps(index_record(
            outcome, position, {"partition": sent.partition, "offset": sent.offset}, ref, out.sketch_spec,
            out.probe)),
            force=True))
    for pending in indexed:
        await pending
        VALID.inc()


async def route_validated(out: ValidationOutputs, events: list, outcomes: list) -> None:
    """Write the batch's tensors to the update store, send every record to exactly one of ``fl.updates.valid`` and
    ``fl.updates.rejected``, in order; then index the valid ones, each only once the broker has acknowledged it on
    the valid topic."""
    refs = await store_tensors(out.store, outcomes)
    await index_accepted(out, await send_outcomes(out, events, outcomes, refs))


# -- the validation stage's producer and pipeline ----------------------------------------------------------------------
# Measured with one worker at d = 159k on the embedded broker (bench/pipeline.py): through the app's producer, whose
# batches hold one record (BROKER.md: required for table state) and which keeps one request in flight per broker,
# each send waited for the broker to acknowledge the record before it: 7.1 of the 8.1 ms a record took were spent
# blocked in send, and the worker used 0.6 of a core. The valid records and their index therefore go through a
# producer of the validation stage's own, whose batches take every record of a partition that arrives while a request
# is out, and the next batch is validated while the broker takes the outputs of the one before: one worker validated
# 165-171 records/s instead of 149-157 on a quiet machine (bench/pipeline.py --quick).
STOP_PRODUCER_S = 10.0


class ProducerTopic:
    """A topic written through the validation stage's producer, with the ``send`` of a Faust topic: the awaitable it
    returns gives the record's place (``partition``, ``offset``) once the broker holds it."""

    def __init__(self, producer: AIOKafkaProducer, name: str) -> None:
        self.producer, self.name = producer, name

    async def send(self, *, key: bytes, value: bytes, force: bool = True):
        return await self.producer.send(self.name, value=value, key=key)  # the default partitioner, as Faust's


def validation_producer(settings: Settings) -> AIOKafkaProducer:
    """The producer of ``fl.updates.valid`` and its index: a batch per partition as large as one validation call's
    records (``validate_batch_max_bytes``) plus the largest record, acknowledged by all replicas, no idempotence
    (the embedded broker refuses it, BROKER.md)."""
    return AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=0,
                            client_id=f"fedguard-validation-{settings.model_id}", enable_idempotence=False,
                            max_batch_size=settings.validate_batch_max_bytes + 1024 * 1024,
                            max_request_size=settings.max_payload_bytes + 1024 * 1024)


class ValidationPipeline:
    """The validation agent's steps on its batches of raw events: :meth:`submit` validates a batch and starts writing
    its valid tensors to the update store (in a thread), then leaves sending its dead letters and valid records,
    indexing them and acknowledging the raw events to a task that runs while the next batch is validated. One batch
    is finishing at most, and batches finish in order, so the index keeps the order of the raw topic; a raw event is
    acknowledged (its offset may be committed) only once its outputs are on the broker, so a crash re-delivers it
    instead of losing it (at least once, as before)."""

    def __init__(self, validator: Validator, out: ValidationOutputs, ack: Callable[[Any], Awaitable],
                 processed: Callable[[list], None]) -> None:
        self.validator, self.out, self._ack, self._processed = validator, out, ack, processed
        self._finishing: asyncio.Task | None = None

    async def submit(self, events: list) -> None:
        RECEIVED.inc(len(events))
        started = time.perf_counter()
        outcomes = await self.validator.validate_batch(
            [(e.value, e.key, f"{e.message.partition}:{e.message.offset}") for e in events])
        stored = asyncio.ensure_future(store_tensors(self.out.store, outcomes))  # a thread writes meanwhile
        await self.drain()  # the batch before sends and indexes first
        self._finishing = asyncio.ensure_future(self._finish(events, outcomes, stored, started))

    async def drain(self) -> None:
        """Wait for the batch that is finishing, if any (its failure is raised here)."""
        finishing, self._finishing = self._finishing, None
        if finishing is not None:
            await finishing

    def cancel(self) -> None:
        """Stop finishing (the agent stops): its raw events stay unacknowledged, and are delivered again."""
        if self._finishing is not None:
            self._finishing.cancel()

    async def _finish(self, events: list, outcomes: list, stored: asyncio.Future, started: float) -> None:
        accepted = await send_outcomes(self.out, events, outcomes, await stored)
        await index_accepted(self.out, accepted)
        for event in events:
            await self._ack(event)
        self._processed(events)
        elapsed = (time.perf_counter() - started) / len(events)
        for _ in events:
            VALIDATE_SECONDS.observe(elapsed)


@contextlib.asynccontextmanager
async def validation_pipeline(settings: Settings, validator: Validator, out: ValidationOutputs, stream,
                              raw_topic: str):
    """A :class:`ValidationPipeline` writing the valid records and their index through :func:`validation_producer`
    (started on the agent's loop, stopped after the last batch has finished) and acknowledging on ``stream``."""
    producer = validation_producer(settings)
    await producer.start()
    own = dataclasses.replace(out, valid=ProducerTopic(producer, settings.topics.valid),
                              index=ProducerTopic(producer, settings.topics.valid_index))
    pipeline = ValidationPipeline(validator, own, stream.ack, lambda events: POSITIONS.processed(raw_topic, events))
    try:
        yield pipeline
        await pipeline.drain()
    finally:
        pipeline.cancel()
        # Stopping delivers what is pending; bounded, as what it drops was never acknowledged (it comes again).
        await asyncio.wait_for(producer.stop(), STOP_PRODUCER_S)


def make_validator(settings: Settings, num_params: int) -> Validator:
    """The worker's validator: the server key (made on first use) and a Redis client on the worker's loop."""
    server_key = load_or_create_server_key(settings.server_key_path)
    client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    return Validator(settings, server_key, num_params, client)


# -- the window stage's steps -----------------------------------------------------------------------------------------
# The window stage seats index records in batches and writes each model id's window state to the table once per
# batch: a write sends the whole state (every seated member's sketch included) to the table's changelog, one record per
# request (BROKER.md: producer_max_batch_size=1), and while more than 100 such sends wait Faust stops delivering to
# every stream of the worker (its producer buffer's wait_until_ebb): measured with one write per record, the raw
# records' validation stalled behind it ("producer buffer full" in the worker log, one worker at 546 records/s).
COLLECT_BATCH_SIZE = 256
COLLECT_BATCH_WITHIN_S = 0.01


class WindowStage:
    """The window stage's steps on the state of one model id's windows (:mod:`processors.windows`), which lives in
    the ``windows`` table: each step takes the state and returns the new one for the caller to store. The agent and
    the deadline timer both close windows: they hold :attr:`closing` while they do, so one closes at a time."""

    def __init__(self, settings: Settings, windows_topic, events_topic) -> None:
        self.settings = settings
        self.windows_topic = windows_topic
        self.events_topic = events_topic
        self.closing = asyncio.Lock()
        self._defence: WindowDefence | None = None
        load_clustering()  # now, not at the first window close: the import would stall validation for 1-2 s

    def defence(self) -> WindowDefence:
        """Detection and reputation (made on the worker's event loop, at first use: its Redis client is bound to it)."""
        if self._defence is None:
            self._defence = WindowDefence(self.settings, aioredis.Redis.from_url(self.settings.redis_url,
                                                                                 decode_responses=True))
        return self._defence

    async def seat(self, model_id: str, window_state: W.State, entry: dict, now: float) -> W.State:
        """Seat a valid update's index ``entry`` in its window (at most one per device); a window it fills closes."""
        window_state, outcome = W.add_member(window_state, entry, now, self.settings.window_size)
        if outcome == "late":
            LATE_UPDATES.inc()
        elif outcome == "device_duplicate":
            DEVICE_DUPLICATES.inc()
        elif outcome == "full":
            window_state = await self.close(model_id, window_state, int(entry["base_version"]))
        OPEN_WINDOWS.set(len(window_state["open"]))
        return window_state

    async def seat_batch(self, entries: list[tuple[str, dict]], stored: Callable[[str], W.State | None]
                         ) -> dict[str, W.State]:
        """Seat a batch of index entries (model id, entry) in order; returns the new state of each model id they
        name, for the caller to store once (``stored``: the state the table holds, ``None`` if none)."""
        states: dict[str, W.State] = {}
        for model_id, entry in entries:
            if model_id not in states:
                states[model_id] = stored(model_id) or W.empty_state()
            states[model_id] = await self.seat(model_id, states[model_id], entry, time.time())
        return states

    async def close_due(self, model_id: str, window_state: W.State, now: float) -> tuple[W.State, bool]:
        """Close the windows whose deadline has passed; returns the state and whether any closed."""
        s = self.settings
        due = W.due_windows(window_state, now, s.window_size, s.window_deadline_s)
        for base_version in due:
            window_state = await self.close(model_id, window_state, base_version)
        if due:
            OPEN_WINDOWS.set(len(window_state["open"]))
        return window_state, bool(due)

    async def close(self, model_id: str, window_state: W.State, base_version: int) -> W.State:
        """Close the window of ``base_version``: judge its members, publish it on ``fl.windows`` and its events. A
        window closed before (by a worker killed before its table held the closure) is sent as it was then."""
        window_state, window = W.take_window(window_state, base_version)
        window_id = f"{model_id}:{base_version}"
        started = time.perf_counter()
        defence = self.defence()
        earlier = await defence.earlier_closure(window_id)
        if earlier is None:
            judged = await defence.judge(window_id, window["members"])
            record = W.window_record(window, judged.members, judged.stats, model_id=model_id,
                                     base_version=base_version, now=time.time(), size=self.settings.window_size)
            earlier = await defence.earlier_closure(window_id, records.dumps(record).decode())
        if earlier is not None:
            await self.resend(window_id, window, earlier)
            return window_state
        await self.windows_topic.send(key=model_id.encode(), value=records.dumps(record), force=True)
        WINDOW_SECONDS.observe(time.perf_counter() - started)
        if not judged.replayed:  # a window judged before a crash was counted then
            await self.publish_events(judged.events)
            observe_window(record)
        log.info("closed window %s with %d members (%s): %d rejected, %d down-weighted%s", window_id,
                 len(record["members"]), record["closed_by"], record["detector"]["rejected"],
                 record["detector"]["downweighted"], " (judged before a restart)" if judged.replayed else "")
        return window_state

    async def resend(self, window_id: str, window: dict, earlier: str) -> None:
        """Send the record of a window's earlier closure (``earlier``, as stored) again, byte for byte; the members
        it lacks came too late for it."""
        record = records.loads(earlier)
        await self.windows_topic.send(key=record["model_id"].encode(), value=earlier.encode(), force=True)
        kept = {m["update_id"] for m in record["members"]}
        late = [m["update_id"] for m in window["members"] if m["update_id"] not in kept]
        LATE_UPDATES.inc(len(late))
        log.warning("window %s had closed before a restart with %d members: its record sent again (%d late: %s)",
                    window_id, len(kept), len(late), late)

    async def publish_events(self, events: list[dict]) -> None:
        for event in events:
            SECURITY_EVENTS.labels(event["type"]).inc()
            await self.events_topic.send(key=event["device_id"].encode(), value=records.dumps(event), force=True)

    async def release_due(self) -> None:
        """Release the devices whose quarantine probation is over, and publish it."""
        await self.publish_events(await self.defence().release_due())
        QUARANTINED.set(await self.defence().redis.scard(quarantined_key(self.settings)))


# -- the app ----------------------------------------------------------------------------------------------------------
def loss_probe(settings: Settings, task: TaskData, spec: ModelSpec) -> LossProbe:
    """The validator's :class:`LossProbe`: the server's clean rows of ``task`` (the model audit's), the base
    versions' weights from the model store the aggregator writes (fedguard/modelstore.py)."""
    configure_torch()  # one thread: the validator shares the machine with the other services
    store = ModelStore(settings.models_dir)
    x, y = server_set(task, settings.seed)
    return LossProbe(build_model(spec), x, y, lambda version: store.load(version).params)


def create_app(settings: Settings, *, web_port: int | None = None) -> faust.App:
    task = load_task(settings.task, seed=settings.seed)
    spec = model_spec(task, settings.hidden_widths())  # the task actually available
    # The secret sketch the window stage detects on (fedguard/sketch.py): one seed per deployment, in Redis.
    sketch_spec = SketchSpec(spec.num_params, settings.detector_sketch_k,
                             registry.sketch_seed(registry.connect(settings), settings))
    app = faust.App(
        f"fedguard-processors-{settings.model_id}",
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        datadir=str(settings.data_dir / "faust"),  # not the current directory
        topic_partitions=settings.partitions,
        table_standby_replicas=0,  # a standby's copy must not be closed by its timer too
        broker_session_timeout=6.0,  # BROKER.md: group joins are held for half the session timeout
        broker_heartbeat_interval=2.0,
        # The raw topic's payloads carry an AEAD tag the validator checks end to end, and the other topics this app
        # reads are small JSON records on loopback or TCP: the consumer's CRC-32C of every fetched byte (aiokafka's
        # software CRC, 0.28 ms per 400 kB record, 7% of a worker's CPU at d = 100k) is skipped, as Kafka's own
        # `check.crcs` documentation allows "in cases seeking extreme performance" (docs/design-decisions.md).
        broker_check_crcs=False,
        producer_max_batch_size=1,  # BROKER.md: required, or table state is lost when partitions move
        producer_max_request_size=settings.max_payload_bytes + 1024 * 1024,
        consumer_max_fetch_size=settings.max_payload_bytes + 1024 * 1024,
        web_port=web_port or settings.processors_web_port,
        web_host="127.0.0.1",
        key_serializer="raw",
        value_serializer="json",  # the window table; every topic below carries bytes we encode ourselves
    )
    t = settings.topics
    raw_topic, valid_topic, rejected_topic, index_topic, windows_topic, events_topic = (
        app.topic(name, key_serializer="raw", value_serializer="raw")
        for name in (t.raw, t.valid, t.rejected, t.valid_index, t.windows, t.events))
    window_table = app.Table("windows", default=None, use_partitioner=True, partitions=settings.partitions)
    outputs = ValidationOutputs(valid_topic, rejected_topic, index_topic, events_topic, sketch_spec,
                                UpdateStore(settings.update_store_dir, settings.update_store_spare_bytes),
                                loss_probe(settings, task, spec))
    stage = WindowStage(settings, windows_topic, events_topic)

    @app.agent(raw_topic)
    async def validate(stream):
        validator = make_validator(settings, spec.num_params)
        async with validation_pipeline(settings, validator, outputs, stream, t.raw) as pipeline:
            # noack: the pipeline acknowledges each raw event once its outputs are on the broker
            batches = stream.noack_take(settings.validate_batch_size, within=settings.validate_batch_within_s)
            async for batch in batches:
                for events in byte_bounded(batch, settings.validate_batch_max_bytes, lambda e: len(e.value or b"")):
                    await pipeline.submit(events)

    @app.agent(index_topic)
    async def collect(stream):
        # noack: each index event is acknowledged once its batch's window state is in the table
        async for events in stream.noack_take(COLLECT_BATCH_SIZE, within=COLLECT_BATCH_WITHIN_S):
            async with stage.closing:
                seated = await stage.seat_batch(
                    [(event.key.decode(), records.loads(event.value)) for event in events], window_table.get)
                for model_id, window_state in seated.items():  # one table write per model id and batch
                    window_table[model_id] = window_state
            for event in events:
                await stream.ack(event)
            POSITIONS.processed(t.valid_index, events)

    window_partitions = WindowPartitions()

    @app.timer(interval=0.5)
    async def close_on_deadline() -> None:
        if app.rebalancing or app.in_recovery:  # the table holds another worker's state, or part of its own
            return
        ready = await window_partitions.refresh(app.consumer, POSITIONS, t.valid_index, app.rebalancing_count)
        async with stage.closing:
            now = time.time()
            for model_id, window_state in list(window_table.items()):
                if window_state and key_partition(model_id.encode(), settings.partitions) in ready:
                    window_state, closed = await stage.close_due(model_id, window_state, now)
                    if closed:
                        window_table[model_id] = window_state

    @app.timer(interval=5.0)
    async def release_after_probation() -> None:
        await stage.release_due()

    lag_exported: set[tuple[str, int]] = set()

    @app.timer(interval=2.0)
    async def consumer_lag_metrics() -> None:
        nonlocal lag_exported
        try:
            lag_exported = await export_consumer_lag(app.consumer, POSITIONS, (t.raw, t.valid_index), lag_exported)
        except Exception as exc:  # noqa: BLE001 - e.g. the consumer is (re)starting: a metric must not stop the worker
            log.debug("consumer lag not exported: %r", exc)

    return app


def _claimed_device(raw: bytes | None) -> str | None:
    """The device id a rejected record claims, for the dead letter (unauthenticated: for operators, not trust)."""
    try:
        return parse(raw, 1 << 62).header.device_id
    except Exception:
        return None
