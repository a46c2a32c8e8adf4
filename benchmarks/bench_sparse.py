"""effattn's sparse backends (`local`, `strided`, `bigbird`) against their public peers on CPU.

Peers, all called on the same (B, H, N, D) tensors in one process:
  - torch.compile(flex_attention) with a create_block_mask of the same sliding window
    (|q - kv| <= w, causal 0 <= q - kv <= w); forward only (no CPU backward for flex).
  - local-attention 1.11.2 ``LocalAttention(window_size=w, exact_windowsize=True,
    use_rotary_pos_emb=False)``: with look_backward = look_forward = 1 it keeps exactly
    |i - j| <= w (causal: 0 <= i - j <= w); checked against ours below (max |diff|).
  - HF transformers BigBirdBlockSparseAttention (block 64, 3 random blocks, train mode so that
    random blocks are drawn, dropout 0) with its query/key/value projections replaced by the
    identity so that only the attention core runs, as ours.
Timings are interleaved (each candidate once per repeat, effattn.bench.interleave with
meters.time_cpu and the thread count pinned; freed memory kept for the next call, as in the sweep:
benchmarks.machine, ``--system-malloc`` times with the C library's malloc as it comes); tables give
the median over repeats of each repeat's median, the spread (IQR / median of the repeats' medians)
and peer / ours (the median of per-repeat ratios). Peak memory: bytes allocated above the inputs
during one forward (meters.peak_memory_cpu). Memory exponents: the slope of log(peak) over log(N)
for N = 2K..32K, and peak(16K) / peak(4K) (target <= 4.5).

    .venv/bin/python -m benchmarks.bench_sparse                      # writes reports/sparse/
    .venv/bin/python -m benchmarks.bench_sparse --repeats 2 --no-peers --mem-ns 2048,4096
    .venv/bin/python -m benchmarks.bench_sparse --only "local bidirectional forward" \
        --repeats 7 --mem-ns 4096,16384 --out reports/sparse/local_forward
    .venv/bin/python -m benchmarks.bench_sparse --vs-sdpa   # fraction of SDPA's GFLOP/s only:
        # bigbird, local, strided at N = 1K, 2K, 4K, fwd and fwd_bwd -> reports/sparse/vs_sdpa.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

import effattn
from benchmarks import machine, vs_sdpa
from effattn.bench.interleave import time_interleaved
from effattn.bench.meters import MIB, peak_memory_cpu
from effattn.ops import clear_cache

B, H, D, WINDOW = 1, 8, 64, 256
CEILING_GFLOPS = 177  # 2-thread fp32 matmul ceiling of the project's CPU (anchors.md)


def _inputs(n: int, grad: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, n, D, generator=g).requires_grad_(grad) for _ in range(3))


def _fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        fn().sum().backward()

    return run


def ours(name: str, n: int, causal: bool, grad: bool, **options) -> Callable[[], object]:
    backend = effattn.get_backend(name, **options)
    q, k, v = _inputs(n, grad)

    def call() -> torch.Tensor:
        return backend(q, k, v, causal=causal)

    return _fwd_bwd(call) if grad else torch.no_grad()(call)


def flex(n: int, causal: bool) -> Callable[[], object]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def window(b, h, q_idx, kv_idx):
        keep = (q_idx - kv_idx <= WINDOW) & (kv_idx - q_idx <= WINDOW)
        return keep & (kv_idx <= q_idx) if causal else keep

    mask = create_block_mask(window, None, None, n, n, device="cpu")
    compiled = torch.compile(flex_attention)
    q, k, v = _inputs(n)
    return torch.no_grad()(lambda: compiled(q, k, v, block_mask=mask))


def local_attention_peer(n: int, causal: bool, grad: bool) -> Callable[[], object]:
    from local_attention import LocalAttention

    layer = LocalAttention(
        window_size=WINDOW, causal=causal, exact_windowsize=True, use_rotary_pos_emb=False
    )
    q, k, v = _inputs(n, grad)

    def call() -> torch.Tensor:
        return layer(q, k, v)

    return _fwd_bwd(call) if grad else torch.no_grad()(call)


def hf_bigbird(n: int, grad: bool) -> Callable[[], object]:
    from torch import nn
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import (
        BigBirdBlockSparseAttention,
        BigBirdModel,
    )

    config = BigBirdConfig(
        hidden_size=H * D,
        num_attention_heads=H,
        attention_type="block_sparse",
        block_size=64,
        num_random_blocks=3,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=n,
    )
    layer = BigBirdBlockSparseAttention(config, seed=0).train()
    layer.query = layer.key = layer.value = nn.Identity()  # the attention core only
    hidden = _inputs(n, grad)[0].transpose(1, 2).reshape(B, n, H * D).detach()
    hidden.requires_grad_(grad)
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
        torch.ones(B, n), 64
    )

    def call() -> torch.Tensor:
        return layer(hidden, band, from_mask, to_mask, blocked, blocked)[0]

    return _fwd_bwd(call) if grad else torch.no_grad()(call)


def alignment_check(n: int) -> dict[str, float]:
    """Max |ours - peer| of the local window outputs (same pattern, same scale)."""
    from local_attention import LocalAttention

    q, k, v = _inputs(n)
    diffs = {}
    with torch.no_grad():
        for causal in (False, True):
            peer = LocalAttention(
                window_size=WINDOW, causal=causal, exact_windowsize=True, use_rotary_pos_emb=False
            )(q, k, v)
            mine = effattn.attention(q, k, v, "local", window=WINDOW, causal=causal)
            diffs[f"local-attention causal={causal}"] = float((peer - mine).abs().max())
    return diffs


def timing_cases(n: int, peers: bool) -> dict[str, dict[str, Callable[[], Callable[[], object]]]]:
    """Groups of candidates timed side by side; the first of each group is ours (the baseline)."""
    groups: dict[str, dict[str, Callable[[], Callable[[], object]]]] = {}
    for causal in (False, True):
        tag = "causal" if causal else "bidirectional"
        fwd = {f"effattn local w={WINDOW}": lambda c=causal: ours("local", n, c, False)}
        bwd = {f"effattn local w={WINDOW}": lambda c=causal: ours("local", n, c, True)}
        if peers:
            fwd["flex_attention (compiled)"] = lambda c=causal: flex(n, c)
            fwd["local-attention 1.11.2"] = lambda c=causal: local_attention_peer(n, c, False)
            bwd["local-attention 1.11.2"] = lambda c=causal: local_attention_peer(n, c, True)
        groups[f"local {tag} forward"] = fwd
        groups[f"local {tag} forward+backward"] = bwd
    for grad in (False, True):
        mode = "forward+backward" if grad else "forward"
        group = {"effattn bigbird b=64 r=3": lambda g=grad: ours("bigbird", n, False, g)}
        if peers:
            group["HF BigBirdBlockSparseAttention"] = lambda g=grad: hf_bigbird(n, g)
        groups[f"bigbird bidirectional {mode}"] = group
    for causal in (False, True):
        tag = "causal" if causal else "bidirectional"
        groups[f"strided {tag} forward"] = {
            "effattn strided (defaults)": lambda c=causal: ours("strided", n, c, False),
            "torch SDPA (dense)": lambda c=causal: sdpa(n, c),
        }
    return groups


def sdpa(n: int, causal: bool) -> Callable[[], object]:
    q, k, v = _inputs(n)
    return torch.no_grad()(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    )


def run_timings(
    n: int, repeats: int, threads: int, peers: bool, min_run_s: float, only: str = ""
) -> list[dict]:
    """One row per candidate of each case containing ``only``: time_ms_median (median over
    repeats), spread_iqr_over_median (IQR / median of the repeats' medians), ratio_to_ours
    (median of per-repeat candidate / ours ratios), peak_mem_mib and repeats_ms."""
    rows = []
    for group, candidates in timing_cases(n, peers).items():
        if only not in group:
            continue
        fns = {name: make() for name, make in candidates.items()}
        timed = time_interleaved(fns, repeats=repeats, threads=threads, min_run_time_s=min_run_s)
        base = next(iter(fns))
        for name, fn in fns.items():
            rows.append(
                {
                    "case": group,
                    "implementation": name,
                    "time_ms_median": round(timed.median_ms(name), 1),
                    "spread_iqr_over_median": round(timed.repeat_iqr_over_median(name), 3),
                    "ratio_to_ours": round(timed.ratio(name, base), 2),
                    "peak_mem_mib": round(peak_memory_cpu(fn) / MIB, 1),
                    "repeats_ms": [round(m, 1) for m in timed.times_ms(name)],
                }
            )
            print(rows[-1], flush=True)
        del fns
    return rows


def memory_exponents(ns: list[int]) -> list[dict]:
    rows = []
    for name, options in (("local", {"window": WINDOW}), ("strided", {}), ("bigbird", {})):
        for causal in (False, True) if name != "bigbird" else (False,):
            peaks = {}
            for n in ns:  # a first call: the cached mask and key lists are built inside it
                fn = ours(name, n, causal, False, **options)
                clear_cache()
                peaks[n] = peak_memory_cpu(fn)
            xs = [math.log(n) for n in ns]
            ys = [math.log(peaks[n]) for n in ns]
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
                (x - mx) ** 2 for x in xs
            )
            row = {
                "backend": name,
                "causal": causal,
                **{f"peak_mib_N{n}": round(peaks[n] / MIB, 1) for n in ns},
                "exponent": round(slope, 2),
            }
            if 4096 in peaks and 16384 in peaks:
                row["ratio_16K_over_4K"] = round(peaks[16384] / peaks[4096], 2)
            rows.append(row)
            print(row, flush=True)
    return rows


def _table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_report(
    out: Path,
    args: argparse.Namespace,
    command: str,
    setup: dict[str, object],
    timings,
    memory,
    align,
) -> None:
    """results.json and README.md in ``out``; ``setup``: benchmarks.machine.CpuSetup.record()."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        **setup,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "shape": f"B={B}, H={H}, N={args.n}, D={D}, float32",
        "command": command,
    }
    (out / "results.json").write_text(
        json.dumps(
            {"meta": meta, "timings": timings, "memory": memory, "alignment": align}, indent=1
        )
    )
    floor_gflop = 4 * B * H * args.n * (2 * WINDOW + 1) * D / 1e9
    floor_ms = floor_gflop / CEILING_GFLOPS * 1e3
    for row in timings:
        if row["case"] == "local bidirectional forward":
            row["x_flop_floor"] = round(row["time_ms_median"] / floor_ms, 2)
    text = [
        "# Sparse backends on CPU: local, strided, bigbird vs peers",
        "",
        f"Produced by `{meta['command']}` (torch {meta['torch']}, {meta['shape']}; "
        f"{machine.describe(meta)}).",
        "Each candidate timed once per repeat, interleaved with the others of its case; "
        "time = median over repeats of each repeat's median (torch.utils.benchmark), "
        "ratio_to_ours = median of per-repeat peer/ours ratios (> 1: ours is faster), "
        "peak_mem_mib = extra memory of one call above its inputs (profiler memory events). "
        "The 2-core machine is shared with other jobs: a repeat run under load shows in "
        "repeats_ms; compare ratios within a repeat, not absolute times across runs.",
        f"Pattern FLOP floor of local w={WINDOW} (exact band pairs): {floor_gflop:.2f} GFLOP, "
        f"{floor_ms:.1f} ms at the {CEILING_GFLOPS} GFLOP/s matmul ceiling of this machine "
        "(x_flop_floor = time / that).",
        "",
        "## Time and peak memory",
        "",
        _table(
            timings,
            [
                "case",
                "implementation",
                "time_ms_median",
                "spread_iqr_over_median",
                "ratio_to_ours",
                "peak_mem_mib",
                "x_flop_floor",
                "repeats_ms",
            ],
        ),
        "",
        "## Peak memory of one forward over N (ours), and its growth exponent",
        "",
        _table(memory, list(memory[0].keys()) if memory else []),
        "",
        "## Alignment with the peer (same pattern, same scale)",
        "",
        _table(
            [{"peer": k, "max_abs_diff": f"{v:.2e}"} for k, v in align.items()],
            ["peer", "max_abs_diff"],
        ),
        "",
    ]
    (out / "README.md").write_text("\n".join(text))


def main(argv: list[str] | None = None) -> None:

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-run-s", type=float, default=1.0)
    parser.add_argument("--mem-ns", default="2048,4096,8192,16384,32768")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--out", default="reports/sparse")
    parser.add_argument("--only", default="", help="time only the cases containing this text")
    parser.add_argument(
        "--vs-sdpa",
        action="store_true",
        help="only the GFLOP/s fraction of dense SDPA (benchmarks.vs_sdpa) at --vs-sdpa-ns",
    )
    parser.add_argument("--vs-sdpa-ns", default="1024,2048,4096")
    machine.add_system_malloc_flag(parser)
    args = parser.parse_args(argv)
    setup = machine.prepare_cpu(args.threads, system_malloc=args.system_malloc)
    command = machine.command_line("benchmarks.bench_sparse", argv)
    if args.vs_sdpa:
        ns = [int(x) for x in args.vs_sdpa_ns.split(",")]
        rows = vs_sdpa.vs_sdpa(
            ("bigbird", "local", "strided"), ns, repeats=args.repeats, threads=args.threads
        )
        print(vs_sdpa.write(rows, Path(args.out) / "vs_sdpa.md", command, setup.record()))
        return
    align = alignment_check(1024) if not args.no_peers else {}
    timings = run_timings(
        args.n, args.repeats, args.threads, not args.no_peers, args.min_run_s, args.only
    )
    memory = memory_exponents([int(x) for x in args.mem_ns.split(",")])
    write_report(Path(args.out), args, command, setup.record(), timings, memory, align)


if __name__ == "__main__":
    main()
