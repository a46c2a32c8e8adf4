"""Transformer-XL on CPU: effattn's relative attention layer against HF transformers 4.57's
``RelPartialLearnableMultiHeadAttn``, streaming decode against recomputation, and the `xl`
backend against dense causal attention.

1. layer: qlen 2048 + mem 2048, d_model 512, 8 heads, batch 1, forward under no_grad, eval mode,
   through the wrappers of effattn.peers.xl: HF's layer also adds the residual and a
   post-LayerNorm, so ours is timed with the same two ops around it; the weights are copied, and
   the outputs are compared (max abs difference). HF gets its positional embedding precomputed;
   ours computes it inside the call.
2. decode: one new token with a memory of ``ctx`` positions (the cached hidden states) against
   recomputing the layer over the whole context (ctx + 1 positions, no memory), as a model
   without a cache must; plus HF's layer for the one-token step.
3. backend: ``xl`` (segment 256, memory 256) against sdpa and full, causal, N = 4096, forward.

Every implementation is a case on the shared main helper (effattn.harness.cases), timed in
interleaved rounds in one process with the thread count pinned and freed memory kept for the next
call, as in the sweep (``--system-malloc``: the C library's malloc as it comes), its row written to
a run folder (``--run-dir``, default OUT/run) that `effattn report` and `effattn compare` read.
The table is computed from those rows: the median time, the noise within a round (median over
rounds of IQR / median) and the time ratio against ours (median of per-round ratios); memory is
the peak of one call above what was live before it (effattn.harness.meters). Parts: the layer and
the backends are mode ``fwd``, the decode step mode ``decode``; all causal, B=1, H=8, D=64.

    .venv/bin/python -m benchmarks.bench_xl                 # everything, writes reports/xl/
    .venv/bin/python -m benchmarks.bench_xl --parts layer --repeats 2
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import effattn
from effattn.harness import cases, machine, table
from effattn.peers.xl import OURS, E, H, hf_call, layer_calls, paired_layers

XL = (("mem_len", 256), ("segment_len", 256))
BACKENDS = {  # implementation -> (backend, options) of the backend part
    "xl_full_terms": ("xl", (*XL, ("relative", "full"))),
    "xl_bias": ("xl", XL),
    "sdpa_causal": ("sdpa", ()),
    "full_causal": ("full", ()),
}


def _layer(name: str, q_len: int, mem_len: int) -> Callable[[], object]:
    fns = layer_calls(q_len, mem_len)
    if name not in fns:
        raise ImportError(f"{name} is not installed")
    return torch.no_grad()(fns[name])


def _decode(name: str, context: int) -> Callable[[], object]:
    """One new token with a memory of ``context`` positions, or (effattn_recompute) the layer
    over all context + 1 positions, as a model without a cache must."""
    ours, norm, hf, pos_emb = paired_layers(mem_len=context)
    history, token = torch.randn(1, context, E), torch.randn(1, 1, E)
    everything = torch.cat([history, token], dim=1)  # (1, ctx + 1, E)
    if name == "hf_transformers":
        if hf is None:
            raise ImportError("transformers is not installed")
        return torch.no_grad()(hf_call(hf, pos_emb, token, history))
    if name == "effattn_recompute":
        return torch.no_grad()(lambda: norm(everything + ours(everything)[0])[:, -1:])
    return torch.no_grad()(lambda: norm(token + ours(token, history)[0]))


def _backend(name: str, n: int) -> Callable[[], object]:
    backend, options = BACKENDS[name]
    attention = effattn.get_backend(backend, **dict(options))
    q, k, v = (torch.randn(1, H, n, 64) for _ in range(3))
    return torch.no_grad()(lambda: attention(q, k, v, causal=True))


def xl_cases(parts: Sequence[str], q_len: int, mem_len: int, contexts: Sequence[int]):
    """The cases of each part; the first of a part (and context) is ours, the ratios' base."""
    found = []

    def add(part: str, name: str, n: int, build, backend="xl", options=(), mode="fwd"):
        label = name if part == "backend" else f"{name} {part}"
        found.append(
            cases.Case(
                backend=backend if name.startswith("effattn") else f"peer:{name}",
                label=label,
                n=n,
                mode=mode,
                causal=True,
                options=options,
                build=build,
            )
        )

    if "layer" in parts:
        for name in (OURS, "hf_transformers"):
            add("layer", name, q_len + mem_len, lambda name=name: _layer(name, q_len, mem_len))
    for ctx in contexts if "decode" in parts else ():
        for name in (OURS, "effattn_recompute", "hf_transformers"):
            build = lambda name=name, ctx=ctx: _decode(name, ctx)  # noqa: E731
            add("decode", name, ctx, build, mode="decode")
    for name, (backend, options) in BACKENDS.items() if "backend" in parts else ():
        found.append(
            cases.Case(
                backend=backend,
                label=name,
                n=4096,
                causal=True,
                options=options,
                build=lambda name=name: _backend(name, 4096),
            )
        )
    return found


def xl_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table's lines from the run's rows: part, implementation, context, the median time,
    the noise within a round, the time ratio vs ours (per round), the peak memory."""
    lines, ours = [], {}
    for row in rows:
        name, _, part = row["label"].partition(" ")
        part = part or "backend"
        base = ours.setdefault((part, row["n"]), row)  # the first of a part and context
        line = {"part": part, "implementation": name, "context": row["n"]}
        if row["status"] != "ok":
            lines.append({**line, "time_ms_median": f"{row['status']}: {row['reason']}"})
            continue
        ratio = cases.ratio(row, base) if base["status"] == "ok" else None
        lines.append(
            {
                **line,
                "time_ms_median": f"{row['time_ms_median']:.2f}",
                "IQR/median": f"{cases.noise(row):.3f}",
                "time ratio vs ours": "" if ratio is None else f"{ratio:.2f}",
                "peak_mem_mib": f"{row['peak_mem_mib']:.1f}",
            }
        )
    return lines


def layer_max_diff(q_len: int, mem_len: int) -> float | None:
    """max |ours - HF| of the layer outputs (same weights); None without transformers."""
    fns = layer_calls(q_len, mem_len)
    if "hf_transformers" not in fns:
        return None
    with torch.no_grad():
        return (fns[OURS]() - fns["hf_transformers"]()).abs().max().item()


def arguments(parser: argparse.ArgumentParser) -> None:
    """bench_xl's own options (the shared ones: effattn.harness.cases.add_arguments)."""
    parser.add_argument("--parts", default="layer,decode,backend")
    parser.add_argument("--qlen", type=int, default=2048)
    parser.add_argument("--mem", type=int, default=2048)
    parser.add_argument("--contexts", default="1024,2048,4096,8192,16384")
    parser.add_argument("--out", type=Path, default=Path("reports/xl"), help="the report folder")


def make_cases(args: argparse.Namespace) -> list[cases.Case]:
    contexts = [int(c) for c in args.contexts.split(",")]
    return xl_cases(args.parts.split(","), args.qlen, args.mem, contexts)


def run_dir(args: argparse.Namespace) -> Path:
    """The run folder beside the report: OUT/run-<parts>."""
    return args.out / f"run-{args.parts.replace(',', '_')}"


def main(argv: list[str] | None = None) -> None:
    def report(args: argparse.Namespace, setup: machine.CpuSetup, rows: list[dict]) -> None:
        parts = args.parts.split(",")
        meta: dict[str, object] = {
            "torch": torch.__version__,
            "command": machine.command_line("benchmarks.bench_xl", argv),
            "machine": platform.processor() or platform.machine(),
            "repeats": args.rounds,
            "run_dir": str(args.run_dir or run_dir(args)),
        }
        if "layer" in parts:
            meta["layer_max_abs_diff_vs_hf"] = layer_max_diff(args.qlen, args.mem)
        meta.update(setup.record())
        lines = xl_rows(rows)
        text = table.markdown(lines)
        print(text, flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        tag = "_".join(parts)
        (args.out / f"bench_xl_{tag}.md").write_text(
            f"`{meta['command']}`: torch {meta['torch']}, {machine.describe(meta)}; the rows: "
            f"`effattn report {meta['run_dir']}`.\n\n{text}\n"
        )
        (args.out / f"bench_xl_{tag}.json").write_text(
            json.dumps({"meta": meta, "rows": lines}, indent=1)
        )

    cases.main(
        make_cases,
        argv,
        script="benchmarks.bench_xl",
        description=__doc__,
        arguments=arguments,
        report=report,
        run_dir=run_dir,
    )


if __name__ == "__main__":
    main()
