"""Freed memory kept in the process on CPU, as torch's CUDA caching allocator keeps it on GPU.

torch's CPU tensors come from the C library's malloc. glibc's hands a block of 32 MiB or more (an
(N, N) float32 score matrix from N = 2896) straight back to the OS when it is freed, and smaller
ones too once the heap's free top passes its trim threshold; the next call maps fresh memory, and
every 4 KiB page of it faults in and is zeroed by the kernel. In a virtual machine a fault also
costs the host work that depends on the host's state: on the project's 2-core VM (Firecracker,
free pages reported to the host) faults were 45% of ``full``'s forward+backward at N = 1024
(176 ms a call against 95 ms with memory kept; 41,000 faults a call against none), and their cost
moved between runs, so the ratios of the backends that allocate the most (full, lsh) did not
repeat. On a GPU, torch's caching allocator keeps freed blocks for the next call, and no time
includes the OS.

:func:`keep_freed_memory` makes a CPU process do the same with glibc's own switches (mallopt):
large blocks come from the heap (``M_MMAP_MAX`` = 0) and the heap is never trimmed
(``M_TRIM_THRESHOLD`` = -1), so a block freed by one call is reused by the next without faults.
Peak memory is unaffected: the meters count allocations, not pages. The sweep's workers call it
(``settings.keep_freed_memory``, on by default; env.json records whether it took effect).
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Callable

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_MAX = -4


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's mallopt, or None where the C library is not glibc on Linux."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def can_keep_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` would take effect here (Linux with glibc)."""
    return _mallopt() is not None


def keep_freed_memory() -> bool:
    """Make this process's malloc keep what is freed for reuse (see the module docstring).
    Returns True when it took effect: Linux with glibc; elsewhere nothing changes (False)."""
    mallopt = _mallopt()
    return (
        mallopt is not None and mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    )
