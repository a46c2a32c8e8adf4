"""effattn.harness.allocator: with freed memory kept, a large block freed by one call is reused by
the next without page faults; without it (glibc's default) every call faults its pages in again.
Each case runs in a fresh interpreter, since the switch lasts for the whole process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from effattn.harness import machine
from effattn.harness.allocator import can_keep_freed_memory, meminfo_kib

# Faults while a 256 MiB tensor is filled after ``before`` others were filled and freed: 65,536
# pages of 4 KiB (128 with transparent huge pages) unless the block's pages are already mapped.
# (A kept heap grows twice before a block always fits: torch asks for 64-byte aligned blocks,
# and whether a freed block of the same size holds one depends on where the heap starts, which
# address space randomisation moves; the second fill or the third grows it once more. Three
# fills before: the measured one never grows it.)
_FAULTS_OF_FILL = """
import resource, sys
import torch
from effattn.harness.allocator import keep_freed_memory
from effattn.harness.allocator import reserve_heap
if sys.argv[1] in ("keep", "reserve"):
    assert keep_freed_memory()
if sys.argv[1] == "reserve":
    assert reserve_heap(512 * 2**20) == 512 * 2**20
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(sys.argv[2])):
    x = torch.ones(64 * 2**20)
    del x
before = faults()
x = torch.ones(64 * 2**20)
print(faults() - before)
"""


def _fill_faults(mode: str, before: int) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _FAULTS_OF_FILL, mode, str(before)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(not can_keep_freed_memory(), reason="needs Linux with glibc")
def test_a_freed_block_is_reused_without_page_faults():
    assert _fill_faults("default", 3) >= 64  # the control: glibc unmapped the blocks
    assert _fill_faults("keep", 3) <= 16


@pytest.mark.skipif(not can_keep_freed_memory(), reason="needs Linux with glibc")
def test_a_reserved_heap_has_its_pages_mapped_before_the_first_use():
    assert _fill_faults("keep", 0) >= 64  # the control: a kept heap grows, and faults
    assert _fill_faults("reserve", 0) <= 16


def test_elsewhere_nothing_changes(monkeypatch: pytest.MonkeyPatch):
    import platform

    from effattn.harness import allocator

    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert not allocator.can_keep_freed_memory()
    assert not allocator.keep_freed_memory()
    assert allocator.heap_bytes() is None
    assert allocator.reserve_heap() == 0
    assert allocator.reserve_heap(2**20) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/meminfo is Linux's")
def test_meminfo_reads_the_os_counters_in_kib():
    fields = meminfo_kib()
    assert 0 < fields["MemAvailable"] <= fields["MemTotal"]
    assert fields["Dirty"] >= 0 and fields["Writeback"] >= 0


def test_flush_writes_reports_the_pending_writes_in_mib(monkeypatch):
    synced = []
    monkeypatch.setattr(machine.os, "sync", lambda: synced.append(1))
    monkeypatch.setattr(machine, "meminfo_kib", lambda: {"Dirty": 3072, "Writeback": 1024})
    assert machine.flush_writes() == 4.0 and synced == [1]
    monkeypatch.setattr(machine, "meminfo_kib", dict)  # no /proc/meminfo: unknown, still synced
    assert machine.flush_writes() is None and synced == [1, 1]


def test_meminfo_is_empty_where_the_os_has_none(monkeypatch):
    def no_meminfo(*args, **kwargs):
        raise FileNotFoundError("/proc/meminfo")

    monkeypatch.setattr("builtins.open", no_meminfo)
    assert meminfo_kib() == {}
