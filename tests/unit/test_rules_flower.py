"""Equivalence with Flower's reference implementations
(``flwr.server.strategy.aggregate``) on random inputs.

Flower's functions take ``[(list_of_layer_arrays, num_examples), ...]``; one
layer holding the whole flat update is used here.  Semantics checked against
flwr 1.41:

* ``aggregate(results)``: mean weighted by ``num_examples`` == our
  ``fedavg(updates, sample_counts)`` with no cap.
* ``aggregate_median``: ``np.median(axis=0)`` == ``coordinate_median``.
* ``aggregate_trimmed_avg(results, proportiontocut)`` (there is no
  ``aggregate_trimmed_mean``): ``k = int(beta * n)`` per side, like ours.
* ``aggregate_krum(results, num_malicious, to_keep)``: scores over
  ``max(1, n - f - 2)`` nearest others; ``to_keep=0`` returns the argmin
  update (Krum), ``to_keep=m > 0`` returns the **num_examples-weighted**
  mean of the m lowest-score updates -- our ``multi_krum(..., weights=num_examples)``;
  with equal num_examples it is the paper's uniform Multi-Krum.  Flower does
  not check n > 2f + 2; we do, so inputs here satisfy it.
* ``aggregate_bulyan(results, num_malicious, aggregate_krum, to_keep=0)``:
  iterated Krum on the shrinking set, then coordinate-wise mean of the beta
  values closest to the median == our ``bulyan`` wherever those beta values
  are unique (continuous data).  Where the beta boundary is tied between
  different values (median 0, one slot, both -1 and 1 present: integer or
  quantised updates), Flower keeps whichever ``np.argpartition`` places
  first and we keep the lower member index; both are sets of the definition
  (same total distance to the median), see
  ``test_bulyan_on_tied_data_differs_from_flower_only_in_the_tie_break``.
  It pops from the list it is given, so it gets a copy.

Flower computes in the input's dtype, we accumulate in float64.  On float32
input that can resolve a near-tie differently: in the benchmark (n = 50,
d = 1M, float32) one coordinate of a million differed in Bulyan, where the
beta-th and (beta+1)-th deviations from the median were 1.1735301 and
1.17353016 -- equal in float32 arithmetic.  The large-input test below
therefore uses float64, where Flower's arithmetic is as exact as ours.
"""

from __future__ import annotations

import numpy as np
import pytest

flwr_agg = pytest.importorskip("flwr.server.strategy.aggregate")

from aggregator.rules import (  # noqa: E402
    bulyan,
    coordinate_median,
    fedavg,
    krum,
    multi_krum,
    pairwise_sq_distances,
    trimmed_mean,
)

DTYPES = [np.float64, np.float32]
SEEDS = [0, 1, 2]


def _data(seed: int, n: int, d: int, dtype, n_bad: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, size=(n, d)) + rng.normal(0.0, 1.0, size=d)
    if n_bad:
        x[:n_bad] += rng.normal(0.0, 5.0, size=(n_bad, d))
        rng.shuffle(x, axis=0)
    return x.astype(dtype)


def _results(x: np.ndarray, counts=None):
    counts = [1] * len(x) if counts is None else counts
    return [([row.copy()], int(c)) for row, c in zip(x, counts)]


def _tol(dtype):
    return 1e-6 if dtype == np.float32 else 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_fedavg_matches_flower_aggregate(seed, dtype):
    x = _data(seed, 9, 40, dtype)
    counts = np.random.default_rng(seed).integers(1, 100, size=9)
    ref = flwr_agg.aggregate(_results(x, counts))[0]
    ours = fedavg(x, counts).vector
    np.testing.assert_allclose(ours, ref, rtol=0, atol=_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [7, 8])
@pytest.mark.parametrize("seed", SEEDS)
def test_median_matches_flower(seed, n, dtype):
    x = _data(seed, n, 300, dtype, n_bad=2)
    ref = flwr_agg.aggregate_median(_results(x))[0]
    np.testing.assert_allclose(coordinate_median(x).vector, ref, rtol=0, atol=_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "beta"), [(10, 0.1), (11, 0.2), (20, 0.25), (12, 0.0), (7, 0.45)])
@pytest.mark.parametrize("seed", SEEDS)
def test_trimmed_mean_matches_flower(seed, n, beta, dtype):
    x = _data(seed, n, 300, dtype, n_bad=2)
    ref = flwr_agg.aggregate_trimmed_avg(_results(x), beta)[0]
    np.testing.assert_allclose(trimmed_mean(x, beta).vector, ref, rtol=0, atol=_tol(dtype))


def _flower_distances(x: np.ndarray) -> np.ndarray:
    return flwr_agg._compute_distances([[row] for row in x])


@pytest.mark.parametrize("seed", SEEDS)
def test_distance_matrix_matches_flower(seed):
    x = _data(seed, 12, 200, np.float64, n_bad=3)
    np.testing.assert_allclose(pairwise_sq_distances(x), _flower_distances(x), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "f"), [(7, 2), (12, 3), (20, 4), (5, 0)])
@pytest.mark.parametrize("seed", SEEDS)
def test_krum_selects_the_same_update_as_flower(seed, n, f, dtype):
    x = _data(seed, n, 150, dtype, n_bad=f)
    ref = flwr_agg.aggregate_krum(_results(x), num_malicious=f, to_keep=0)[0]
    flower_idx = [i for i in range(n) if np.array_equal(x[i], ref)]
    res = krum(x, f)
    assert res.selected.tolist() == flower_idx
    np.testing.assert_allclose(res.vector, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "f", "m"), [(7, 2, 3), (12, 3, 9), (20, 4, 10), (20, 4, 1)])
@pytest.mark.parametrize("seed", SEEDS)
def test_multi_krum_matches_flower_equal_counts(seed, n, f, m, dtype):
    x = _data(seed, n, 150, dtype, n_bad=f)
    ref = flwr_agg.aggregate_krum(_results(x), num_malicious=f, to_keep=m)[0]
    np.testing.assert_allclose(multi_krum(x, f, m).vector, ref, rtol=0, atol=_tol(dtype))


@pytest.mark.parametrize(("n", "f", "m"), [(12, 3, 9), (20, 4, 10)])
@pytest.mark.parametrize("seed", SEEDS)
def test_multi_krum_weighted_like_flower(seed, n, f, m):
    """Flower's Multi-Krum weights the selected updates by num_examples."""
    x = _data(seed, n, 150, np.float64, n_bad=f)
    counts = np.random.default_rng(seed + 100).integers(1, 50, size=n)
    ref = flwr_agg.aggregate_krum(_results(x, counts), num_malicious=f, to_keep=m)[0]
    np.testing.assert_allclose(multi_krum(x, f, m, weights=counts).vector, ref, rtol=0, atol=1e-12)
    # ... and the paper's uniform mean differs from it
    assert not np.allclose(multi_krum(x, f, m).vector, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "f"), [(7, 1), (11, 2), (15, 3), (16, 3), (10, 0), (23, 5)])
@pytest.mark.parametrize("seed", SEEDS)
def test_bulyan_matches_flower(seed, n, f, dtype):
    x = _data(seed, n, 200, dtype, n_bad=f)
    ref = flwr_agg.aggregate_bulyan(
        _results(x), num_malicious=f, aggregation_rule=flwr_agg.aggregate_krum, to_keep=0
    )[0]
    np.testing.assert_allclose(bulyan(x, f).vector, ref, rtol=0, atol=_tol(dtype))


def _ambiguous_coordinates(s: np.ndarray, beta: int) -> np.ndarray:
    """Coordinates of the selection ``s`` (theta, d) whose beta closest values to the median are not unique:
    more values than fit lie at the beta-th smallest distance r, and they are not all equal."""
    med = np.median(s, axis=0)
    dist = np.abs(s - med)
    r = np.sort(dist, axis=0)[beta - 1]
    surplus = (dist <= r).sum(axis=0) > beta
    both_sides = ((s == med - r).any(axis=0) & (s == med + r).any(axis=0)) & (r > 0)
    return surplus & both_sides


@pytest.mark.parametrize(("n", "f"), [(11, 2), (15, 3), (19, 4)])
@pytest.mark.parametrize("seed", SEEDS)
def test_bulyan_on_tied_data_differs_from_flower_only_in_the_tie_break(seed, n, f):
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=(n, 500)).astype(np.float64)
    x[:f] *= 7
    ref = flwr_agg.aggregate_bulyan(
        _results(x), num_malicious=f, aggregation_rule=flwr_agg.aggregate_krum, to_keep=0
    )[0]
    res = bulyan(x, f)
    s = x[res.selected]
    beta = res.info["beta"]
    ambiguous = _ambiguous_coordinates(s, beta)
    assert ambiguous.any()  # the data does exercise the tie-break
    differ = ~np.isclose(res.vector, ref, rtol=0, atol=1e-12)
    assert not (differ & ~ambiguous).any(), np.flatnonzero(differ & ~ambiguous)
    # where they differ, both are means of beta values at the same (minimal) total distance from the median:
    # the two means differ by a multiple of 2r / beta (a value med - r swapped for med + r)
    med = np.median(s, axis=0)
    r = np.sort(np.abs(s - med), axis=0)[beta - 1]
    steps = (res.vector - ref)[differ] * beta / (2 * r[differ])
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)


def test_flower_bulyan_precondition_is_ours():
    x = _data(0, 10, 20, np.float64)
    with pytest.raises(ValueError):
        flwr_agg.aggregate_bulyan(_results(x), num_malicious=2, aggregation_rule=flwr_agg.aggregate_krum, to_keep=0)
    with pytest.raises(ValueError, match="4f \\+ 3"):
        bulyan(x, 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_large_inputs_take_the_blocked_multithreaded_path(seed):
    """n * d above the parallel threshold: many column blocks, several threads."""
    n, f, d = 12, 2, 200_000
    x = _data(seed, n, d, np.float64, n_bad=f)
    res = _results(x)
    np.testing.assert_allclose(coordinate_median(x).vector, flwr_agg.aggregate_median(res)[0], atol=1e-12)
    np.testing.assert_allclose(trimmed_mean(x, 0.2).vector, flwr_agg.aggregate_trimmed_avg(res, 0.2)[0], atol=1e-12)
    ref = flwr_agg.aggregate_krum(res, num_malicious=f, to_keep=0)[0]
    np.testing.assert_array_equal(krum(x, f).vector, ref)
    np.testing.assert_allclose(multi_krum(x, f, 6).vector, flwr_agg.aggregate_krum(res, f, 6)[0], atol=1e-12)
    ref = flwr_agg.aggregate_bulyan(list(res), num_malicious=f, aggregation_rule=flwr_agg.aggregate_krum, to_keep=0)[0]
    np.testing.assert_allclose(bulyan(x, f).vector, ref, atol=1e-12)
