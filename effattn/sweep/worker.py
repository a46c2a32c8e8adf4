"""The worker: measures the points of one comparison group in a process of its own, so that a
crash, an out-of-memory or a hang costs one cell, never the sweep.

Workers are forked from a multiprocessing *forkserver* that has imported torch and effattn once
(a fresh interpreter costs ~3 s on the 2-core machine, i.e. minutes over a sweep; a fork from the
server costs ~0.1 s). A group worker (:func:`group_main`) gets the points of one group (same N,
B, H, D, dtype, device, causal, threads and mode: they share one set of inputs) and a schedule
of (round, point) measurements made by the parent (effattn.sweep.runner). It:

1. loads the sweep's plugin files (extra backends), pins the CPU thread count; on CPU, makes
   malloc keep freed memory for the next call (effattn.harness.allocator, as CUDA's caching
   allocator does), so that no timing includes the OS mapping and zeroing fresh pages;
2. sets each point up: builds its callable, calls it once (warm-up), chooses the calls per timed
   block (effattn.harness.meters.block_size); on CPU then doubles the kept heap, its pages mapped
   (effattn.harness.allocator.reserve_heap);
3. follows the schedule: each measurement times blocks of calls for ``min_run_time_s / rounds``
   seconds (CPU) or ``cuda_repeats / rounds`` blocks (CUDA); the rounds are interleaved, each
   in its own shuffled order, so a change of machine load lands on every point of a round;
4. measures each point's peak memory (effattn.harness.meters), and for approximate backends the
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

import math
import os
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

import effattn.backends  # noqa: F401
from effattn.harness import meters
from effattn.harness.allocator import keep_freed_memory, reserve_heap
from effattn.harness.machine import cpu_name
from effattn.harness.meters import MIB
from effattn.harness.worker import MemoryCap, failure, load_plugins, redirect_output
from effattn.sweep import measure as measure_mod
from effattn.sweep.spec import Point, Settings


def _device_of(point: Point) -> dict[str, str]:
    """The name of the device the point ran on, and the GPU it was given (if any)."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if point.device == "cuda":
        return {"device_name": torch.cuda.get_device_name(0), "gpu": gpu}
    return {"device_name": cpu_name(), "gpu": ""}


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
            if shared is None and point.mode in ("fwd", "fwd_bwd"):
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
            if isinstance(fn, measure_mod.DecodeStep):  # what decoding keeps between tokens
                fields["state_mib"] = fn.state.nbytes / MIB
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
