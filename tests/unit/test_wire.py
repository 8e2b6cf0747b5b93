"""Envelope and tensor codec: round trips and every way a record can be wrong."""

import json
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedguard import envelope
from fedguard.codec import decode_tensor, encode_tensor
from fedguard.envelope import UpdateHeader
from fedguard.reasons import Reason, RejectError

MAX = 1 << 20


@pytest.fixture(scope="module")
def keys():
    device, server = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    device_side = envelope.derive_key(device, server.public_key(), "dev-0001")
    server_side = envelope.derive_key(server, device.public_key(), "dev-0001")
    return device_side, server_side


def header(**overrides):
    fields = dict(device_id="dev-0001", seq=7, base_version=3, num_samples=120, model_id="m")
    fields.update(overrides)
    return UpdateHeader.new(**fields)


def reason_of(fn, *args) -> Reason:
    with pytest.raises(RejectError) as info:
        fn(*args)
    return info.value.reason


def test_both_sides_derive_the_same_key(keys):
    device_side, server_side = keys
    assert device_side == server_side and len(device_side) == 32


def test_seal_parse_open_round_trip(keys):
    tensor = np.arange(10, dtype=np.float32)
    h = header()
    raw = envelope.seal(h, encode_tensor(tensor), keys[0])
    sealed = envelope.parse(raw, MAX)
    assert sealed.header == h
    out = decode_tensor(envelope.open_sealed(sealed, keys[1]), 100)
    np.testing.assert_array_equal(out, tensor)


def test_payload_is_not_readable_on_the_wire(keys):
    tensor = np.full(64, 1234.5, dtype=np.float32)
    raw = envelope.seal(header(), encode_tensor(tensor), keys[0])
    assert tensor.tobytes() not in raw and encode_tensor(tensor) not in raw


@pytest.mark.parametrize("where", ["header", "nonce", "ciphertext", "tag"])
def test_any_flipped_bit_fails_authentication(keys, where):
    raw = bytearray(envelope.seal(header(), encode_tensor(np.ones(8, np.float32)), keys[0]))
    header_len = struct.unpack_from(">H", raw, 4)[0]
    # In the header, flip a digit of the sequence number so the JSON stays valid and only the AEAD can tell.
    positions = {"header": 6 + raw[6:6 + header_len].index(b'"seq":7') + 6, "nonce": 6 + header_len,
                 "ciphertext": 6 + header_len + 12, "tag": len(raw) - 1}
    raw[positions[where]] ^= 0x01
    sealed = envelope.parse(bytes(raw), MAX)
    assert reason_of(envelope.open_sealed, sealed, keys[1]) is Reason.AUTH_FAILED


def test_wrong_key_fails_authentication(keys):
    raw = envelope.seal(header(), b"payload", keys[0])
    other = envelope.derive_key(X25519PrivateKey.generate(), X25519PrivateKey.generate().public_key(), "dev-0001")
    assert reason_of(envelope.open_sealed, envelope.parse(raw, MAX), other) is Reason.AUTH_FAILED


def test_key_is_bound_to_the_device_id():
    device, server = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    assert envelope.derive_key(device, server.public_key(), "a") != envelope.derive_key(device, server.public_key(), "b")


@pytest.mark.parametrize("raw, reason", [
    (b"", Reason.MALFORMED),
    (b"FG", Reason.MALFORMED),
    (b"XYZ\x01\x00\x02{}" + bytes(40), Reason.MALFORMED),
    (b"FGE\x02\x00\x02{}" + bytes(40), Reason.UNSUPPORTED_VERSION),
    (b"FGE\x01\xff\xff" + bytes(100), Reason.OVERSIZED),
    (b"FGE\x01\x00\x02{}" + bytes(10), Reason.MALFORMED),
    (b"FGE\x01\x00\x04\xff\xfe{}" + bytes(40), Reason.MALFORMED),
    (b"FGE\x01\x00\x02[]" + bytes(40), Reason.BAD_HEADER),
    (b"FGE\x01\x00\x02{}" + bytes(40), Reason.BAD_HEADER),
])
def test_malformed_envelopes(raw, reason):
    assert reason_of(envelope.parse, raw, MAX) is reason


def test_oversized_record_is_rejected_before_parsing():
    assert reason_of(envelope.parse, b"FGE\x01" + bytes(2000), 1000) is Reason.OVERSIZED


@pytest.mark.parametrize("field, value", [
    ("seq", -1), ("seq", 2**60), ("seq", "7"), ("seq", 1.5), ("seq", True), ("base_version", -3),
    ("device_id", ""), ("device_id", "d\u00e9v"), ("device_id", "x" * 200), ("device_id", 5),
    ("timestamp", "now"), ("num_samples", None),
])
def test_bad_header_fields(field, value):
    obj = json.loads(header().to_bytes())
    obj[field] = value
    head = json.dumps(obj).encode()
    raw = b"FGE\x01" + struct.pack(">H", len(head)) + head + bytes(40)
    assert reason_of(envelope.parse, raw, MAX) is Reason.BAD_HEADER


def test_missing_and_extra_header_fields():
    obj = json.loads(header().to_bytes())
    for mutated in ({k: v for k, v in obj.items() if k != "seq"}, {**obj, "admin": True}):
        head = json.dumps(mutated).encode()
        raw = b"FGE\x01" + struct.pack(">H", len(head)) + head + bytes(40)
        assert reason_of(envelope.parse, raw, MAX) is Reason.BAD_HEADER


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_codec_round_trip(dtype):
    tensor = np.linspace(-1, 1, 24, dtype=dtype).reshape(2, 3, 4)
    out = decode_tensor(encode_tensor(tensor), 24)
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    np.testing.assert_array_equal(out, tensor)


def test_codec_refuses_unsupported_arrays():
    with pytest.raises(ValueError):
        encode_tensor(np.arange(3, dtype=np.int64))
    with pytest.raises(ValueError):
        encode_tensor(np.zeros((1,) * 5, np.float32))


def test_huge_declared_shape_is_rejected_without_allocation():
    raw = b"FGT1" + bytes([1, 4, 0, 0]) + struct.pack("<4I", *(2**32 - 1,) * 4)
    assert reason_of(decode_tensor, raw, 10**9) is Reason.OVERSIZED


@pytest.mark.parametrize("mutate, reason", [
    (lambda b: b[:5], Reason.BAD_TENSOR),
    (lambda b: b"XXXX" + b[4:], Reason.BAD_TENSOR),
    (lambda b: b[:4] + bytes([9]) + b[5:], Reason.BAD_DTYPE),
    (lambda b: b[:5] + bytes([0]) + b[6:], Reason.BAD_TENSOR),
    (lambda b: b[:6] + bytes([1]) + b[7:], Reason.BAD_TENSOR),
    (lambda b: b[:-1], Reason.BAD_TENSOR),
    (lambda b: b + b"\x00", Reason.BAD_TENSOR),
    (lambda b: b[:10], Reason.BAD_TENSOR),
])
def test_codec_rejects_mangled_tensors(mutate, reason):
    good = encode_tensor(np.ones(6, np.float32))
    assert reason_of(decode_tensor, mutate(good), 100) is reason
