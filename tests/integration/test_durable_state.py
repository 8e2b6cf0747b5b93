"""Durable state (issue 12, items 2 and 5): what the registry and admission hold survives a restart of the stack;
``init`` / ``up`` never undo an operator's decision; the version key comes back from the model store; the fleet
samples only active devices.

Real broker (the session's) and a real Redis: the embedded stack's own redis-server on its append-only file where
the test is about a restart, the session's Redis otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedguard import envelope, registry
from fedguard.keys import load_or_create_server_key, private_from_hex, public_to_hex
from fedguard.modelstore import ModelStore
from fedguard.stack import EmbeddedStack, free_port, initialize, restore_version_key
from processors import admission
from processors.validation import ValidUpdate, Validator
from producers.enroll import revoke, rotate
from producers.keystore import Keystore
from tests.hostile import Fleet as Sealer

pytestmark = pytest.mark.integration


def own_redis(settings):
    """The same test settings, but with the embedded stack's own Redis on a free port (its data in the data dir)."""
    return dataclasses.replace(settings, redis_url=None, redis_port=free_port())


def accept_one_update(settings, device_id: str) -> None:
    """Validate one honest update of ``device_id`` through the real admission script: its admission state
    (``fedguard:seq:<id>``) is written."""
    sealer = Sealer(settings, 8)  # seals to the server key published in Redis, with the key store's device key
    private = private_from_hex(Keystore.load(settings.keystore_path).devices[device_id].private_key)
    sealer.keys[device_id] = envelope.derive_key(private, sealer.server_public, device_id)
    sealer.redis.set(registry.model_version_key(settings), 0)
    server_key = load_or_create_server_key(settings.server_key_path)

    async def run():
        client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
        try:
            return await Validator(settings, server_key, 8, client).validate_batch(
                [(sealer.seal(device_id, base=0), device_id.encode(), "0:0")])
        finally:
            await client.aclose()

    (outcome,) = asyncio.run(run())
    assert isinstance(outcome, ValidUpdate), outcome


def test_revocation_admission_state_quarantine_and_audit_survive_a_restart_of_the_stack(settings):
    """Start the stack, revoke a device, quarantine another, let a third have an update accepted; stop; start again
    on the same data dir (``up`` re-runs init and enrollment): the revoked device is still revoked, the quarantined
    one quarantined, the admission state and the audit trail still there."""
    settings = own_redis(settings)
    with EmbeddedStack(settings, services=(), own_broker=False) as stack:
        client = registry.connect(settings)
        revoke(settings, "dev-0001", reason="stolen (test)")
        registry.set_device_status(client, settings, "dev-0002", registry.QUARANTINED, "3 rejected windows")
        accept_one_update(settings, "dev-0003")
        state = admission.admission_state(client, settings, "dev-0003")
        client.set(registry.model_version_key(settings), 4)
        audit = client.lrange(registry.audit_key(settings), 0, -1)
        assert "redis" in stack.procs
        client.close()

    with EmbeddedStack(settings, services=(), own_broker=False):  # `up` again on the same data dir
        client = registry.connect(settings)
        assert registry.get_device(client, settings, "dev-0001")["status"] == registry.REVOKED
        assert client.get(registry.auth_key(settings, "dev-0001")).startswith("revoked ")
        assert registry.get_device(client, settings, "dev-0002")["status"] == registry.QUARANTINED
        assert registry.get_device(client, settings, "dev-0000")["status"] == registry.ACTIVE
        assert state["seq"] == "1" and admission.admission_state(client, settings, "dev-0003") == state
        assert client.get(registry.model_version_key(settings)) == "4"
        assert client.lrange(registry.audit_key(settings), 0, -1) == audit
        assert [json.loads(a)["action"] for a in audit].count("revoke") == 1
        client.close()
    assert list((settings.data_dir / "redis").rglob("*.aof")), "no append-only file in the data dir"


def test_init_never_reactivates_rekeys_or_reenrolls_a_revoked_device_nor_resets_an_enrolled_key(settings):
    initialize(settings)
    client = registry.connect(settings)
    revoke(settings, "dev-0001")
    device_made = public_to_hex(X25519PrivateKey.generate().public_key())
    rotate(settings, "dev-0002", public_key_hex=device_made)  # the device made its own key: not in the key store
    revoked_before = registry.get_device(client, settings, "dev-0001")

    done = initialize(settings)  # `fedguard init` again, or `up` again

    assert done["devices_new"] == []
    assert registry.get_device(client, settings, "dev-0001") == revoked_before
    assert registry.get_device(client, settings, "dev-0002")["public_key"] == device_made
    actions = [json.loads(a)["action"] for a in client.lrange(registry.audit_key(settings), 0, -1)]
    assert "rekey-from-keystore" not in actions and actions.count("enroll") == settings.num_devices

    # A registry that lost a device (e.g. a fresh Redis) gets it back from the key store, active.
    client.delete(registry.device_key(settings, "dev-0004"), registry.auth_key(settings, "dev-0004"))
    initialize(settings)
    assert registry.get_device(client, settings, "dev-0004")["status"] == registry.ACTIVE


def test_the_version_key_is_restored_from_the_model_store_when_missing_or_behind(settings):
    store = ModelStore(settings.models_dir)
    for version in range(3):
        store.save(version, np.zeros(4, np.float32), {"parent": version - 1 if version else None})
    client = registry.connect(settings)
    key = registry.model_version_key(settings)

    assert client.get(key) is None
    done = initialize(settings, enroll_devices=False)  # `fedguard init` on a fresh Redis
    assert client.get(key) == "2" and done["version_restored"] == 2
    client.set(key, 1)  # a Redis that lost its last writes
    assert restore_version_key(settings) == 2 and client.get(key) == "2"
    client.set(key, 5)  # the aggregator is ahead of what this process sees: never lowered
    assert restore_version_key(settings) is None and client.get(key) == "5"
    # The store's id comes back too (the window stage keys its closures by it), and a store started afresh has
    # another one.
    identity = store.identity()
    assert client.get(registry.model_store_key(settings)) == identity and len(identity) == 16
    assert identity == ModelStore(settings.models_dir).identity()
    fresh = ModelStore(settings.data_dir / "fresh-models")
    assert fresh.identity() is None
    fresh.save(0, np.zeros(4, np.float32), {"parent": None, "created_at": 1.0})
    assert fresh.identity() not in (None, identity)


def test_the_fleet_samples_only_active_devices_deterministically(settings):
    from producers.fleet import Fleet

    settings = dataclasses.replace(settings, num_devices=10, devices_per_round=4)
    initialize(settings)
    fleet = Fleet(settings)
    try:
        all_active = {(v, a): fleet.select(v, a) for v in range(20) for a in range(2)}
        for (v, a), chosen in all_active.items():  # with every device active: the choice of earlier fleets
            rng = np.random.default_rng([settings.seed, v, a])
            assert chosen == sorted(rng.choice(10, 4, replace=False).tolist())

        client = registry.connect(settings)
        revoke(settings, "dev-0001")
        registry.set_device_status(client, settings, "dev-0002", registry.QUARANTINED)
        registry.set_device_status(client, settings, "dev-0005", registry.QUARANTINED)
        chosen = {(v, a): fleet.select(v, a) for v in range(20) for a in range(2)}
        for picked in chosen.values():
            assert len(picked) == 4 and not {1, 2, 5} & set(picked)
        assert fleet.active() == [0, 3, 4, 6, 7, 8, 9]
        assert chosen == {(v, a): fleet.select(v, a) for v in range(20) for a in range(2)}  # deterministic
        assert len({tuple(p) for p in chosen.values()}) > 5  # and still spread over the active devices

        for d in ("dev-0000", "dev-0003", "dev-0004", "dev-0006"):
            registry.set_device_status(client, settings, d, registry.QUARANTINED)
        assert fleet.select(7, 0) == [7, 8, 9]  # fewer active devices than the round wants: all of them
        registry.set_device_status(client, settings, "dev-0002", registry.ACTIVE)  # released after probation
        assert 2 in fleet.active()
    finally:
        fleet.close()
