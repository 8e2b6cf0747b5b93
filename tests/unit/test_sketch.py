"""The secret CountSketch: hash, linearity, unbiasedness and variance, and the strict wire codec."""

import base64

import numpy as np
import pytest

from fedguard import sketch as S
from fedguard.sketch import DEFAULT_K, SketchSpec, decode, encode, new_secret_seed, sketch, sketch_rows

SEED = 20240611  # fixed seeds are for tests only: production seeds come from new_secret_seed()


def test_secret_seed_is_fresh_128_bit_and_there_is_no_default():
    seeds = {new_secret_seed() for _ in range(50)}
    assert len(seeds) == 50 and all(isinstance(s, int) and 0 <= s < 1 << 128 for s in seeds)
    with pytest.raises(TypeError):
        SketchSpec(10, 4)  # the seed is required
    spec = SketchSpec.new(100)
    assert spec.k == DEFAULT_K == 1024 and spec.seed >= 0
    assert str(spec.seed) not in repr(spec)  # logging a spec does not leak the seed


@pytest.mark.parametrize("bad", [dict(dim=0, k=4, seed=1), dict(dim=4, k=0, seed=1), dict(dim=4, k=4, seed=-1),
                                 dict(dim=4, k=4, seed=1.5), dict(dim=True, k=4, seed=1)])
def test_spec_validation(bad):
    with pytest.raises((TypeError, ValueError)):
        SketchSpec(**bad)


def test_hash_is_deterministic_keyed_and_cached():
    a = S._hash(SketchSpec(1000, 32, SEED))
    b = S._hash(SketchSpec(1000, 32, SEED))
    assert a[0] is b[0]  # lru_cache per spec
    assert a[0].min() >= 0 and a[0].max() < 32 and set(np.unique(a[1])) == {-1.0, 1.0}
    c = S._hash(SketchSpec(1000, 32, SEED + 1))
    assert (a[0] != c[0]).mean() > 0.9  # another seed, another hash
    # every bucket used, signs balanced (d = 1000 over 32 buckets)
    assert np.bincount(a[0], minlength=32).min() > 10 and abs(a[1].mean()) < 0.15


def test_sketch_matches_the_definition():
    spec = SketchSpec(50, 8, SEED)
    buckets, signs = S._hash(spec)
    x = np.arange(50, dtype=np.float64) - 20
    expected = np.zeros(8)
    for j in range(50):
        expected[buckets[j]] += signs[j] * x[j]
    got = sketch(x, spec)
    assert got.dtype == np.float32 and got.shape == (8,)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def bincount_sketch(mat: np.ndarray, spec: SketchSpec) -> np.ndarray:
    """The previous implementation: np.bincount of the signed float64 terms, i.e. each bucket's terms added one by
    one in ascending coordinate order from 0, in float64 (returned before the rounding to float32)."""
    buckets, signs = S._hash(spec)
    return np.stack([np.bincount(buckets, weights=signs * row, minlength=spec.k) for row in mat])


def wide_values(rows: int, dim: int) -> np.ndarray:
    """float32 values spread over 2^-40 .. 2^40, whose float64 sums depend on the order of the additions."""
    rng = np.random.default_rng(dim)
    return (rng.standard_normal((rows, dim)) * np.exp2(rng.integers(-40, 40, (rows, dim)))).astype(np.float32)


@pytest.mark.parametrize("dim, k", [(159_010, 1024), (3000, 128), (50, 8), (7, 1)])
def test_sketch_is_bit_for_bit_the_ordered_float64_sum(dim, k):
    """The same floats as the definition's terms added in ascending coordinate order in float64 (as np.bincount
    did), before and after the rounding to float32, whatever the input dtype."""
    spec = SketchSpec(dim, k, SEED)
    wide = wide_values(2, dim)
    np.testing.assert_array_equal(S._matrix(spec) @ wide[0].astype(np.float64), bincount_sketch(wide[:1], spec)[0])
    np.testing.assert_array_equal(sketch_rows(wide, spec), bincount_sketch(wide, spec).astype(np.float32))
    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.float16, np.int64, np.uint8, bool):
        other = (rng.standard_normal((2, dim)) * 100).astype(dtype)
        np.testing.assert_array_equal(sketch_rows(other, spec), bincount_sketch(other, spec).astype(np.float32))


def test_the_wide_values_tell_summation_orders_apart():
    """The float64 comparison above can fail: on those values, the same terms added in another order (descending
    coordinates) give other floats."""
    spec = SketchSpec(3000, 128, SEED)
    buckets, signs = S._hash(spec)
    terms = signs * wide_values(1, 3000)[0]
    descending = np.bincount(buckets[::-1], weights=terms[::-1], minlength=128)
    assert not np.array_equal(descending, bincount_sketch(wide_values(1, 3000), spec)[0])


def test_linear_and_rows_agree():
    rng = np.random.default_rng(0)
    spec = SketchSpec(3000, 128, SEED)
    x, y = rng.standard_normal((2, 3000))
    np.testing.assert_allclose(sketch(2 * x - 3 * y, spec), 2 * sketch(x, spec) - 3 * sketch(y, spec),
                               rtol=1e-5, atol=1e-4)
    rows = sketch_rows(np.stack([x, y, x + y]), spec)
    assert rows.shape == (3, 128) and rows.dtype == np.float32
    np.testing.assert_allclose(rows[2], rows[0] + rows[1], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(rows[0], sketch(x, spec))
    with pytest.raises(ValueError):
        sketch_rows(np.zeros((2, 10)), spec)
    with pytest.raises(ValueError):
        sketch(np.zeros((1, 3000)), spec)


def test_inner_product_unbiased_with_the_stated_variance():
    """E<Sx, Sy> = <x, y>; Var = (||x||^2 ||y||^2 + <x,y>^2 - 2 sum x_j^2 y_j^2) / k (Weinberger et al. 2009)."""
    rng = np.random.default_rng(1)
    d, k, trials = 2000, 64, 600
    x = rng.standard_normal(d)
    y = 0.5 * x + rng.standard_normal(d)
    est = np.array([sketch(x, SketchSpec(d, k, s)).astype(np.float64) @ sketch(y, SketchSpec(d, k, s))
                    for s in range(trials)])
    true = x @ y
    var = ((x @ x) * (y @ y) + true ** 2 - 2 * np.sum(x ** 2 * y ** 2)) / k
    assert abs(est.mean() - true) < 4 * np.sqrt(var / trials)
    assert 0.8 < est.var() / var < 1.25


def test_norm_relative_error_is_about_sqrt_2_over_k():
    rng = np.random.default_rng(2)
    d = 20000
    x = rng.standard_normal(d)
    rel = np.array([np.linalg.norm(sketch(x, SketchSpec(d, DEFAULT_K, s))) / np.linalg.norm(x) - 1
                    for s in range(150)])
    assert abs(rel.mean()) < 0.005
    assert 0.7 * np.sqrt(0.5 / DEFAULT_K) < rel.std() < 1.3 * np.sqrt(0.5 / DEFAULT_K)  # ~2.2 % on the norm


def test_codec_round_trip_is_exact_little_endian_float32():
    rng = np.random.default_rng(3)
    sk = rng.standard_normal(16).astype(np.float32)
    text = encode(sk)
    assert base64.b64decode(text) == sk.astype("<f4").tobytes()
    out = decode(text, 16)
    np.testing.assert_array_equal(out, sk)
    assert out.dtype == np.float32 and out.flags.writeable
    assert len(encode(np.zeros(DEFAULT_K))) == 4 * ((4 * DEFAULT_K + 2) // 3)


@pytest.mark.parametrize("k", [15, 17])
def test_decode_rejects_wrong_length(k):
    with pytest.raises(ValueError):
        decode(encode(np.ones(16, dtype=np.float32)), k)


def test_decode_is_strict():
    good = encode(np.ones(4, dtype=np.float32))
    for bad in [good[:-1] + "!", " " + good[1:], good.replace("A", "-"), good[:-4], good + "AAAA"]:
        with pytest.raises(ValueError):
            decode(bad, 4)
    with pytest.raises(ValueError):
        decode(b"AAAA", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        decode(good, 0)
    # a non-canonical encoding of the same bytes (non-zero padding bits) is refused
    raw = base64.b64encode(np.ones(1, dtype="<f4").tobytes()).decode()  # 'AACAPw=='
    tweaked = raw[:5] + chr(ord(raw[5]) + 1) + raw[6:]
    assert base64.b64decode(tweaked) == base64.b64decode(raw)
    with pytest.raises(ValueError):
        decode(tweaked, 1)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected_both_ways(value):
    with pytest.raises(ValueError):
        encode(np.array([1.0, value], dtype=np.float32))
    text = base64.b64encode(np.array([1.0, value], dtype="<f4").tobytes()).decode()
    with pytest.raises(ValueError):
        decode(text, 2)
