"""Time and memory meters, the one place that measures (sweeps, benchmarks/ and peers use them).

Time: the median and spread of warm runs; torch.utils.benchmark on CPU with the thread count
pinned, CUDA events on GPU. Memory: peak bytes allocated above what was live before the call;
on CPU from the profiler's memory events, on CUDA from max_memory_allocated after a reset.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.benchmark as tbench

MIB = 2**20


@dataclass(frozen=True)
class Timing:
    median_ms: float  # median of the warm runs
    iqr_ms: float  # interquartile range of the warm runs
    runs: int  # number of timed runs


def time_cpu(fn: Callable[[], object], *, threads: int, min_run_time_s: float = 1.0) -> Timing:
    """Warm-run timing on CPU with ``threads`` intra-op threads (torch.utils.benchmark)."""
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    fn()  # warm-up outside the measurement
    m = timer.blocked_autorange(min_run_time=min_run_time_s)
    times_ms = [t * 1e3 for t in m.times]
    return Timing(median_ms=m.median * 1e3, iqr_ms=m.iqr * 1e3, runs=len(times_ms))


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
    return Timing(median_ms=statistics.median(times_ms), iqr_ms=q3 - q1, runs=repeats)


def peak_memory_cpu(fn: Callable[[], object]) -> int:
    """Peak bytes allocated on CPU by ``fn`` above what was live before it (profiler events)."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
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
