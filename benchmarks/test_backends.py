"""pytest-benchmark suite: every registered backend x N x mode, grouped by N (`make bench`).

The timed callables, inputs and FLOP counts are the sweep's own (effattn.sweep.measure), so the
two measure the same thing. Each benchmark records its FLOPs, achieved GFLOP/s, peak memory
above the inputs, device and thread count in extra_info, so a saved JSON is a complete record.
Regression gate: `make bench-check` compares against the last saved run and fails when a median
got slower by more than BENCH_TOLERANCE (default 10%).
"""

from __future__ import annotations

import pytest
import torch

import effattn
from benchmarks.settings import DEVICE, SEQ_LENS, THREADS
from effattn.harness.meters import MIB, peak_memory_cpu, peak_memory_cuda
from effattn.sweep.measure import build_callable, point_flops
from effattn.sweep.spec import Point, Settings

B, H, D = 1, 8, 64
MODES = ["fwd", "fwd_bwd"]


def _point(name: str, n: int, mode: str) -> Point:
    backend = effattn.get_backend(name)
    causal = not backend.supports_bidirectional  # causal-only backends (xl) run causal
    reasons = backend.not_supported_reasons(
        device=DEVICE, dtype=torch.float32, causal=causal, backward=mode == "fwd_bwd"
    )
    if reasons:
        pytest.skip("; ".join(reasons))
    return Point(name, (), n, B, H, D, "float32", DEVICE, causal, THREADS, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", SEQ_LENS)
@pytest.mark.parametrize("name", effattn.list_backends())
def test_attention(benchmark, name: str, n: int, mode: str):
    point = _point(name, n, mode)
    settings = Settings()
    run = build_callable(point, settings)
    run()  # warm-up (and compilation, for backends that compile)
    peak = peak_memory_cuda(run) if DEVICE == "cuda" else peak_memory_cpu(run)
    flops = point_flops(point, settings)
    benchmark.extra_info.update(
        backend=name,
        n=n,
        mode=mode,
        causal=point.causal,
        device=DEVICE,
        threads=THREADS,
        flops=flops,
        peak_mem_mib=round(peak / MIB, 2),
    )
    benchmark.pedantic(run, rounds=5 if n <= 2048 else 3, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: each call ran once, untimed
        return
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["gflops_per_s"] = round(flops / median_s / 1e9, 2)
