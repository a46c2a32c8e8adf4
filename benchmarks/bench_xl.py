"""Transformer-XL on CPU: effattn's relative attention layer against HF transformers 4.57's
``RelPartialLearnableMultiHeadAttn``, streaming decode against recomputation, and the `xl`
backend against dense causal attention.

1. layer: qlen 2048 + mem 2048, d_model 512, 8 heads, batch 1, forward under no_grad, eval mode.
   HF's layer also adds the residual and a post-LayerNorm, so ours is timed with the same two
   ops around it; the weights are copied, and the outputs are compared (max abs difference).
   HF gets its positional embedding precomputed; ours computes it inside the call.
2. decode: one new token with a memory of ``ctx`` positions (the cached hidden states) against
   recomputing the layer over the whole context (ctx + 1 positions, no memory), as a model
   without a cache must; plus HF's layer for the one-token step.
3. backend: ``xl`` (segment 256, memory 256) against sdpa and full, causal, N = 4096, forward.

Timings are interleaved (every implementation once per repeat, effattn.bench.interleave) in one
process with the thread count pinned and freed memory kept for the next call, as in the sweep
(benchmarks.machine; ``--system-malloc``: the C library's malloc as it comes); tables give the
median over repeats of each repeat's median, the spread (IQR / median) and the time ratio against
ours (median of per-repeat ratios); memory is the peak of one call above what was live before it
(effattn.bench.meters).

    .venv/bin/python -m benchmarks.bench_xl                 # everything, writes reports/xl/
    .venv/bin/python -m benchmarks.bench_xl --parts layer --repeats 2
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import effattn
from benchmarks import machine
from effattn.bench.interleave import time_interleaved
from effattn.bench.meters import MIB, peak_memory_cpu
from effattn.nn import TransformerXLAttention

OURS = "effattn"
E, H = 512, 8


@dataclass(frozen=True)
class Row:
    part: str  # layer, decode, backend
    implementation: str  # effattn, hf_transformers, effattn_recompute, sdpa, full, ...
    context: int  # layer: qlen + mem; decode: positions in memory; backend: N
    time_ms_median: float  # median over repeats of the per-repeat median call time
    time_iqr_over_median: float  # median over repeats of IQR / median
    time_ratio_vs_ours: float  # median over repeats of (this time / ours)
    peak_mem_mib: float  # peak memory of one call above what was live before it
    threads: int  # torch intra-op threads, pinned


def hf_modeling():
    """HF transformers' Transformer-XL module (4.x only; 5.x removed it); raises ImportError."""
    from transformers.models.deprecated.transfo_xl import modeling_transfo_xl

    return modeling_transfo_xl


def paired_layers(mem_len: int):
    """Ours and HF's layer with the same weights (HF's is None when transformers lacks it)."""
    ours = TransformerXLAttention(E, H, mem_len=mem_len, bias=False).eval()
    norm = nn.LayerNorm(E).eval()
    try:
        modeling = hf_modeling()
    except ImportError:
        return ours, norm, None, None
    hf = modeling.RelPartialLearnableMultiHeadAttn(H, E, E // H, 0.0).eval()
    with torch.no_grad():
        hf.r_w_bias.normal_(std=0.02)
        hf.r_r_bias.normal_(std=0.02)
        w_q, w_k, w_v = hf.qkv_net.weight.chunk(3)
        ours.q_proj.weight.copy_(w_q)
        ours.kv_proj.weight.copy_(torch.cat([w_k, w_v]))
        ours.r_proj.weight.copy_(hf.r_net.weight)
        ours.out_proj.weight.copy_(hf.o_net.weight)
        ours.pos_bias_u.copy_(hf.r_w_bias)
        ours.pos_bias_v.copy_(hf.r_r_bias)
        norm.load_state_dict(hf.layer_norm.state_dict())
    return ours, norm, hf, modeling.PositionalEmbedding(E)


def hf_call(hf, pos_emb, x: torch.Tensor, mems: torch.Tensor) -> Callable[[], torch.Tensor]:
    """HF's layer on batch-first x (1, L, E) with mems (1, M, E), in its (len, batch, E) layout."""
    q_len, m_len = x.shape[1], mems.shape[1]
    k_len = q_len + m_len
    pos = pos_emb(torch.arange(k_len - 1, -1, -1.0))  # (k_len, 1, E), precomputed
    mask = torch.triu(torch.ones(q_len, k_len, dtype=torch.bool), 1 + m_len)[:, :, None]
    w, m = x.transpose(0, 1).contiguous(), mems.transpose(0, 1).contiguous()
    return lambda: hf(w, pos, attn_mask=mask, mems=m)[0]


def _measure(
    part: str,
    context: int,
    fns: dict[str, Callable[[], object]],
    *,
    threads: int,
    repeats: int,
    min_run_time_s: float,
) -> list[Row]:
    """One Row per entry of ``fns``, the first being ours (the ratios' baseline)."""
    with torch.no_grad():
        timed = time_interleaved(
            fns, repeats=repeats, threads=threads, min_run_time_s=min_run_time_s
        )
        memory = {name: peak_memory_cpu(fn) / MIB for name, fn in fns.items()}
    ours = next(iter(fns))
    return [
        Row(
            part=part,
            implementation=name,
            context=context,
            time_ms_median=timed.median_ms(name),
            time_iqr_over_median=timed.timing_iqr_over_median(name),
            time_ratio_vs_ours=timed.ratio(name, ours),
            peak_mem_mib=memory[name],
            threads=threads,
        )
        for name in fns
    ]


def layer_calls(q_len: int, mem_len: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Ours (with HF's residual and post-LayerNorm around it) and HF's layer, same weights, on
    the same x (1, q_len, E) and memory (1, mem_len, E); both return (1, q_len, E) batch-first.
    HF's entry is absent when transformers lacks Transformer-XL."""
    ours, norm, hf, pos_emb = paired_layers(mem_len)
    x, mems = torch.randn(1, q_len, E), torch.randn(1, mem_len, E)
    fns: dict[str, Callable[[], torch.Tensor]] = {OURS: lambda: norm(x + ours(x, mems)[0])}
    if hf is not None:
        hf_fn = hf_call(hf, pos_emb, x, mems)  # (q_len, 1, E)
        fns["hf_transformers"] = lambda: hf_fn().transpose(0, 1)  # -> (1, q_len, E)
    return fns


def bench_layer(q_len: int, mem_len: int, **kw) -> tuple[list[Row], float | None]:
    fns = layer_calls(q_len, mem_len)
    max_diff = None
    if "hf_transformers" in fns:
        with torch.no_grad():
            max_diff = (fns[OURS]() - fns["hf_transformers"]()).abs().max().item()
    return _measure("layer", q_len + mem_len, fns, **kw), max_diff


def bench_decode(context: int, **kw) -> list[Row]:
    ours, norm, hf, pos_emb = paired_layers(mem_len=context)
    history, token = torch.randn(1, context, E), torch.randn(1, 1, E)
    everything = torch.cat([history, token], dim=1)  # (1, ctx + 1, E)
    fns: dict[str, Callable[[], object]] = {
        OURS: lambda: norm(token + ours(token, history)[0]),
        "effattn_recompute": lambda: norm(everything + ours(everything)[0])[:, -1:],
    }
    if hf is not None:
        fns["hf_transformers"] = hf_call(hf, pos_emb, token, history)
    return _measure("decode", context, fns, **kw)


def bench_backend(n: int, **kw) -> list[Row]:
    q, k, v = (torch.randn(1, H, n, 64) for _ in range(3))
    xl_full = effattn.get_backend("xl", segment_len=256, mem_len=256, relative="full")
    xl_bias = effattn.get_backend("xl", segment_len=256, mem_len=256)
    sdpa, full = effattn.get_backend("sdpa"), effattn.get_backend("full")
    fns: dict[str, Callable[[], object]] = {
        "xl_full_terms": lambda: xl_full(q, k, v, causal=True),
        "xl_bias": lambda: xl_bias(q, k, v, causal=True),
        "sdpa_causal": lambda: sdpa(q, k, v, causal=True),
        "full_causal": lambda: full(q, k, v, causal=True),
    }
    return _measure("backend", n, fns, **kw)


def _markdown(rows: list[Row]) -> str:
    header = (
        "| part | implementation | context | time_ms_median | IQR/median | time ratio vs ours "
        "| peak_mem_mib |\n|---|---|---|---|---|---|---|\n"
    )
    return header + "".join(
        f"| {r.part} | {r.implementation} | {r.context} | {r.time_ms_median:.2f} | "
        f"{r.time_iqr_over_median:.3f} | {r.time_ratio_vs_ours:.2f} | {r.peak_mem_mib:.1f} |\n"
        for r in rows
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="layer,decode,backend")
    parser.add_argument("--qlen", type=int, default=2048)
    parser.add_argument("--mem", type=int, default=2048)
    parser.add_argument("--contexts", default="1024,2048,4096,8192,16384")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("reports/xl"))
    machine.add_system_malloc_flag(parser)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    setup = machine.prepare_cpu(args.threads, system_malloc=args.system_malloc)
    kw = {"threads": args.threads, "repeats": args.repeats, "min_run_time_s": args.min_run_time}
    parts = args.parts.split(",")
    rows: list[Row] = []
    meta: dict[str, object] = {
        "torch": torch.__version__,
        "command": machine.command_line("benchmarks.bench_xl", argv),
        "machine": platform.processor() or platform.machine(),
        "repeats": args.repeats,
    }
    if "layer" in parts:
        layer_rows, max_diff = bench_layer(args.qlen, args.mem, **kw)
        rows += layer_rows
        meta["layer_max_abs_diff_vs_hf"] = max_diff
        print(_markdown(layer_rows), f"max |ours - hf| = {max_diff}", flush=True)
    if "decode" in parts:
        for ctx in (int(c) for c in args.contexts.split(",")):
            decode_rows = bench_decode(ctx, **kw)
            rows += decode_rows
            print(_markdown(decode_rows), flush=True)
    if "backend" in parts:
        backend_rows = bench_backend(4096, **kw)
        rows += backend_rows
        print(_markdown(backend_rows), flush=True)
    meta.update(setup.record())
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "_".join(parts)
    (args.out / f"bench_xl_{tag}.md").write_text(
        f"`{meta['command']}`: torch {meta['torch']}, {machine.describe(meta)}.\n\n"
        f"{_markdown(rows)}"
    )
    (args.out / f"bench_xl_{tag}.json").write_text(
        json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1)
    )


if __name__ == "__main__":
    main()
