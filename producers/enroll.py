"""Enrollment, revocation and key rotation of devices (issue 3, item 2).

Every operation here changes who may send updates, so each first verifies the operator credential
(:func:`fedguard.operator.verify`) and records itself in the audit list (``fedguard:audit``).

* enroll: a key pair per device; the private key goes into the fleet's key store, the public key into the registry.
* revoke: the device's status becomes ``revoked`` (terminal: enroll, ``init`` and ``up`` do not bring it back, and
  the registry is kept on disk by the embedded Redis' append-only file); its updates are then
  rejected with the reason code ``revoked``, checked atomically with admission, so nothing is accepted after the
  command returns.
* rotate: a new key pair for the device (or a public key the device made itself); the registry and key store are
  updated. Updates sealed with the old key are then rejected ``auth_failed``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedguard import operator, registry
from fedguard.keys import private_from_hex, private_to_hex, public_from_hex, public_to_hex
from fedguard.settings import Settings
from producers.keystore import DeviceKeys, Keystore


def device_ids(count: int) -> list[str]:
    return [f"dev-{i:04d}" for i in range(count)]


def enroll(settings: Settings, count: int, token: str | None = None, rekey: bool = False) -> list[str]:
    """Make sure devices ``dev-0000`` .. ``dev-<count-1>`` have keys and are in the registry; returns new ids.

    Requires the operator credential (``token``, else ``$FEDGUARD_OPERATOR_TOKEN`` or the token file). Idempotent,
    and it never undoes an operator's decision (``fedguard init`` and ``fedguard up`` run it at every start):

    * a device missing from the registry (never enrolled, or a Redis that lost its data) is registered with its key
      store key (a new key pair if the key store has none);
    * a device the registry holds as ``revoked`` is left alone: revocation is terminal, so it is neither
      re-activated nor given a key (the key store gets an entry for it if it has none, which nobody accepts);
    * an enrolled device keeps its registry key and status, even if the key store holds another key (e.g. after
      ``fedguard devices rotate --public-key``, where the device made its own key), unless ``rekey``: then a
      device that is not revoked gets the key store's key (audited ``rekey-from-keystore``), its status unchanged.
    """
    client = registry.connect(settings)
    operator.verify(client, settings, token)
    created = []
    with Keystore.editing(settings.keystore_path) as store:
        ids = device_ids(count)
        pipe = client.pipeline()
        for device_id in ids:
            pipe.hmget(registry.device_key(settings, device_id), "public_key", "status")
        registered = pipe.execute()
        for device_id, (current, status) in zip(ids, registered):
            keys = store.devices.get(device_id)
            if keys is None:  # (a revoked device too: the fleet needs every id; its registry entry is untouched)
                keys = DeviceKeys(device_id, private_to_hex(X25519PrivateKey.generate()))
                store.devices[device_id] = keys
                if status != registry.REVOKED:
                    created.append(device_id)
            if status == registry.REVOKED:
                continue  # terminal: neither re-activated nor given a key
            public_hex = public_to_hex(private_from_hex(keys.private_key).public_key())
            if current is None:
                registry.register_device(client, settings, device_id, public_hex)
                registry.audit(client, settings, "enroll", device_id, registry.fingerprint(public_hex))
            elif current != public_hex and rekey:
                registry.set_public_key(client, settings, device_id, public_hex)
                registry.audit(client, settings, "rekey-from-keystore", device_id, registry.fingerprint(public_hex))
    return created


def revoke(settings: Settings, device_id: str, reason: str = "", token: str | None = None) -> dict[str, str]:
    """Revoke an enrolled device; returns its registry entry after the change. Raises KeyError if not enrolled."""
    client = registry.connect(settings)
    operator.verify(client, settings, token)
    registry.set_device_status(client, settings, device_id, registry.REVOKED, reason)
    registry.audit(client, settings, "revoke", device_id, reason)
    return registry.get_device(client, settings, device_id) or {}


@dataclass(frozen=True)
class Rotation:
    device_id: str
    old_fingerprint: str
    new_fingerprint: str
    in_keystore: bool  # the new private key was written to the fleet's key store


def rotate(settings: Settings, device_id: str, public_key_hex: str | None = None,
           token: str | None = None) -> Rotation:
    """Give a device a new key.

    Without ``public_key_hex``: a new key pair; the private key replaces the old one in the key store (the device
    must be in it). With it: a public key the device generated itself; only the registry changes.
    """
    client = registry.connect(settings)
    operator.verify(client, settings, token)
    if registry.get_device(client, settings, device_id) is None:
        raise KeyError(f"device {device_id!r} is not enrolled")
    if public_key_hex is not None:
        try:
            public_hex = public_to_hex(public_from_hex(public_key_hex))
        except ValueError:
            raise ValueError("the public key must be 64 hex digits (a raw X25519 public key)") from None
        old = registry.set_public_key(client, settings, device_id, public_hex)
        in_keystore = False
    else:
        with Keystore.editing(settings.keystore_path) as store:
            keys = store.devices.get(device_id)
            if keys is None:
                raise KeyError(f"device {device_id!r} is not in the key store {settings.keystore_path}; "
                               f"pass the device's new public key instead")
            new_private = X25519PrivateKey.generate()
            public_hex = public_to_hex(new_private.public_key())
            # Key store first, registry second, both under the key store lock: the fleet adopts the new key at
            # its next round; records sealed with the old key in between are rejected auth_failed.
            keys.private_key = private_to_hex(new_private)
            store.save()
            old = registry.set_public_key(client, settings, device_id, public_hex)
        in_keystore = True
    rotation = Rotation(device_id, registry.fingerprint(old), registry.fingerprint(public_hex), in_keystore)
    registry.audit(client, settings, "rotate", device_id, f"{rotation.old_fingerprint} -> {rotation.new_fingerprint}")
    return rotation


def list_devices(settings: Settings) -> list[dict[str, str]]:
    """The registry, with key fingerprints (read-only: needs Redis access, not the operator credential)."""
    return registry.list_devices(registry.connect(settings), settings)
