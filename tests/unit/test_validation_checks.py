"""The validator's local checks (no Redis): content checks in order, the norm without a float64 copy, batching."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedguard.codec import decode_tensor, encode_tensor, exact_float32_vector
from fedguard.envelope import UpdateHeader
from fedguard.reasons import Reason, RejectError
from fedguard.settings import Settings
from processors.validation import (NORM_CHUNK, admission_split, byte_bounded, check_content, finite_norm,
                                  sum_of_squares)

N = 1000
S = Settings(max_update_norm=100.0, max_sample_count=500, max_clock_skew_s=60.0)


def header(**overrides):
    fields = dict(device_id="dev-0001", seq=1, base_version=0, num_samples=10, model_id="m")
    fields.update(overrides)
    return UpdateHeader.new(**fields)


def reason(h, payload, now=None):
    with pytest.raises(RejectError) as info:
        check_content(h, payload, num_params=N, settings=S, now=time.time() if now is None else now)
    return info.value.reason


def good(n=N):
    return np.random.default_rng(0).normal(0, 0.01, n).astype(np.float32)


def test_a_good_update_passes_with_its_norm():
    tensor, norm = check_content(header(), encode_tensor(good()), num_params=N, settings=S, now=time.time())
    assert tensor.shape == (N,) and norm == pytest.approx(float(np.linalg.norm(good().astype(np.float64))), 1e-6)


CASES = {  # built when the test runs: headers carry the current time, and clock skew is checked
    "good": (lambda: header(), lambda: encode_tensor(good()), None),
    "zero_samples": (lambda: header(num_samples=0), lambda: encode_tensor(good()), Reason.BAD_SAMPLE_COUNT),
    "negative_samples": (lambda: header(num_samples=-5), lambda: encode_tensor(good()), Reason.BAD_SAMPLE_COUNT),
    "too_many_samples": (lambda: header(num_samples=501), lambda: encode_tensor(good()), Reason.BAD_SAMPLE_COUNT),
    "codec": (lambda: header(codec="npy"), lambda: encode_tensor(good()), Reason.UNSUPPORTED_CODEC),
    "garbage_tensor": (lambda: header(), lambda: b"garbage", Reason.BAD_TENSOR),
    "float64": (lambda: header(), lambda: encode_tensor(good().astype(np.float64)), Reason.BAD_DTYPE),
    "float16": (lambda: header(), lambda: encode_tensor(good().astype(np.float16)), Reason.BAD_DTYPE),
    "short": (lambda: header(), lambda: encode_tensor(good(N - 1)), Reason.BAD_SHAPE),
    "2d": (lambda: header(), lambda: encode_tensor(good().reshape(10, 100)), Reason.BAD_SHAPE),
    "long": (lambda: header(), lambda: encode_tensor(good(N + 1)), Reason.OVERSIZED),
    "norm": (lambda: header(), lambda: encode_tensor(np.full(N, 10.0, np.float32)), Reason.NORM_BOUND),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_content_failure_has_its_code(case):
    make_header, make_payload, expected = CASES[case]
    h, payload = make_header(), make_payload()
    if expected is None:
        check_content(h, payload, num_params=N, settings=S, now=time.time())
    else:
        assert reason(h, payload) is expected


def test_clock_skew_either_way():
    h = header()
    assert reason(h, encode_tensor(good()), now=h.timestamp + 61) is Reason.CLOCK_SKEW
    assert reason(h, encode_tensor(good()), now=h.timestamp - 61) is Reason.CLOCK_SKEW


@pytest.mark.parametrize("where", [0, 1, NORM_CHUNK - 1, NORM_CHUNK, 2 * NORM_CHUNK + 7, -1])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_anywhere_are_non_finite(where, bad):
    tensor = np.zeros(3 * NORM_CHUNK, np.float32)
    tensor[where] = bad
    assert not np.isfinite(sum_of_squares(tensor))
    with pytest.raises(RejectError) as info:
        finite_norm(tensor, 1e30)
    assert info.value.reason is Reason.NON_FINITE


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy says so once; it is the point
def test_finite_values_whose_squares_overflow_float32_are_norm_bound_not_non_finite():
    tensor = np.full(10, 3e38, np.float32)
    with pytest.raises(RejectError) as info:
        finite_norm(tensor, 1e4)
    assert info.value.reason is Reason.NORM_BOUND
    assert finite_norm(tensor, 1e40) == pytest.approx(3e38 * np.sqrt(10), rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=3 * NORM_CHUNK), st.floats(min_value=1e-6, max_value=1e3),
       st.integers(min_value=0, max_value=2**32 - 1))
def test_the_float32_norm_matches_float64(n, scale, seed):
    tensor = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    assert finite_norm(tensor, np.inf) == pytest.approx(float(np.linalg.norm(tensor.astype(np.float64))), rel=1e-5)


def test_the_norm_makes_no_float64_copy():
    tensor = good(1_000_000)
    tracemalloc.start()
    try:
        finite_norm(tensor, np.inf)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # a float64 copy would be 8 MB


def test_byte_bounded_groups_keep_order_and_bound():
    items = [(bytes(n), None, str(i)) for i, n in enumerate([5, 5, 5, 20, 1, 1, 9, 0])]
    groups = byte_bounded(items, 10)
    assert [item for g in groups for item in g] == items
    assert [[len(i[0]) for i in g] for g in groups] == [[5, 5], [5], [20], [1, 1], [9, 0]]
    assert byte_bounded([], 10) == []
    assert byte_bounded([(None, None, "")], 10) == [[(None, None, "")]]


@pytest.mark.parametrize("count", [0, 1, 7, 16, 17, 40, 255, 256, 1000])
def test_admission_split_covers_every_record_once_in_order(count):
    parts = admission_split(count)
    assert [i for start, end in parts for i in range(start, end)] == list(range(count))
    assert all(end > start for start, end in parts)
    if count > 16:  # pipelined: the last part, whose Redis time nothing hides, is the smallest
        assert len(parts) == 3 and parts[-1][1] - parts[-1][0] <= min(end - start for start, end in parts[:-1])


@pytest.mark.parametrize("array", [np.ones(5, np.float64), np.ones(4, np.float32), np.ones((5, 1), np.float32),
                                   np.ones(6, np.float32), np.ones(5, np.float16)])
def test_the_fast_vector_path_declines_anything_but_the_exact_shape(array):
    assert exact_float32_vector(encode_tensor(array), 5) is None


@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=40))
@settings(max_examples=50, deadline=None)
def test_the_fast_vector_path_reads_what_the_decoder_reads(values):
    buf = encode_tensor(np.array(values, np.float32))
    np.testing.assert_array_equal(exact_float32_vector(buf, len(values)), decode_tensor(buf, len(values)))
    assert exact_float32_vector(buf[:-1], len(values)) is None and exact_float32_vector(buf + b"\0" * 4, len(values)) is None
