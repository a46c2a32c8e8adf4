"""The machine a measurement runs on: what it is, how busy it is, and how a process readies the
CPU before it times anything.

Probes: :func:`cpu_name`, :func:`load_average`, :func:`busy_cores` (cores busy right now, from
/proc/stat), :func:`busy_warning`, :func:`flush_writes`, and :func:`environment`, the env.json
of a run (versions, CPU, threads, git commit, command, spec).

Readying the CPU (:func:`prepare_cpu`): torch's intra-op threads are pinned, and the process
keeps freed memory for the next call (effattn.harness.allocator, on glibc): without it, every
block of 32 MiB or more goes back to the OS when freed and the next call faults fresh pages in, a
cost that falls on whichever implementation allocates more. ``--system-malloc`` times with the C
library's malloc as it comes. A benchmark script stores what it got (:meth:`CpuSetup.record`)
beside its numbers and says it in its report (:func:`describe`), with the command that made it
(:func:`command_line`).

    parser = argparse.ArgumentParser()
    machine.add_system_malloc_flag(parser)
    ...
    setup = machine.prepare_cpu(args.threads, system_malloc=args.system_malloc)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from effattn.harness.allocator import keep_freed_memory, meminfo_kib


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]  # the checkout, when run from one
    try:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def flush_writes() -> float | None:
    """Write the file data the OS still holds in memory to disk (``os.sync``), before timing
    starts; returns how much there was, MiB (Dirty + Writeback of /proc/meminfo; None off
    Linux). A fresh install (a venv of torch) leaves hundreds of MiB to write back for minutes,
    and while it does, page faults slow down: ``full``, which allocates an (N, N) matrix a
    call, ran up to 2x slower in the first minutes of sweeps started right after one."""
    fields = meminfo_kib()
    pending = None
    if "Dirty" in fields and "Writeback" in fields:
        pending = round((fields["Dirty"] + fields["Writeback"]) / 1024, 1)
    if hasattr(os, "sync"):
        os.sync()
    return pending


def cpu_jiffies(stat: str | None = None) -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine since boot, in clock ticks, from the ``cpu``
    line of /proc/stat (``stat``: its text; None reads it). Busy is all but idle and iowait.
    None where there is no /proc/stat."""
    if stat is None:
        try:
            with open("/proc/stat") as f:
                stat = f.read()
        except OSError:
            return None
    fields = stat.split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    total = sum(ticks)
    return total - ticks[3] - (ticks[4] if len(ticks) > 4 else 0), total


def busy_cores(window_s: float = 0.25) -> float | None:
    """How many cores other work keeps busy right now: the machine's busy share of CPU time over
    the next ``window_s`` seconds, times the cores (None without /proc/stat). Unlike the load
    average, which still counts a job that ended a minute ago (the first of two back-to-back
    sweeps), it is what a sweep starting now would share the machine with."""
    first = cpu_jiffies()
    time.sleep(window_s)
    second = cpu_jiffies()
    if first is None or second is None or second[1] <= first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])
    return round(share * (os.cpu_count() or 1), 2)


def busy_warning(
    start: Sequence[float] | None,
    end: Sequence[float] | None,
    cpus: int,
    threads: int,
    busy_at_start: float | None = None,
) -> str | None:
    """A sentence when the machine was busy with other work, else None. Busy: more than what
    the sweep leaves free plus half a core busy at the start (``> cpus - threads + 0.5``; cores
    busy just before the sweep, :func:`busy_cores`, where known, else the 1-minute load
    average), or a 1-minute load average above every core plus half a core at the end, when
    the sweep's own threads count in it (``> cpus + 0.5``)."""
    free = max(cpus - threads, 0) + 0.5
    at_start = busy_at_start if busy_at_start is not None else (start[0] if start else None)
    over_start = at_start is not None and at_start > free
    over_end = end is not None and end[0] > cpus + 0.5
    if not (over_start or over_end):
        return None
    busy = "" if busy_at_start is None else f"{busy_at_start:g} cores busy at the start, "
    return (
        f"the machine was busy: {busy}load average (1, 5, 15 min) {start} at the start, {end} "
        f"at the end, on {cpus} CPUs with {threads} threads timing: other processes shared the "
        "cores, so times (less so the ratios taken within rounds) are slower and noisier"
    )


def environment(threads: Iterable[int], spec: dict[str, Any]) -> dict[str, Any]:
    """What a reader needs to trust (or distrust) the numbers."""
    cuda = torch.cuda.is_available()
    status = _git("status", "--porcelain")
    return {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average_start": load_average(),
        "command": sys.argv,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "effattn": _version("effattn"),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": sorted(set(threads)),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cuda_version": torch.version.cuda if cuda else None,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "spec": spec,
    }


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
    (effattn.harness.allocator); load average (1, 5, 15 min) [0.5, 0.6, 0.7] at the start,
    [1.9, 1.1, 0.8] at the end"."""
    memory = (
        "freed memory kept for the next call (effattn.harness.allocator)"
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
