"""Process-wide memory allocator setting for fast CPU steps (no torch import: cheap at start-up)."""

from __future__ import annotations

import ctypes
import os
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory in the process; True if it took effect.

    A training or extraction step frees and re-allocates the same large activation buffers.
    By default glibc serves each large one from a fresh mmap and unmaps it when freed, so every
    step faults all of it in again from the kernel (measured: 36,000-190,000 page faults a step).
    Served from the heap and never trimmed, they are reused instead: Lite2 extraction at 224 px
    ran 1.66x faster, Lite0 training at 128 px 1.13x, ResNet50 training at 224 px 1.11x
    (BENCHMARKS.md). The cost is that the process keeps its peak memory until it exits.
    Set CIFAR_TRANSFER_KEEP_FREED_MEMORY=0 to leave malloc alone. A no-op off glibc.
    """
    if os.environ.get("CIFAR_TRANSFER_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
