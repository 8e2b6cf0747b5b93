"""Block-wise kernels over the ``(n, d)`` update matrix: the one block loop (:func:`blockwise`) and what the rules
build on it (finiteness, squared norms, dot products, distances to a vector, the Gram matrix, linear combinations).

Memory: no kernel copies or up-casts the whole array.  :func:`blockwise` walks it in column blocks of about
``_BLOCK_ELEMS`` elements (:mod:`._runtime`), converts one block at a time into a buffer reused for every block of a
thread's column range, and the kernels accumulate in float64.  Peak extra memory is therefore a few blocks per worker
thread (a few MB) plus the ``(d,)`` float64 result, whatever ``n * d`` is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from ._runtime import block_width, iter_blocks, run_ranges

_S = TypeVar("_S")


def _no_state(width: int) -> None:
    return None


def blockwise(
    x: np.ndarray,
    step: Callable[[_S, slice, np.ndarray], None],
    *,
    init: Callable[[int], _S] = _no_state,
    rows: np.ndarray | None = None,
    transpose: bool = False,
    dtype: Any = np.float64,
    load: Callable[[_S, slice, np.ndarray], np.ndarray] | None = None,
    copy: bool = True,
    block_rows: int | None = None,
    blas: bool = False,
) -> list[_S]:
    """The block loop of every kernel: walk the columns of ``x`` (``(n, d)``) block by block, the column range split
    between the worker threads (:func:`._runtime.run_ranges`), calling ``step(state, sl, block)`` for each column
    block ``sl`` of a range, in column order.

    ``block`` is ``x[rows][:, sl]`` (every row when ``rows`` is None), as ``(r, w)`` or, with ``transpose``,
    ``(w, r)`` (one row per coordinate), copied into a buffer of ``dtype`` that is allocated once per range and reused
    for each of its blocks.  ``load(state, sl, buf)``, if given, fills ``buf`` (the block's part of that buffer)
    itself and returns the block; with ``copy=False`` the block is the view ``x[:, sl]`` (no buffer).

    ``init(width)`` makes a range's state (accumulators, scratch for blocks of ``width`` columns); the states are
    returned in range order, so a caller that reduces them in that order gets a result that does not depend on the
    number of threads' timing.  Blocks are about ``_BLOCK_ELEMS / block_rows`` columns wide (``block_rows``: the
    rows the block is sized for, default the rows read); ``blas=True`` when ``step`` calls BLAS.
    """
    r = x.shape[0] if rows is None else len(rows)
    sized_for = block_rows or r

    def work(a0: int, a1: int) -> _S:
        width = block_width(sized_for, a1 - a0)
        if not copy:
            state = init(width)
            for sl in iter_blocks(a0, a1, sized_for):
                step(state, sl, x[:, sl])
            return state
        buf = np.empty((width, r) if transpose else (r, width), dtype=dtype)
        state = init(width)
        for sl in iter_blocks(a0, a1, sized_for):
            k = sl.stop - sl.start
            b = buf[:k] if transpose else buf[:, :k]
            if load is not None:
                b = load(state, sl, b)
            else:  # (the gathered rows are a temporary: freed here, so the next block's can reuse its memory)
                np.copyto(b, _columns(x, rows, sl, transpose))
            step(state, sl, b)
        return state

    return run_ranges(work, x.shape[1], r, blas=blas)


def _columns(x: np.ndarray, rows: np.ndarray | None, sl: slice, transpose: bool) -> np.ndarray:
    block = x[:, sl] if rows is None else x[rows, sl]
    return block.T if transpose else block


def all_finite(x: np.ndarray) -> bool:
    """Whether every element of ``x`` is finite (blocks after the first non-finite one are not checked)."""

    def step(finite: list[bool], sl: slice, b: np.ndarray) -> None:
        if finite[0]:
            finite[0] = bool(np.isfinite(b).all())

    return all(finite[0] for finite in blockwise(x, step, init=lambda width: [True], copy=False))


def sq_norms(x: np.ndarray) -> np.ndarray:
    """Squared L2 norm of every row, float64 ``(n,)``."""
    n = x.shape[0]

    def step(out: np.ndarray, sl: slice, b: np.ndarray) -> None:
        out += np.einsum("ij,ij->i", b, b)

    return sum(blockwise(x, step, init=lambda width: np.zeros(n)))


def dots_and_sq_norms(x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(x @ v, ||x_i||^2)`` in float64 with one pass over ``x``."""
    n = x.shape[0]

    def step(state: tuple[np.ndarray, np.ndarray], sl: slice, b: np.ndarray) -> None:
        dots, sq = state
        dots += b @ v[sl]
        sq += np.einsum("ij,ij->i", b, b)

    parts = blockwise(x, step, init=lambda width: (np.zeros(n), np.zeros(n)), blas=True)
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def row_distances(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``||x_i - v||`` for every row (direct differences, no cancellation)."""
    n = x.shape[0]

    def difference(out: np.ndarray, sl: slice, buf: np.ndarray) -> np.ndarray:
        return np.subtract(x[:, sl], v[sl], out=buf)

    def step(out: np.ndarray, sl: slice, b: np.ndarray) -> None:
        out += np.einsum("ij,ij->i", b, b)

    return np.sqrt(sum(blockwise(x, step, init=lambda width: np.zeros(n), load=difference)))


def gram(x: np.ndarray, *, center: bool) -> np.ndarray:
    """Gram matrix ``G[i, j] = <x_i - c, x_j - c>`` (float64, ``(n, n)``).

    ``center=True`` subtracts, block by block, the coordinate-wise mean ``c``
    of the rows first (``c = 0`` otherwise).  Distances are invariant to that
    shift, and it removes the component all updates share, which is what
    makes ``||x||^2 + ||y||^2 - 2<x, y>`` lose precision when updates are
    close to each other but far from the origin.  (``c`` is computed in the
    input's precision: any shift works, it only has to be the same for
    every row.)

    Each block is multiplied in the input's precision (one SGEMM per block
    for float32 input, DGEMM for float64) and the ``(n, n)`` partial products
    are accumulated in float64.  For float64 input the result is accurate to
    float64 rounding; for float32 input an entry carries a relative error of
    about ``1e-7 * sqrt(block width)`` (~1e-6), far below the spread of the
    distances Krum compares.
    """
    n = x.shape[0]

    def step(state: tuple[np.ndarray, np.ndarray | None], sl: slice, b: np.ndarray) -> None:
        g = state[0]
        g += b @ b.T

    def centered(state: tuple[np.ndarray, np.ndarray], sl: slice, buf: np.ndarray) -> np.ndarray:
        blk = x[:, sl]
        m = state[1][: sl.stop - sl.start]
        np.add.reduce(blk, axis=0, out=m)
        m *= 1.0 / n
        return np.subtract(blk, m, out=buf)

    if center:
        parts = blockwise(x, step, init=lambda width: (np.zeros((n, n)), np.empty(width, dtype=x.dtype)),
                          dtype=x.dtype, load=centered, blas=True)
    else:
        parts = blockwise(x, step, init=lambda width: (np.zeros((n, n)), None), copy=False, blas=True)
    g = sum(p[0] for p in parts)
    # symmetrise: BLAS may round the two triangles differently
    return 0.5 * (g + g.T)


def sq_distances_from_gram(g: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances from a Gram matrix, clamped at 0
    with an exact-zero diagonal."""
    diag = np.diag(g)
    d2 = diag[:, None] + diag[None, :] - 2.0 * g
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    return d2


def combine(x: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """``sum_i coef[i] * x[i]`` in float64 (``(d,)``).

    Rows with a zero coefficient are skipped when they are the majority;
    otherwise it is cheaper to stream every row through one GEMV per block.
    """
    coef = np.asarray(coef, dtype=np.float64)
    n, d = x.shape
    rows = np.flatnonzero(coef)
    out = np.zeros(d)
    if rows.size == 0:
        return out
    gather = rows.size <= n // 2
    c = coef[rows] if gather else coef

    def step(state: None, sl: slice, b: np.ndarray) -> None:
        np.matmul(c, b, out=out[sl])

    blockwise(x, step, rows=rows if gather else None, blas=True)
    return out
