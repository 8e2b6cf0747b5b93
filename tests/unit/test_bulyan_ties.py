"""Bulyan's coordinate-wise phase on tied data, against the definition (issue 13, item 1).

El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium", ICML 2018,
Sec. 4: per coordinate, the average of the ``beta = theta - 2f`` selected values closest to the coordinate-wise
median of the selection. The reference below is that sentence written as a loop over coordinates; where several
values are equally far from the median at the ``beta`` boundary, it takes the member with the lower index
(the tie-break ``aggregator.rules.bulyan`` documents). Integer-valued updates tie all the time.
"""

from __future__ import annotations

import numpy as np
import pytest

import aggregator.rules._runtime as runtime
from aggregator.rules import bulyan, bulyan_select, get_num_threads, set_num_threads


def naive_bulyan(x: np.ndarray, f: int) -> np.ndarray:
    """The definition, one coordinate at a time (selection by the library's own iterated Krum)."""
    x = np.asarray(x, dtype=np.float64)
    rows = np.sort(bulyan_select(x, f))  # the selection, members in ascending index order
    theta = rows.size
    beta = theta - 2 * f
    out = np.empty(x.shape[1])
    for k in range(x.shape[1]):
        values = [float(v) for v in x[rows, k]]
        med = float(np.median(values))
        closest = sorted(range(theta), key=lambda i: (abs(values[i] - med), i))[:beta]
        out[k] = sum(values[i] for i in closest) / beta
    return out


def test_issue_example():
    # Nine clustered members and six far outliers (n = 15, f = 3): iterated Krum selects exactly the cluster,
    # whose sorted values are the issue's [-2, -2, -2, -2, 0, 1, 1, 2, 2]: theta = 9, beta = 3, median 0.
    x = np.array([-2, -2, -2, -2, 0, 1, 1, 2, 2, 1000, -1000, 3000, -3000, 9000, -9000], dtype=np.float64)[:, None]
    res = bulyan(x, 3)
    assert res.selected.tolist() == list(range(9))
    assert res.info["theta"] == 9 and res.info["beta"] == 3
    # The three values closest to 0 are 0, 1, 1 (distances 0, 1, 1; every other value is 2 away): mean 2/3.
    # The old prefix shortcut averaged -2, 0, 1 (-1/3).
    np.testing.assert_allclose(res.vector, [2 / 3], rtol=0, atol=1e-15)


def test_boundary_tie_goes_to_the_lower_member_index():
    # theta = 9, beta = 3; rows 0..8 hold 4, -1, 0, 1, 0, -4, 6, -6, 8: median 0, distances 4, 1, 0, 1, 0, 4, 6,
    # 6, 8. Both 0s (rows 2, 4) are in; -1 (row 1) and 1 (row 3) tie for the last slot: row 1 wins, (0 + 0 - 1) / 3.
    col = np.array([4, -1, 0, 1, 0, -4, 6, -6, 8], dtype=np.float64)
    far = np.array([1000, -1000, 3000, -3000, 9000, -9000], dtype=np.float64)
    x = np.concatenate([col, far])[:, None]
    assert np.sort(bulyan_select(x, 3)).tolist() == list(range(9))
    np.testing.assert_allclose(bulyan(x, 3).vector, [-1 / 3], atol=1e-15)
    # Swap rows 1 and 3: the 1 now has the lower index and wins.
    x[[1, 3]] = x[[3, 1]]
    np.testing.assert_allclose(bulyan(x, 3).vector, [1 / 3], atol=1e-15)


CASES = [(7, 1), (11, 2), (15, 3), (16, 3), (19, 4), (23, 5), (10, 0)]


@pytest.mark.parametrize(("n", "f"), CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tied_integer_updates_match_the_definition(seed, n, f):
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=(n, 400)).astype(np.float64)
    x[:f] *= 7  # the Byzantine rows: larger integers
    np.testing.assert_allclose(bulyan(x, f).vector, naive_bulyan(x, f), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tied_integer_updates_blocked_and_parallel(monkeypatch, dtype):
    """The same on many small column blocks split between threads (the large-input path)."""
    monkeypatch.setattr(runtime, "_BLOCK_ELEMS", 64)
    monkeypatch.setattr(runtime, "_MIN_BLOCK_COLS", 3)
    monkeypatch.setattr(runtime, "_PARALLEL_MIN_ELEMS", 1)
    old = get_num_threads()
    set_num_threads(3)
    try:
        rng = np.random.default_rng(7)
        x = rng.integers(-2, 3, size=(15, 301)).astype(dtype)
        np.testing.assert_allclose(bulyan(x, 3).vector, naive_bulyan(x, 3), rtol=0, atol=1e-12)
    finally:
        set_num_threads(old)
