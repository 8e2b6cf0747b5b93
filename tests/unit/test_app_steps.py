"""The processors' steps, each alone (no Kafka, no Redis): the records the validation stage writes, the routing of a
validated batch, the window stage's seating and closing with a stand-in for detection, the validator's steps and the
admission protocol's records and replies."""

from __future__ import annotations

import asyncio
import os
import zlib
from types import SimpleNamespace

import numpy as np
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedguard import envelope, records
from fedguard import sketch as sketch_codec
from fedguard.codec import encode_tensor
from fedguard.envelope import UpdateHeader
from fedguard.reasons import Reason, RejectError
from fedguard.settings import Settings
from fedguard.sketch import SketchSpec, sketch
from fedguard.updatestore import UpdateStore
from processors import admission, validation
from processors import app as A
from processors import windows as W
from processors.defence import Judged
from processors.validation import CHECKS, ValidUpdate, Validator

SPEC = SketchSpec(50, 8, 12345)


def event(value: bytes | None, key: bytes | None = b"dev-1", partition: int = 2, offset: int = 17):
    return SimpleNamespace(key=key, value=value, message=SimpleNamespace(partition=partition, offset=offset))


def update(device_id: str = "dev-1", base_version: int = 3) -> ValidUpdate:
    header = UpdateHeader.new(device_id=device_id, seq=4, base_version=base_version, num_samples=20, model_id="m")
    # Each device its own tensor, so a tensor stored under another update's reference is seen.
    seed = zlib.crc32(f"{device_id}/{base_version}".encode())
    tensor = np.random.default_rng(seed).normal(size=SPEC.dim).astype(np.float32)
    return ValidUpdate(header, tensor, float(np.linalg.norm(tensor)))


def sealed(device_id: str = "dev-9") -> bytes:
    header = UpdateHeader.new(device_id=device_id, seq=1, base_version=0, num_samples=1, model_id="m")
    return envelope.seal(header, encode_tensor(np.zeros(3, np.float32)), os.urandom(32))


# -- records ----------------------------------------------------------------------------------------------------------
def test_raw_position_names_the_raw_record():
    assert A.raw_position(event(b"x", partition=5, offset=9)) == {"partition": 5, "offset": 9}


def test_dead_letter_record_of_an_authenticated_rejection():
    err = RejectError(Reason.REPLAY, "sequence 4 not above last accepted 9", device_id="dev-1", authenticated=True)
    position = {"partition": 2, "offset": 17}
    assert A.dead_letter_record(err, position, b"anything", now=1234.5) == {
        "raw": position, "device_id": "dev-1", "authenticated": True, "reason": "replay",
        "detail": "sequence 4 not above last accepted 9", "rejected_at": 1234.5}


def test_dead_letter_record_names_the_claimed_device_only_when_there_is_no_authenticated_one():
    err = RejectError(Reason.AUTH_FAILED, "tag does not verify")
    record = A.dead_letter_record(err, {"partition": 0, "offset": 0}, sealed("dev-9"), now=1.0)
    assert record["device_id"] == "dev-9" and record["authenticated"] is False and record["reason"] == "auth_failed"
    for garbage in (b"garbage", None, b""):
        assert A.dead_letter_record(err, {"partition": 0, "offset": 0}, garbage, now=1.0)["device_id"] is None


def test_security_event_record_carries_the_raw_position():
    position = {"partition": 1, "offset": 2}
    event_ = {"type": "replay", "device_id": "dev-1", "reason": "replay", "detail": "d", "at": 5.0}
    assert A.security_event_record(event_, position) == {**event_, "raw": position}


def test_valid_record_is_json_metadata_naming_its_tensor_in_the_update_store(tmp_path):
    u = update()
    position, store = {"partition": 2, "offset": 17}, UpdateStore(tmp_path)
    ref, = asyncio.run(A.store_tensors(store, [u]))
    meta = A.valid_meta(u, position, ref)
    h = u.header
    assert meta == {"update_id": h.update_id, "device_id": h.device_id, "model_id": "m", "base_version": 3,
                    "seq": 4, "num_samples": 20, "timestamp": h.timestamp, "norm": u.norm, "raw": position,
                    "tensor": ref, "checks": list(CHECKS)}
    assert records.loads(records.dumps(meta)) == meta  # the whole record is JSON: no tensor on the topic
    assert ref.startswith("m/3/dev-1.")  # model, base version, device (retention prunes by base version)
    assert store.get(meta["tensor"], SPEC.dim).tobytes() == u.tensor.tobytes()


def test_index_record_points_at_the_valid_record_and_its_tensor_and_carries_the_sketch():
    u = update()
    position, valid, ref = {"partition": 2, "offset": 17}, {"partition": 0, "offset": 41}, "m/3/dev-1.00ff.f32"
    record = A.index_record(u, position, valid, ref, SPEC)
    assert {k: v for k, v in record.items() if k != "sketch"} == {
        "update_id": u.header.update_id, "device_id": "dev-1", "base_version": 3, "num_samples": 20,
        "norm": u.norm, "raw": position, "tensor": ref, "valid": valid, "loss": None, "base_loss": None}
    assert np.array_equal(sketch_codec.decode(record["sketch"], SPEC.k), sketch(u.tensor, SPEC))
    assert records.loads(records.dumps(record)) == record  # JSON-safe


# -- routing ----------------------------------------------------------------------------------------------------------
class Topic:
    """A stand-in for a Faust topic: ``send`` returns an awaitable that gives the record's place once acknowledged."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log, self.sent = name, log, []

    async def send(self, *, key, value, force):
        assert force is True
        self.sent.append((key, value))
        self.log.append(self.name)
        ack = asyncio.get_running_loop().create_future()
        ack.set_result(SimpleNamespace(partition=0, offset=100 + len(self.sent)))
        return ack


class LoggedStore(UpdateStore):
    """A real update store that also notes each write in the routing log (to see it precedes the valid record)."""

    def __init__(self, root, log: list) -> None:
        super().__init__(root)
        self.log = log

    def put(self, model_id, base_version, device_id, tensor):
        ref = super().put(model_id, base_version, device_id, tensor)
        self.log.append("store")
        return ref


def stored_files(store: UpdateStore) -> list:
    return sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file()) \
        if store.root.exists() else []


def outputs(root):
    log: list[str] = []
    return A.ValidationOutputs(Topic("valid", log), Topic("rejected", log), Topic("index", log), Topic("events", log),
                               SPEC, LoggedStore(root, log)), log


def test_route_validated_sends_every_record_to_exactly_one_of_valid_and_rejected(tmp_path):
    out, log = outputs(tmp_path / "updates")
    flood = RejectError(Reason.RATE_LIMITED, "bucket empty", device_id="dev-2", authenticated=True)
    flood.event = {"type": "rate_limited", "device_id": "dev-2", "reason": "rate_limited", "detail": "d", "at": 1.0}
    outcomes = [update("dev-1"), RejectError(Reason.MALFORMED, "bad"), flood, update("dev-3")]
    events = [event(b"a", b"dev-1", offset=1), event(b"garbage", b"x", offset=2), event(b"c", b"dev-2", offset=3),
              event(b"d", b"dev-3", offset=4)]
    asyncio.run(A.route_validated(out, events, outcomes))

    assert [k for k, _ in out.valid.sent] == [b"dev-1", b"dev-3"]
    assert [records.loads(v)["raw"]["offset"] for _, v in out.rejected.sent] == [2, 3]
    assert [records.loads(v)["reason"] for _, v in out.rejected.sent] == ["malformed", "rate_limited"]
    (key, value), = out.events.sent  # only the rejection that carries a security event
    assert key == b"dev-2" and records.loads(value)["raw"] == {"partition": 2, "offset": 3}
    # The batch's tensors are written first (in one call, in a thread), then every record is sent in order; the
    # index names only records the broker acknowledged on the valid topic: after every valid send.
    assert log == ["store", "store", "valid", "rejected", "rejected", "events", "valid", "index", "index"]
    valid = [records.loads(v) for _, v in out.valid.sent]
    index = [records.loads(v) for _, v in out.index.sent]
    assert [k for k, _ in out.index.sent] == [b"m", b"m"]
    assert [(e["device_id"], e["raw"]["offset"], e["valid"]) for e in index] == [
        ("dev-1", 1, {"partition": 0, "offset": 101}), ("dev-3", 4, {"partition": 0, "offset": 102})]
    # The tensors are in the store, not on the topics: one file per valid record (none for a rejected one), named
    # by the valid record and its index alike, holding that update's tensor.
    refs = [v["tensor"] for v in valid]
    assert [e["tensor"] for e in index] == refs and stored_files(out.store) == sorted(refs) and len(set(refs)) == 2
    for ref, u in zip(refs, [outcomes[0], outcomes[3]]):
        assert out.store.get(ref, SPEC.dim).tobytes() == u.tensor.tobytes()
    assert all(set(r) <= {"raw", "device_id", "authenticated", "reason", "detail", "rejected_at"}
               for r in (records.loads(v) for _, v in out.rejected.sent))


def test_route_validated_of_a_batch_rejected_whole_sends_no_valid_no_index_and_stores_nothing(tmp_path):
    out, log = outputs(tmp_path / "updates")
    asyncio.run(A.route_validated(out, [event(None, None)], [RejectError(Reason.MALFORMED, "empty")]))
    assert log == ["rejected"] and stored_files(out.store) == []


def test_a_redelivered_record_is_stored_again_under_a_new_reference(tmp_path):
    """At least once: the same raw record validated twice writes two files, neither overwriting the other."""
    out, log = outputs(tmp_path / "updates")
    u = update("dev-1")
    asyncio.run(A.route_validated(out, [event(b"a", offset=1)], [u]))
    asyncio.run(A.route_validated(out, [event(b"a", offset=1)], [u]))
    first, second = (records.loads(v)["tensor"] for _, v in out.valid.sent)
    assert first != second and stored_files(out.store) == sorted([first, second])
    assert out.store.get(first, SPEC.dim).tobytes() == out.store.get(second, SPEC.dim).tobytes() == u.tensor.tobytes()


class FailingStore(UpdateStore):
    """A real store whose first ``failures`` writes fail as a full or unwritable disk does."""

    def __init__(self, root, failures: int) -> None:
        super().__init__(root)
        self.failures, self.attempts = failures, 0

    def put(self, model_id, base_version, device_id, tensor):
        self.attempts += 1
        if self.attempts <= self.failures:
            raise OSError(28, "No space left on device")
        return super().put(model_id, base_version, device_id, tensor)


def test_a_store_that_cannot_be_written_pauses_the_valid_record_until_it_can(tmp_path, monkeypatch):
    monkeypatch.setattr(A, "STORE_RETRY_S", (0.001, 0.002))
    log: list[str] = []
    store = FailingStore(tmp_path / "updates", failures=3)
    out = A.ValidationOutputs(Topic("valid", log), Topic("rejected", log), Topic("index", log),
                              Topic("events", log), SPEC, store)
    errors = A.STORE_ERRORS._value.get()
    u = update("dev-1")
    asyncio.run(A.route_validated(out, [event(b"a", offset=1)], [u]))
    assert store.attempts == 4 and A.STORE_ERRORS._value.get() == errors + 3
    assert log == ["valid", "index"]  # sent once, after the write that succeeded: never rejected, never lost
    (_, value), = out.valid.sent
    assert store.get(records.loads(value)["tensor"], SPEC.dim).tobytes() == u.tensor.tobytes()


class HeldTopic(Topic):
    """A stand-in topic whose acknowledgements the test gives, one by one, with :meth:`acknowledge`."""

    def __init__(self, name: str, log: list) -> None:
        super().__init__(name, log)
        self.held: list[asyncio.Future] = []

    async def send(self, *, key, value, force):
        self.sent.append((key, value))
        self.log.append(self.name)
        self.held.append(asyncio.get_running_loop().create_future())
        return self.held[-1]

    def acknowledge(self, count: int) -> None:
        for ack in self.held[:count]:
            if ack.cancelled():  # its awaiter was cancelled (the pipeline stopped)
                continue
            ack.set_result(SimpleNamespace(partition=0, offset=100 + self.held.index(ack)))
        self.held = self.held[count:]


class BatchValidator:
    """A stand-in validator: every record valid, the batches it was given in order."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def validate_batch(self, items):
        self.batches.append([position for _, _, position in items])
        return [update(key.decode()) for _, key, _ in items]


def pipeline(root):
    log: list[str] = []
    out = A.ValidationOutputs(HeldTopic("valid", log), Topic("rejected", log), Topic("index", log),
                              Topic("events", log), SPEC, UpdateStore(root))
    acked: list[int] = []

    async def ack(e):
        log.append(f"ack {e.message.offset}")
        acked.append(e.message.offset)

    processed: list[int] = []
    return A.ValidationPipeline(BatchValidator(), out, ack, lambda events: processed.extend(
        e.message.offset for e in events)), out, log, acked, processed


async def settle() -> None:
    for _ in range(20):  # let every task that can run, run
        await asyncio.sleep(0)


async def until(condition, timeout_s: float = 10.0) -> None:
    """Wait for ``condition()`` (the tensors are written in a thread, so this takes real time)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


def test_the_next_batch_is_validated_while_the_one_before_waits_for_the_broker_and_raw_records_are_acked_after(
        tmp_path):
    async def scenario():
        p, out, log, acked, processed = pipeline(tmp_path)
        first, second = [event(b"a", b"dev-1", offset=1), event(b"b", b"dev-2", offset=2)], [event(b"c", offset=3)]
        await p.submit(first)
        await until(lambda: log == ["valid", "valid"])  # tensors written, records sent: not acknowledged yet
        assert acked == []
        submitting = asyncio.ensure_future(p.submit(second))
        await until(lambda: p.validator.batches == [["2:1", "2:2"], ["2:3"]])
        await settle()
        # The second batch was validated (and its tensor written) while the first waits for its acknowledgements;
        # its records wait for the first batch to finish, so the index keeps the raw order.
        assert log == ["valid", "valid"] and not submitting.done()
        out.valid.acknowledge(2)
        await until(lambda: submitting.done() and len(log) == 7)
        assert acked == [1, 2] and processed == [1, 2]
        assert log == ["valid"] * 2 + ["index", "index", "ack 1", "ack 2", "valid"]  # acked once indexed
        out.valid.acknowledge(1)
        await p.drain()
        assert acked == [1, 2, 3] and processed == [1, 2, 3] and log[-2:] == ["index", "ack 3"]
        assert [records.loads(v)["raw"]["offset"] for _, v in out.index.sent] == [1, 2, 3]
        assert [records.loads(v)["valid"]["offset"] for _, v in out.index.sent] == [100, 101, 100]
        refs = [records.loads(v)["tensor"] for _, v in out.valid.sent]
        assert [records.loads(v)["tensor"] for _, v in out.index.sent] == refs and len(set(refs)) == 3
        for ref, device in zip(refs, ["dev-1", "dev-2", "dev-1"]):
            assert out.store.get(ref, SPEC.dim).tobytes() == update(device).tensor.tobytes()

    asyncio.run(scenario())


def test_a_batch_that_cannot_be_indexed_is_not_acked_and_its_failure_stops_the_next_submit(tmp_path):
    async def scenario():
        p, out, log, acked, processed = pipeline(tmp_path)
        await p.submit([event(b"a", b"dev-1", offset=1)])
        await until(lambda: len(out.valid.held) == 1)
        out.valid.held[0].set_exception(RuntimeError("broker gone"))
        try:
            await p.submit([event(b"b", b"dev-2", offset=2)])
        except RuntimeError as exc:
            assert str(exc) == "broker gone"
        else:
            raise AssertionError("the failure of the batch before was not raised")
        assert acked == [] and processed == [] and out.index.sent == []

    asyncio.run(scenario())


def test_cancel_leaves_the_finishing_batch_unacked(tmp_path):
    async def scenario():
        p, out, log, acked, processed = pipeline(tmp_path)
        await p.submit([event(b"a", b"dev-1", offset=1)])
        await until(lambda: len(out.valid.held) == 1)
        p.cancel()
        out.valid.acknowledge(1)
        await settle()
        assert acked == [] and out.index.sent == []

    asyncio.run(scenario())


# -- the window stage -------------------------------------------------------------------------------------------------
class Defence:
    """A stand-in for detection and reputation: accepts every member."""

    def __init__(self, closures: dict[str, str] | None = None) -> None:
        self.judged: list[str] = []
        self.closures = {} if closures is None else closures  # Redis's closures (tests/integration has the real one)

    async def earlier_closure(self, window_id, record=""):
        if window_id in self.closures:
            return self.closures[window_id]
        if record:
            self.closures[window_id] = record
        return None

    async def judge(self, window_id, members):
        self.judged.append(window_id)
        return Judged([{"verdict": "accept", "weight": 1.0, "flags": [], "reasons": []} for _ in members],
                      {"detectors": []}, [{"type": "flagged", "device_id": members[0]["device_id"]}])


def stage(size: int = 2, closures: dict[str, str] | None = None):
    log: list[str] = []
    s = A.WindowStage(Settings(window_size=size, window_deadline_s=10.0), Topic("windows", log), Topic("events", log))
    s._defence = Defence(closures)
    return s


def entry(device_id: str, base_version: int = 3, update_id: str | None = None) -> dict:
    return {"update_id": update_id or f"u-{device_id}", "device_id": device_id, "base_version": base_version,
            "num_samples": 1, "norm": 1.0, "raw": {"partition": 0, "offset": 0},
            "tensor": f"m/{base_version}/{update_id or device_id}.00ff.f32", "sketch": "x"}


def test_a_window_closes_when_its_last_seat_is_taken_and_a_second_update_of_a_device_gets_none():
    s = stage(size=2)

    async def run():
        state = await s.seat("m", W.empty_state(), entry("dev-1"), now=0.0)
        state = await s.seat("m", state, entry("dev-1", update_id="u-again"), now=0.1)  # no second seat
        assert s._defence.judged == [] and len(state["open"]["3"]["members"]) == 1
        state = await s.seat("m", state, entry("dev-2"), now=0.2)
        state = await s.seat("m", state, entry("dev-4"), now=0.3)  # late: version 3's window has closed
        return state

    state = asyncio.run(run())
    assert state == {"open": {}, "closed_upto": 3} and s._defence.judged == ["m:3"]
    (key, value), = s.windows_topic.sent
    record = records.loads(value)
    assert key == b"m" and record["closed_by"] == "count"
    assert [m["device_id"] for m in record["members"]] == ["dev-1", "dev-2"]
    assert all("sketch" not in m for m in record["members"])
    # Each member still names its tensor in the update store: what the aggregator reads.
    assert [m["tensor"] for m in record["members"]] == ["m/3/dev-1.00ff.f32", "m/3/dev-2.00ff.f32"]
    assert [records.loads(v)["type"] for _, v in s.events_topic.sent] == ["flagged"]


def test_seat_batch_seats_in_order_from_the_stored_state_and_returns_each_model_ids_state_once():
    s = stage(size=2)
    held = W.empty_state()
    held["open"]["3"] = {"opened_at": 0.0, "members": [entry("dev-1")]}  # model m already holds a seated member
    asked: list[str] = []

    def stored(model_id):
        asked.append(model_id)
        return held if model_id == "m" else None

    batch = [("m", entry("dev-2")), ("other", entry("dev-7", base_version=0)), ("m", entry("dev-3")),
             ("m", entry("dev-3", update_id="u-again")), ("other", entry("dev-7", base_version=0))]
    states = asyncio.run(s.seat_batch(batch, stored))
    assert asked == ["m", "other"]  # the table is read once per model id, the batch's own state used after
    # m: dev-2 filled version 3's window (closed, with the member the table held); dev-3 opened nothing: late
    assert states["m"] == {"open": {}, "closed_upto": 3} and s._defence.judged == ["m:3"]
    assert [m["device_id"] for m in records.loads(s.windows_topic.sent[0][1])["members"]] == ["dev-1", "dev-2"]
    # other: one seat, its second delivery a duplicate
    assert [m["update_id"] for m in states["other"]["open"]["0"]["members"]] == ["u-dev-7"]


def test_close_due_closes_only_windows_past_their_deadline():
    s = stage(size=5)

    async def run():
        state = await s.seat("m", W.empty_state(), entry("dev-1", base_version=1), now=0.0)
        state = await s.seat("m", state, entry("dev-2", base_version=2), now=8.0)
        state, closed = await s.close_due("m", state, now=9.0)
        assert not closed
        return await s.close_due("m", state, now=10.5)

    state, closed = asyncio.run(run())
    assert closed and list(state["open"]) == ["2"] and state["closed_upto"] == 1
    assert records.loads(s.windows_topic.sent[0][1])["closed_by"] == "deadline"


def test_a_window_closed_before_a_crash_is_sent_again_as_it_was_and_its_new_members_are_late():
    """A worker closed window 3 by count and died before its table held the closure: the next owner re-opens the
    window from re-delivered index entries (and a straggler's), closes it by deadline, and must send the same record,
    judging and counting nothing again."""
    closures: dict[str, str] = {}
    first, second = stage(size=3, closures=closures), stage(size=3, closures=closures)
    late_before = A.LATE_UPDATES._value.get()

    async def run():
        state = W.empty_state()
        for device in ("dev-1", "dev-2", "dev-3"):
            state = await first.seat("m", state, entry(device), now=0.0)
        state = await second.seat("m", W.empty_state(), entry("dev-3"), now=5.0)  # re-delivered
        state = await second.seat("m", state, entry("dev-7"), now=5.1)  # sent after the first closure
        return await second.close_due("m", state, now=15.5)

    state, closed = asyncio.run(run())
    assert closed and state == {"open": {}, "closed_upto": 3}
    (_, sent_first), = first.windows_topic.sent
    (key, sent_again), = second.windows_topic.sent
    assert key == b"m" and sent_again == sent_first
    assert [m["device_id"] for m in records.loads(sent_again)["members"]] == ["dev-1", "dev-2", "dev-3"]
    assert second._defence.judged == [] and second.events_topic.sent == []
    assert A.LATE_UPDATES._value.get() == late_before + 1  # dev-7's update



# -- the validator's steps and the admission protocol (no Redis) ------------------------------------------------------
def test_admission_arguments_carry_the_records_as_six_nul_ended_fields():
    s = Settings(redis_prefix="p", model_id="m", one_update_per_window=False)
    lines = [admission.admission_record("dev-1", "ab" * 32, 4, "u1@2:17", None, 3),
             admission.admission_record("dev-2", "cd" * 32, 5, "u2@2:18", "clock_skew", 3)]
    assert lines[1] == f"dev-2\0{'cd' * 32}\x005\0u2@2:18\0clock_skew\x003\0"
    args = admission.admit_args(s, lines)
    assert args[0] == "p" and args[7] == "m" and args[8] == "".join(lines) and args[-1] == "0"
    assert admission.record_count(args) == 2 and admission.record_count(admission.admit_args(s, [])) == 0


def test_admission_reply_lines_parse_into_code_event_and_info():
    lines = admission.reply_lines("\n".join([admission.ACCEPTED, "replay 1 7", "rekey 0 -", "quarantined 0 x y"]))
    assert [admission.parse_line(line) for line in lines] == [
        ("ok", False, ""), ("replay", True, "7"), (admission.REKEY, False, ""), ("quarantined", False, "x y")]


def test_admission_rejections_say_what_the_code_means():
    s = Settings(max_staleness=2)
    h = UpdateHeader.new(device_id="dev-1", seq=4, base_version=3, num_samples=1, model_id="m")
    err = admission.rejection("stale", "6", False, h, s)
    assert (err.reason, err.device_id, err.authenticated, err.event) == (Reason.STALE, "dev-1", True, None)
    assert err.detail == "base version 3, current is 6, max staleness 2"
    replay = admission.rejection("replay", "9", True, h, s)
    assert replay.detail == "sequence 4 not above last accepted 9"
    assert {k: v for k, v in replay.event.items() if k != "at"} == {
        "type": "replay", "device_id": "dev-1", "reason": "replay", "detail": replay.detail}
    assert admission.rejection("future_version", "none", False, h, s).detail == (
        "no global model version has been published yet")
    assert admission.rejection("no_such_code", "", False, h, s).reason is Reason.INTERNAL_ERROR


def test_admission_state_reads_the_scripts_state_format():
    def state(value):
        return admission.admission_state(SimpleNamespace(get=lambda key: value), Settings(), "dev-1")

    assert state(None) == {}
    assert state("4\0u@0:1\x002.5\x0010.000000\x003\0") == {
        "seq": "4", "delivery": "u@0:1", "tokens": "2.5", "tokens_ts": "10.000000", "window_base": "3"}
    assert state("4\0u@0:1\0-\0-\0-\0") == {"seq": "4", "delivery": "u@0:1"}  # "-": not set yet


class Reply:
    """A stand-in for the admission channel: answers each call with the next canned reply."""

    def __init__(self, *replies: str) -> None:
        self.replies, self.sent = list(replies), []

    async def send(self, args):
        self.sent.append(admission.record_count(args))

    async def receive(self):
        return self.replies.pop(0)

    async def abandon(self):
        pass


def validator(settings: Settings | None = None) -> Validator:
    return Validator(settings or Settings(model_id="m"), X25519PrivateKey.generate(), 3, aioredis.Redis())


def test_parse_all_rejects_what_does_not_parse_and_keeps_the_order_of_the_rest():
    v = validator()
    items = [(sealed("dev-1"), b"dev-1", "0:0"), (b"garbage", None, "0:1"), (None, None, "0:2"),
             (sealed("dev-2"), b"dev-2", "0:3")]
    outcomes = [None] * len(items)
    parsed = v._parse_all(items, outcomes)
    assert [(i, s.header.device_id) for i, s in parsed] == [(0, "dev-1"), (3, "dev-2")]
    assert outcomes[0] is None and outcomes[3] is None
    assert isinstance(outcomes[1], RejectError) and isinstance(outcomes[2], RejectError)
    other = Validator(Settings(model_id="other"), X25519PrivateKey.generate(), 3, aioredis.Redis())
    outcomes = [None]
    assert other._parse_all(items[:1], outcomes) == [] and outcomes[0].reason is Reason.WRONG_MODEL


def test_fetch_missing_keys_reads_only_uncached_keys_and_bounds_the_cache(monkeypatch):
    v = validator()
    asked = []

    async def fetch(device_ids, only_changed=False):
        asked.append(set(device_ids))
        return set(device_ids)

    v._fetch_keys = fetch
    v._keys = {"a": object(), "b": object()}
    assert asyncio.run(v._fetch_missing_keys({"a", "c"})) == {"c"}
    monkeypatch.setattr(validation, "MAX_CACHED_KEYS", 3)
    assert asyncio.run(v._fetch_missing_keys({"a", "d", "e"})) == {"a", "d", "e"} and v._keys == {}
    assert asked == [{"c"}, {"a", "d", "e"}]


def test_finish_admission_turns_each_reply_line_into_its_records_outcome():
    v = validator(Settings(model_id="m", max_staleness=2))
    pending = [validation._Pending(i, envelope.parse(sealed(f"dev-{i}"), 1 << 20), np.zeros(3, np.float32), 0.5,
                                   None, "") for i in range(3)]
    v._admission = Reply("\n".join([admission.ACCEPTED, "stale 0 6", "rekey 0 -"]), admission.ACCEPTED)
    outcomes = [None] * 3
    asyncio.run(v._finish_admission(pending, [None] * 3, outcomes, now=0.0, retry=False))
    assert isinstance(outcomes[0], ValidUpdate) and outcomes[0].norm == 0.5
    assert outcomes[1].reason is Reason.STALE and outcomes[1].detail.endswith("current is 6, max staleness 2")
    assert outcomes[2].reason is Reason.AUTH_FAILED  # the key changed again while validating: no second retry


def test_window_stage_imports_the_clustering_when_it_is_made():
    """sklearn's import (1-2 s of CPU) happens when the worker starts, not at its first window close, where it
    stalled validation (bench/pipeline.py's profile)."""
    from processors import detectors
    detectors._HDBSCAN = None
    stage()
    assert detectors._HDBSCAN is not None and detectors._HDBSCAN.__name__ == "HDBSCAN"
