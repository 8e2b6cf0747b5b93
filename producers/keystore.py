"""The fleet's key store: each simulated device's X25519 private key and its last sequence number.

A JSON file created with mode 0600 (``Settings.keystore_path``). It plays the part of each device's secure storage:
the private keys never leave it, only the public keys go to the registry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fedguard.keys import write_secret


@dataclass
class DeviceKeys:
    device_id: str
    private_key: str  # hex
    seq: int = 0


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

    def save(self) -> None:
        data = {"devices": {d: {"private_key": k.private_key, "seq": k.seq} for d, k in sorted(self.devices.items())}}
        write_secret(self.path, json.dumps(data, indent=1))
