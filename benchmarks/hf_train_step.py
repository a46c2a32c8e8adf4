"""Time one training step of a small HuggingFace Llama with each attention implementation.

The model is built from a config with random weights (no downloads): 2 layers, hidden 256,
4 heads of dim 64, FFN 512, vocabulary 256. One step = forward with a language-modelling loss,
backward, SGD update, batch 1, float32, causal, no padding. Implementations: transformers' own
``sdpa`` (the baseline) and every effattn backend registered by
``effattn.integrations.huggingface.register()`` that can train on the device (on CPU the Triton
backend runs under its interpreter and is left out). Timings are interleaved (every N and
implementation once per repeat) in one process with the thread count pinned and freed memory
kept for the next call, as in the sweep (effattn.harness.machine; ``--system-malloc``: the C
library's malloc as it comes); the table gives
the median over repeats of each repeat's median, its spread, the speed-up against ``sdpa`` and
the peak memory of a step above what was live before it.

    .venv/bin/python -m benchmarks.hf_train_step                    # N = 1K..4K, CPU
    .venv/bin/python -m benchmarks.hf_train_step --lengths 1024 2048 --repeats 3 \\
        --backends sdpa effattn_full effattn_local
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import pandas as pd
import torch

import effattn
from effattn.harness import machine
from effattn.harness.meters import MIB, peak_memory_cpu, peak_memory_cuda, time_cpu, time_cuda
from effattn.integrations import huggingface

BASELINE = "sdpa"  # transformers' own implementation
INTERPRETED_ON_CPU = ("triton",)  # backends that only run under an interpreter on CPU


@dataclass(frozen=True)
class StepRow:
    implementation: str  # attn_implementation name
    n: int  # sequence length
    status: str  # ok, or error
    time_ms_median: float | None  # median over repeats of the per-repeat median step time
    time_iqr_over_median: float | None  # median over repeats of IQR / median
    peak_mem_mib: float | None  # peak memory of one step above what was live before it
    reason: str = ""  # the error, when status is error


def build_model(device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=8192,
        use_cache=False,
    )
    return LlamaForCausalLM(config).to(device).train()


def default_implementations(device: str) -> list[str]:
    names = [BASELINE]
    for name in huggingface.register(device=device):
        backend = huggingface.registered_backend(name)
        if device == "cpu" and backend.name in INTERPRETED_ON_CPU:
            continue
        if not backend.not_supported_reasons(
            device=device, dtype=torch.float32, causal=True, backward=True
        ):
            names.append(name)
    return names


def make_step(model: torch.nn.Module, implementation: str, ids: torch.Tensor):
    """One training step of ``model`` run by ``implementation`` on token ids (1, N)."""
    model.set_attn_implementation(implementation)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()

    return step


def measure(args: argparse.Namespace) -> list[StepRow]:
    torch.manual_seed(0)
    huggingface.register()
    implementations = args.backends or default_implementations(args.device)
    model = build_model(args.device)
    on_cuda = args.device == "cuda"
    timings: dict[tuple[str, int], list] = {}
    memory: dict[tuple[str, int], float] = {}
    errors: dict[tuple[str, int], str] = {}
    for repeat in range(args.repeats):
        for n in args.lengths:
            ids = torch.randint(0, model.config.vocab_size, (1, n), device=args.device)
            for name in implementations:
                key = (name, n)
                if key in errors:
                    continue
                step = make_step(model, name, ids)
                try:
                    if on_cuda:
                        timing = time_cuda(step, warmup=1, repeats=5)
                    else:
                        timing = time_cpu(step, threads=args.threads, min_run_time_s=args.min_time)
                    if repeat == 0 and args.memory:
                        peak = peak_memory_cuda(step) if on_cuda else peak_memory_cpu(step)
                        memory[key] = peak / MIB
                except Exception as err:  # a failed point is reported as such, never timed
                    errors[key] = f"{type(err).__name__}: {err}"
                    continue
                timings.setdefault(key, []).append(timing)
                mem = f", {memory[key]:.0f} MiB" if key in memory else ""
                print(f"repeat {repeat} N={n} {name}: {timing.median_ms:.0f} ms{mem}", flush=True)
    rows = []
    for n in args.lengths:
        for name in implementations:
            key = (name, n)
            if key in errors:
                rows.append(StepRow(name, n, "error", None, None, None, errors[key]))
                continue
            runs = timings[key]
            rows.append(
                StepRow(
                    implementation=name,
                    n=n,
                    status="ok",
                    time_ms_median=statistics.median(t.median_ms for t in runs),
                    time_iqr_over_median=statistics.median(t.iqr_ms / t.median_ms for t in runs),
                    peak_mem_mib=memory.get(key),
                )
            )
    return rows


def table(rows: list[StepRow]) -> pd.DataFrame:
    frame = pd.DataFrame([row.__dict__ for row in rows])
    base = frame[frame.implementation == BASELINE].set_index("n").time_ms_median
    frame["speedup_vs_sdpa"] = base.reindex(frame.n).to_numpy() / frame.time_ms_median
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 3072, 4096])
    parser.add_argument("--backends", nargs="+", help="attn_implementation names (default: all)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats")
    parser.add_argument("--threads", type=int, default=2, help="CPU intra-op threads (pinned)")
    parser.add_argument("--min-time", type=float, default=1.0, help="CPU seconds per timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    machine.add_system_malloc_flag(parser)
    args = parser.parse_args()
    import transformers

    # Host memory as the sweep's CPU workers keep it; on CUDA the caching allocator does that.
    cuda = args.device != "cpu"
    setup = machine.prepare_cpu(args.threads, system_malloc=args.system_malloc or cuda)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, effattn "
        f"{effattn.__version__}, device {args.device}, {machine.describe(setup.record())}, "
        f"repeats {args.repeats}, backends {effattn.list_backends()}"
    )
    frame = table(measure(args))
    print(frame.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
