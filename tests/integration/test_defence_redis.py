"""The window stage's defence against a real Redis: exactly once per window, and no confusion between windows."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from fedguard import registry
from fedguard import sketch as sketch_codec
from fedguard.settings import Settings
from processors.defence import WINDOW_RECORD_TTL_S, WindowDefence, reputation_key

pytestmark = pytest.mark.integration
K = 64


def members(tag: str, n: int, rng) -> list[dict]:
    out = []
    for i in range(n):
        vec = rng.normal(size=K).astype(np.float32)
        out.append({"update_id": f"{tag}-{i}", "device_id": f"dev-{i:04d}", "num_samples": 100,
                    "norm": float(np.linalg.norm(vec)), "sketch": sketch_codec.encode(vec)})
    return out


def test_a_window_is_judged_once_and_a_new_window_with_the_same_id_is_judged_anew(redis_url):
    settings = Settings(redis_url=redis_url, redis_prefix=f"fgd-{uuid.uuid4().hex[:8]}", detector_sketch_k=K)
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    rng = np.random.default_rng(0)
    first, other = members("a", 6, rng), members("b", 4, rng)

    async def scenario():
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            defence = WindowDefence(settings, client)
            judged = await defence.judge("m:0", first)
            trust = sync.hget(reputation_key(settings, "dev-0000"), "state")
            again = await defence.judge("m:0", first)  # re-delivered after a crash: the stored judgement
            assert sync.hget(reputation_key(settings, "dev-0000"), "state") == trust  # reputation moved once
            fresh = await defence.judge("m:0", other)  # same id, other members (a model store started afresh)
            return judged, again, fresh
        finally:
            await client.aclose()

    judged, again, fresh = asyncio.run(scenario())
    assert not judged.replayed and again.replayed and again.members == judged.members
    assert not fresh.replayed and len(fresh.members) == 4
    for key in sync.scan_iter(f"{settings.redis_prefix}:*"):
        sync.delete(key)


def test_a_window_closure_is_kept_per_model_store_and_the_first_one_stays(redis_url):
    settings = Settings(redis_url=redis_url, redis_prefix=f"fgd-{uuid.uuid4().hex[:8]}", detector_sketch_k=K)
    sync = redis.Redis.from_url(redis_url, decode_responses=True)

    async def scenario():
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            defence = WindowDefence(settings, client)
            seen = [await defence.earlier_closure("m:5")]  # never closed
            seen.append(await defence.earlier_closure("m:5", '{"members": [1, 2, 3]}'))  # closes it
            seen.append(await defence.earlier_closure("m:5"))
            seen.append(await defence.earlier_closure("m:5", '{"members": [3]}'))  # a second closure: refused
            sync.set(registry.model_store_key(settings), "store-b")  # a model store started afresh
            seen.append(await defence.earlier_closure("m:5", '{"members": [9]}'))
            seen.append(await defence.earlier_closure("m:5"))
            sync.set(registry.model_store_key(settings), "store-c")
            seen.append(await defence.earlier_closure("m:5"))
            return seen
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == [None, None, '{"members": [1, 2, 3]}', '{"members": [1, 2, 3]}', None,
                                       '{"members": [9]}', None]
    ttl = max(sync.ttl(k) for k in sync.scan_iter(f"{settings.redis_prefix}:window:closed:*"))
    assert 0 < ttl <= WINDOW_RECORD_TTL_S
    for key in sync.scan_iter(f"{settings.redis_prefix}:*"):
        sync.delete(key)


def test_a_member_whose_device_equivocated_is_rejected_and_only_in_its_own_store_and_version(redis_url):
    """Admission records a device that sent a second update for a base version (fedguard.registry.equivocated_key);
    the window stage rejects that device's seated update, with its reason, and feeds a reject to its reputation.
    The record of another model store or another base version changes nothing."""
    settings = Settings(redis_url=redis_url, redis_prefix=f"fgd-{uuid.uuid4().hex[:8]}", detector_sketch_k=K)
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    sync.set(registry.model_store_key(settings), "store-a")
    sync.sadd(registry.equivocated_key(settings, "store-a", 3), "dev-0002")
    sync.sadd(registry.equivocated_key(settings, "store-b", 4), "dev-0001")  # another store
    sync.sadd(registry.equivocated_key(settings, "store-a", 2), "dev-0001")  # another version
    rng = np.random.default_rng(5)
    window = members("e", 6, rng)

    async def scenario():
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            defence = WindowDefence(settings, client)
            sync.set(registry.model_store_key(settings), "store-b")
            other_store = await defence.judge(f"{settings.model_id}:3", window)
            sync.set(registry.model_store_key(settings), "store-a")
            judged = await defence.judge(f"{settings.model_id}:3", members("f", 6, rng))
            return other_store, judged
        finally:
            await client.aclose()

    other_store, judged = asyncio.run(scenario())
    assert [m["verdict"] for m in other_store.members] == ["accept"] * 6
    verdicts = [m["verdict"] for m in judged.members]
    assert verdicts == ["accept", "accept", "reject", "accept", "accept", "accept"]
    seat = judged.members[2]
    assert seat["flags"] == ["equivocation"] and seat["evidence"] == "reject" and seat["weight"] == 0.0
    assert judged.stats["equivocated"] == 1
    history = sync.lrange(f"{reputation_key(settings, 'dev-0002')}:history", 0, 0)
    assert '"equivocation"' in history[0]
    for key in sync.scan_iter(f"{settings.redis_prefix}:*"):
        sync.delete(key)


def anti_members(tag: str, seed: int, rho: float = -0.15) -> list[dict]:
    """Three honest-looking members whose sketches have pairwise cosine ``rho`` (the synthetic and digits tasks'
    honest spread): below the measured pairwise threshold of -0.1, so uncalibrated they are all voted against."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(K, 3)))
    x = (q @ np.linalg.cholesky(np.full((3, 3), rho) + (1 - rho) * np.eye(3)).T).T.astype(np.float32)
    return [{"update_id": f"{tag}-{i}", "device_id": f"dev-{seed % 4 * 3 + i:04d}", "num_samples": 100,
             "norm": float(np.linalg.norm(v)), "sketch": sketch_codec.encode(v)} for i, v in enumerate(x)]


def test_the_angle_baseline_grows_once_per_window_and_calibrates_the_next_windows(redis_url):
    """Each judged window adds its non-rejected members' cosines to the stored baseline exactly once (a re-delivered
    window adds nothing); once the baseline holds ANGLE_MIN_PAIRS cosines, windows of honest members whose angles
    are wider than Fashion-MNIST's are accepted instead of voted against."""
    from processors.defence import angle_baseline_key, load_angle_baseline
    from processors.detectors import ANGLE_MIN_PAIRS, ANGLE_REFERENCE

    settings = Settings(redis_url=redis_url, redis_prefix=f"fgd-{uuid.uuid4().hex[:8]}", detector_sketch_k=K)
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    windows = ANGLE_MIN_PAIRS // 3

    async def scenario():
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            defence = WindowDefence(settings, client)
            judged = [await defence.judge(f"m:{v}", anti_members(f"w{v}", v)) for v in range(windows)]
            again = await defence.judge("m:3", anti_members("w3", 3))  # re-delivered
            after = await defence.judge(f"m:{windows}", anti_members("next", windows))
            return judged, again, after
        finally:
            await client.aclose()

    judged, again, after = asyncio.run(scenario())
    assert all(j.stats["angle_scale"] == 1.0 for j in judged)
    assert all(m["verdict"] == "downweight" and "direction" in m["flags"] for m in judged[0].members)
    assert again.replayed
    baseline = load_angle_baseline(sync.get(angle_baseline_key(settings)))
    assert len(baseline) == 3 * windows + 3  # the windows and the one after; nothing from the re-delivery
    assert baseline[:3 * windows] == pytest.approx([-0.15] * (3 * windows), abs=1e-5)
    assert after.stats["angle_scale"] == pytest.approx(0.15 / ANGLE_REFERENCE, abs=1e-3)
    assert [m["verdict"] for m in after.members] == ["accept"] * 3
    sync.set(angle_baseline_key(settings), "not json")  # a damaged entry: the measured thresholds, no crash
    assert load_angle_baseline(sync.get(angle_baseline_key(settings))) == []
    for key in sync.scan_iter(f"{settings.redis_prefix}:*"):
        sync.delete(key)
