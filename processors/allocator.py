"""Allocator tuning for the processors worker (and the validator benchmark, which measures the same code path).

The validator decrypts each update into a fresh buffer (one per record, up to the model's size) and keeps a batch
of them alive until the valid records are sent. With glibc's defaults, freeing a batch leaves more than
``M_TRIM_THRESHOLD`` (128 KiB, adjusted dynamically) free at the top of the heap, so glibc gives it back to the
kernel, and the next batch takes a page fault for every 4 KiB it writes: measured on the validator benchmark, that
costs a third of the throughput at 10k parameters and half at 1M. Raising the trim threshold and the mmap threshold
(to glibc's maximum, 32 MiB) keeps freed buffers in the heap for the next batch: memory stays at its high-water
mark (bounded by ``validate_batch_max_bytes`` plus what the broker client buffers) instead of being returned.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("fedguard.allocator")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 512 * 1024 * 1024  # freed memory kept in the heap up to this much
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit: allocations below it come from the heap


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as above; returns False (and changes nothing) where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                        TRIM_THRESHOLD))
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.info("malloc tuning not available on this platform; continuing with the defaults")
    return ok
