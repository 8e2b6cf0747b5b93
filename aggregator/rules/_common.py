"""Shared pieces of the rules library: errors, the result type, input validation
and the block-wise linear algebra every rule is built on.

Memory and threads
------------------
Updates arrive as one ``(n, d)`` array (``n`` members, ``d`` parameters); at
``n = 100, d = 1_000_000`` a float32 array is 400 MB.  No helper here copies or
up-casts the whole array: they walk it in column blocks of about
``_BLOCK_ELEMS`` elements, convert one block at a time into a reused buffer
and accumulate in float64.  Peak extra memory is therefore a few blocks per
worker thread (a few MB) plus the ``(d,)`` float64 result, whatever ``n * d``
is.  The column range is split between ``get_num_threads()`` worker threads
(numpy releases the GIL in every kernel used), with BLAS limited to one
thread meanwhile.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "AggregateResult",
    "PreconditionError",
    "RuleConfigError",
    "get_num_threads",
    "set_num_threads",
]

_T = TypeVar("_T")

#: Elements per column block (n * block width).  2**19 elements is 2 MiB of
#: float32 / 4 MiB of float64: it keeps the elementwise work in L2/L3 cache and
#: is still large enough for BLAS to run at full speed.
_BLOCK_ELEMS = 1 << 19
_MIN_BLOCK_COLS = 1024


class PreconditionError(ValueError):
    """The input violates a precondition of the rule (wrong shape, too few
    members for the assumed number of Byzantine members, non-finite values,
    mismatched weights, a parameter out of range, ...).

    It subclasses :class:`ValueError`, so callers that already catch
    ``ValueError`` keep working.
    """


class RuleConfigError(ValueError):
    """Unknown rule name, unknown/missing parameter or a parameter value that
    can never be valid (raised by :func:`aggregator.rules.aggregate` and
    :func:`aggregator.rules.validate_config`)."""


@dataclass(frozen=True)
class AggregateResult:
    """What every rule returns.

    Attributes
    ----------
    vector:
        The aggregate, shape ``(d,)``, always float64 (cast it to the model's
        dtype when applying it).
    selected:
        Sorted int64 indices (rows of ``updates``) of the members that
        contributed to ``vector``: the Krum winner, the Multi-Krum/Bulyan
        selection, FLAME's admitted cluster, members with non-zero weight or
        trust; every member for coordinate-wise rules.  May be empty (e.g.
        FLTrust when every trust score is 0); then ``vector`` is all zeros.
    info:
        Rule-specific, JSON-serialisable extras (Python scalars and lists
        only): scores, effective per-member ``weights``, ``clip_norm``,
        ``noise_std``, iteration counts, ...
    rule:
        Registry name of the rule that produced the result.
    """

    vector: np.ndarray
    selected: np.ndarray
    info: Mapping[str, Any] = field(default_factory=dict)
    rule: str = ""

    @property
    def n_selected(self) -> int:
        return int(self.selected.size)


# --------------------------------------------------------------------------- #
# scalar parameter checks (shared with the registry's config validation)
# --------------------------------------------------------------------------- #


def check_int(name: str, value: Any, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise PreconditionError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise PreconditionError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise PreconditionError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise PreconditionError(f"{name} must be finite, got {value!r}")
    if low is not None and (v < low or (low_open and v == low)):
        op = ">" if low_open else ">="
        raise PreconditionError(f"{name} must be {op} {low}, got {value}")
    if high is not None and (v > high or (high_open and v == high)):
        op = "<" if high_open else "<="
        raise PreconditionError(f"{name} must be {op} {high}, got {value}")
    return v


def make_rng(rng: Any) -> np.random.Generator:
    """``rng`` may be a Generator, an int seed or None (fresh OS entropy)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, Integral) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    raise PreconditionError(
        f"rng must be a numpy.random.Generator, an int seed or None, got {type(rng).__name__}"
    )


# --------------------------------------------------------------------------- #
# array validation
# --------------------------------------------------------------------------- #


def as_updates(updates: Any, *, check_finite: bool = True) -> np.ndarray:
    """Validate the ``(n, d)`` update matrix without copying it.

    float32 and float64 arrays are used as they are (any memory layout);
    other real dtypes (ints, bool, float16) are converted to float64.
    ``check_finite=False`` is for callers that detect non-finite input
    themselves from the norms/Gram matrix they compute anyway.
    """
    a = np.asarray(updates)
    if a.ndim != 2:
        raise PreconditionError(
            f"updates must be a 2-D array of shape (n_members, n_params), got shape {a.shape}"
        )
    n, d = a.shape
    if n == 0:
        raise PreconditionError("no updates to aggregate (n = 0)")
    if d == 0:
        raise PreconditionError("updates have no parameters (d = 0)")
    if a.dtype not in (np.float32, np.float64):
        if a.dtype.kind not in "biuf":
            raise PreconditionError(f"updates must be real numbers, got dtype {a.dtype}")
        a = a.astype(np.float64)
    if check_finite:

        def finite(a0: int, a1: int) -> bool:
            return all(bool(np.isfinite(a[:, sl]).all()) for sl in iter_blocks(a0, a1, n))

        if not all(run_ranges(finite, d, n)):
            raise PreconditionError("updates contain NaN or infinite values")
    return a


def as_member_vector(name: str, values: Any, n: int, *, nonneg: bool = False) -> np.ndarray:
    """A per-member vector (weights, counts, trust scores) as float64 ``(n,)``."""
    if values is None:
        raise PreconditionError(f"{name} is required")
    v = np.asarray(values)
    if v.dtype.kind not in "biuf":
        raise PreconditionError(f"{name} must be numbers, got dtype {v.dtype}")
    v = v.astype(np.float64, copy=False)
    if v.ndim != 1 or v.shape[0] != n:
        raise PreconditionError(f"{name} must have one value per update: expected shape ({n},), got {v.shape}")
    if not np.isfinite(v).all():
        raise PreconditionError(f"{name} contains NaN or infinite values")
    if nonneg and (v < 0).any():
        raise PreconditionError(f"{name} must be non-negative, got min {v.min()}")
    return v


def as_param_vector(name: str, value: Any, d: int) -> np.ndarray:
    """A ``(d,)`` vector parameter (server update, center) as float64."""
    if value is None:
        raise PreconditionError(f"{name} is required")
    v = np.asarray(value)
    if v.dtype.kind not in "biuf":
        raise PreconditionError(f"{name} must be numbers, got dtype {v.dtype}")
    v = v.astype(np.float64, copy=False)
    if v.shape != (d,):
        raise PreconditionError(f"{name} must have shape ({d},) like one update, got {np.shape(value)}")
    if not np.isfinite(v).all():
        raise PreconditionError(f"{name} contains NaN or infinite values")
    return v


def check_finite_stats(values: np.ndarray, what: str = "updates") -> None:
    """Raise if norms/Gram entries computed from the updates are not finite,
    which (for float32/64 input) means the updates held NaN/inf or values so
    large that their squares overflow."""
    if not np.isfinite(values).all():
        raise PreconditionError(f"{what} contain NaN or infinite values (or overflow when squared)")


# --------------------------------------------------------------------------- #
# block-wise, multi-threaded traversal
# --------------------------------------------------------------------------- #

_threads: int | None = None
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
_blas_lock = threading.Lock()
_blas_controller: Any = None
#: below this many elements everything runs in the calling thread
_PARALLEL_MIN_ELEMS = 1 << 21
_MAX_DEFAULT_THREADS = 8


def _default_threads() -> int:
    env = os.environ.get("FEDGUARD_AGG_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    # each thread holds a few block buffers (~4 MB each): cap the default
    return max(1, min(cpus, _MAX_DEFAULT_THREADS))


def get_num_threads() -> int:
    """Worker threads the rules use (default: the CPUs this process may run
    on, at most 8, or ``$FEDGUARD_AGG_THREADS``)."""
    global _threads
    if _threads is None:
        _threads = _default_threads()
    return _threads


def set_num_threads(k: int | None) -> None:
    """Set the number of worker threads (``None``: back to the default).
    numpy releases the GIL in the kernels used here (copies, ufuncs, sort,
    partition, BLAS), so threads over disjoint column ranges scale."""
    global _threads, _executor
    with _executor_lock:
        _threads = None if k is None else check_int("threads", k, minimum=1)
        if _executor is not None:
            _executor.shutdown(wait=False)
            _executor = None


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=get_num_threads(), thread_name_prefix="fedguard-agg")
        return _executor


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[bool]:
    """Limit BLAS to one thread while our own threads call it (OpenBLAS's
    threading on skinny ``(n, w) x (w, n)`` products is slower than one
    thread on this kind of machine, and two levels of threads oversubscribe).
    Yields False when threadpoolctl is unavailable: then the caller should not
    run BLAS from several threads.  Serialised by a lock, so concurrent
    aggregations cannot restore each other's limits out of order."""
    global _blas_controller
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        yield False
        return
    with _blas_lock:
        if _blas_controller is None:
            _blas_controller = ThreadpoolController()
        with _blas_controller.limit(limits=1, user_api="blas"):
            yield True


def block_width(rows: int, span: int | None = None) -> int:
    """Columns per block for ``rows`` rows (about ``_BLOCK_ELEMS`` elements),
    at most ``span`` (the width of the range being processed)."""
    w = max(_MIN_BLOCK_COLS, (_BLOCK_ELEMS // max(rows, 1)) // 64 * 64)
    return w if span is None else max(1, min(w, span))


def column_ranges(d: int, rows: int) -> list[tuple[int, int]]:
    """Split ``range(d)`` into one contiguous range per worker thread
    (a single range when the work is small or only one thread is set)."""
    t = get_num_threads()
    if t <= 1 or rows * d < _PARALLEL_MIN_ELEMS:
        return [(0, d)]
    width = block_width(rows)
    nblocks = -(-d // width)
    t = min(t, nblocks)
    if t <= 1:
        return [(0, d)]
    edges = [round(i * nblocks / t) * width for i in range(t + 1)]
    edges[-1] = d
    return [(edges[i], min(edges[i + 1], d)) for i in range(t) if edges[i] < d]


def run_ranges(
    work: Callable[[int, int], _T],
    d: int,
    rows: int,
    *,
    blas: bool = False,
) -> list[_T]:
    """Call ``work(start, stop)`` on disjoint column ranges, in parallel when
    worthwhile, and return the results in range order.  ``blas=True`` when
    ``work`` calls BLAS: BLAS is then limited to one thread meanwhile."""
    def guarded(r: tuple[int, int]) -> _T:
        # non-finite input is detected from the results and reported as a
        # PreconditionError; numpy's warnings about it would only be noise
        with np.errstate(invalid="ignore", over="ignore"):
            return work(*r)

    ranges = column_ranges(d, rows)
    if blas:
        # BLAS is limited to one thread even when we run serially: the
        # products here are skinny (n x w times w x n, n <= a few hundred),
        # where OpenBLAS's own threads only add synchronisation, and spin
        # badly when other processes compete for the cores (a 0.2 s Gram
        # matrix took 18 s with a busy neighbour).
        with _single_threaded_blas() as ok:
            if len(ranges) == 1 or not ok:
                return [guarded((0, d))]
            return list(_pool().map(guarded, ranges))
    if len(ranges) == 1:
        return [guarded((0, d))]
    return list(_pool().map(guarded, ranges))


def iter_blocks(start: int, stop: int, rows: int) -> Iterator[slice]:
    width = block_width(rows)
    for a in range(start, stop, width):
        yield slice(a, min(a + width, stop))


# --------------------------------------------------------------------------- #
# block-wise linear algebra
# --------------------------------------------------------------------------- #


def sq_norms(x: np.ndarray) -> np.ndarray:
    """Squared L2 norm of every row, float64 ``(n,)``."""
    n, d = x.shape

    def work(a0: int, a1: int) -> np.ndarray:
        out = np.zeros(n)
        buf = np.empty((n, block_width(n, a1 - a0)))
        for sl in iter_blocks(a0, a1, n):
            b = buf[:, : sl.stop - sl.start]
            np.copyto(b, x[:, sl])
            out += np.einsum("ij,ij->i", b, b)
        return out

    return sum(run_ranges(work, d, n))


def dots_and_sq_norms(x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(x @ v, ||x_i||^2)`` in float64 with one pass over ``x``."""
    n, d = x.shape

    def work(a0: int, a1: int) -> tuple[np.ndarray, np.ndarray]:
        dots = np.zeros(n)
        sq = np.zeros(n)
        buf = np.empty((n, block_width(n, a1 - a0)))
        for sl in iter_blocks(a0, a1, n):
            b = buf[:, : sl.stop - sl.start]
            np.copyto(b, x[:, sl])
            dots += b @ v[sl]
            sq += np.einsum("ij,ij->i", b, b)
        return dots, sq

    parts = run_ranges(work, d, n, blas=True)
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def row_distances(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``||x_i - v||`` for every row (direct differences, no cancellation)."""
    n, d = x.shape

    def work(a0: int, a1: int) -> np.ndarray:
        out = np.zeros(n)
        buf = np.empty((n, block_width(n, a1 - a0)))
        for sl in iter_blocks(a0, a1, n):
            b = buf[:, : sl.stop - sl.start]
            np.subtract(x[:, sl], v[sl], out=b)
            out += np.einsum("ij,ij->i", b, b)
        return out

    return np.sqrt(sum(run_ranges(work, d, n)))


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
    n, d = x.shape

    def work(a0: int, a1: int) -> np.ndarray:
        g = np.zeros((n, n))
        w = block_width(n, a1 - a0)
        buf = np.empty((n, w), dtype=x.dtype)
        mu = np.empty(w, dtype=x.dtype)
        for sl in iter_blocks(a0, a1, n):
            k = sl.stop - sl.start
            blk = x[:, sl]
            if center:
                m = mu[:k]
                np.add.reduce(blk, axis=0, out=m)
                m *= 1.0 / n
                b = buf[:, :k]
                np.subtract(blk, m, out=b)
            else:
                b = blk
            g += b @ b.T
        return g

    g = sum(run_ranges(work, d, n, blas=True))
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
    r = rows.size if gather else n

    def work(a0: int, a1: int) -> None:
        buf = np.empty((r, block_width(r, a1 - a0)))
        for sl in iter_blocks(a0, a1, r):
            b = buf[:, : sl.stop - sl.start]
            np.copyto(b, x[rows, sl] if gather else x[:, sl])
            np.matmul(c, b, out=out[sl])

    run_ranges(work, d, r, blas=True)
    return out


def to_list(a: np.ndarray) -> list:
    """ndarray -> list of Python scalars, for JSON-serialisable ``info``."""
    return np.asarray(a).tolist()


def result(
    vector: np.ndarray,
    selected: Any,
    info: dict[str, Any],
    rule: str,
) -> AggregateResult:
    sel = np.asarray(selected, dtype=np.int64).reshape(-1)
    sel = np.sort(sel)
    return AggregateResult(vector=np.asarray(vector, dtype=np.float64), selected=sel, info=info, rule=rule)
