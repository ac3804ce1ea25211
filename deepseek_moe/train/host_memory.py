"""Opt-in process-wide tuning: keep freed host memory in the process (glibc malloc settings),
so large CPU tensors reuse pages (`trainer.reuse_host_memory=true`; off by default).

Why: glibc serves every allocation above `M_MMAP_THRESHOLD` (128 KB to start with) with a fresh
`mmap` and returns it to the kernel on free. A training step allocates and frees the same large
temporaries every step (logits, attention scores, expert buffers), so on CPU each step
page-faults all of them in again. Raising the mmap threshold to glibc's maximum (32 MB on
64-bit) and the trim threshold to 1 GB keeps those pages in the heap for reuse (its effect on a
CPU training step is in bench/reports/, "host allocator"). Cost: the process keeps up to 1 GB of
freed heap instead of returning it to the OS, which is why it is opt-in: it changes the whole
process, not just our tensors. The same effect is available to any program through the
environment (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`).

Only glibc has `mallopt`; elsewhere (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# <malloc.h> parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's maximum on 64-bit
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024


def keep_freed_host_memory() -> bool:
    """Apply the settings above; True if glibc accepted both."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error
    return (
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    )
