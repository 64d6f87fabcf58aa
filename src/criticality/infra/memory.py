"""Process-wide allocator settings: the command line applies them once at start-up, never an import.

Library users (a notebook calling ``analyze``) keep their process as it is unless they call
:func:`tune_malloc` themselves.
"""

from __future__ import annotations

import ctypes
import os
import sys

LARGE_BLOCK = 4 << 20  # bytes: allocations this large get their own mapping (glibc's M_MMAP_THRESHOLD)


def tune_malloc() -> None:
    """Let freed tensors of LARGE_BLOCK bytes and more go back to the system at once (glibc only).

    By default glibc raises its mmap threshold to the size of the first large block freed, after which
    freed layers, draws and activations stay in the heap, fragmented: the peak RSS of an fcn-5x2048 analysis
    was 6 model sizes instead of 3.5 (benchmarks/bench_memory.py). A fixed threshold keeps the peak at
    what is alive. Left alone when MALLOC_MMAP_THRESHOLD_ is set or where there is no glibc ``mallopt``.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, LARGE_BLOCK)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        pass
