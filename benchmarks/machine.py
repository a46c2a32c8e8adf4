"""How every benchmark script readies the CPU before it times anything, as the sweep's workers do.

torch's intra-op threads are pinned, and the process keeps freed memory for the next call
(effattn.bench.allocator, on glibc): without it, every block of 32 MiB or more goes back to the
OS when freed and the next call faults fresh pages in, a cost that falls on whichever
implementation allocates more (on the project's 2-core VM it made our ratios against the peers
up to 2.4x too favourable, reports/peers). ``--system-malloc`` times with the C library's malloc
as it comes. Each script stores what it got (:meth:`CpuSetup.record`) beside its numbers and
says it in its report (:func:`describe`; hf_train_step, which writes no report, prints it), with
the command that made it (:func:`command_line`).

    parser = argparse.ArgumentParser()
    machine.add_system_malloc_flag(parser)
    ...
    setup = machine.prepare_cpu(args.threads, system_malloc=args.system_malloc)
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from effattn.bench.allocator import keep_freed_memory
from effattn.bench.store import load_average


@dataclass(frozen=True)
class CpuSetup:
    """What :func:`prepare_cpu` got: the pinned thread count, whether freed memory is kept
    (False with ``--system-malloc`` or off glibc), and the load average when it was called."""

    threads: int
    freed_memory_kept: bool
    load_average_start: list[float] | None

    def record(self) -> dict[str, object]:
        """The fields a report's JSON stores, with the load average now as ``load_average_end``."""
        return {
            "threads": self.threads,
            "freed_memory_kept": self.freed_memory_kept,
            "load_average_start": self.load_average_start,
            "load_average_end": load_average(),
        }


def describe(record: dict[str, object]) -> str:
    """What a report says of the set-up in ``record`` (:meth:`CpuSetup.record`, perhaps read
    back from JSON), e.g. "2 threads pinned; freed memory kept for the next call
    (effattn.bench.allocator); load average (1, 5, 15 min) [0.5, 0.6, 0.7] at the start,
    [1.9, 1.1, 0.8] at the end"."""
    memory = (
        "freed memory kept for the next call (effattn.bench.allocator)"
        if record.get("freed_memory_kept")
        else "the C library's malloc as it comes (freed memory not kept)"
    )
    return (
        f"{record['threads']} threads pinned; {memory}; load average (1, 5, 15 min) "
        f"{record.get('load_average_start')} at the start, {record.get('load_average_end')} at "
        "the end"
    )


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """The command a report was made by, as a shell would take it back:
    ``python -m module arg ...`` (``argv`` None: this process's arguments), each argument quoted
    where it needs to be."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def add_system_malloc_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--system-malloc`` (store_true) to a benchmark script's ``parser``."""
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="time with the C library's malloc as it comes, instead of keeping freed memory "
        "for the next call as the sweep does",
    )


def prepare_cpu(threads: int, *, system_malloc: bool = False) -> CpuSetup:
    """Pin torch's intra-op threads to ``threads`` and, unless ``system_malloc``, keep freed
    memory in this process from now on (it cannot be undone: call it once, before timing)."""
    if threads < 1:
        raise ValueError(f"threads: expected a positive thread count, got {threads!r}")
    torch.set_num_threads(threads)
    kept = not system_malloc and keep_freed_memory()
    return CpuSetup(threads, kept, load_average())
