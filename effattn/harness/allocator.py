"""Freed memory kept in the process on CPU, as torch's CUDA caching allocator keeps it on GPU.

torch's CPU tensors come from the C library's malloc. glibc's hands a block of 32 MiB or more
(``full``'s (B, H, N, N) scores at B = 1, H = 8 from N = 1024) straight back to the OS when it is
freed, and smaller ones too once the heap's free top passes its trim threshold; the next call
maps fresh memory, and every 4 KiB page of it faults in and is zeroed by the kernel. In a virtual
machine a fault also costs the host work: on the project's 2-core VM (Firecracker, free pages
reported to the host) faults were about half of ``full``'s time (forward+backward at N = 1024:
176 ms a call, 41,000 faults, against 95 ms and none with memory kept; forward at N = 4096:
1,050 ms against 560 ms), and a cost that depends on the host's state, not on the attention. On
a GPU, torch's caching allocator keeps freed blocks for the next call, and no time includes the
OS.

:func:`keep_freed_memory` makes a CPU process do the same with glibc's own switches (mallopt):
large blocks come from the heap (``M_MMAP_MAX`` = 0) and the heap is never trimmed
(``M_TRIM_THRESHOLD`` = -1), so a block freed by one call is reused by a later one without
faults. Peak memory is unaffected: the meters count allocations, not pages. The sweep's workers
call it (``settings.keep_freed_memory``, on by default; env.json records whether it took effect).

A kept heap still grows, and faults, until it has room for every point of a group in any order:
the backends cut up each other's freed blocks, and torch asks for 64-byte aligned blocks, which
a freed block of the same size cannot hold. The first interleaved round of a fresh worker faulted
in up to half as much again as the set-up had (``full`` at N = 4096: 958 ms in the first round of
each pass against 560 ms in the second). :func:`reserve_heap` therefore grows the heap by what
the points' set-up left it, faulting its pages in once, before the first round.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Callable
from typing import Any

import torch

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_MAX = -4


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33, malloc.h
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _glibc(name: str) -> Callable[..., Any] | None:
    """glibc's function ``name``, or None where the C library is not glibc on Linux (or is one
    too old to have it)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def _mallopt() -> Callable[[int, int], int] | None:
    mallopt = _glibc("mallopt")
    if mallopt is not None:
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        mallopt.restype = ctypes.c_int
    return mallopt


def heap_bytes() -> int | None:
    """Bytes of the heap malloc got from the OS (mallinfo2's ``arena``); None off glibc."""
    mallinfo2 = _glibc("mallinfo2")
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().arena)


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


def reserve_heap(extra: int | None = None) -> int:
    """Grow the kept heap by ``extra`` bytes (None: by its present size) and fault those pages in
    now, so that allocations up to that much more find them mapped; call after
    :func:`keep_freed_memory`. At most half the memory the OS has available is taken. Returns
    the bytes reserved (0 off glibc, or when the allocation failed)."""
    if _mallopt() is None:
        return 0
    size = heap_bytes() if extra is None else extra
    if not size:
        return 0
    size = min(size, _available_bytes() // 2)
    try:
        block = torch.ones(size // 4, dtype=torch.float32)  # writes every page of it
    except RuntimeError:  # out of memory (a capped address space): reserve nothing
        return 0
    reserved = block.numel() * 4
    del block  # freed into the heap's top, which is never trimmed: the pages stay mapped
    return reserved


def meminfo_kib() -> dict[str, int]:
    """The OS's memory counters, KiB, by name (MemAvailable, Dirty, ...: Linux's /proc/meminfo);
    empty where there is none."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = (line.split(":", 1) for line in meminfo)
            return {name: int(value.split()[0]) for name, value in fields}
    except (OSError, ValueError, IndexError):
        return {}


def _available_bytes() -> int:
    return meminfo_kib().get("MemAvailable", 0) * 1024
