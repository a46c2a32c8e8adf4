"""effattn's `lsh` backend against the two public Reformer LSH attentions, side by side on CPU.

Peers (the wrappers of effattn.peers.lsh): reformer-pytorch 1.4.4 ``LSHAttention(bucket_size,
n_hashes)`` called on (qk, v) of shape (B*H, N, D), and HF transformers' ``LSHSelfAttention``
with its two input projections replaced (query_key by the identity, value by a module returning
v) so that only the attention core runs. All three use shared-QK, chunks of ``bucket_size``
attending to themselves and the previous chunk, N / bucket_size buckets, no dedup, forward only
under ``torch.no_grad()``.

Every implementation and hash count is a case on the shared main helper (effattn.harness.cases):
timed in interleaved rounds in one process with the thread count pinned and freed memory kept for
the next call, as in the sweep (``--system-malloc``: the C library's malloc as it comes), its row
written to a run folder (``--run-dir``, default OUT/run) that `effattn report` and `effattn
compare` read. The table is computed from those rows: the median time, the noise within a round
(IQR / median) and between rounds ((max - min) / median of the rounds' medians), the peer / ours
time ratio (median of per-round ratios) and the peak memory of one call above what was live
before it (effattn.harness.meters). Also: our peak memory at a 4x longer N, and an alignment check:
with one hash round and N = 2 * bucket_size every pair is met once, so all three must equal exact
shared-QK attention with self-exclusion under their own scale (reformer-pytorch: 1/sqrt(D) with unit
keys; HF: 1 with unit keys). With several rounds the outputs differ by design, not only by the
random rotations: both peers sort all rounds into one sequence, so the first chunk of round r looks
back into the last chunk of round r-1 (which can repeat a pair, or the query itself, within the
window); effattn keeps rounds apart.

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
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import effattn
from benchmarks import vs_sdpa
from effattn.backends.lsh.lsh import SELF_ATTENTION_BIAS
from effattn.harness import cases, machine, table
from effattn.harness.meters import MIB, peak_memory_cpu
from effattn.peers.lsh import effattn_lsh_call, hf_lsh_call, reformer_pytorch_call

OURS = "effattn_lsh"
PEERS = {  # implementation -> (backend of its case, its call on shared-QK q, v)
    "reformer_pytorch": ("peer:reformer-pytorch", reformer_pytorch_call),
    "hf_transformers": ("peer:hf-lsh", hf_lsh_call),
}


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


def _inputs(n: int, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared-QK q and v: (1, 8, N, 64), the same tensors for every implementation (seed 0)."""
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 8, n, 64, generator=gen).requires_grad_(grad) for _ in range(2))


def _forward(name: str, n: int, n_hashes: int, bucket_size: int) -> Callable[[], object]:
    q, v = _inputs(n)
    if name == OURS:
        call = effattn_lsh_call(q, v, bucket_size, n_hashes, None)
    else:
        call = PEERS[name][1](q, v, bucket_size, n_hashes)
    return torch.no_grad()(call)


def _backward(name: str, n: int, n_hashes: int, bucket_size: int) -> Callable[[], object]:
    """Forward + backward of a sum (q and v require grad), ours or reformer-pytorch's."""
    q, v = _inputs(n, grad=True)
    if name == OURS:
        ours = effattn.get_backend("lsh", bucket_size=bucket_size, n_hashes=n_hashes)
        return lambda: ours(q, q, v).sum().backward()
    from reformer_pytorch.reformer_pytorch import LSHAttention

    lucid = LSHAttention(bucket_size=bucket_size, n_hashes=n_hashes)
    qk_flat = q.detach().reshape(8, n, 64).requires_grad_()  # (B, H, N, D) -> (BH, N, D)
    v_flat = v.detach().reshape(8, n, 64).requires_grad_()
    return lambda: lucid(qk_flat, v_flat)[0].sum().backward()


def lsh_cases(n: int, hashes: Sequence[int], bucket_size: int, backward: bool) -> list[cases.Case]:
    """Ours and both peers, forward, at each hash count; with ``backward`` also ours and
    reformer-pytorch forward + backward at the first hash count. B=1, H=8, D=64."""
    found = []
    runs = [("fwd", h, (OURS, *PEERS)) for h in hashes]
    if backward:
        runs.append(("fwd_bwd", hashes[0], (OURS, "reformer_pytorch")))
    for mode, n_hashes, names in runs:
        make = _backward if mode == "fwd_bwd" else _forward
        for name in names:
            options = (("bucket_size", bucket_size), ("n_hashes", n_hashes))
            backend = "lsh" if name == OURS else PEERS[name][0]
            label = f"{name} n_hashes={n_hashes}"
            build = lambda name=name, h=n_hashes, make=make: make(name, n, h, bucket_size)  # noqa: E731
            found.append(
                cases.Case(
                    backend=backend,
                    label=label,
                    n=n,
                    mode=mode,
                    build=build,
                    options=options if name == OURS else (),
                )
            )
    return found


def lsh_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table's lines, from the run's rows: per implementation and hash count, the median
    time, the noise within a round (median over rounds of IQR / median of its runs) and
    between rounds, the ratio to ours (median of per-round ratios), the peak memory."""
    by_label = {(r["label"], r["mode"]): r for r in rows}
    lines = []
    for row in rows:
        name, hashes = row["label"].split(" n_hashes=")
        line = {"implementation": name, "mode": row["mode"], "n": row["n"], "n_hashes": int(hashes)}
        if row["status"] != "ok":
            lines.append({**line, "status": f"{row['status']}: {row['reason']}"})
            continue
        ours = by_label.get((f"{OURS} n_hashes={hashes}", row["mode"]))
        medians = [m for m in cases.round_medians(row) if m is not None]
        ratio = cases.ratio(row, ours) if ours and ours["status"] == "ok" else None
        lines.append(
            {
                **line,
                "time_ms_median": row["time_ms_median"],
                "time_iqr_over_median": cases.noise(row),
                "time_spread_over_median": (max(medians) - min(medians))
                / statistics.median(medians),
                "time_ratio_vs_ours": ratio,
                "peak_mem_mib": row["peak_mem_mib"],
                "threads": row["threads"],
            }
        )
    return lines


def our_memory(n: int, n_hashes: int, bucket_size: int) -> float:
    q, v = torch.randn(1, 8, n, 64), torch.randn(1, 8, n, 64)
    backend = effattn.get_backend("lsh", bucket_size=bucket_size, n_hashes=n_hashes)
    with torch.no_grad():
        return peak_memory_cpu(lambda: backend(q, q, v)) / MIB


def markdown(lines: list[dict[str, Any]]) -> str:
    """The lines as a Markdown table, one column per field, floats to 3 significant digits."""
    return table.markdown(lines, floatfmt=".3g")


def arguments(parser: argparse.ArgumentParser) -> None:
    """bench_lsh's own options (the shared ones: effattn.harness.cases.add_arguments)."""
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--long-n", type=int, default=16384, help="N of the memory scaling check")
    parser.add_argument("--hashes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--bucket-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("reports/lsh"), help="the report folder")
    parser.add_argument(
        "--backward", action="store_true", help="also forward+backward vs reformer-pytorch"
    )
    parser.add_argument(
        "--vs-sdpa",
        action="store_true",
        help="only the GFLOP/s fraction of dense SDPA (benchmarks.vs_sdpa) at --vs-sdpa-ns",
    )
    parser.add_argument("--vs-sdpa-ns", default="1024,2048,4096")


def make_cases(args: argparse.Namespace) -> list[cases.Case]:
    if args.vs_sdpa:
        return vs_sdpa.vs_sdpa_cases(("lsh",), [int(x) for x in args.vs_sdpa_ns.split(",")])
    return lsh_cases(args.n, args.hashes, args.bucket_size, args.backward)


def run_dir(args: argparse.Namespace) -> Path:
    """The run folder beside the report: OUT/run (OUT/vs_sdpa-run with --vs-sdpa)."""
    return args.out / ("vs_sdpa-run" if args.vs_sdpa else "run")


def write_report(
    args: argparse.Namespace, command: str, record: dict, rows: list[dict[str, Any]]
) -> None:
    """bench_lsh.md and bench_lsh.json in OUT: the timing table (forward; forward + backward
    with --backward), our memory scaling and the alignment check."""
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
    lines = lsh_rows(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(lines)
    (args.out / "bench_lsh.md").write_text(
        f"# lsh vs peers (CPU, B=1, H=8, D=64, fp32, bucket {args.bucket_size}, "
        f"forward under no_grad (mode fwd), {args.rounds} interleaved rounds)\n\n"
        f"`{command}`; {machine.describe(record)}; "
        f"{os.cpu_count()} cores. time_ratio_vs_ours > 1: the peer is slower. "
        f"The rows: `effattn report {record['run_dir']}`.\n\n"
        f"{text}\n\n## Our peak memory, N={args.n} -> {args.long_n}\n\n"
        f"```\n{json.dumps(scaling, indent=1)}\n```\n\n"
        f"## Alignment: max abs error vs exact attention, N={2 * args.bucket_size}, 1 hash\n\n"
        f"```\n{json.dumps(alignment, indent=1)}\n```\n"
    )
    saved = {"rows": lines, "memory_scaling": scaling, "alignment": alignment}
    saved.update(torch=torch.__version__, command=command, **record)
    (args.out / "bench_lsh.json").write_text(json.dumps(saved, indent=1))
    print(text)
    print(json.dumps(scaling, indent=1))
    print(json.dumps(alignment, indent=1))


def main(argv: list[str] | None = None) -> None:
    def report(args: argparse.Namespace, setup: machine.CpuSetup, rows: list[dict]) -> None:
        command = machine.command_line("benchmarks.bench_lsh", argv)
        if args.vs_sdpa:
            print(vs_sdpa.write(rows, args.out / "vs_sdpa.md", command, setup.record()))
            return
        record = {**setup.record(), "run_dir": str(args.run_dir or run_dir(args))}
        write_report(args, command, record, rows)

    cases.main(
        make_cases,
        argv,
        script="benchmarks.bench_lsh",
        description=__doc__,
        arguments=arguments,
        report=report,
        run_dir=run_dir,
    )


if __name__ == "__main__":
    main()
