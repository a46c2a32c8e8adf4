"""Sparse backends against dense torch SDPA in one process: the fraction of SDPA's GFLOP/s.

For each N and mode (``fwd``: forward under no_grad; ``fwd_bwd``: forward, then
``out.backward(grad_out)`` with q, k, v requiring grad, as the sweep does), every backend is a
case (effattn.harness.cases) timed in interleaved rounds with ``sdpa`` (one comparison group per
N and mode, threads pinned), its row written to the run folder with its speed-up vs sdpa taken
per round. FLOPs are each backend's own ``flops()`` (only the pairs it computes; hashing,
sorting and gathers count none), x3.5 for forward+backward, as in effattn.sweep.measure. So

    gflops_fraction = (flops_backend / time_backend) / (flops_sdpa / time_sdpa)
                    = flops_backend / flops_sdpa * (median over rounds of t_sdpa / t_backend)

and ``time_over_sdpa`` = median over rounds of t_backend / t_sdpa (< 1: faster than dense).
Both are ratios within one round, so machine load that lands on a round lands on both.

    .venv/bin/python -m benchmarks.bench_sparse --vs-sdpa     # bigbird, local, strided
    .venv/bin/python -m benchmarks.bench_lsh --vs-sdpa         # lsh
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import effattn
from effattn.harness import cases, machine, table
from effattn.sweep.measure import FWD_BWD_FACTOR

B, H, D = 1, 8, 64
MODES = ("fwd", "fwd_bwd")


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


def vs_sdpa_cases(
    backends: Sequence[str], ns: Sequence[int], modes: Sequence[str] = MODES
) -> list[cases.Case]:
    """sdpa and every backend (default options) at each N and mode: bidirectional, B=1, H=8,
    D=64, float32; each case's FLOPs from its backend's flops() (x3.5 for fwd_bwd)."""
    found = []
    for n in ns:
        for mode in modes:
            factor = FWD_BWD_FACTOR if mode == "fwd_bwd" else 1.0
            for name in ("sdpa", *backends):
                flops = int(effattn.get_backend(name).flops(B, H, n, n, D) * factor)
                found.append(
                    cases.Case(
                        backend=name,
                        label=name,
                        n=n,
                        mode=mode,
                        batch=B,
                        heads=H,
                        head_dim=D,
                        flops=flops,
                        build=lambda name=name, n=n, mode=mode: _call(name, n, mode),
                    )
                )
    return found


def summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One line per backend row beside the sdpa row of its (N, mode), rounded for the report:
    time_ms_median, sdpa_ms_median, time_over_sdpa (median over rounds of t / t_sdpa),
    flops_over_sdpa, gflops_fraction, spread_iqr_over_median (of its per-round medians)."""
    sdpa = {(r["n"], r["mode"]): r for r in rows if r["label"] == "sdpa" and r["status"] == "ok"}
    lines = []
    for row in rows:
        base = sdpa.get((row["n"], row["mode"]))
        if row["label"] == "sdpa" or base is None:
            continue
        line = {"backend": row["label"], "n": row["n"], "mode": row["mode"]}
        time_ratio = cases.ratio(row, base) if row["status"] == "ok" else None
        if time_ratio is None:
            lines.append({**line, "time_ms_median": f"{row['status']}: {row['reason']}"})
            continue
        flops_ratio = row["flops"] / base["flops"]
        lines.append(
            {
                **line,
                "time_ms_median": round(row["time_ms_median"], 1),
                "sdpa_ms_median": round(base["time_ms_median"], 1),
                "time_over_sdpa": round(time_ratio, 3),
                "flops_over_sdpa": round(flops_ratio, 4),
                "gflops_fraction": round(flops_ratio / time_ratio, 3),
                "spread_iqr_over_median": round(cases.spread(row), 3),
                "repeats": row["rounds"],
                "threads": row["threads"],
            }
        )
    return lines


def markdown(rows: Sequence[Mapping[str, Any]], command: str, setup: dict[str, object]) -> str:
    """The rows as a markdown report, with the command, the CPU set-up and the machine load
    (``setup``: effattn.harness.machine.CpuSetup.record())."""
    lines = [
        "# Sparse backends vs dense torch SDPA: fraction of SDPA's GFLOP/s",
        "",
        f"Produced by `{command}` (torch {torch.__version__}, B={B}, H={H}, D={D}, float32, "
        "bidirectional). Each (N, mode) times sdpa and the backends in interleaved rounds in "
        "one process; gflops_fraction = (flops/time of the backend) / (flops/time of sdpa), "
        "flops from each backend's own flops() (computed pairs only; hashing, sorting and "
        "gathers count none; forward+backward = 3.5x forward for both). time_over_sdpa < 1: "
        "faster than dense SDPA.",
        f"{machine.describe(setup)}; {os.cpu_count()} cores.",
        "",
        table.markdown(summary(rows), floatfmt=""),  # each number as rounded (str)
    ]
    return "\n".join(lines) + "\n"


def write(
    rows: Sequence[Mapping[str, Any]], out: Path, command: str, setup: dict[str, object]
) -> Path:
    """Write the report to ``out`` (a .md file; its folder is created) and return the path;
    ``setup``: effattn.harness.machine.CpuSetup.record()."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(rows, command, setup))
    return out
