"""Time one training step of a small HuggingFace Llama with each attention implementation.

The model is built from a config with random weights (no downloads): 2 layers, hidden 256,
4 heads of dim 64, FFN 512, vocabulary 256. One step = forward with a language-modelling loss,
backward, SGD update, batch 1, float32, causal, no padding. Implementations: transformers' own
``sdpa`` (the baseline, backend ``peer:transformers-sdpa``) and every effattn backend registered
by ``effattn.integrations.huggingface.register()`` that can train on the device (on CPU the
Triton backend runs under its interpreter and is left out).

Every (implementation, N) is a case (mode ``step``) on the shared main helper
(effattn.harness.cases): the cases of one N are timed in interleaved rounds in one process with
the thread count pinned, each row written to a run folder (``--run-dir``, default
reports/runs/hf_train_step) that `effattn report` and `effattn compare` read. The cases share
one model, so each step sets the model's attention implementation itself before it runs (a
tenth of a millisecond). On CPU freed host memory is kept for the next call, as in the sweep
(effattn.harness.machine; ``--system-malloc``: the C library's malloc as it comes); on CUDA the
caching allocator does that and host memory is left as it comes. The table, from the rows,
gives the median step time, the spread of the rounds' medians, the speed-up against ``sdpa``
(median of the per-round ratios) and the peak memory of a step above what was live before it.

    .venv/bin/python -m benchmarks.hf_train_step                    # N = 1K..4K, CPU
    .venv/bin/python -m benchmarks.hf_train_step --lengths 1024 2048 --repeats 3 \\
        --backends sdpa effattn_full effattn_local
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

import effattn
from effattn.harness import cases, machine, table
from effattn.integrations import huggingface

BASELINE = "sdpa"  # transformers' own implementation (a case labelled sdpa: the speed-up base)
INTERPRETED_ON_CPU = ("triton",)  # backends that only run under an interpreter on CPU
SCRIPT = "benchmarks.hf_train_step"


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
    """One training step of ``model`` run by ``implementation`` on token ids (1, N); the step
    sets the model's attention implementation itself, as other steps share the model."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> None:
        model.set_attn_implementation(implementation)
        optimizer.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()

    return step


class SharedModel:
    """The one model of every case, built on first use (a case's build)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._model: torch.nn.Module | None = None

    def step(self, implementation: str, n: int) -> Callable[[], None]:
        """The step of ``implementation`` on token ids (1, N) drawn from seed ``n``."""
        if self._model is None:
            self._model = build_model(self.device)
        vocab = self._model.config.vocab_size
        gen = torch.Generator().manual_seed(n)
        ids = torch.randint(0, vocab, (1, n), generator=gen).to(self.device)
        return make_step(self._model, implementation, ids)


def step_cases(
    implementations: Sequence[str], lengths: Sequence[int], device: str
) -> list[cases.Case]:
    """A case per implementation and N (mode step, causal, B=1, H=4, D=64), on one model."""
    model = SharedModel(device)
    found = []
    for n in lengths:
        for name in implementations:
            if name == BASELINE:
                backend, options = "peer:transformers-sdpa", ()
            else:
                registered = huggingface.registered_backend(name)
                backend, options = registered.name, tuple(sorted(registered.options().items()))
            found.append(
                cases.Case(
                    backend=backend,
                    label=name,
                    n=n,
                    heads=4,
                    head_dim=64,
                    device=device,
                    causal=True,
                    mode="step",
                    options=options,
                    build=lambda name=name, n=n: model.step(name, n),
                )
            )
    return found


def summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per row: implementation, N, status, the median step time, the spread (IQR /
    median) of the rounds' medians, the speed-up vs sdpa (median of per-round sdpa / step
    time) and the peak memory."""
    lines = []
    for row in rows:
        line = {"implementation": row["label"], "n": row["n"], "status": row["status"]}
        if row["status"] != "ok":
            lines.append({**line, "status": f"{row['status']}: {row['reason']}"})
            continue
        lines.append(
            {
                **line,
                "time_ms_median": row["time_ms_median"],
                "spread_iqr_over_median": cases.spread(row),
                "speedup_vs_sdpa": row.get("speedup_vs_sdpa"),
                "peak_mem_mib": row.get("peak_mem_mib"),
            }
        )
    return lines


def arguments(parser: argparse.ArgumentParser) -> None:
    """hf_train_step's own options (the shared ones: effattn.harness.cases.add_arguments)."""
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 3072, 4096])
    parser.add_argument("--backends", nargs="+", help="attn_implementation names (default: all)")
    parser.add_argument("--device", default=_default_device())


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_cases(args: argparse.Namespace) -> list[cases.Case]:
    huggingface.register()
    implementations = args.backends or default_implementations(args.device)
    return step_cases(implementations, args.lengths, args.device)


def report(args: argparse.Namespace, setup: machine.CpuSetup, rows: list[dict[str, Any]]) -> None:
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, effattn "
        f"{effattn.__version__}, device {args.device}, {machine.describe(setup.record())}, "
        f"{args.rounds} interleaved rounds"
    )
    print(table.markdown(summary(rows), floatfmt=".3g"))


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parse, measure into the run, print the table; returns the rows. Host memory is kept as
    the sweep's CPU workers keep it only on CPU: with a CUDA device, --system-malloc is on."""
    argv = list(sys.argv[1:] if argv is None else argv)
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default=_default_device())
    if device.parse_known_args(argv)[0].device != "cpu" and "--system-malloc" not in argv:
        argv.append("--system-malloc")
    return cases.main(
        make_cases,
        argv,
        script=SCRIPT,
        description=__doc__,
        arguments=arguments,
        report=report,
        rounds=2,
    )


if __name__ == "__main__":
    main()
