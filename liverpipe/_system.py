"""Facts about the machine this process runs on."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable

__all__ = ["available_cpus", "release_free_memory"]


def available_cpus() -> int:
    """CPU cores this process may use (respects affinity masks and cgroup pinning)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def release_free_memory() -> None:
    """Hand the memory that the C allocator holds free back to the OS (glibc's
    ``malloc_trim``); a no-op where the C library has no such call."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None
