"""Enrollment: a key pair per device; the public key goes into the Redis device registry."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedguard import registry
from fedguard.keys import private_from_hex, private_to_hex, public_to_hex
from fedguard.settings import Settings
from producers.keystore import DeviceKeys, Keystore


def device_ids(count: int) -> list[str]:
    return [f"dev-{i:04d}" for i in range(count)]


def enroll(settings: Settings, count: int) -> list[str]:
    """Make sure devices ``dev-0000`` .. ``dev-<count-1>`` have keys and are in the registry; returns new ids.

    Idempotent: existing keys are kept, and a device whose registry entry was lost (a fresh Redis) is registered
    again with its existing public key.
    """
    store = Keystore.load(settings.keystore_path)
    client = registry.connect(settings)
    created = []
    for device_id in device_ids(count):
        keys = store.devices.get(device_id)
        if keys is None:
            keys = DeviceKeys(device_id, private_to_hex(X25519PrivateKey.generate()))
            store.devices[device_id] = keys
            created.append(device_id)
        public_hex = public_to_hex(private_from_hex(keys.private_key).public_key())
        if client.hget(registry.device_key(settings, device_id), "public_key") != public_hex:
            registry.register_device(client, settings, device_id, public_hex)
    store.save()
    return created
