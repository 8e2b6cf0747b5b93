"""Property tests of the validator with a real Redis (issue 3, item 6): hypothesis mixes honest updates with every
kind of hostile record (tests/hostile.py) and with arbitrary mutations of authentic ones. Every record gets an
outcome, no exception escapes, each hostile record gets its reason code (never ``internal_error``), and every honest
update is accepted, in any order and batch split.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedguard import registry
from fedguard.reasons import Reason, RejectError
from fedguard.settings import Settings
from processors.validation import ValidUpdate, Validator
from tests.hostile import AUTHENTIC, MALFORMED, Fleet

pytestmark = pytest.mark.integration
N = 64
HONEST = [f"h{i}" for i in range(4)]
HOSTILE = [f"x{i}" for i in range(4)]
PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class World:
    """A Redis namespace with honest and hostile devices, and a validator on its own event loop."""

    def __init__(self, redis_url: str):
        self.settings = Settings(redis_url=redis_url, redis_prefix=f"fgp-{uuid.uuid4().hex[:8]}", model_id="mp",
                                 max_update_norm=100.0, rate_device_capacity=1e6, rate_global_capacity=1e9,
                                 one_update_per_window=False)  # many updates per device and version
        server = X25519PrivateKey.generate()
        self.fleet = Fleet(self.settings, N, server_public=server.public_key())
        for d in HONEST + HOSTILE:
            self.fleet.enroll(d)
        self.fleet.redis.set(registry.model_version_key(self.settings), 0)
        self.loop = asyncio.new_event_loop()
        self.client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        self.validator = Validator(self.settings, server, N, self.client)
        self.offset = 0

    def validate(self, records: list[tuple[bytes | None, bytes | None]], batch: int) -> list:
        items = []
        for key, value in records:
            items.append((value, key, f"0:{self.offset}"))
            self.offset += 1
        out = []
        for i in range(0, len(items), batch):
            out += self.loop.run_until_complete(self.validator.validate_batch(items[i:i + batch]))
        return out

    def close(self):
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()
        sync = redis.Redis.from_url(self.settings.redis_url)
        for key in sync.scan_iter(f"{self.settings.redis_prefix}:*"):
            sync.delete(key)


@pytest.fixture
def world(redis_url):
    w = World(redis_url)
    yield w
    w.close()


def check(outcome, expected: str | None):
    if expected is None:
        assert isinstance(outcome, ValidUpdate), outcome
        return
    assert isinstance(outcome, RejectError), outcome
    assert isinstance(outcome.reason, Reason) and outcome.detail
    assert outcome.reason is not Reason.INTERNAL_ERROR, outcome
    assert outcome.reason.value == expected, (expected, outcome)


@PROPERTY
@given(kinds=st.lists(st.sampled_from(["valid"] * 6 + sorted(MALFORMED)), min_size=1, max_size=48),
       batch=st.integers(min_value=1, max_value=64), data=st.data())
def test_every_hostile_record_gets_its_code_and_every_honest_update_passes(world, kinds, batch, data):
    records, expected = [], []
    for n, kind in enumerate(kinds):
        if kind == "valid":
            device = HONEST[n % len(HONEST)]
            records.append((device.encode(), world.fleet.seal(device)))
            expected.append(None)
        else:
            make, reason = MALFORMED[kind]
            records.append(make(world.fleet, data.draw(st.sampled_from(HOSTILE))))
            expected.append(reason)
    for outcome, want in zip(world.validate(records, batch), expected, strict=True):
        check(outcome, want)


@PROPERTY
@given(mutations=st.lists(st.tuples(st.sampled_from(["flip", "truncate", "extend", "prefix", "splice"]),
                                    st.integers(min_value=0, max_value=10**6), st.binary(min_size=1, max_size=32)),
                          min_size=1, max_size=4),
       honest_first=st.booleans())
def test_mutated_authentic_records_are_rejected_and_do_not_disturb_honest_ones(world, mutations, honest_first):
    device = HOSTILE[0]
    raw = bytearray(world.fleet.seal(device))
    for op, where, blob in mutations:
        at = where % len(raw) if raw else 0
        if op == "flip":
            if raw:
                raw[at] ^= 1 << (where % 8)
        elif op == "truncate":
            del raw[at:]
        elif op == "extend":
            raw += blob
        elif op == "prefix":
            raw[0:0] = blob
        else:
            raw[at:at + len(blob)] = blob
    honest = (HONEST[0].encode(), world.fleet.seal(HONEST[0]))
    records = [honest, (device.encode(), bytes(raw))] if honest_first else [(device.encode(), bytes(raw)), honest]
    out = world.validate(records, batch=2)
    mutated = out[1] if honest_first else out[0]
    check(out[0] if honest_first else out[1], None)
    if isinstance(mutated, ValidUpdate):  # the mutations cancelled out: the bytes are the authentic record
        return
    assert isinstance(mutated, RejectError) and mutated.reason is not Reason.INTERNAL_ERROR


def test_each_hostile_kind_once_with_its_expected_code(world):
    """The table of tests/hostile.py, one record each, so a regression names the kind."""
    for kind, (make, reason) in MALFORMED.items():
        (outcome,) = world.validate([make(world.fleet, HOSTILE[1])], batch=1)
        check(outcome, reason)
        assert outcome.authenticated == (kind in AUTHENTIC or kind == "key_mismatch"), kind
