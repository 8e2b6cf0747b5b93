"""The parallel runtime of the rules: worker threads over disjoint column ranges, and the column blocks a range is
walked in.

Updates arrive as one ``(n, d)`` array (``n`` members, ``d`` parameters); at ``n = 100, d = 1_000_000`` a float32
array is 400 MB.  The kernels (:mod:`._kernels`) walk it in column blocks of about ``_BLOCK_ELEMS`` elements
(:func:`block_width`, :func:`iter_blocks`); the column range is split between ``get_num_threads()`` worker threads
(:func:`column_ranges`, :func:`run_ranges`; numpy releases the GIL in every kernel used), with BLAS limited to one
thread meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from numbers import Integral
from typing import Any, TypeVar

import numpy as np

from ._types import PreconditionError

__all__ = ["get_num_threads", "set_num_threads"]

_T = TypeVar("_T")

#: Elements per column block (n * block width).  2**19 elements is 2 MiB of
#: float32 / 4 MiB of float64: it keeps the elementwise work in L2/L3 cache and
#: is still large enough for BLAS to run at full speed.
_BLOCK_ELEMS = 1 << 19
_MIN_BLOCK_COLS = 1024

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
    if k is not None:  # (the runtime sits below the checks module, which uses it: checked here)
        if isinstance(k, bool) or not isinstance(k, Integral):
            raise PreconditionError(f"threads must be an integer, got {k!r}")
        if k < 1:
            raise PreconditionError(f"threads must be >= 1, got {k}")
    with _executor_lock:
        _threads = None if k is None else int(k)
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
