"""effattn's sparse backends (`local`, `strided`, `bigbird`) against their public peers on CPU.

Peers, all called on the same (B, H, N, D) tensors (effattn.peers.inputs) in one process, through
the wrappers of effattn.peers.sparse:
  - torch.compile(flex_attention) with a create_block_mask of the same sliding window
    (|q - kv| <= w, causal 0 <= q - kv <= w); forward only (no CPU backward for flex).
  - local-attention 1.11.2 ``LocalAttention(window_size=w, exact_windowsize=True,
    use_rotary_pos_emb=False)``: with look_backward = look_forward = 1 it keeps exactly
    |i - j| <= w (causal: 0 <= i - j <= w); checked against ours below (max |diff|).
  - HF transformers BigBirdBlockSparseAttention (block 64, 3 random blocks, train mode so that
    random blocks are drawn, dropout 0) with its query/key/value projections replaced by the
    identity so that only the attention core runs, as ours.
Every candidate is a case on the shared main helper (effattn.harness.cases): the cases of one
comparison group (same mode and causality) are timed in interleaved rounds, threads pinned and
freed memory kept for the next call, as in the sweep (``--system-malloc`` times with the C
library's malloc as it comes), and their rows go to a run folder (``--run-dir``, default
OUT/run) that `effattn report` and `effattn compare` read. The tables are computed from those
rows: the median time, the spread (IQR / median of the rounds' medians) and peer / ours (the
median of per-round ratios). Peak memory: bytes allocated above the inputs during one call
(meters.peak_memory_cpu). Memory exponents: the slope of log(peak) over
log(N) for N = 2K..32K, and peak(16K) / peak(4K) (target <= 4.5).

    .venv/bin/python -m benchmarks.bench_sparse                      # writes reports/sparse/
    .venv/bin/python -m benchmarks.bench_sparse --repeats 2 --no-peers --mem-ns 2048,4096
    .venv/bin/python -m benchmarks.bench_sparse --only "local bidirectional forward" \
        --repeats 7 --mem-ns 4096,16384 --out reports/sparse/local_forward
    effattn report reports/sparse/run --out /tmp/sparse      # the same rows, Tay-style
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import effattn
from benchmarks import vs_sdpa
from effattn.harness import cases, machine, table
from effattn.harness.meters import MIB, peak_memory_cpu
from effattn.ops import clear_cache
from effattn.peers.inputs import B, D, H, qkv
from effattn.peers.sparse import WINDOW, flex, forward_or_backward, hf_bigbird, local_attention_peer

CEILING_GFLOPS = 177  # 2-thread fp32 matmul ceiling of the project's CPU (anchors.md)
LOCAL = f"local:window={WINDOW}"
OURS_OF = {  # a peer's label -> the label of ours it is compared with
    f"flex_attention local w={WINDOW} (compiled)": LOCAL,
    f"local-attention 1.11.2 w={WINDOW}": LOCAL,
    "HF BigBirdBlockSparseAttention": "bigbird",
    "sdpa": "strided",
}


def ours(name: str, n: int, causal: bool, grad: bool, **options) -> Callable[[], object]:
    backend = effattn.get_backend(name, **options)
    q, k, v = qkv(n, grad=grad)
    return forward_or_backward(lambda: backend(q, k, v, causal=causal), grad)


def alignment_check(n: int) -> dict[str, float]:
    """Max |ours - peer| of the local window outputs (same pattern, same scale)."""
    q, k, v = qkv(n)
    diffs = {}
    with torch.no_grad():
        for causal in (False, True):
            peer = local_attention_peer(n, causal, grad=False)()
            mine = effattn.attention(q, k, v, "local", window=WINDOW, causal=causal)
            diffs[f"local-attention causal={causal}"] = float((peer - mine).abs().max())
    return diffs


def sdpa(n: int, causal: bool) -> Callable[[], object]:
    q, k, v = qkv(n)
    return torch.no_grad()(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    )


def timing_cases(n: int, peers: bool) -> list[cases.Case]:
    """local (fwd, fwd_bwd; both causalities) beside flex_attention and local-attention,
    bigbird (bidirectional) beside HF's, strided beside dense sdpa (forward): B=1, H=8, D=64."""

    def case(backend: str, label: str, build, causal: bool, grad: bool, options=()):
        mode = "fwd_bwd" if grad else "fwd"
        return cases.Case(
            backend=backend,
            label=label,
            n=n,
            batch=B,
            heads=H,
            head_dim=D,
            causal=causal,
            mode=mode,
            options=options,
            build=build,
        )

    found = []
    for causal in (False, True):
        for grad in (False, True):
            local = lambda c=causal, g=grad: ours("local", n, c, g, window=WINDOW)  # noqa: E731
            found.append(case("local", LOCAL, local, causal, grad, (("window", WINDOW),)))
            if peers and not grad:
                label = f"flex_attention local w={WINDOW} (compiled)"
                found.append(
                    case("peer:flex_attention", label, lambda c=causal: flex(n, c), causal, grad)
                )
            if peers:
                peer = lambda c=causal, g=grad: local_attention_peer(n, c, g)  # noqa: E731
                label = f"local-attention 1.11.2 w={WINDOW}"
                found.append(case("peer:local-attention", label, peer, causal, grad))
    for grad in (False, True):
        found.append(
            case("bigbird", "bigbird", lambda g=grad: ours("bigbird", n, False, g), False, grad)
        )
        if peers:
            label = "HF BigBirdBlockSparseAttention"
            found.append(
                case("peer:hf-bigbird", label, lambda g=grad: hf_bigbird(n, g), False, grad)
            )
    for causal in (False, True):
        found.append(
            case("strided", "strided", lambda c=causal: ours("strided", n, c, False), causal, False)
        )
        found.append(case("sdpa", "sdpa", lambda c=causal: sdpa(n, c), causal, False))
    return found


def timing_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per row: its comparison (``local causal forward``), time_ms_median,
    spread_iqr_over_median (of the rounds' medians), ratio_to_ours (median of per-round
    this / ours, from the same rounds), peak_mem_mib and repeats_ms (each round's median)."""
    by_label = {(r["label"], r["causal"], r["mode"]): r for r in rows}
    lines = []
    for row in rows:
        mine = by_label.get((OURS_OF.get(row["label"], row["label"]), row["causal"], row["mode"]))
        family = (mine or row)["backend"]
        what = "causal" if row["causal"] else "bidirectional"
        mode = "forward+backward" if row["mode"] == "fwd_bwd" else "forward"
        line = {"case": f"{family} {what} {mode}", "implementation": row["label"]}
        if row["status"] != "ok":
            lines.append({**line, "time_ms_median": f"{row['status']}: {row['reason']}"})
            continue
        ratio = cases.ratio(row, mine) if mine and mine["status"] == "ok" else None
        lines.append(
            {
                **line,
                "time_ms_median": round(row["time_ms_median"], 1),
                "spread_iqr_over_median": round(cases.spread(row), 3),
                "ratio_to_ours": None if ratio is None else round(ratio, 2),
                "peak_mem_mib": round(row["peak_mem_mib"], 1),
                "repeats_ms": [round(m, 1) for m in cases.round_medians(row) if m is not None],
            }
        )
    return lines


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
    """``rows`` as a Markdown table of the columns ``keys`` (a missing cell empty), numbers as
    they were rounded."""
    return table.markdown([{k: r.get(k, "") for k in keys} for r in rows], floatfmt="")


def write_report(
    out: Path,
    args: argparse.Namespace,
    command: str,
    setup: dict[str, object],
    timings,
    memory,
    align,
) -> None:
    """results.json and README.md in ``out``; ``setup``:
    effattn.harness.machine.CpuSetup.record()."""
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
        if row["case"] == "local bidirectional forward" and "peak_mem_mib" in row:
            row["x_flop_floor"] = round(row["time_ms_median"] / floor_ms, 2)
    text = [
        "# Sparse backends on CPU: local, strided, bigbird vs peers",
        "",
        f"Produced by `{meta['command']}` (torch {meta['torch']}, {meta['shape']}; "
        f"{machine.describe(meta)}).",
        "Each candidate timed once per round, interleaved with the others of its mode and "
        "causality (effattn.harness.cases); time = median of the timed runs of every round "
        "(torch.utils.benchmark), ratio_to_ours = median of per-round peer/ours ratios "
        "(> 1: ours is faster), "
        "peak_mem_mib = extra memory of one call above its inputs (profiler memory events). "
        "The 2-core machine is shared with other jobs: a repeat run under load shows in "
        "repeats_ms (each round's median); compare ratios within a round, not absolute times "
        f"across runs. The rows: `effattn report {meta['run_dir']}`.",
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


def arguments(parser: argparse.ArgumentParser) -> None:
    """bench_sparse's own options (the shared ones: effattn.harness.cases.add_arguments)."""
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--mem-ns", default="2048,4096,8192,16384,32768")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--out", default="reports/sparse", help="the report folder")
    parser.add_argument(
        "--vs-sdpa",
        action="store_true",
        help="only the GFLOP/s fraction of dense SDPA (benchmarks.vs_sdpa) at --vs-sdpa-ns",
    )
    parser.add_argument("--vs-sdpa-ns", default="1024,2048,4096")


def make_cases(args: argparse.Namespace) -> list[cases.Case]:
    if args.vs_sdpa:
        ns = [int(x) for x in args.vs_sdpa_ns.split(",")]
        return vs_sdpa.vs_sdpa_cases(("bigbird", "local", "strided"), ns)
    return timing_cases(args.n, not args.no_peers)


def run_dir(args: argparse.Namespace) -> Path:
    """The run folder beside the report: OUT/run (OUT/vs_sdpa-run with --vs-sdpa)."""
    return Path(args.out) / ("vs_sdpa-run" if args.vs_sdpa else "run")


def main(argv: list[str] | None = None) -> None:
    def report(args: argparse.Namespace, setup: machine.CpuSetup, rows: list[dict]) -> None:
        command = machine.command_line("benchmarks.bench_sparse", argv)
        if args.vs_sdpa:
            out = Path(args.out) / "vs_sdpa.md"
            print(vs_sdpa.write(rows, out, command, setup.record()))
            return
        align = alignment_check(1024) if not args.no_peers else {}
        memory = memory_exponents([int(x) for x in args.mem_ns.split(",")])
        record = {**setup.record(), "run_dir": str(args.run_dir or run_dir(args))}
        write_report(Path(args.out), args, command, record, timing_table(rows), memory, align)

    cases.main(
        make_cases,
        argv,
        script="benchmarks.bench_sparse",
        description=__doc__,
        arguments=arguments,
        report=report,
        run_dir=run_dir,
    )


if __name__ == "__main__":
    main()
