"""The C library's memory allocator, told to keep big freed blocks for reuse. Layer L1.

PyTorch on a CPU allocates every layer's output afresh. glibc serves blocks above its mmap
threshold (32 MiB at most; one convolution's output for 256 wafers x 64 channels at 48 x 48 is
~150 MiB) with a fresh `mmap` and gives them back with `munmap` when freed, so every batch
touches new zeroed pages: page faults, system time. Measured on this project's 2-core machine
(prediction of 2,048 stored WM-811K wafers x 8 views with the served wafercnn at 48, two runs each,
alternating, beside Label Studio serving the simulated engineers): 8.8 M minor page faults, 25-27 s
of system time and 186-189 s of wall time as glibc comes; no page fault, 0.2 s of system time and
109-113 s with big blocks kept (1.65-1.7x faster).

`keep_freed_memory` turns mmap off for big blocks (they come from the heap) and the trimming of
the heap's top off, so freed memory is reused rather than returned. The price: a process keeps its
peak heap until it exits. The rq worker runs each job in its own fork, which exits after the job;
the HTTP backend's peak is bounded by its request limits (`WAFER_MAX_TASKS`); the CLI's commands
end. `WAFER_KEEP_FREED_MEMORY=false` leaves the allocator as glibc sets it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: glibc's `mallopt` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: Freed memory at the heap's top kept rather than returned to the kernel: all of it.
TRIM_THRESHOLD = 2**31 - 1

_kept = False


def keep_freed_memory() -> bool:
    """Keep big freed blocks in this process (and the forks it makes from now on) for reuse.
    Returns whether the allocator took the settings: False where the C library is not glibc
    (nothing changes then). Calling it again does nothing more."""
    global _kept
    if _kept:
        return True
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        log.warning("the C library refused the allocator settings; left as it was")
        return False
    _kept = True
    return True
