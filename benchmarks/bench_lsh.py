"""effattn's `lsh` backend against the two public Reformer LSH attentions, side by side on CPU.

Peers: reformer-pytorch 1.4.4 ``LSHAttention(bucket_size, n_hashes)`` called on (qk, v) of
shape (B*H, N, D), and HF transformers' ``LSHSelfAttention`` with its two input projections
replaced (query_key by the identity, value by a module returning v) so that only the attention
core runs. All three use shared-QK, chunks of ``bucket_size`` attending to themselves and the
previous chunk, N / bucket_size buckets, no dedup, forward only under ``torch.no_grad()``.

Timings are interleaved (every implementation once per repeat, effattn.bench.interleave) in one
process with the thread count pinned and freed memory kept for the next call, as in the sweep
(benchmarks.machine; ``--system-malloc``: the C library's malloc as it comes); the table gives the
median over repeats of each repeat's median, the spread (IQR / median), the peer / ours time ratio
(median of per-repeat ratios) and the peak memory of one call above what was live before it
(effattn.bench.meters). Also: our peak memory at a 4x longer N, and an alignment check: with one
hash round and N = 2 * bucket_size every pair is met once, so all three must equal exact shared-QK
attention with self-exclusion under their own scale (reformer-pytorch: 1/sqrt(D) with unit keys; HF:
1 with unit keys). With several rounds the outputs differ by design, not only by the random
rotations: both peers sort all rounds into one sequence, so the first chunk of round r looks back
into the last chunk of round r-1 (which can repeat a pair, or the query itself, within the window);
effattn keeps rounds apart.

    .venv/bin/python -m benchmarks.bench_lsh                       # N = 4096, 4 and 8 hashes
    .venv/bin/python -m benchmarks.bench_lsh --n 1024 --repeats 2 --long-n 4096
    .venv/bin/python -m benchmarks.bench_lsh --backward    # also forward+backward (4 hashes)
    .venv/bin/python -m benchmarks.bench_lsh --vs-sdpa     # fraction of SDPA's GFLOP/s only:
        # lsh (defaults, separate q and k), N = 1K, 2K, 4K, fwd, fwd_bwd -> reports/lsh/vs_sdpa.md
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import effattn
from benchmarks import machine, vs_sdpa
from effattn.backends.lsh.lsh import SELF_ATTENTION_BIAS
from effattn.bench.interleave import time_interleaved
from effattn.bench.meters import MIB, peak_memory_cpu

OURS = "effattn_lsh"


@dataclass(frozen=True)
class Row:
    implementation: str  # effattn_lsh, reformer_pytorch, hf_transformers
    n: int  # sequence length
    n_hashes: int  # hash rounds
    time_ms_median: float  # median over repeats of the per-repeat median call time
    time_iqr_over_median: float  # median over repeats of IQR / median (0 when a repeat ran once)
    time_spread_over_median: float  # (max - min) / median of the per-repeat medians
    time_ratio_vs_ours: float  # median over repeats of (this time / ours)
    peak_mem_mib: float  # peak memory of one call above what was live before it
    threads: int  # torch intra-op threads, pinned


class _Fixed(nn.Module):
    """Stands in for HF's value projection: returns the given (B, N, H*D) values."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.values = values

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.values


def _to_hf(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, H, N, D) -> (B, N, H*D)


def effattn_lsh_call(
    q: torch.Tensor, v: torch.Tensor, bucket_size: int, n_hashes: int, scale: float | None
) -> Callable[[], torch.Tensor]:
    """Our `lsh` backend on shared-QK inputs q, v: (B, H, N, D) -> (B, H, N, D).
    ``scale``: None = 1/sqrt(D) (reformer-pytorch's convention), 1.0 = HF's."""
    ours = effattn.get_backend("lsh", bucket_size=bucket_size, n_hashes=n_hashes)
    return lambda: ours(q, q, v, scale=scale)


def reformer_pytorch_call(
    q: torch.Tensor, v: torch.Tensor, bucket_size: int, n_hashes: int
) -> Callable[[], torch.Tensor]:
    """reformer-pytorch's ``LSHAttention`` on shared-QK q, v: (B, H, N, D) -> (B, H, N, D).
    Raises ImportError when reformer-pytorch is not installed."""
    from reformer_pytorch.reformer_pytorch import LSHAttention

    b, h, n, d = q.shape
    lucid = LSHAttention(bucket_size=bucket_size, n_hashes=n_hashes).eval()
    qk_flat, v_flat = q.reshape(b * h, n, d), v.reshape(b * h, n, d)  # (B, H, N, D) -> (BH, N, D)
    return lambda: lucid(qk_flat, v_flat)[0].view(b, h, n, d)  # (BH, N, D) -> (B, H, N, D)


def hf_lsh_call(
    q: torch.Tensor, v: torch.Tensor, bucket_size: int, n_hashes: int
) -> Callable[[], torch.Tensor]:
    """HF transformers' ``LSHSelfAttention`` core (projections bypassed) on shared-QK q, v:
    (B, H, N, D) -> (B, H, N, D); its scale is 1. Raises ImportError without transformers."""
    from transformers import ReformerConfig
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    b, h, n, d = q.shape
    config = ReformerConfig(
        attention_head_size=d,
        num_attention_heads=h,
        hidden_size=h * d,
        lsh_attn_chunk_length=bucket_size,
        num_buckets=max(2, n // bucket_size),
        num_hashes=n_hashes,
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        is_decoder=False,
        max_position_embeddings=n,
        lsh_attention_probs_dropout_prob=0.0,
    )
    hf = LSHSelfAttention(config).eval()
    hf.query_key, hf.value = nn.Identity(), _Fixed(_to_hf(v))
    hidden = _to_hf(q)

    def run_hf() -> torch.Tensor:
        out = hf(hidden).hidden_states  # (B, N, H*D)
        return out.view(b, n, h, d).transpose(1, 2)  # -> (B, H, N, D)

    return run_hf


def implementations(
    q: torch.Tensor, v: torch.Tensor, bucket_size: int, n_hashes: int, scale: float | None
) -> dict[str, Callable[[], torch.Tensor]]:
    """Calls of each implementation on shared-QK inputs q, v: (B, H, N, D) -> (B, H, N, D).
    ``scale``: ours; None = 1/sqrt(D) (reformer-pytorch's convention), 1.0 = HF's."""
    return {
        OURS: effattn_lsh_call(q, v, bucket_size, n_hashes, scale),
        "reformer_pytorch": reformer_pytorch_call(q, v, bucket_size, n_hashes),
        "hf_transformers": hf_lsh_call(q, v, bucket_size, n_hashes),
    }


def exact_shared_qk(q: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense shared-QK attention with self-exclusion (float64; for small N only)."""
    q64, v64 = q.double(), v.double()
    scores = q64 @ F.normalize(q64, dim=-1).transpose(-2, -1) * scale  # (B, H, N, N)
    scores = scores + torch.eye(q.shape[2], dtype=torch.float64) * SELF_ATTENTION_BIAS
    return torch.softmax(scores, dim=-1) @ v64


def alignment_errors(bucket_size: int, n_hashes: int) -> dict[str, float]:
    """Max abs error of each implementation against exact attention when every pair is met
    once (N = 2 * bucket_size, n_hashes = 1), each under its own scale convention."""
    q = torch.randn(1, 2, 2 * bucket_size, 16)
    v = torch.randn(1, 2, 2 * bucket_size, 16)
    errors = {}
    with torch.no_grad():
        for scale, names in ((None, (OURS, "reformer_pytorch")), (1.0, (OURS, "hf_transformers"))):
            want = exact_shared_qk(q, v, 16**-0.5 if scale is None else scale)
            calls = implementations(q, v, bucket_size, n_hashes, scale)
            for name in names:
                label = f"{name} (scale {'1/sqrt(D)' if scale is None else scale})"
                errors[label] = (calls[name]().double() - want).abs().max().item()
    return errors


def measure(n: int, n_hashes: int, bucket_size: int, repeats: int, threads: int) -> list[Row]:
    q = torch.randn(1, 8, n, 64)
    v = torch.randn(1, 8, n, 64)
    calls = implementations(q, v, bucket_size, n_hashes, scale=None)
    with torch.no_grad():
        timed = time_interleaved(calls, repeats=repeats, threads=threads, min_run_time_s=1.0)
        memory = {name: peak_memory_cpu(fn) / MIB for name, fn in calls.items()}
    return [
        Row(
            implementation=name,
            n=n,
            n_hashes=n_hashes,
            time_ms_median=timed.median_ms(name),
            time_iqr_over_median=timed.timing_iqr_over_median(name),
            time_spread_over_median=timed.repeat_range_over_median(name),
            time_ratio_vs_ours=timed.ratio(name, OURS),
            peak_mem_mib=memory[name],
            threads=threads,
        )
        for name in calls
    ]


def our_memory(n: int, n_hashes: int, bucket_size: int) -> float:
    q, v = torch.randn(1, 8, n, 64), torch.randn(1, 8, n, 64)
    backend = effattn.get_backend("lsh", bucket_size=bucket_size, n_hashes=n_hashes)
    with torch.no_grad():
        return peak_memory_cpu(lambda: backend(q, q, v)) / MIB


def forward_backward(n: int, n_hashes: int, bucket_size: int, threads: int) -> dict[str, dict]:
    """Forward + backward of a sum, ours vs reformer-pytorch (q and v require grad): median
    time (interleaved, 2 repeats) and peak memory."""
    from reformer_pytorch.reformer_pytorch import LSHAttention

    q = torch.randn(1, 8, n, 64, requires_grad=True)
    v = torch.randn(1, 8, n, 64, requires_grad=True)
    qk_flat = q.detach().reshape(8, n, 64).requires_grad_()  # (B, H, N, D) -> (BH, N, D)
    v_flat = v.detach().reshape(8, n, 64).requires_grad_()
    ours = effattn.get_backend("lsh", bucket_size=bucket_size, n_hashes=n_hashes)
    lucid = LSHAttention(bucket_size=bucket_size, n_hashes=n_hashes)
    calls = {
        OURS: lambda: ours(q, q, v).sum().backward(),
        "reformer_pytorch": lambda: lucid(qk_flat, v_flat)[0].sum().backward(),
    }
    timed = time_interleaved(calls, repeats=2, threads=threads)
    return {
        name: {
            "n": n,
            "n_hashes": n_hashes,
            "time_ms_median": timed.median_ms(name),
            "peak_mem_mib": peak_memory_cpu(fn) / MIB,
        }
        for name, fn in calls.items()
    }


def markdown(rows: list[Row]) -> str:
    cols = list(asdict(rows[0]))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [f"{x:.3g}" if isinstance(x, float) else str(x) for x in asdict(row).values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--long-n", type=int, default=16384, help="N of the memory scaling check")
    parser.add_argument("--hashes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--bucket-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("reports/lsh"))
    parser.add_argument(
        "--backward", action="store_true", help="also forward+backward vs reformer-pytorch"
    )
    parser.add_argument(
        "--vs-sdpa",
        action="store_true",
        help="only the GFLOP/s fraction of dense SDPA (benchmarks.vs_sdpa) at --vs-sdpa-ns",
    )
    parser.add_argument("--vs-sdpa-ns", default="1024,2048,4096")
    machine.add_system_malloc_flag(parser)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    setup = machine.prepare_cpu(args.threads, system_malloc=args.system_malloc)
    command = machine.command_line("benchmarks.bench_lsh", argv)
    if args.vs_sdpa:
        ns = [int(x) for x in args.vs_sdpa_ns.split(",")]
        rows = vs_sdpa.vs_sdpa(("lsh",), ns, repeats=args.repeats, threads=args.threads)
        print(vs_sdpa.write(rows, args.out / "vs_sdpa.md", command, setup.record()))
        return

    rows = [
        row
        for n_hashes in args.hashes
        for row in measure(args.n, n_hashes, args.bucket_size, args.repeats, args.threads)
    ]
    scaling = {
        n_hashes: {
            "n": args.n,
            "long_n": args.long_n,
            "peak_mem_mib": our_memory(args.n, n_hashes, args.bucket_size),
            "long_peak_mem_mib": our_memory(args.long_n, n_hashes, args.bucket_size),
        }
        for n_hashes in args.hashes
    }
    for s in scaling.values():
        s["ratio"] = s["long_peak_mem_mib"] / s["peak_mem_mib"]
    alignment = alignment_errors(args.bucket_size, n_hashes=1)
    backward = (
        forward_backward(args.n, args.hashes[0], args.bucket_size, args.threads)
        if args.backward
        else {}
    )

    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    record = setup.record()
    (args.out / "bench_lsh.md").write_text(
        f"# lsh vs peers (CPU, B=1, H=8, D=64, fp32, bucket {args.bucket_size}, "
        f"forward, no_grad, {args.repeats} interleaved repeats)\n\n"
        f"`{command}`; {machine.describe(record)}; "
        f"{os.cpu_count()} cores. time_ratio_vs_ours > 1: the peer is slower.\n\n"
        f"{table}\n\n## Our peak memory, N={args.n} -> {args.long_n}\n\n"
        f"```\n{json.dumps(scaling, indent=1)}\n```\n\n"
        f"## Alignment: max abs error vs exact attention, N={2 * args.bucket_size}, 1 hash\n\n"
        f"```\n{json.dumps(alignment, indent=1)}\n```\n"
        + (
            f"\n## Forward + backward\n\n```\n{json.dumps(backward, indent=1)}\n```\n"
            if backward
            else ""
        )
    )
    (args.out / "bench_lsh.json").write_text(
        json.dumps(
            {
                "rows": [asdict(r) for r in rows],
                "memory_scaling": scaling,
                "alignment": alignment,
                "forward_backward": backward,
                "torch": torch.__version__,
                "command": command,
                **record,
            },
            indent=1,
        )
    )
    print(table)
    print(json.dumps(scaling, indent=1))
    print(json.dumps(alignment, indent=1))
    if backward:
        print(json.dumps(backward, indent=1))


if __name__ == "__main__":
    main()
