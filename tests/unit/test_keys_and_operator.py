"""Key material and the operator credential without Redis: file permissions, hashing, the key store's merge."""

from __future__ import annotations

import json
import os
import threading

import pytest

from fedguard import operator
from fedguard.keys import load_or_create_server_key, private_to_hex, write_secret
from fedguard.settings import Settings
from producers.keystore import DeviceKeys, Keystore


def test_secrets_are_written_owner_only(tmp_path):
    write_secret(tmp_path / "s", "x")
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o600


def test_server_key_file_readable_by_others_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDGUARD_SERVER_KEY", raising=False)
    path = tmp_path / "server.key"
    key = load_or_create_server_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert private_to_hex(load_or_create_server_key(path)) == private_to_hex(key)
    path.chmod(0o644)
    with pytest.raises(PermissionError):
        load_or_create_server_key(path)


def test_server_key_from_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGUARD_SERVER_KEY", "11" * 32)
    assert private_to_hex(load_or_create_server_key(tmp_path / "absent.key")) == "11" * 32
    assert not (tmp_path / "absent.key").exists()


def test_credential_record_verifies_only_its_token():
    record = operator.credential_record("correct horse battery staple")
    fields = json.loads(record)
    assert fields["scheme"] == "scrypt" and "correct" not in record  # only the hash is stored
    assert operator.matches(record, "correct horse battery staple")
    assert not operator.matches(record, "correct horse battery stapler")
    assert not operator.matches("not json", "x" * 20)
    assert not operator.matches(json.dumps({**fields, "scheme": "plain"}), "correct horse battery staple")
    # the same token twice gives different salts and hashes
    assert json.loads(operator.credential_record("correct horse battery staple"))["hash"] != fields["hash"]


def test_short_tokens_are_refused():
    with pytest.raises(operator.OperatorAuthError):
        operator.credential_record("short")


def test_token_from_env_then_file_with_permission_check(tmp_path, monkeypatch):
    settings = Settings(data_dir=tmp_path)
    monkeypatch.delenv(operator.TOKEN_ENV, raising=False)
    assert operator.load_token(settings) is None
    write_secret(operator.token_path(settings), "from-the-file-0123456789\n")
    assert operator.load_token(settings) == "from-the-file-0123456789"
    monkeypatch.setenv(operator.TOKEN_ENV, "from-the-environment-0123")
    assert operator.load_token(settings) == "from-the-environment-0123"
    monkeypatch.delenv(operator.TOKEN_ENV)
    operator.token_path(settings).chmod(0o640)
    with pytest.raises(operator.OperatorAuthError, match="chmod 600"):
        operator.load_token(settings)


def test_keystore_merge_keeps_the_higher_seq_and_adopts_rotated_keys(tmp_path):
    mine = Keystore(tmp_path / "k.json", {"a": DeviceKeys("a", "aa", seq=10), "b": DeviceKeys("b", "bb", seq=1)})
    disk = Keystore(tmp_path / "k.json", {"a": DeviceKeys("a", "aa", seq=3), "b": DeviceKeys("b", "NEW", seq=5),
                                           "c": DeviceKeys("c", "cc", seq=0)})
    assert mine.merge_from(disk) == ["b"]
    assert {d: (k.private_key, k.seq) for d, k in mine.devices.items()} == {
        "a": ("aa", 10), "b": ("NEW", 5), "c": ("cc", 0)}


def test_keystore_edits_from_threads_are_not_lost(tmp_path):
    path = tmp_path / "devices.json"

    def add(i):
        with Keystore.editing(path) as store:
            store.devices[f"d{i}"] = DeviceKeys(f"d{i}", f"{i:02x}")

    threads = [threading.Thread(target=add, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(Keystore.load(path).devices) == {f"d{i}" for i in range(16)}
    assert os.stat(path).st_mode & 0o777 == 0o600
