"""Property tests of the wire format (issue 3, item 6): whatever bytes arrive, the decoder answers with a reason code.

``envelope.parse``, ``envelope.open_sealed`` and ``codec.decode_tensor`` get truncated, extended, bit-flipped,
wrong-key, wrong-version and re-headered envelopes, arbitrary bytes, huge declared shapes, NaN/Inf, unicode and
oversized ids: no exception other than :class:`RejectError` escapes, every rejection carries a :class:`Reason`, any
change to an authentic envelope that still parses fails authentication, and nothing allocates in proportion to a
declared size.
"""

from __future__ import annotations

import math
import struct
import tracemalloc
from dataclasses import asdict

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedguard import envelope
from fedguard.codec import decode_tensor, encode_tensor
from fedguard.envelope import UpdateHeader
from fedguard.reasons import Reason, RejectError

MAX_RECORD = 1 << 20
MAX_ELEMENTS = 4096
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_device = X25519PrivateKey.generate()
_server = X25519PrivateKey.generate()
KEY = envelope.derive_key(_device, _server.public_key(), "dev-0001")
SERVER_KEY = envelope.derive_key(_server, _device.public_key(), "dev-0001")
OTHER_KEY = envelope.derive_key(X25519PrivateKey.generate(), _server.public_key(), "dev-0001")


def sealed_record(n: int = 16, **header) -> bytes:
    fields = dict(device_id="dev-0001", seq=7, base_version=0, num_samples=10, model_id="m")
    fields.update(header)
    return envelope.seal(UpdateHeader.new(**fields), encode_tensor(np.ones(n, np.float32)), KEY)


GOOD = sealed_record()


def outcome(raw: bytes, key: bytes = SERVER_KEY):
    """Parse, open, decode: the decoded array, or the Reason of the first rejection. Anything else propagates."""
    try:
        sealed = envelope.parse(raw, MAX_RECORD)
        return decode_tensor(envelope.open_sealed(sealed, key), MAX_ELEMENTS)
    except RejectError as err:
        assert isinstance(err.reason, Reason) and err.detail
        return err.reason


def header_bytes(raw: bytes) -> bytes:
    (length,) = struct.unpack_from(">H", raw, 4)
    return raw[6:6 + length]


def with_header(raw: bytes, head: bytes) -> bytes:
    """``raw`` with its header replaced by ``head`` (length field adjusted): what a hostile sender can write."""
    (length,) = struct.unpack_from(">H", raw, 4)
    return raw[:4] + struct.pack(">H", len(head) % 65536) + head + raw[6 + length:]


@FUZZ
@given(st.binary(max_size=600))
def test_arbitrary_bytes_get_a_reason(raw):
    assert isinstance(outcome(raw), Reason)


@FUZZ
@given(st.binary(max_size=300))
def test_bytes_after_a_valid_prefix_get_a_reason(tail):
    assert isinstance(outcome(b"FGE" + bytes([envelope.VERSION]) + tail), Reason)


@FUZZ
@given(st.integers(min_value=0, max_value=len(GOOD) - 1))
def test_truncated_envelopes_are_rejected(cut):
    assert outcome(GOOD[:cut]) in (Reason.MALFORMED, Reason.BAD_HEADER, Reason.OVERSIZED, Reason.AUTH_FAILED)


@FUZZ
@given(st.binary(min_size=1, max_size=200))
def test_extended_envelopes_fail_authentication(extra):
    assert outcome(GOOD + extra) is Reason.AUTH_FAILED


@FUZZ
@given(st.lists(st.integers(min_value=0, max_value=len(GOOD) * 8 - 1), min_size=1, max_size=8, unique=True))
def test_any_bit_flip_is_rejected_and_after_parsing_only_by_authentication(bits):
    raw = bytearray(GOOD)
    for bit in bits:
        raw[bit // 8] ^= 1 << (bit % 8)
    result = outcome(bytes(raw))
    assert isinstance(result, Reason)
    try:
        envelope.parse(bytes(raw), MAX_RECORD)
    except RejectError:
        return
    assert result is Reason.AUTH_FAILED  # it still parses: only the AEAD can tell, and it does


@FUZZ
@given(st.integers(min_value=0, max_value=255).filter(lambda v: v != envelope.VERSION))
def test_other_format_versions_are_unsupported(version):
    assert outcome(GOOD[:3] + bytes([version]) + GOOD[4:]) is Reason.UNSUPPORTED_VERSION


@FUZZ
@given(st.binary(min_size=32, max_size=32))
def test_wrong_keys_fail_authentication(key):
    assume(key != SERVER_KEY)
    assert outcome(GOOD, key) is Reason.AUTH_FAILED


def test_a_key_for_another_device_fails_authentication():
    assert outcome(GOOD, OTHER_KEY) is Reason.AUTH_FAILED


def fields_of(raw: bytes) -> dict:
    return asdict(envelope.parse(raw, MAX_RECORD).header)


def with_fields(raw: bytes, **overrides) -> bytes:
    """``raw`` with header fields replaced, encoded as any sender can (:func:`envelope.pack_header`)."""
    return with_header(raw, envelope.pack_header(**{**fields_of(raw), **overrides}))


int64s = st.integers(min_value=-2**63, max_value=2**63 - 1)
ids = st.text(max_size=140).filter(lambda t: len(t.encode()) <= 255)
hostile_fields = st.fixed_dictionaries({}, optional={
    "seq": int64s, "base_version": int64s, "num_samples": int64s,
    "timestamp": st.floats(allow_nan=True, allow_infinity=True),
    "device_id": ids, "update_id": ids, "model_id": ids, "codec": ids})


@FUZZ
@given(hostile_fields)
def test_hostile_headers_are_rejected_before_authentication(fields):
    head = envelope.pack_header(**{**fields_of(GOOD), **fields})
    try:
        sealed = envelope.parse(with_header(GOOD, head), MAX_RECORD)
    except RejectError as err:
        assert err.reason in (Reason.BAD_HEADER, Reason.OVERSIZED)
        return
    # Accepted by the parser: then every field is in its range...
    h = sealed.header
    assert 0 <= h.seq <= 2**53 and 0 <= h.base_version <= 2**53 and math.isfinite(h.timestamp)
    assert all(envelope._ID_BYTES.fullmatch(getattr(h, f).encode()) for f in envelope._ID_FIELDS)
    # ... and unless it is byte for byte the header that was sealed, authentication fails.
    result = outcome(with_header(GOOD, head))
    if head == header_bytes(GOOD):
        assert isinstance(result, np.ndarray)
    else:
        assert result is Reason.AUTH_FAILED


@FUZZ
@given(st.binary(max_size=envelope.MAX_HEADER_BYTES + 40))
def test_arbitrary_header_bytes_get_a_reason(head):
    result = outcome(with_header(GOOD, head))
    assert isinstance(result, Reason)
    if head != header_bytes(GOOD):
        assert result in (Reason.BAD_HEADER, Reason.OVERSIZED, Reason.AUTH_FAILED, Reason.MALFORMED)


@FUZZ
@given(st.text(min_size=1, max_size=200).filter(lambda t: len(t.encode()) <= 255))
def test_unicode_and_odd_device_ids_are_bad_headers(device_id):
    assume(not envelope._ID_BYTES.fullmatch(device_id.encode()))
    assert outcome(with_fields(GOOD, device_id=device_id)) is Reason.BAD_HEADER


def test_trailing_newline_in_an_id_is_not_accepted():
    assert outcome(with_fields(GOOD, device_id="dev-0001\n")) is Reason.BAD_HEADER


def test_bytes_after_the_last_field_are_a_bad_header():
    assert outcome(with_header(GOOD, header_bytes(GOOD) + b"x")) is Reason.BAD_HEADER


def test_an_id_running_past_the_header_is_a_bad_header():
    head = bytearray(header_bytes(GOOD))
    head[-len("fgt1") - 1] = 200  # the codec's length byte: past the end of the header, into the nonce
    assert outcome(with_header(GOOD, bytes(head))) is Reason.BAD_HEADER


def test_a_header_shorter_than_its_numbers_is_a_bad_header():
    assert outcome(with_header(GOOD, header_bytes(GOOD)[:20])) is Reason.BAD_HEADER


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_timestamps_are_bad_headers(value):
    assert outcome(with_fields(GOOD, timestamp=value)) is Reason.BAD_HEADER


@pytest.mark.parametrize("field, value", [("seq", -1), ("seq", 2**53 + 1), ("base_version", -3),
                                          ("base_version", 2**63 - 1)])
def test_out_of_range_integers_are_bad_headers(field, value):
    assert outcome(with_fields(GOOD, **{field: value})) is Reason.BAD_HEADER


@FUZZ
@given(st.integers(min_value=1, max_value=4).flatmap(
    lambda ndim: st.tuples(st.just(ndim), st.lists(st.integers(0, 2**32 - 1), min_size=ndim, max_size=ndim))),
    st.sampled_from([1, 2, 3, 0, 9]), st.integers(min_value=0, max_value=4096))
def test_declared_shapes_never_allocate_their_size(shape, code, body):
    ndim, dims = shape
    buf = b"FGT1" + bytes([code, ndim, 0, 0]) + struct.pack(f"<{ndim}I", *dims) + bytes(body)
    tracemalloc.start()
    try:
        try:
            decode_tensor(buf, MAX_ELEMENTS)
        except RejectError as err:
            assert err.reason in (Reason.OVERSIZED, Reason.BAD_TENSOR, Reason.BAD_DTYPE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # a view of the bytes present, whatever the declared shape


def test_a_huge_record_is_cut_off_before_it_is_parsed():
    big = GOOD + bytes(MAX_RECORD)
    tracemalloc.start()
    try:
        assert outcome(big) is Reason.OVERSIZED
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_parsing_copies_nothing_proportional_to_the_record():
    raw = sealed_record(n=200_000)
    tracemalloc.start()
    try:
        sealed = envelope.parse(raw, 1 << 24)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 and len(sealed.ciphertext) > 800_000


@FUZZ
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=64))
def test_non_finite_values_survive_decoding_for_the_validator_to_reject(values):
    tensor = np.array(values, dtype=np.float32)
    out = decode_tensor(encode_tensor(tensor), MAX_ELEMENTS)
    np.testing.assert_array_equal(out, tensor)  # NaN == NaN here: the codec is lossless, the validator decides
