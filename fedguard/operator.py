"""The operator credential: who may enroll, revoke and rotate devices (issue 3, item 2).

The operator holds a token: ``$FEDGUARD_OPERATOR_TOKEN``, else the file ``<data dir>/operator.token`` (mode 0600;
a file readable by group or others is refused). Redis keeps only its scrypt hash (``fedguard:operator:credential``:
parameters, salt, hash), so reading Redis does not reveal the token. ``fedguard devices enroll|revoke|rotate``
verify the token against that hash (constant-time comparison) before they touch the registry.

Bootstrap is trust on first use: ``fedguard up`` / ``fedguard init`` (:func:`bootstrap`) create a random 256-bit
token in the data dir when there is none, and install its hash when Redis has no credential yet. After that, only a
holder of the token can change the registry through fedguard. (Whoever can write to Redis directly can change
anything: Redis access control is part of the deployment, see docs/threat-model.md.)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path

import redis

from fedguard import registry
from fedguard.keys import write_secret
from fedguard.settings import Settings

TOKEN_ENV = "FEDGUARD_OPERATOR_TOKEN"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # 16 MiB and ~50 ms per guess
MIN_TOKEN_CHARS = 16


class OperatorAuthError(Exception):
    """The operator credential is missing, wrong, or not set up; the message says which and what to do."""


def token_path(settings: Settings) -> Path:
    return settings.data_dir / "operator.token"


def load_token(settings: Settings) -> str | None:
    """The operator token from ``$FEDGUARD_OPERATOR_TOKEN``, else from the token file, else None."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    path = token_path(settings)
    if not path.exists():
        return None
    mode = path.stat().st_mode
    if mode & 0o077:
        raise OperatorAuthError(f"{path} is readable by group/others (mode {oct(mode & 0o777)}); chmod 600 it")
    return path.read_text().strip() or None


def hash_token(token: str, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    return hashlib.scrypt(token.encode(), salt=salt, n=n, r=r, p=p, maxmem=128 * r * n * 2, dklen=32).hex()


def credential_record(token: str) -> str:
    """What Redis stores for ``token``: scrypt parameters, a random salt and the hash, as JSON."""
    if len(token) < MIN_TOKEN_CHARS:
        raise OperatorAuthError(f"an operator token needs at least {MIN_TOKEN_CHARS} characters")
    salt = os.urandom(16)
    return json.dumps({"scheme": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": salt.hex(),
                       "hash": hash_token(token, salt), "created_at": round(time.time(), 3)})


def matches(record: str, token: str) -> bool:
    """Whether ``token`` is the one ``record`` (from :func:`credential_record`) was made from; constant time."""
    try:
        fields = json.loads(record)
        if fields.get("scheme") != "scrypt":
            return False
        expected = hash_token(token, bytes.fromhex(fields["salt"]), int(fields["n"]), int(fields["r"]),
                              int(fields["p"]))
    except (ValueError, KeyError, TypeError):
        return False
    return hmac.compare_digest(expected, str(fields["hash"]))


def install(client: redis.Redis, settings: Settings, token: str) -> bool:
    """Install ``token``'s hash if Redis has no operator credential yet; returns whether it did."""
    return bool(client.set(registry.operator_credential_key(settings), credential_record(token), nx=True))


def verify(client: redis.Redis, settings: Settings, token: str | None = None) -> str:
    """Check the operator token (given, or from :func:`load_token`) against Redis; returns it or raises."""
    token = token or load_token(settings)
    if not token:
        raise OperatorAuthError(f"no operator credential: set {TOKEN_ENV} or put the token in {token_path(settings)} "
                                f"(mode 600); `fedguard init` / `fedguard up` create one on first start")
    record = client.get(registry.operator_credential_key(settings))
    if record is None:
        raise OperatorAuthError("no operator credential is installed in Redis; run `fedguard init` "
                                "(or `fedguard up`) once to create it")
    if not matches(record, token):
        raise OperatorAuthError("operator credential rejected: the token does not match the one installed in Redis")
    return token


def bootstrap(settings: Settings, client: redis.Redis | None = None) -> str:
    """First start: make sure a token exists (env, else the file, else a new random one in a 0600 file) and that
    Redis holds a credential; then verify the token against it and return it."""
    client = client or registry.connect(settings)
    token = load_token(settings)
    if token is None:
        token = secrets.token_urlsafe(32)
        write_secret(token_path(settings), token + "\n")
    install(client, settings, token)
    return verify(client, settings, token)
