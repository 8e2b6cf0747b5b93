"""The fleet's key store: each simulated device's X25519 private key and its last sequence number.

A JSON file created with mode 0600 (``Settings.keystore_path``). It plays the part of each device's secure storage:
the private keys never leave it, only the public keys go to the registry.

Several processes write it (the fleet saves sequence numbers every round; ``fedguard devices enroll|rotate`` add or
replace keys), so every read-modify-write holds an exclusive ``flock`` on ``<keystore>.lock``: see
:meth:`Keystore.editing`. A rotation is therefore never overwritten by the fleet's next save.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fedguard.keys import write_secret


@dataclass
class DeviceKeys:
    device_id: str
    private_key: str  # hex
    seq: int = 0


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock for the key store at ``path`` (held until the block ends)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@dataclass
class Keystore:
    path: Path
    devices: dict[str, DeviceKeys] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "Keystore":
        if not path.exists():
            return cls(path)
        data = json.loads(path.read_text())
        return cls(path, {d: DeviceKeys(d, v["private_key"], v["seq"]) for d, v in data["devices"].items()})

    @classmethod
    @contextmanager
    def editing(cls, path: Path) -> Iterator["Keystore"]:
        """Load under the lock, let the caller change it, save it (still under the lock) if the block succeeds."""
        with locked(path):
            store = cls.load(path)
            yield store
            store.save()

    def save(self) -> None:
        data = {"devices": {d: {"private_key": k.private_key, "seq": k.seq} for d, k in sorted(self.devices.items())}}
        write_secret(self.path, json.dumps(data, indent=1))

    def merge_from(self, other: "Keystore") -> list[str]:
        """Adopt ``other``'s keys (it is the newer file) while keeping the higher sequence number of each device.

        Returns the devices whose private key changed (rotated since this copy was loaded).
        """
        rotated = []
        for device_id, theirs in other.devices.items():
            mine = self.devices.get(device_id)
            if mine is None:
                self.devices[device_id] = DeviceKeys(device_id, theirs.private_key, theirs.seq)
                continue
            if mine.private_key != theirs.private_key:
                mine.private_key = theirs.private_key
                rotated.append(device_id)
            mine.seq = max(mine.seq, theirs.seq)
        return rotated
