"""The C allocator of a CPU training process. glibc's malloc gives large freed blocks back to the
kernel (an mmap'd block at once; the heap's free top above a threshold that it adapts as it goes),
and a training step frees its activations and allocates them again every step: each comes back as
fresh pages, faulted in and zeroed by the kernel inside the step. For the `medium` net on one CPU
thread that was a quarter to a third of the step (benchmarks/RESULTS.md, issue 32's readings).
Fixing both thresholds keeps freed memory in the process for the next step, at the cost of a
resident size that stays at its peak: what a training process reaches anyway, every step.
"""

from __future__ import annotations

import ctypes
import os

# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # bytes: smaller blocks come from the heap (glibc's ceiling for its adaptive one)
TRIM_THRESHOLD = 1 << 30  # bytes of free heap top kept before any is given back
# Set by hand (the environment's tunables, or another allocator preloaded): theirs stands.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def keep_freed_memory(environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """Fix glibc's two thresholds for this process; whether it did (not on other C libraries, nor
    where the environment already sets the allocator)."""
    if not glibc() or any(k in environ for k in USER_SETTINGS):
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # no such name here (macOS, musl)
        return False
