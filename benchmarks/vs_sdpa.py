"""Sparse backends against dense torch SDPA in one process: the fraction of SDPA's GFLOP/s.

For each N and mode (``fwd``: forward under no_grad; ``fwd_bwd``: forward, then
``out.backward(grad_out)`` with q, k, v requiring grad, as the sweep does), every backend is
timed interleaved with ``sdpa`` (effattn.bench.interleave: each candidate once per repeat,
threads pinned). FLOPs are each backend's own ``flops()`` (only the pairs it computes; hashing,
sorting and gathers count none), x3.5 for forward+backward, as in effattn.bench.measure. So

    gflops_fraction = (flops_backend / time_backend) / (flops_sdpa / time_sdpa)
                    = flops_backend / flops_sdpa * (median over repeats of t_sdpa / t_backend)

and ``time_over_sdpa`` = median over repeats of t_backend / t_sdpa (< 1: faster than dense).
Both are ratios within one repeat, so machine load that lands on a repeat lands on both.

    .venv/bin/python -m benchmarks.bench_sparse --vs-sdpa     # bigbird, local, strided
    .venv/bin/python -m benchmarks.bench_lsh --vs-sdpa         # lsh
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import effattn
from benchmarks import machine
from effattn.bench.interleave import time_interleaved
from effattn.bench.measure import FWD_BWD_FACTOR

B, H, D = 1, 8, 64
MODES = ("fwd", "fwd_bwd")


@dataclass(frozen=True)
class VsSdpaRow:
    """One backend at one (N, mode), timed interleaved with sdpa."""

    backend: str  # registry name (default options)
    n: int  # sequence length (Nq = Nk)
    mode: str  # fwd or fwd_bwd
    time_ms_median: float  # median over repeats of the backend's per-repeat median
    sdpa_ms_median: float  # the same for sdpa, from the same repeats
    time_over_sdpa: float  # median over repeats of t_backend / t_sdpa (< 1: faster)
    flops_over_sdpa: float  # flops() of the backend / flops() of sdpa
    gflops_fraction: float  # (flops / time) of the backend over that of sdpa
    spread_iqr_over_median: float  # IQR / median of the backend's per-repeat medians
    repeats: int  # interleaved repeats
    threads: int  # torch intra-op threads, pinned


def _call(name: str, n: int, mode: str) -> Callable[[], object]:
    """The timed callable: forward (no_grad) or forward + backward of backend ``name``."""
    gen = torch.Generator().manual_seed(0)
    grad = mode == "fwd_bwd"
    q, k, v = (torch.randn(B, H, n, D, generator=gen).requires_grad_(grad) for _ in range(3))
    grad_out = torch.randn(B, H, n, D, generator=gen)
    backend = effattn.get_backend(name)

    if not grad:
        return torch.no_grad()(lambda: backend(q, k, v, causal=False))

    def run() -> None:
        q.grad = k.grad = v.grad = None
        backend(q, k, v, causal=False).backward(grad_out)

    return run


def vs_sdpa(
    backends: Sequence[str],
    ns: Sequence[int],
    *,
    repeats: int,
    threads: int,
    min_run_s: float = 0.5,
    modes: Sequence[str] = MODES,
) -> list[VsSdpaRow]:
    """One row per (backend, N, mode); each (N, mode) times sdpa and all ``backends`` in one
    interleaved run (bidirectional, B=1, H=8, D=64, float32)."""
    rows = []
    for n in ns:
        for mode in modes:
            names = ["sdpa", *backends]
            calls = {name: _call(name, n, mode) for name in names}
            timed = time_interleaved(
                calls, repeats=repeats, threads=threads, min_run_time_s=min_run_s
            )
            sdpa_flops = effattn.get_backend("sdpa").flops(B, H, n, n, D)
            factor = FWD_BWD_FACTOR if mode == "fwd_bwd" else 1.0
            for name in backends:
                flops = effattn.get_backend(name).flops(B, H, n, n, D)
                time_ratio = timed.ratio(name, "sdpa")
                rows.append(
                    VsSdpaRow(
                        backend=name,
                        n=n,
                        mode=mode,
                        time_ms_median=round(timed.median_ms(name), 1),
                        sdpa_ms_median=round(timed.median_ms("sdpa"), 1),
                        time_over_sdpa=round(time_ratio, 3),
                        flops_over_sdpa=round(flops * factor / (sdpa_flops * factor), 4),
                        gflops_fraction=round(flops / sdpa_flops / time_ratio, 3),
                        spread_iqr_over_median=round(timed.repeat_iqr_over_median(name), 3),
                        repeats=repeats,
                        threads=threads,
                    )
                )
                print(rows[-1], flush=True)
            del calls
    return rows


def markdown(rows: Sequence[VsSdpaRow], command: str, setup: dict[str, object]) -> str:
    """The rows as a markdown report, with the command, the CPU set-up and the machine load
    (``setup``: benchmarks.machine.CpuSetup.record())."""
    cols = list(asdict(rows[0])) if rows else []
    lines = [
        "# Sparse backends vs dense torch SDPA: fraction of SDPA's GFLOP/s",
        "",
        f"Produced by `{command}` (torch {torch.__version__}, B={B}, H={H}, D={D}, float32, "
        "bidirectional). Each (N, mode) times sdpa and the backends interleaved in one "
        "process; gflops_fraction = (flops/time of the backend) / (flops/time of sdpa), "
        "flops from each backend's own flops() (computed pairs only; hashing, sorting and "
        "gathers count none; forward+backward = 3.5x forward for both). time_over_sdpa < 1: "
        "faster than dense SDPA.",
        f"{machine.describe(setup)}; {os.cpu_count()} cores.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(str(x) for x in asdict(r).values()) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(rows: Sequence[VsSdpaRow], out: Path, command: str, setup: dict[str, object]) -> Path:
    """Write the report to ``out`` (a .md file; its folder is created) and return the path;
    ``setup``: benchmarks.machine.CpuSetup.record()."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(rows, command, setup))
    return out
