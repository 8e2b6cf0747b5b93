"""The validator against a real Redis (issue 3, items 2-4): revocation, rotation, replay across restarts, rate
limits and the global ingress bound, security events, versions, and a batch behaving like records one by one.

No broker: the Validator is called directly, as the Faust agent calls it. Each test has its own Redis namespace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
import uuid

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedguard import registry
from fedguard.reasons import RejectError
from fedguard.settings import Settings
from processors import admission
from processors.validation import ValidUpdate, Validator
from tests.hostile import Fleet, flip

pytestmark = pytest.mark.integration
N = 64


@pytest.fixture
def env(redis_url, tmp_path):
    settings = Settings(redis_url=redis_url, redis_prefix=f"fgv-{uuid.uuid4().hex[:8]}", model_id="mv",
                        data_dir=tmp_path, max_update_norm=100.0, rate_device_capacity=1000.0,
                        rate_global_capacity=100000.0,
                        # these tests send many updates per device for one version; the one-per-window rule has its own
                        one_update_per_window=False)
    server = X25519PrivateKey.generate()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.set(registry.model_version_key(settings), 0)
    yield Env(settings, server, Fleet(settings, N, server_public=server.public_key()))
    for key in client.scan_iter(f"{settings.redis_prefix}:*"):
        client.delete(key)


@dataclasses.dataclass
class Env:
    settings: Settings
    server: X25519PrivateKey
    fleet: Fleet

    def run(self, coro_fn, **overrides):
        """Run ``coro_fn(make_validator)`` in a fresh event loop; validators made there share ``overrides``."""
        settings = dataclasses.replace(self.settings, **overrides)

        async def main():
            clients = []

            def make():
                client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
                clients.append(client)
                return Validator(settings, self.server, N, client)

            try:
                return await coro_fn(make)
            finally:
                for c in clients:
                    await c.aclose()

        return asyncio.run(main())


def code(outcome) -> str:
    return "ok" if isinstance(outcome, ValidUpdate) else outcome.reason.value


async def codes(v: Validator, records) -> list[str]:
    return [code(o) for o in await v.validate_batch(records)]


def test_replay_is_rejected_across_restarts_and_redelivery_gets_the_same_answer(env):
    f = env.fleet
    f.enroll("dev-1")
    first, second = f.seal("dev-1"), f.seal("dev-1")

    async def scenario(make):
        v1 = make()
        assert await codes(v1, [(first, b"dev-1", "0:1")]) == ["ok"]
        v2 = make()  # a restarted worker: nothing in memory
        return await codes(v2, [
            (first, b"dev-1", "0:9"),  # the same bytes elsewhere: a replay
            (first, b"dev-1", "0:1"),  # the same record delivered again after a crash: the same answer
            (second, b"dev-1", "0:2"),
            (first, b"dev-1", "0:1"),  # older than the last accepted one now, but delivered again: the same answer
            (second, b"dev-1", "0:3")])

    assert env.run(scenario) == ["replay", "ok", "ok", "ok", "replay"]


def test_revoked_and_quarantined_devices_get_their_own_codes_at_once(env):
    f = env.fleet
    for d in ("dev-r", "dev-q"):
        f.enroll(d)

    async def scenario(make):
        v = make()
        before = await codes(v, [(f.seal("dev-r"), b"dev-r", "0:1"), (f.seal("dev-q"), b"dev-q", "0:2")])
        # The validator's key cache is warm; the registry changes under it.
        registry.set_device_status(f.redis, env.settings, "dev-r", registry.REVOKED, "stolen")
        registry.set_device_status(f.redis, env.settings, "dev-q", registry.QUARANTINED)
        outcomes = await v.validate_batch([(f.seal("dev-r"), b"dev-r", "0:3"), (f.seal("dev-q"), b"dev-q", "0:4"),
                                           (f.seal("dev-r", key=bytes(32)), b"dev-r", "0:5")])
        return before, outcomes

    before, after = env.run(scenario)
    assert before == ["ok", "ok"]
    assert [code(o) for o in after] == ["revoked", "quarantined", "auth_failed"]
    assert after[0].authenticated and after[0].device_id == "dev-r" and not after[2].authenticated


def test_a_record_accepted_before_its_device_was_quarantined_or_revoked_keeps_its_answer_on_redelivery(env):
    """At-least-once: a worker killed after validating a record, before acknowledging it, leaves it to be delivered
    again; if the window stage quarantined the device in between (or an operator revoked it), the re-delivery must
    still get its first answer (the two-workers kill -9 test saw 'valid' then 'quarantined' for one raw position).
    A new record from the device is refused, and so is a copy of the old one at another position (not a
    re-delivery: the device's status answers it)."""
    f = env.fleet
    for d in ("dev-q", "dev-r"):
        f.enroll(d)
    q1, r1 = f.seal("dev-q"), f.seal("dev-r")

    async def scenario(make):
        first = await codes(make(), [(q1, b"dev-q", "0:1"), (r1, b"dev-r", "0:2")])
        registry.set_device_status(f.redis, env.settings, "dev-q", registry.QUARANTINED)
        registry.set_device_status(f.redis, env.settings, "dev-r", registry.REVOKED, "stolen")
        again = await codes(make(), [  # a restarted worker: nothing in memory
            (q1, b"dev-q", "0:1"), (r1, b"dev-r", "0:2"),  # re-deliveries: the first answer
            (q1, b"dev-q", "0:7"),  # the same bytes at another position: not a re-delivery
            (f.seal("dev-q"), b"dev-q", "0:8"), (f.seal("dev-r"), b"dev-r", "0:9")])  # new records: refused
        return first, again

    first, again = env.run(scenario)
    assert first == ["ok", "ok"]
    assert again == ["ok", "ok", "quarantined", "quarantined", "revoked"]


def test_after_rotation_the_old_key_fails_authentication_and_the_new_one_works(env):
    f = env.fleet
    f.enroll("dev-k")

    async def scenario(make):
        v = make()
        warm = await codes(v, [(f.seal("dev-k"), b"dev-k", "0:1")])
        in_flight = f.seal("dev-k")  # sealed before the rotation, arrives after it
        old_key = f.rotate("dev-k")
        late = f.seal("dev-k", key=old_key)
        fresh = f.seal("dev-k")
        warm_cache = await v.validate_batch([(in_flight, b"dev-k", "0:2"), (late, b"dev-k", "0:3"),
                                             (fresh, b"dev-k", "0:4")])
        cold_cache = await codes(make(), [(f.seal("dev-k", key=old_key), b"dev-k", "0:5"),
                                          (f.seal("dev-k"), b"dev-k", "0:6")])
        return warm, [code(o) for o in warm_cache], cold_cache

    warm, warm_cache, cold_cache = env.run(scenario)
    assert warm == ["ok"]
    assert warm_cache == ["auth_failed", "auth_failed", "ok"]
    assert cold_cache == ["auth_failed", "ok"]


def test_a_flooding_device_is_rate_limited_with_one_event_and_others_keep_flowing(env):
    f = env.fleet
    for d in ("flood", "honest"):
        f.enroll(d)

    async def scenario(make):
        v = make()
        flood = await v.validate_batch([(f.seal("flood"), b"flood", f"0:{i}") for i in range(8)])
        honest = await codes(v, [(f.seal("honest"), b"honest", "1:0")])
        more = await v.validate_batch([(f.seal("flood"), b"flood", f"0:{i}") for i in range(8, 12)])
        return flood + more, honest

    outcomes, honest = env.run(scenario, rate_device_capacity=3.0, rate_device_refill_per_s=0.0)
    assert [code(o) for o in outcomes] == ["ok"] * 3 + ["rate_limited"] * 9
    events = [o.event for o in outcomes if getattr(o, "event", None)]
    assert len(events) == 1 and events[0]["type"] == "rate_limited" and events[0]["device_id"] == "flood"
    assert set(events[0]) >= {"type", "device_id", "reason", "detail", "at"}
    assert honest == ["ok"]


def test_forgeries_and_replays_cannot_drain_an_honest_devices_bucket(env):
    f = env.fleet
    f.enroll("honest")

    async def scenario(make):
        v = make()
        first = f.seal("honest")
        ok = await codes(v, [(first, b"honest", "0:0")])
        attacks = await codes(v, [(f.seal("honest", key=bytes(32)), b"honest", f"1:{i}") for i in range(20)]
                              + [(first, b"honest", f"2:{i}") for i in range(20)]
                              + [(flip(f.seal("honest"), -1), b"honest", f"3:{i}") for i in range(20)])
        after = await codes(v, [(f.seal("honest"), b"honest", f"0:{i}") for i in range(1, 3)])
        return ok, attacks, after

    ok, attacks, after = env.run(scenario, rate_device_capacity=3.0, rate_device_refill_per_s=0.0)
    assert ok == ["ok"] and after == ["ok", "ok"]  # its three tokens were all its own
    assert attacks == ["auth_failed"] * 20 + ["replay"] * 20 + ["auth_failed"] * 20


def test_authentic_garbage_spends_tokens_so_a_hostile_device_cannot_flood_with_it(env):
    f = env.fleet
    f.enroll("hostile")
    bad = f.good()
    bad[0] = np.nan

    async def scenario(make):
        return await codes(make(), [(f.seal("hostile", bad), b"hostile", f"0:{i}") for i in range(5)])

    assert env.run(scenario, rate_device_capacity=2.0, rate_device_refill_per_s=0.0) == \
        ["non_finite", "non_finite", "rate_limited", "rate_limited", "rate_limited"]


def test_the_global_ingress_bound_limits_all_devices_together(env):
    f = env.fleet
    for i in range(6):
        f.enroll(f"d{i}")

    async def scenario(make):
        return await make().validate_batch([(f.seal(f"d{i}"), f"d{i}".encode(), f"0:{i}") for i in range(6)])

    outcomes = env.run(scenario, rate_global_capacity=4.0, rate_global_refill_per_s=0.0)
    assert [code(o) for o in outcomes] == ["ok"] * 4 + ["ingress_limited"] * 2
    assert [bool(o.event) for o in outcomes[4:]] == [True, False]  # one event for the bound, not one per record


def test_buckets_refill_and_events_come_back_after_their_interval(env):
    f = env.fleet
    f.enroll("d")

    async def scenario(make):
        v = make()
        first = await v.validate_batch([(f.seal("d"), b"d", f"0:{i}") for i in range(3)])
        await asyncio.sleep(0.6)  # refill 5/s: 3 tokens; the event interval (0.3 s) has passed
        second = await v.validate_batch([(f.seal("d"), b"d", f"0:{i}") for i in range(3, 8)])
        return first + second

    outcomes = env.run(scenario, rate_device_capacity=2.0, rate_device_refill_per_s=5.0,
                       security_event_interval_s=0.3)
    assert [code(o) for o in outcomes] == ["ok", "ok", "rate_limited", "ok", "ok"] + ["rate_limited"] * 3
    assert [bool(o.event) for o in outcomes if code(o) == "rate_limited"] == [True, True, False, False]


def test_base_versions_future_and_stale(env):
    f = env.fleet
    f.enroll("d")
    client = f.redis

    async def scenario(make):
        v = make()
        client.delete(registry.model_version_key(env.settings))
        none_yet = await v.validate_batch([(f.seal("d"), b"d", "0:0")])
        client.set(registry.model_version_key(env.settings), 3)
        rest = await codes(v, [(f.seal("d", base=4), b"d", "0:1"), (f.seal("d", base=1), b"d", "0:2"),
                               (f.seal("d", base=2), b"d", "0:3"), (f.seal("d", base=3), b"d", "0:4")])
        return none_yet, rest

    none_yet, rest = env.run(scenario, max_staleness=1)
    assert code(none_yet[0]) == "future_version" and "no global model version" in none_yet[0].detail
    assert rest == ["future_version", "stale", "ok", "ok"]


def test_a_batch_gives_what_the_same_records_give_one_by_one(env):
    f = env.fleet
    for d in ("a", "b"):
        f.enroll(d)
    a1, a2, b1 = f.seal("a"), f.seal("a"), f.seal("b")
    nan = f.good()
    nan[1] = np.inf
    items = [(a1, b"a", "0:0"), (a1, b"a", "0:1"), (b"junk", b"a", "0:2"), (f.seal("b", nan), b"b", "0:3"),
             (a2, b"a", "0:4"), (b1, b"b", "0:5"), (f.seal("ghost", key=bytes(32), seq=1), b"ghost", "0:6"),
             (a2, b"a", "0:4"), (f.seal("b", base=7), b"b", "0:7")]
    expected = ["ok", "replay", "malformed", "non_finite", "ok", "ok", "unknown_device", "ok", "future_version"]

    async def batch(make):
        return await codes(make(), items)

    assert env.run(batch) == expected
    # The same records one by one, in a fresh namespace (the first run advanced the sequence numbers).
    other = dataclasses.replace(env.settings, redis_prefix=env.settings.redis_prefix + "-2")
    client = f.redis
    for d in ("a", "b"):
        entry = client.hgetall(registry.device_key(env.settings, d))
        registry.register_device(client, other, d, entry["public_key"])
    client.set(registry.model_version_key(other), 0)

    async def one_by_one(make):
        v = make()
        out = []
        for item in items:
            try:
                await v.validate(*item)
                out.append("ok")
            except RejectError as err:
                out.append(err.reason.value)
        return out

    assert env.run(one_by_one, redis_prefix=other.redis_prefix) == expected


def test_when_redis_is_unreachable_the_batch_waits_instead_of_rejecting_internal_error(env):
    """A Redis outage pauses validation (issue 12): the batch waits for Redis, no record is dead-lettered for it.
    Stalls, restarts and bugs: tests/integration/test_outages.py."""
    f = env.fleet
    f.enroll("d")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"

    async def scenario(make):
        batch = asyncio.ensure_future(make().validate_batch([(f.seal("d"), b"d", "0:0"), (b"junk", None, "0:1")]))
        await asyncio.sleep(2.0)
        waiting = not batch.done()
        batch.cancel()
        return waiting

    assert env.run(scenario, redis_url=dead)


def test_rejections_name_the_device_and_whether_it_was_authenticated(env):
    f = env.fleet
    f.enroll("d")

    async def scenario(make):
        return await make().validate_batch([(f.seal("d", samples=0), b"d", "0:0"),
                                            (f.seal("d", key=bytes(32)), b"d", "0:1"),
                                            (f.seal("d"), b"other", "0:2")])

    outcomes = env.run(scenario)
    assert [(code(o), o.device_id, o.authenticated) for o in outcomes] == [
        ("bad_sample_count", "d", True), ("auth_failed", "d", False), ("key_mismatch", "d", True)]


def test_registry_keys_match_the_ones_the_script_builds(env):
    f = env.fleet
    f.enroll("dev-x")

    async def scenario(make):
        return await codes(make(), [(f.seal("dev-x"), b"dev-x", "3:14")])

    assert env.run(scenario) == ["ok"]
    state = admission.admission_state(f.redis, env.settings, "dev-x")
    assert state["seq"] == "1" and state["delivery"].endswith("@3:14") and float(state["tokens"]) == 999.0
    entry = f.redis.hgetall(registry.device_key(env.settings, "dev-x"))
    assert f.redis.get(registry.auth_key(env.settings, "dev-x")) == f"active {entry['public_key']}"
    assert f.redis.hgetall(registry.ingress_key(env.settings))["tokens"]
    assert abs(float(state["tokens_ts"]) - time.time()) < 60


def test_admission_survives_a_script_flush_and_a_killed_connection(env):
    """The admission channel's own connection: a flushed script is loaded again, a killed connection reconnects."""
    f = env.fleet
    f.enroll("d")
    admin = f.redis

    async def scenario(make):
        v = make()
        first = await codes(v, [(f.seal("d"), b"d", "0:0")])
        admin.script_flush()
        after_flush = await codes(v, [(f.seal("d"), b"d", "0:1")])
        admin.client_kill_filter(_type="normal", skipme=True)
        after_kill = await codes(v, [(f.seal("d"), b"d", "0:2")])
        return first, after_flush, after_kill

    assert env.run(scenario) == (["ok"], ["ok"], ["ok"])


def test_a_connection_lost_between_send_and_reply_gets_the_same_answers(env, monkeypatch):
    """If the connection breaks after the call went out, the call is sent again: records it already admitted are
    re-deliveries (same update id, same raw position) and get the same answer; nothing is admitted twice."""
    f = env.fleet
    f.enroll("d")
    admin = f.redis
    public_hex = admin.hget(registry.device_key(env.settings, "d"), "public_key")
    record = admission.admission_record("d", public_hex, 1, "u1@0:7", None, 0)

    failures = []
    back_off = admission.AdmissionChannel._back_off

    async def counted(self, exc, delay):
        failures.append(exc)
        await back_off(self, exc, delay)

    monkeypatch.setattr(admission.AdmissionChannel, "_back_off", counted)

    async def scenario(make):
        channel = admission.AdmissionChannel(make().redis)
        await channel.send(admission.admit_args(env.settings, [record]))
        await asyncio.sleep(0.2)  # the call has run in Redis
        conn, read = channel._conn, channel._conn.read_response

        async def lost(*args, **kwargs):  # the reply is lost with the connection, once
            conn.read_response = read
            await conn.disconnect()
            raise redis.exceptions.ConnectionError("connection lost (test)")

        conn.read_response = lost
        return await channel.receive()

    assert env.run(scenario) == "ok 0 -"
    assert len(failures) == 1  # the reply was lost with the connection, and the call was sent again
    state = admission.admission_state(admin, env.settings, "d")
    assert state["seq"] == "1" and state["delivery"] == "u1@0:7" and float(state["tokens"]) == 999.0


def test_concurrent_batches_on_one_validator_each_get_their_own_answers(env):
    f = env.fleet
    for d in ("a", "b"):
        f.enroll(d)

    async def scenario(make):
        v = make()
        good = [(f.seal("a"), b"a", f"0:{i}") for i in range(40)]
        bad = [(f.seal("b", seq=1), b"b", f"1:{i}") for i in range(40)]  # one fresh, then 39 replays
        return await asyncio.gather(codes(v, good), codes(v, bad))

    good, bad = env.run(scenario)
    assert good == ["ok"] * 40 and bad == ["ok"] + ["replay"] * 39


# -- one update per device per window (issue 9, item 1) -----------------------------------------------------------

def test_one_update_per_device_per_base_version_across_restarts_and_floods(env):
    """A device holds at most one seat in the window of a base version: a second update, a flood, or the same after a
    worker restart gets ``window_duplicate``; a re-delivery of the accepted record keeps its answer; the next base
    version is open again; other devices are unaffected."""
    f = env.fleet
    for d in ("dev-a", "dev-b"):
        f.enroll(d)
    client = f.redis

    async def scenario(make):
        v1 = make()
        first = f.seal("dev-a", base=0)
        out = [await codes(v1, [(first, b"dev-a", "0:1")])]
        flood = [(f.seal("dev-a", base=0), b"dev-a", f"0:{10 + i}") for i in range(20)]
        out.append(await codes(v1, flood + [(f.seal("dev-b", base=0), b"dev-b", "0:40")]))
        v2 = make()  # a restarted worker
        out.append(await codes(v2, [(first, b"dev-a", "0:1"),  # the same record re-delivered after a crash
                                    (f.seal("dev-a", base=0), b"dev-a", "0:41")]))
        client.set(registry.model_version_key(env.settings), 1)
        out.append(await codes(v2, [(f.seal("dev-a", base=1), b"dev-a", "0:42"),
                                    (f.seal("dev-a", base=1), b"dev-a", "0:43")]))
        return out

    single, flood, restarted, next_version = env.run(scenario, one_update_per_window=True)
    assert single == ["ok"]
    assert flood == ["window_duplicate"] * 20 + ["ok"]
    assert restarted == ["ok", "window_duplicate"]
    assert next_version == ["ok", "window_duplicate"]
    assert admission.admission_state(client, env.settings, "dev-a")["window_base"] == "1"
    # each second update was recorded as equivocation for its base version; the honest device and the re-delivery
    # were not
    for base in (0, 1):
        assert client.smembers(registry.equivocated_key(env.settings, "-", base)) == {"dev-a"}
        assert 0 < client.ttl(registry.equivocated_key(env.settings, "-", base)) <= 7 * 24 * 3600


def test_equivocation_is_recorded_per_model_store_and_only_for_the_base_version_of_the_seat(env):
    """A second update for the base version a device holds a seat for is equivocation (the window stage rejects the
    seat too); one for an *older* base version is only refused (nothing of it is in that window). The record is kept
    under the model store's id, so that a store started afresh, which reuses version numbers, does not inherit it."""
    f = env.fleet
    f.enroll("dev-e")
    client = f.redis
    client.set(registry.model_store_key(env.settings), "store-1")
    client.set(registry.model_version_key(env.settings), 1)

    async def scenario(make):
        v = make()
        return await codes(v, [(f.seal("dev-e", base=1), b"dev-e", "0:1"),
                               (f.seal("dev-e", base=0), b"dev-e", "0:2"),
                               (f.seal("dev-e", base=1), b"dev-e", "0:3")])

    assert env.run(scenario, one_update_per_window=True, max_staleness=1) == ["ok", "window_duplicate",
                                                                               "window_duplicate"]
    assert client.smembers(registry.equivocated_key(env.settings, "store-1", 1)) == {"dev-e"}
    assert not client.exists(registry.equivocated_key(env.settings, "store-1", 0))
    assert not client.exists(registry.equivocated_key(env.settings, "-", 1))


def test_window_duplicate_detail_names_the_version_and_a_state_from_before_the_rule_is_read(env):
    f = env.fleet
    f.enroll("dev-o")
    # An admission state written before the window field existed (four fields): read, not an error.
    f.redis.set(registry.seq_key(env.settings, "dev-o"), "0\0u@0:0\0-\0-\0")

    async def scenario(make):
        v = make()
        return await v.validate_batch([(f.seal("dev-o", base=0), b"dev-o", "0:1"),
                                       (f.seal("dev-o", base=0), b"dev-o", "0:2")])

    ok, dup = env.run(scenario, one_update_per_window=True)
    assert code(ok) == "ok" and code(dup) == "window_duplicate"
    assert dup.authenticated and dup.device_id == "dev-o" and "base version 0" in dup.detail


def test_a_copy_refused_for_an_empty_bucket_is_still_equivocation(env):
    """A stuffer's bucket runs dry after its first copies; the rest are ``rate_limited``, and are still a second
    signed update for the base version of its seat (recorded once per call, whatever the flood's size). A replay of
    the seated record is not: it is not a new message of the device."""
    f = env.fleet
    f.enroll("dev-r")
    client = f.redis
    client.set(registry.model_version_key(env.settings), 0)

    async def scenario(make):
        v = make()
        seat = f.seal("dev-r", base=0)
        first = await codes(v, [(seat, b"dev-r", "0:1")])
        replayed = await codes(v, [(seat, b"dev-r", "0:2")])
        assert not client.exists(registry.equivocated_key(env.settings, "-", 0))
        flood = await codes(v, [(f.seal("dev-r", base=0), b"dev-r", f"0:{3 + i}") for i in range(5)])
        return first, replayed, flood

    first, replayed, flood = env.run(scenario, one_update_per_window=True, rate_device_capacity=1.0,
                                     rate_device_refill_per_s=0.001)
    assert first == ["ok"] and replayed == ["replay"] and flood == ["rate_limited"] * 5
    assert client.smembers(registry.equivocated_key(env.settings, "-", 0)) == {"dev-r"}
