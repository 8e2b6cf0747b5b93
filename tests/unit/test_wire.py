"""Envelope and tensor codec: round trips and every way a record can be wrong."""

import struct
from dataclasses import asdict

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedguard import envelope, records
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
    # In the header, flip the low bit of the sequence number (7 -> 6): it still parses, only the AEAD can tell.
    positions = {"header": 6 + 7, "nonce": 6 + header_len,
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


V = bytes([envelope.VERSION])
GOOD_HEADER = header().to_bytes()


def envelope_with(head: bytes, tail: bytes = bytes(40)) -> bytes:
    return b"FGE" + V + struct.pack(">H", len(head)) + head + tail


@pytest.mark.parametrize("raw, reason", [
    (b"", Reason.MALFORMED),
    (b"FG", Reason.MALFORMED),
    (b"XYZ" + V + b"\x00\x02ab" + bytes(40), Reason.MALFORMED),
    (b"FGE\x01" + struct.pack(">H", len(GOOD_HEADER)) + GOOD_HEADER + bytes(40), Reason.UNSUPPORTED_VERSION),
    (b"FGE" + V + b"\xff\xff" + bytes(100), Reason.OVERSIZED),
    (envelope_with(GOOD_HEADER, bytes(10)), Reason.MALFORMED),
    (envelope_with(b"{}"), Reason.BAD_HEADER),
    (envelope_with(GOOD_HEADER[:-1]), Reason.BAD_HEADER),
    (envelope_with(GOOD_HEADER + b"\x00"), Reason.BAD_HEADER),
])
def test_malformed_envelopes(raw, reason):
    assert reason_of(envelope.parse, raw, MAX) is reason


def test_oversized_record_is_rejected_before_parsing():
    assert reason_of(envelope.parse, b"FGE" + V + bytes(2000), 1000) is Reason.OVERSIZED


def test_header_layout_is_the_documented_one():
    h = header()
    head = h.to_bytes()
    seq, base, timestamp, samples = struct.unpack_from(">qqdq", head)
    assert (seq, base, timestamp, samples) == (7, 3, h.timestamp, 120)
    ids, pos = [], 32
    while pos < len(head):
        ids.append(head[pos + 1:pos + 1 + head[pos]].decode())
        pos += 1 + head[pos]
    assert ids == [h.device_id, h.update_id, h.model_id, h.codec] and pos == len(head)
    assert UpdateHeader.from_bytes(head) == h


@pytest.mark.parametrize("field, value", [
    ("seq", -1), ("seq", 2**60), ("base_version", -3),
    ("device_id", ""), ("device_id", "d\u00e9v"), ("device_id", "x" * 200), ("device_id", "dev 1"),
    ("update_id", "a/b"), ("timestamp", float("nan")), ("timestamp", float("inf")),
])
def test_bad_header_fields(field, value):
    head = envelope.pack_header(**{**asdict(header()), field: value})
    assert reason_of(envelope.parse, envelope_with(head), MAX) is Reason.BAD_HEADER


def test_sample_counts_of_any_sign_parse_for_the_content_check():
    head = envelope.pack_header(**{**asdict(header()), "num_samples": -5})
    assert envelope.parse(envelope_with(head), MAX).header.num_samples == -5


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_codec_round_trip(dtype):
    tensor = np.linspace(-1, 1, 24, dtype=dtype).reshape(2, 3, 4)
    out = decode_tensor(encode_tensor(tensor), 24)
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    np.testing.assert_array_equal(out, tensor)


@pytest.mark.parametrize("tensor", [
    np.linspace(-1, 1, 24, dtype=np.float32),
    np.linspace(-1, 1, 24, dtype=">f8").reshape(2, 3, 4),  # big-endian: written little-endian
    np.arange(40, dtype=np.float16).reshape(5, 8)[:, ::2],  # not contiguous
    np.frombuffer(b"\x00" * 12 + np.arange(6, dtype="<f4").tobytes(), "<f4", -1, 12),  # read-only view
])
def test_tensor_bytes_are_the_documented_layout(tensor):
    """The layout of the module docstring, byte for byte (the encoder joins header and elements instead of
    concatenating copies)."""
    little = tensor.dtype.newbyteorder("<")
    expected = (b"FGT1" + bytes([{"f4": 1, "f8": 2, "f2": 3}[little.str[1:]], tensor.ndim, 0, 0])
                + struct.pack(f"<{tensor.ndim}I", *tensor.shape) + np.ascontiguousarray(tensor, little).tobytes())
    assert encode_tensor(tensor) == expected


def test_a_valid_record_is_compact_json_naming_its_tensor_in_the_update_store():
    """No binary framing any more: the tensor is in the update store (fedguard/updatestore.py), the record names it."""
    meta = {"update_id": "u", "norm": 1.5, "raw": {"partition": 0, "offset": 3}, "tensor": "m/3/dev-0001.00ff.f32"}
    raw = records.dumps(meta)
    assert raw == (b'{"norm":1.5,"raw":{"offset":3,"partition":0},"tensor":"m/3/dev-0001.00ff.f32",'
                   b'"update_id":"u"}')  # sorted keys, no spaces, UTF-8
    assert records.loads(raw) == meta
    assert not hasattr(records, "encode_valid") and not hasattr(records, "decode_valid")


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


def test_an_empty_shape_with_huge_other_dims_is_a_bad_tensor():
    # Found by hypothesis: numpy cannot even view an empty array of this shape (its other dims overflow).
    raw = b"FGT1" + bytes([2, 4, 0, 0]) + struct.pack("<4I", 0, 23540, 47081, 1_040_273_662)
    assert reason_of(decode_tensor, raw, 4096) is Reason.BAD_TENSOR
