"""Enrollment, revocation and rotation through the CLI with the operator credential (issue 3, item 2).

Runs ``fedguard`` in-process (``fedguard.cli.main``) against the session broker and Redis, in this test's own
namespace and data dir.
"""

from __future__ import annotations

import json

import pytest

from fedguard import cli, operator, registry
from fedguard.keys import private_from_hex, public_to_hex
from fedguard.settings import to_env
from producers.keystore import Keystore

pytestmark = pytest.mark.integration


@pytest.fixture
def run(settings, monkeypatch, capsys):
    for name, value in to_env(settings).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(operator.TOKEN_ENV, raising=False)

    def fedguard(*args: str) -> tuple[int, str]:
        code = cli.main(list(args))
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    return fedguard


def test_enrollment_needs_the_operator_credential(settings, run, monkeypatch):
    code, out = run("devices", "enroll", "--count", "2")
    assert code == cli.EXIT_UNAUTHORIZED and "no operator credential" in out

    code, out = run("init", "--no-enroll")  # first start: creates the token (0600) and installs its hash
    assert code == 0, out
    token_file = operator.token_path(settings)
    assert token_file.stat().st_mode & 0o777 == 0o600
    client = registry.connect(settings)
    stored = client.get(registry.operator_credential_key(settings))
    assert token_file.read_text().strip() not in stored  # Redis holds a hash, not the token

    assert run("devices", "enroll", "--count", "2")[0] == 0
    assert client.scard(registry.devices_key(settings)) == 2

    monkeypatch.setenv(operator.TOKEN_ENV, "a-wrong-token-of-enough-length")
    code, out = run("devices", "enroll", "--count", "4")
    assert code == cli.EXIT_UNAUTHORIZED and "rejected" in out
    assert client.scard(registry.devices_key(settings)) == 2
    code, _ = run("devices", "revoke", "dev-0000")
    assert code == cli.EXIT_UNAUTHORIZED
    assert registry.get_device(client, settings, "dev-0000")["status"] == registry.ACTIVE

    monkeypatch.delenv(operator.TOKEN_ENV)
    token_file.chmod(0o644)
    code, out = run("devices", "enroll", "--count", "2")
    assert code == cli.EXIT_UNAUTHORIZED and "chmod 600" in out


def test_revoke_rotate_and_list(settings, run):
    assert run("init")[0] == 0  # the fixture's 6 devices
    client = registry.connect(settings)

    code, out = run("devices", "revoke", "dev-0001", "--reason", "key leaked")
    assert code == 0 and "revoked" in out
    entry = registry.get_device(client, settings, "dev-0001")
    assert entry["status"] == registry.REVOKED and entry["status_reason"] == "key leaked"
    assert run("devices", "enroll", "--count", "6")[0] == 0  # enrolling again does not bring it back
    assert registry.get_device(client, settings, "dev-0001")["status"] == registry.REVOKED

    before = Keystore.load(settings.keystore_path).devices["dev-0002"].private_key
    old_fp = registry.fingerprint(registry.get_device(client, settings, "dev-0002")["public_key"])
    code, out = run("devices", "rotate", "dev-0002")
    assert code == 0 and old_fp in out
    after = Keystore.load(settings.keystore_path).devices["dev-0002"].private_key
    entry = registry.get_device(client, settings, "dev-0002")
    assert after != before and entry["public_key"] == public_to_hex(private_from_hex(after).public_key())
    assert entry["key_version"] == "2" and registry.fingerprint(entry["public_key"]) in out

    device_made = "ab" * 32
    assert run("devices", "rotate", "dev-0003", "--public-key", device_made)[0] == 0
    assert registry.get_device(client, settings, "dev-0003")["public_key"] == device_made
    code, out = run("devices", "rotate", "dev-0003", "--public-key", "not-hex")
    assert code == cli.EXIT_FAILURE and "64 hex digits" in out

    code, out = run("devices", "rotate", "dev-9999")
    assert code == cli.EXIT_FAILURE and "not enrolled" in out
    code, out = run("devices", "revoke", "dev-9999")
    assert code == cli.EXIT_FAILURE and "not enrolled" in out

    code, out = run("devices", "list")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("dev-")}
    assert len(lines) == 6 and "revoked" in lines["dev-0001"] and registry.fingerprint(device_made) in lines["dev-0003"]
    assert "6 devices: 5 active, 1 revoked" in out
    code, out = run("devices", "list", "--json")
    rows = json.loads(out)
    assert {r["device_id"]: r["status"] for r in rows}["dev-0001"] == "revoked"

    audit = [json.loads(x) for x in client.lrange(registry.audit_key(settings), 0, -1)]
    assert [a["action"] for a in audit][:3] == ["rotate", "rotate", "revoke"]


def test_flood_injection_seals_authentic_updates_with_fresh_sequence_numbers(settings, run):
    from fedguard import envelope
    from producers.inject import flood_records

    assert run("init")[0] == 0
    registry.connect(settings).set(registry.model_version_key(settings), 2)
    floods = flood_records(settings, "dev-0004", 5, num_params=8)
    headers = [envelope.parse(value, 1 << 20).header for _, value in floods]
    assert [key for key, _ in floods] == [b"dev-0004"] * 5
    assert all(h.device_id == "dev-0004" and h.base_version == 2 for h in headers)
    seqs = [h.seq for h in headers]
    assert seqs == sorted(set(seqs))
    assert Keystore.load(settings.keystore_path).devices["dev-0004"].seq == seqs[-1]


def test_quarantine_show_and_release_through_the_cli(settings, run):
    """Operator quarantine and release (issue 9, item 3) on a real Redis: the registry status the validator reads
    changes, the device report explains it, a revoked device cannot be quarantined or released."""
    from processors.defence import reputation_key

    assert run("init")[0] == 0
    client = registry.connect(settings)

    code, out = run("devices", "quarantine", "dev-0003", "--reason", "suspicious")
    assert code == 0 and "quarantined" in out
    assert registry.get_device(client, settings, "dev-0003")["status"] == registry.QUARANTINED
    assert client.get(registry.auth_key(settings, "dev-0003")).startswith("quarantined ")  # what admission reads

    code, out = run("devices", "show", "dev-0003")
    assert code == 0 and "quarantined (operator: suspicious)" in out and "trust 0.500" in out

    code, out = run("devices", "release", "dev-0003")
    assert code == 0 and "released on probation" in out
    assert registry.get_device(client, settings, "dev-0003")["status"] == registry.ACTIVE
    assert client.get(registry.auth_key(settings, "dev-0003")).startswith("active ")
    assert float(client.hget(reputation_key(settings, "dev-0003"), "trust")) < 0.3  # on probation: down-weighted
    assert run("devices", "release", "dev-0003")[0] == cli.EXIT_FAILURE  # not quarantined any more

    assert run("devices", "revoke", "dev-0004")[0] == 0
    code, out = run("devices", "quarantine", "dev-0004")
    assert code == cli.EXIT_FAILURE and "revocation is terminal" in out
    assert run("devices", "show", "dev-9999")[0] == cli.EXIT_FAILURE


def test_versions_and_rollback_through_the_cli(settings, run):
    import numpy as np

    from fedguard import lineage
    from fedguard.modelstore import ModelStore

    store = ModelStore(settings.models_dir)
    for v in range(4):
        store.save(v, np.full(3, v, np.float32), {"parent": v - 1 if v else None, "metrics": {"accuracy": 0.5 + v / 10}})
    store.prune(keep_last=2, keep_every=100)  # version 1's weights are gone
    code, out = run("versions")
    assert code == 0 and len(out.strip().splitlines()) == 5, out  # a header and the four versions
    code, out = run("versions", "--json", "--last", "2")
    assert code == 0 and [r["version"] for r in json.loads(out)] == [2, 3]

    code, out = run("rollback", "--to", "0")
    assert code == cli.EXIT_UNAUTHORIZED and "no operator credential" in out
    assert run("init", "--no-enroll")[0] == 0
    code, out = run("rollback", "--to", "1")
    assert code == cli.EXIT_FAILURE and "\n" not in out.strip(), out  # pruned weights: one line
    code, out = run("rollback", "--to", "9")
    assert code == cli.EXIT_FAILURE and "\n" not in out.strip(), out
    assert lineage.pending_rollback(registry.connect(settings), settings) is None
    code, out = run("rollback", "--to", "0", "--reason", "backdoor found by hand")
    assert code == 0, out
    request = lineage.pending_rollback(registry.connect(settings), settings)
    assert (request["to"], request["from"], request["reason"]) == (0, 3, "backdoor found by hand")
