"""Large buffers straight from the kernel and back to it.

Page images (packbits TIFF, 3-7 MB each) pass through the ingest process and its CPU workers
by the hundred: rendered, pickled between processes, queued. glibc's malloc raises its mmap
threshold to the largest block freed so far (up to 32 MiB), so after the first page these
buffers are carved from the heap arenas of dozens of threads, and the freed holes keep the
processes' resident memory creeping up (about 0.4 MB per page in the ingest process on the
e2e benchmark). A fixed 1 MiB threshold maps and unmaps each such buffer instead; for a page
that costs a few page faults per megabyte, against hundreds of milliseconds of rendering.
"""

from __future__ import annotations

import ctypes
import functools

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
LARGE_BUFFER_BYTES = 1 << 20


@functools.cache
def release_large_buffers() -> bool:
    """Sets a fixed 1 MiB mmap threshold for this process (once); False where the C library
    has no glibc `mallopt` (macOS) or refuses it."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES))


__all__ = ["release_large_buffers"]
