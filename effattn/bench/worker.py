"""The worker: measures the points of one comparison group in a process of its own, so that a
crash, an out-of-memory or a hang costs one cell, never the sweep.

Workers are forked from a multiprocessing *forkserver* that has imported torch and effattn once
(a fresh interpreter costs ~3 s on the 2-core machine, i.e. minutes over a sweep; a fork from the
server costs ~0.1 s). A group worker (:func:`group_main`) gets the points of one group (same N,
B, H, D, dtype, device, causal, threads and mode: they share one set of inputs) and a schedule
of (round, point) measurements made by the parent (effattn.bench.runner). It:

1. loads the sweep's plugin files (extra backends), pins the CPU thread count; on CPU, makes
   malloc keep freed memory for the next call (effattn.bench.allocator, as CUDA's caching
   allocator does), so that no timing includes the OS mapping and zeroing fresh pages;
2. sets each point up: builds its callable, calls it once (warm-up), chooses the calls per timed
   block (effattn.bench.meters.block_size); on CPU then doubles the kept heap, its pages mapped
   (effattn.bench.allocator.reserve_heap);
3. follows the schedule: each measurement times blocks of calls for ``min_run_time_s / rounds``
   seconds (CPU) or ``cuda_repeats / rounds`` blocks (CUDA); the rounds are interleaved, each
   in its own shuffled order, so a change of machine load lands on every point of a round;
4. measures each point's peak memory (effattn.bench.meters), and for approximate backends the
   error against float64 ``full`` (one reference for the whole group); with ``settings.passes``
   > 1 a group has a worker per pass, and only the last pass's worker does this.

Every step that can fail runs under a memory cap: on CPU the soft RLIMIT_AS is set to the
address space the worker holds plus ``settings.mem_limit_mib`` (Linux/macOS; an allocation
beyond it fails with an out-of-memory error, which becomes the point's ``oom``); on CUDA the
allocator's per-process fraction is set to that many MiB. A point that raises is reported and
dropped from the rest of the schedule; the others go on.

The worker reports over a pipe as it goes (the parent keeps what it hears, so a worker that
dies loses nothing but the measurement it was making)::

    ("begin", key, phase)            about to work on point ``key`` (phase: set-up, round r, ...)
    ("round", key, r, times_ms)      round r of ``key``: per-call ms of each timed block
    ("failed", key, status, reason)  ``key`` raised: status oom or crashed
    ("done", key, fields)            peak_mem_mib, flops, rel_error, device_name, gpu
    ("end",)

The time limit is enforced by the parent, which kills the worker; the parent also learns from
the last "begin" which point a dead worker was measuring.

With several GPUs (``--workers N``) the parent gives each worker one GPU: the worker sets
``CUDA_VISIBLE_DEVICES`` first thing, before anything initialises CUDA (the forkserver never does),
so the point sees exactly one device, ``cuda:0``. Each answer names the device it ran on.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

import effattn.backends  # noqa: F401
from effattn.bench import measure as measure_mod
from effattn.bench import meters
from effattn.bench.allocator import keep_freed_memory, reserve_heap
from effattn.bench.meters import MIB
from effattn.bench.spec import Point, Settings

try:
    import resource
except ImportError:  # Windows: no address-space limit, the parent's timeout still applies
    resource = None  # type: ignore[assignment]

_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def load_plugins(paths: tuple[str, ...] | list[str]) -> None:
    """Import each plugin file (it registers its backends as a side effect)."""
    for i, path in enumerate(paths):
        name = f"effattn_plugin_{i}_{Path(path).stem}"
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"plugins: expected a Python file, got {path!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def _address_space_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    return pages * resource.getpagesize()


class MemoryCap:
    """Context manager: cap further memory growth at ``mib`` MiB (see the module docstring)."""

    def __init__(self, device: str, mib: int) -> None:
        self.device, self.mib, self.saved = device, mib, None

    def __enter__(self) -> MemoryCap:
        budget = self.mib * MIB
        if self.device == "cuda":
            total = torch.cuda.get_device_properties(0).total_memory
            used = torch.cuda.memory_allocated()
            torch.cuda.set_per_process_memory_fraction(min(1.0, (used + budget) / total))
        elif resource is not None and Path("/proc/self/statm").exists():
            self.saved = resource.getrlimit(resource.RLIMIT_AS)
            hard = self.saved[1]
            soft = _address_space_bytes() + budget
            if hard != resource.RLIM_INFINITY:
                soft = min(soft, hard)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
        elif self.saved is not None:
            resource.setrlimit(resource.RLIMIT_AS, self.saved)


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(m in text for m in _OOM_MARKERS)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _device_of(point: Point) -> dict[str, str]:
    """The name of the device the point ran on, and the GPU it was given (if any)."""
    from effattn.bench.store import _cpu_name

    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if point.device == "cuda":
        return {"device_name": torch.cuda.get_device_name(0), "gpu": gpu}
    return {"device_name": _cpu_name(), "gpu": ""}


def failure(err: BaseException) -> tuple[str, str]:
    """(status, reason) of a point that raised ``err``: oom or crashed, with where it raised."""
    if is_oom(err):
        return "oom", _first_line(err)
    tb = traceback.extract_tb(err.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return "crashed", _first_line(err) + where


def _round_budget(point: Point, settings: Settings) -> tuple[float, int, float]:
    """(seconds per round, minimum blocks per round, minimum seconds per block)."""
    if point.device == "cuda":
        return 0.0, math.ceil(settings.cuda_repeats / settings.rounds), 1e-4
    per_round = settings.min_run_time_s / settings.rounds
    return per_round, 1, max(1e-4, per_round / 20)  # about 20 blocks a round at most


def group_main(
    conn: Connection,
    points: list[Point],
    settings: Settings,
    plugins: list[str],
    schedule: list[tuple[int, str]],
    log: Path | None = None,
    gpu: str | None = None,
    finish_points: bool = True,
) -> None:
    """Process target: set up ``points`` (one comparison group), time them following
    ``schedule`` ((round, point key) pairs, in order), then measure their memory and error
    (unless ``finish_points`` is False: a pass before the last), reporting over ``conn`` as
    described in the module docstring. stdout and stderr go to ``log`` (appended) when given;
    ``gpu`` (a CUDA_VISIBLE_DEVICES value) pins the one GPU."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before CUDA is initialised in this process
    first = points[0]
    redirect_output(log, f"{first.describe()} and {len(points) - 1} more of its group")
    load_plugins(plugins)
    kept = first.device == "cpu" and settings.keep_freed_memory and keep_freed_memory()
    torch.set_num_threads(first.threads)
    torch.ones(64, 64) @ torch.ones(64, 64)  # start the thread pool before any cap
    sync = torch.cuda.synchronize if first.device == "cuda" else None
    ready: dict[str, tuple[Point, Callable[[], object], int]] = {}
    shared: tuple | None = None  # q, k, v of the group (modes fwd and fwd_bwd)
    reference = None  # float64 full of the group (error of approximate backends)

    def attempt(point: Point, phase: str, work: Callable[[], Any]) -> Any:
        conn.send(("begin", point.key, phase))
        try:
            with MemoryCap(point.device, settings.mem_limit_mib):
                return work()
        except BaseException as err:  # report, never raise: the parent records a cell
            ready.pop(point.key, None)
            conn.send(("failed", point.key, *failure(err)))
            return None

    for point in points:
        _, _, min_block = _round_budget(point, settings)

        def set_up(point: Point = point, min_block: float = min_block) -> tuple:
            nonlocal shared
            if shared is None and point.mode != "step":
                shared = measure_mod.inputs(point, requires_grad=point.mode == "fwd_bwd")
            torch.manual_seed(0)
            fn = measure_mod.build_callable(point, settings, tensors=shared)
            warm_s = meters.timed(fn, 1, sync)  # the warm-up
            number = meters.block_size(fn, min_block_s=min_block, sync=sync, first_s=warm_s)
            return point, fn, number

        built = attempt(point, "set-up", set_up)
        if built is not None:
            ready[point.key] = built
    if kept:
        reserve_heap()  # room for the rounds' own order of allocations, mapped before timing
    for r, key in schedule:
        if key not in ready:
            continue
        point, fn, number = ready[key]
        per_round, blocks, _ = _round_budget(point, settings)
        times = attempt(
            point,
            f"round {r + 1}/{settings.rounds}",
            lambda fn=fn, number=number, per_round=per_round, blocks=blocks: meters.time_blocks(
                fn, number=number, min_time_s=per_round, min_blocks=blocks, sync=sync
            ),
        )
        if times is not None:
            conn.send(("round", key, r, times))
    for key in list(ready) if finish_points else ():
        point, fn, _ = ready.pop(key)

        def finish(point: Point = point, fn: Callable[[], object] = fn) -> dict[str, Any]:
            nonlocal reference
            if point.device == "cuda":
                peak = meters.peak_memory_cuda(fn)
            else:
                peak = meters.peak_memory_cpu(fn)
            fields = {"peak_mem_mib": peak / MIB, "flops": measure_mod.point_flops(point, settings)}
            if measure_mod.wants_error(point, settings):
                if reference is None:
                    reference = measure_mod.reference_output(point)
                fields["rel_error"] = measure_mod.relative_error(point, reference)
            return {**fields, **_device_of(point)}

        fields = attempt(point, "memory", finish)
        del fn
        if fields is not None:
            conn.send(("done", key, fields))
    conn.send(("end",))
    conn.close()


def redirect_output(log: Path | None, title: str) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C++ and library
    output too) to ``log``, appended, under a ``--- title (pid N)`` line; None: leave them."""
    if log is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    print(f"--- {title} (pid {os.getpid()})", flush=True)
