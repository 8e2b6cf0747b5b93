"""Key material: X25519 key pairs for devices and the server, stored as raw hex."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

SERVER_KEY_ENV = "FEDGUARD_SERVER_KEY"


def private_to_hex(key: X25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    ).hex()


def public_to_hex(key: X25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def private_from_hex(text: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(text.strip()))


def public_from_hex(text: str) -> X25519PublicKey:
    return X25519PublicKey.from_public_bytes(bytes.fromhex(text.strip()))


def write_secret(path: Path, text: str) -> None:
    """Write a secret file readable by its owner only (created 0600, never world-readable even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def load_or_create_server_key(path: Path) -> X25519PrivateKey:
    """The server key from ``$FEDGUARD_SERVER_KEY`` (hex), else from ``path``, else a new one written there."""
    env = os.environ.get(SERVER_KEY_ENV)
    if env:
        return private_from_hex(env)
    if path.exists():
        mode = path.stat().st_mode & 0o077
        if mode:
            raise PermissionError(f"{path} is readable by group/others (mode {oct(path.stat().st_mode)}); chmod 600")
        return private_from_hex(path.read_text())
    key = X25519PrivateKey.generate()
    write_secret(path, private_to_hex(key))
    return key
