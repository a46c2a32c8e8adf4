"""Time and memory meters, the one place that measures (sweeps, benchmarks/ and peers use them).

Time: the median and spread of warm runs; torch.utils.benchmark on CPU with the thread count
pinned, CUDA events on GPU. The sweep's interleaved rounds time blocks of calls instead
(:func:`block_size` once per point, then :func:`time_blocks` once per round), so that a round
costs no warm-up or calibration of its own. Memory: peak bytes allocated above what was live
before the call; on CPU from the profiler's memory events, on CUDA from max_memory_allocated
after a reset.

The profiler's own notes (kineto's ``[USDT:...] profiler_start``/``profiler_stop`` and ``STAGE:``
lines, and the allocator's "Memory block of unknown size was allocated before the profiling
started", written to file descriptor 2) are kept off the user's terminal: :func:`peak_memory_cpu`
holds stderr while it profiles and writes back everything else the call printed.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.utils.benchmark as tbench

MIB = 2**20


@dataclass(frozen=True)
class Timing:
    median_ms: float  # median of the warm runs
    iqr_ms: float  # interquartile range of the warm runs
    runs: int  # number of timed runs
    times_ms: tuple[float, ...] = ()  # each timed run's time per call, in the order taken


def time_cpu(fn: Callable[[], object], *, threads: int, min_run_time_s: float = 1.0) -> Timing:
    """Warm-run timing on CPU with ``threads`` intra-op threads (torch.utils.benchmark)."""
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    fn()  # warm-up outside the measurement
    m = timer.blocked_autorange(min_run_time=min_run_time_s)
    times_ms = [t * 1e3 for t in m.times]
    return Timing(m.median * 1e3, m.iqr * 1e3, len(times_ms), tuple(times_ms))


def time_cuda(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20) -> Timing:
    """Warm-run timing on the current CUDA device with CUDA events, one event pair per run."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times_ms = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times_ms.append(start.elapsed_time(end))
    q1, _, q3 = statistics.quantiles(times_ms, n=4)
    return Timing(statistics.median(times_ms), q3 - q1, repeats, tuple(times_ms))


def block_size(
    fn: Callable[[], object],
    *,
    min_block_s: float,
    sync: Callable[[], None] | None = None,
    first_s: float | None = None,
) -> int:
    """Calls per timed block: the smallest power of 10 whose block lasts ``min_block_s`` or more,
    from one timed call of the (already warm) ``fn``. ``sync`` (CUDA: torch.cuda.synchronize)
    is called before and after. ``first_s``: the time of the warm-up call; when it lasted
    ``min_block_s`` or more, the block is one call and no call is made here (a slow call costs
    no calibration)."""
    if first_s is not None and first_s >= min_block_s:
        return 1
    one = timed(fn, 1, sync)
    if one >= min_block_s:
        return 1
    return 10 ** math.ceil(math.log10(min_block_s / one))


def time_blocks(
    fn: Callable[[], object],
    *,
    number: int,
    min_time_s: float = 0.0,
    min_blocks: int = 1,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Time blocks of ``number`` calls of the warm ``fn`` until ``min_time_s`` has passed and
    ``min_blocks`` blocks were timed; returns each block's time per call in ms. The garbage
    collector is off while a block runs (as in timeit); the caller pins the thread count."""
    times_ms: list[float] = []
    spent = 0.0
    while spent < min_time_s or len(times_ms) < min_blocks:
        seconds = timed(fn, number, sync)
        spent += seconds
        times_ms.append(seconds * 1e3 / number)
    return times_ms


def timed(fn: Callable[[], object], number: int, sync: Callable[[], None] | None = None) -> float:
    """Seconds that ``number`` calls of ``fn`` take, the garbage collector off (as in timeit);
    ``sync`` is called before and after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        if sync is not None:
            sync()
        start = time.perf_counter()
        for _ in range(number):
            fn()
        if sync is not None:
            sync()
        return max(time.perf_counter() - start, 1e-9)
    finally:
        if enabled:
            gc.enable()


_PROFILER_NOTE = re.compile(  # kineto's notes; the allocator's warning about blocks from before
    rb"^(USDT|STAGE):\S+ \S+ \d+:\d+ \S+\.cpp:\d+\] "
    rb"|^\[W\d+ \S+ (\d+ )?CPUAllocator\.cpp:\d+\] Memory block of unknown size was allocated "
    rb"before the profiling started"
)


@contextlib.contextmanager
def _without_profiler_notes() -> Iterator[None]:
    """Hold file descriptor 2 in a temporary file; then write back to it every line but the
    profiler's own notes (``USDT:... profiler_start``, ``STAGE:... Completed Stage``)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                held.seek(0)
                kept = [x for x in held.read().splitlines(True) if not _PROFILER_NOTE.match(x)]
                if kept:
                    os.write(2, b"".join(kept))
    finally:
        os.close(saved)


def peak_memory_cpu(fn: Callable[[], object]) -> int:
    """Peak bytes allocated on CPU by ``fn`` above what was live before it (profiler events).
    The profiler's notes on stderr are dropped; anything else printed is kept."""
    with (
        _without_profiler_notes(),
        torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof,
    ):
        fn()
    # Every allocation and free is a "[memory]" record with +bytes or -bytes (from any thread);
    # the peak of their running sum in time order is the extra memory at the call's worst moment.
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(records, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def peak_memory_cuda(fn: Callable[[], object]) -> int:
    """Peak bytes allocated on the current CUDA device by ``fn`` above what was live before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
