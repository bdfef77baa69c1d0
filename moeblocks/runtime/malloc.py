"""The C allocator for CPU training: reuse freed memory instead of handing it back.

On Linux, torch's CPU tensors come from glibc's ``malloc``. With its defaults, a block
larger than the mmap threshold (128 KiB, rising to at most 32 MiB as such blocks are
freed) is a fresh ``mmap`` and goes back to the kernel when freed, and free memory at the
top of the heap is trimmed. A training step allocates and frees the same large
activations and gradients every step, so every step pays the kernel to map and zero
those pages again: a ``tiny`` step took ~6,000 minor page faults. Beside other busy
processes, where a step runs on one thread, that is time the step does not have.

:func:`configure_malloc` raises both thresholds, so freed blocks stay in the process and
are reused: ~60-140 faults per step, and a one-thread ``tiny`` step 9 % faster
(``benchmarks/results/malloc_cpu.md``). The cost is memory: the process keeps its peak heap
instead of shrinking between steps, as a training run does anyway.

It changes process-wide state, so the library never calls it on import; the
``moeblocks`` commands call it at start when run from the shell. It does nothing where
the user chose the allocator's settings (any ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or ``MALLOC_MMAP_MAX_`` in the
environment: set ``MALLOC_TRIM_THRESHOLD_=131072``, glibc's default, to keep the
defaults), where another allocator is preloaded (``LD_PRELOAD`` naming jemalloc,
tcmalloc or mimalloc), or off glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping

__all__ = ["configure_malloc", "malloc_untouched_reason"]

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # blocks below 1 GiB come from the heap; 1 GiB free may stay there

USER_SETTINGS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def malloc_untouched_reason(
    environ: Mapping[str, str] = os.environ, platform: str = sys.platform
) -> str | None:
    """Why :func:`configure_malloc` would leave the allocator alone, or None if it would not."""
    if not platform.startswith("linux"):
        return f"not Linux ({platform})"
    chosen = [name for name in USER_SETTINGS if name in environ]
    if chosen:
        return f"{chosen[0]} is set"
    preload = environ.get("LD_PRELOAD", "")
    other = [name for name in OTHER_ALLOCATORS if name in preload]
    if other:
        return f"{other[0]} is preloaded"
    return None


def configure_malloc(environ: Mapping[str, str] = os.environ) -> bool:
    """Let glibc's malloc keep and reuse freed memory; returns whether it was changed.

    Sets ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to 1 GiB with ``mallopt`` (see the
    module docstring for when it does nothing).

    Args:
        environ: where the user's own allocator settings are looked for.
    """
    if malloc_untouched_reason(environ) is not None:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)
    )
