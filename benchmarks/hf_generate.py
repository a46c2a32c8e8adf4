"""Per-token time of ``model.generate()`` with effattn's decoding cache, beside HF's own sdpa.

The model: a Llama with random weights (seeded, no download) large enough that reading the cache
matters: hidden 1024, 16 query heads and 4 key/value heads of dim 64, 2 layers, FFN 2048,
vocabulary 256, float32, batch 1 (``--tiny``: hidden 64, 4 and 2 heads, FFN 128, for tests).
Every implementation runs on the same weights (one model; each call sets its implementation):

- each effattn backend given by ``--backends`` (``local:window=256``: a backend with options),
  registered with ``huggingface.register(name=..., backend=..., **options)`` and decoding with
  ``huggingface.decoding_cache(model)`` (a fresh cache per call). A backend that cannot decode
  (lsh, strided, ...) falls back to keeping every key and value, as the integration does;
- ``HF sdpa + DynamicCache``: attn_implementation ``sdpa``, no ``past_key_values`` (transformers'
  DynamicCache), the baseline of every ratio.

Per-token time. For each prompt length N (``--prompts``) and implementation, ``generate(ids,
max_new_tokens=T, do_sample=False)`` is timed with T = ``--new-tokens`` and with T = 1 on the same
prompt (EOS is off, so every call makes exactly its tokens):

    prefill_s      = t_1                            (the prompt's forward, one token chosen)
    ms_per_token   = (t_T - t_1) / (T - 1)           (the prefill cancels)
    x_hf_sdpa      = median over rounds of ms_per_token / HF's ms_per_token, both of one round

Each call also timestamps its steps (a logits processor runs after every forward), so the T call
gives its decode steps alone: ``in_call_ms_per_token`` = (last step - first step) / (T - 1), and
``x_hf_in_call`` the same ratio. Both estimate the same thing; the first is the issue's
definition, the second has no prefill in it, so at a long prompt (a prefill of a minute, a decode
of a second or two) the difference of two calls carries the prefill's noise and the in-call
figure does not. Where they disagree, trust the in-call one and raise ``--new-tokens``.

Why effattn.harness.interleave and not effattn.harness.cases: a case's callable is timed with
meters.time_cpu, which makes a warm-up call and a calibration call before each timed block, and
cases.run adds a profiled call for memory; at a 32K prompt each of those is a prefill of about a
minute, so the run would take three times as long. Here each call is timed once per round
(``time_interleaved`` with a one-call timer), after one warm-up call per implementation and
prompt; the calls of one prompt are interleaved (impl_a T, impl_a 1, impl_b T, impl_b 1, ...,
then again next round), so that a change of load lands on every implementation of a round.
The per-token figure is the difference of two rows, which cases' rows and ratios do not take.

A call that raises (out of memory under the ``--mem-limit-gib`` cap, effattn.harness.worker's
MemoryCap) becomes a row with its status and reason; the others go on. The report, ``--out``
(default reports/decode-hf): README.md (the table, the command, the machine, the issue's
targets, met or not) and results.json (the rows, the per-round times and the set-up).

    .venv/bin/python -m benchmarks.hf_generate                        # 1K, 8K, 32K prompts
    .venv/bin/python -m benchmarks.hf_generate --prompts 1024 --backends sdpa linear
    .venv/bin/python -m benchmarks.hf_generate --tiny --prompts 16 32 --new-tokens 3 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import effattn
from effattn.harness import machine, table
from effattn.harness.interleave import time_interleaved
from effattn.harness.meters import Timing
from effattn.harness.worker import MemoryCap, failure
from effattn.registry import parse_backend_spec

SCRIPT = "benchmarks.hf_generate"
BACKENDS = ("full", "sdpa", "local:window=256", "linear", "performer")
HF_SDPA = "HF sdpa + DynamicCache"  # the label of the baseline row
PROMPTS = (1024, 8192, 32768)


@dataclass(frozen=True)
class ModelShape:
    """The Llama every implementation runs (random weights, seeded)."""

    hidden: int = 1024  # hidden size
    heads: int = 16  # query heads (head dim = hidden / heads)
    kv_heads: int = 4  # key/value heads (grouped-query attention)
    layers: int = 2  # decoder layers
    intermediate: int = 2048  # FFN width
    vocab: int = 256  # vocabulary size


TINY = ModelShape(hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=64)


@dataclass(frozen=True)
class Implementation:
    """One thing that generates: an effattn backend through the decoding cache, or HF's sdpa."""

    label: str  # "local:window=256", or HF_SDPA
    attn: str  # the attn_implementation name: "effattn_local_window_256", "sdpa"
    effattn: bool  # True: decodes with huggingface.decoding_cache(model)


def implementations(specs: Sequence[str]) -> list[Implementation]:
    """HF's sdpa, then each backend spec registered under an effattn_ name of its own."""
    from effattn.integrations import huggingface

    found = [Implementation(HF_SDPA, "sdpa", effattn=False)]
    for text in specs:
        spec = parse_backend_spec(text)
        options = "".join(f"_{k}_{v}" for k, v in spec.options)
        name = f"effattn_{spec.name}{options}".replace(".", "_").replace("-", "_")
        huggingface.register(name=name, backend=spec.name, **dict(spec.options))
        label = text.strip() if spec.options else spec.name
        found.append(Implementation(label, name, effattn=True))
    return found


def build_model(shape: ModelShape, max_positions: int, seed: int = 0) -> torch.nn.Module:
    """The Llama of ``shape`` with random weights from ``seed``, in eval mode, EOS off."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None  # every call makes exactly its new tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


class StepClock:
    """A logits processor that timestamps each generation step (after each forward)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


@dataclass
class GenerateCall:
    """``model.generate`` of ``new_tokens`` tokens after prompt ``ids`` (1, N) with one
    implementation, under a memory cap. Keeps what each call gave: the decode steps' ms per
    token (from StepClock; None with one token) and, when a call raised, (status, reason)."""

    model: torch.nn.Module
    impl: Implementation
    ids: torch.Tensor  # (1, N) token ids
    new_tokens: int
    mem_limit_mib: int
    in_call_ms: list[float | None] = field(default_factory=list)  # per call, in call order
    failed: tuple[str, str] | None = None

    def __call__(self) -> torch.Tensor:
        from transformers import LogitsProcessorList

        from effattn.integrations import huggingface

        clock = StepClock()
        try:
            with MemoryCap("cpu", self.mem_limit_mib), torch.no_grad():
                self.model.set_attn_implementation(self.impl.attn)
                extra = {}
                if self.impl.effattn:
                    extra["past_key_values"] = huggingface.decoding_cache(self.model)
                out = self.model.generate(
                    self.ids,
                    attention_mask=torch.ones_like(self.ids),
                    max_new_tokens=self.new_tokens,
                    do_sample=False,
                    logits_processor=LogitsProcessorList([clock]),
                    **extra,
                )
            made = out.shape[1] - self.ids.shape[1]
            if made != self.new_tokens:
                raise RuntimeError(f"expected {self.new_tokens} new tokens, got {made}")
        except Exception as err:
            self.failed = failure(err)
            raise
        steps = clock.stamps
        per_token = (steps[-1] - steps[0]) * 1e3 / (len(steps) - 1) if len(steps) > 1 else None
        self.in_call_ms.append(per_token)
        return out


def one_call(fn: Any) -> Timing:
    """time_interleaved's timer: one call of ``fn`` (already warm), wall-clock."""
    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    return Timing(median_ms=ms, iqr_ms=0.0, runs=1, times_ms=(ms,))


@dataclass(frozen=True)
class GenerateRow:
    """One implementation at one prompt length: status, times and ratios to HF's sdpa."""

    prompt: int  # prompt length N (tokens)
    backend: str  # label: "local:window=256", HF_SDPA
    attn_implementation: str
    status: str  # ok, oom, crashed
    reason: str = ""
    prefill_s: float | None = None  # median over rounds of t_1
    ms_per_token: float | None = None  # median over rounds of (t_T - t_1) / (T - 1)
    spread_iqr_over_median: float | None = None  # of the per-round ms_per_token
    x_hf_sdpa: float | None = None  # median over rounds of ms_per_token / HF's, same round
    x_hf_sdpa_min: float | None = None  # smallest and largest per-round ratio
    x_hf_sdpa_max: float | None = None
    in_call_ms_per_token: float | None = None  # median over rounds: decode steps of the T call
    x_hf_in_call: float | None = None  # median over rounds of in-call / HF's in-call
    rounds: int = 0
    t_new_ms: tuple[float, ...] = ()  # per round: t_T
    t_one_ms: tuple[float, ...] = ()  # per round: t_1


def _iqr_over_median(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / statistics.median(values)


def _ratios(a: Sequence[float | None], b: Sequence[float | None]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=False) if x is not None and y]


class PromptBench:
    """The calls of one prompt length: warm each implementation up, time them in interleaved
    rounds, and make the rows."""

    def __init__(self, model, impls: Sequence[Implementation], n: int, args) -> None:
        gen = torch.Generator().manual_seed(n)
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=gen)  # (1, N)
        self.n, self.impls, self.new_tokens = n, impls, args.new_tokens
        mib = int(args.mem_limit_gib * 1024)
        self.calls = {
            (impl.label, t): GenerateCall(model, impl, ids, t, mib)
            for impl in impls
            for t in (args.new_tokens, 1)
        }
        self.rounds, self.threads = args.rounds, args.threads

    def measure(self) -> list[GenerateRow]:
        ready = {}
        for impl in self.impls:  # one warm-up call each (the T call); a failure drops both
            call = self.calls[(impl.label, self.new_tokens)]
            try:
                call()
                call.in_call_ms.clear()
                ready[f"{impl.label} T"] = call
                ready[f"{impl.label} 1"] = self.calls[(impl.label, 1)]
            except Exception:
                print(f"N={self.n} {impl.label}: {call.failed[0]}: {call.failed[1]}", flush=True)
        timed = time_interleaved(
            ready, repeats=self.rounds, threads=self.threads, drop_failing=True, timer=one_call
        )
        rows = {impl.label: self._row(impl, timed) for impl in self.impls}
        return [self._with_ratios(row, rows.get(HF_SDPA)) for row in rows.values()]

    def _row(self, impl: Implementation, timed) -> GenerateRow:
        base = GenerateRow(prompt=self.n, backend=impl.label, attn_implementation=impl.attn,
                           status="ok")  # fmt: skip
        calls = [self.calls[(impl.label, t)] for t in (self.new_tokens, 1)]
        failed = next((c.failed for c in calls if c.failed), None)
        if failed is not None:
            return GenerateRow(**{**asdict(base), "status": failed[0], "reason": failed[1]})
        t_new, t_one = timed.times_ms(f"{impl.label} T"), timed.times_ms(f"{impl.label} 1")
        per_token = [(a - b) / (self.new_tokens - 1) for a, b in zip(t_new, t_one, strict=True)]
        in_call = [m for m in calls[0].in_call_ms if m is not None]
        fields = {
            "prefill_s": statistics.median(t_one) / 1e3,
            "ms_per_token": statistics.median(per_token),
            "spread_iqr_over_median": _iqr_over_median(per_token),
            "in_call_ms_per_token": statistics.median(in_call) if in_call else None,
            "rounds": len(per_token),
            "t_new_ms": tuple(t_new),
            "t_one_ms": tuple(t_one),
        }
        return GenerateRow(**{**asdict(base), **fields})

    def _per_token(self, row: GenerateRow) -> list[float]:
        return [
            (a - b) / (self.new_tokens - 1) for a, b in zip(row.t_new_ms, row.t_one_ms, strict=True)
        ]

    def _with_ratios(self, row: GenerateRow, hf: GenerateRow | None) -> GenerateRow:
        if row.status != "ok" or hf is None or hf.status != "ok":
            return row
        ratios = _ratios(self._per_token(row), self._per_token(hf))
        in_call = _ratios(
            self.calls[(row.backend, self.new_tokens)].in_call_ms,
            self.calls[(HF_SDPA, self.new_tokens)].in_call_ms,
        )
        fields = {
            "x_hf_sdpa": statistics.median(ratios) if ratios else None,
            "x_hf_sdpa_min": min(ratios, default=None),
            "x_hf_sdpa_max": max(ratios, default=None),
            "x_hf_in_call": statistics.median(in_call) if in_call else None,
        }
        return GenerateRow(**{**asdict(row), **fields})


def targets(rows: Sequence[GenerateRow]) -> list[dict[str, Any]]:
    """The issue's targets, computed on the rows (met or not; "not measured" when a figure is
    missing): linear's ms/token at the longest prompt <= 1.3x at the shortest and <= 0.5x HF
    sdpa's; effattn sdpa's <= 1.2x HF sdpa's at every prompt. Each with the in-call figure."""
    ok = {(r.backend, r.prompt): r for r in rows if r.status == "ok"}
    prompts = sorted({r.prompt for r in rows})
    found = []

    def add(target: str, value: float | None, in_call: float | None, limit: float) -> None:
        if value is None or value <= 0:  # failed, or the prefill's noise exceeded the decode
            met = "not measured" if value is None else "no figure (<= 0: noise)"
        else:
            met = "met" if value <= limit else "not met"
        found.append({"target": target, "measured": value, "in-call": in_call, "status": met})

    if prompts and any(r.backend == "linear" for r in rows):
        short, long = ok.get(("linear", prompts[0])), ok.get(("linear", prompts[-1]))
        both = short is not None and long is not None
        add(
            f"linear ms/token at N={prompts[-1]} / at N={prompts[0]} <= 1.3",
            _div(long.ms_per_token, short.ms_per_token) if both else None,
            _div(long.in_call_ms_per_token, short.in_call_ms_per_token) if both else None,
            1.3,
        )
        add(
            f"linear ms/token at N={prompts[-1]} / HF sdpa's <= 0.5",
            long.x_hf_sdpa if long else None,
            long.x_hf_in_call if long else None,
            0.5,
        )
    for n in prompts if any(r.backend == "sdpa" for r in rows) else ():
        row = ok.get(("sdpa", n))
        add(
            f"effattn sdpa ms/token at N={n} / HF sdpa's <= 1.2",
            row.x_hf_sdpa if row else None,
            row.x_hf_in_call if row else None,
            1.2,
        )
    return found


def _div(a: float | None, b: float | None) -> float | None:
    """a / b of two times; None when either is missing or not positive (then it means nothing)."""
    return a / b if a is not None and b is not None and a > 0 and b > 0 else None


def table_lines(rows: Sequence[GenerateRow]) -> list[dict[str, Any]]:
    """The report's table: prompt, backend, prefill s, ms/token, x HF sdpa (median and the
    per-round range), spread, the in-call figures; a failed row gives its status and reason."""
    lines = []
    for r in rows:
        line: dict[str, Any] = {"prompt": r.prompt, "backend": r.backend}
        if r.status != "ok":
            lines.append({**line, "prefill_s": f"{r.status}: {r.reason}"})
            continue
        span = "-" if r.x_hf_sdpa_min is None else f"{r.x_hf_sdpa_min:.3g}..{r.x_hf_sdpa_max:.3g}"
        lines.append(
            {
                **line,
                "prefill_s": table.fmt_number(r.prefill_s),
                "ms_per_token": table.fmt_number(r.ms_per_token),
                "x_hf_sdpa": table.fmt_number(r.x_hf_sdpa),
                "x_hf_sdpa_range": span,
                "spread_iqr_over_median": table.fmt_number(r.spread_iqr_over_median, 2),
                "in_call_ms_per_token": table.fmt_number(r.in_call_ms_per_token),
                "x_hf_in_call": table.fmt_number(r.x_hf_in_call),
            }
        )
    return lines


def markdown(rows: Sequence[GenerateRow], meta: dict[str, Any]) -> str:
    """README.md: the command, the set-up, the table and the targets."""
    found = [
        {
            **t,
            "measured": table.fmt_number(t["measured"]),
            "in-call": table.fmt_number(t["in-call"]),
        }
        for t in targets(rows)
    ]
    shape = meta["model"]
    text = [
        "# generate(): per-token time with effattn's decoding cache vs HF sdpa + DynamicCache",
        "",
        f"Produced by `{meta['command']}` (torch {meta['torch']}, transformers "
        f"{meta['transformers']}, effattn {meta['effattn']}).",
        f"Machine: {meta['cpu']}, {meta['cpu_count']} cores; {machine.describe(meta['setup'])}.",
        f"Model: Llama, random weights, hidden {shape['hidden']}, {shape['heads']} heads, "
        f"{shape['kv_heads']} KV heads, {shape['layers']} layers, FFN {shape['intermediate']}, "
        f"vocabulary {shape['vocab']}, float32, batch 1, greedy. T = {meta['new_tokens']} new "
        f"tokens; {meta['rounds']} interleaved rounds per prompt.",
        "",
        "prefill_s = t_1 (generate with 1 new token); ms_per_token = (t_T - t_1) / (T - 1); "
        "x_hf_sdpa = median over rounds of ms_per_token / HF sdpa's, both of one round "
        "(x_hf_sdpa_range: the smallest and largest round); spread = IQR / median of the "
        "per-round ms_per_token. in_call_ms_per_token: the T call's decode steps timed inside "
        "the call (no prefill in it), x_hf_in_call its ratio; where the two disagree, the "
        "prefill's noise is in the first.",
        "",
        table.markdown(table_lines(rows), floatfmt=""),
        "",
        "## Targets (issue #31)",
        "",
        table.markdown(found, floatfmt="") if found else "No target's backend was measured.",
        "",
    ]
    return "\n".join(text)


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=list(PROMPTS))
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS),
                        help="effattn backends, with options as local:window=256")  # fmt: skip
    parser.add_argument("--new-tokens", type=int, default=32, help="T (>= 2)")
    parser.add_argument("--threads", type=int, default=2, help="CPU intra-op threads (pinned)")
    parser.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=3,
                        help="interleaved rounds per prompt")  # fmt: skip
    parser.add_argument("--mem-limit-gib", type=float, default=_default_mem_gib(),
                        help="memory one call may grow by; beyond it the call is oom")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="a toy Llama, for tests")
    parser.add_argument("--out", type=Path, default=Path("reports/decode-hf"))
    machine.add_system_malloc_flag(parser)
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error(f"--new-tokens: expected 2 or more, got {args.new_tokens}")
    if args.rounds < 1:
        parser.error(f"--rounds: expected 1 or more, got {args.rounds}")
    return args


def _default_mem_gib() -> float:
    """Three quarters of the memory available now (16 GiB where unknown)."""
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 16.0
    return round(0.75 * pages / 2**30, 1)


def main(argv: Sequence[str] | None = None) -> list[GenerateRow]:
    """Measure every implementation at every prompt, write README.md and results.json to
    ``--out``; returns the rows."""
    import transformers

    args = arguments(argv)
    setup = machine.prepare_cpu(args.threads, system_malloc=args.system_malloc)
    shape = TINY if args.tiny else ModelShape()
    impls = implementations(args.backends)
    model = build_model(shape, max(args.prompts) + args.new_tokens)
    rows: list[GenerateRow] = []
    for n in args.prompts:
        for row in PromptBench(model, impls, n, args).measure():
            rows.append(row)
            what = f"N={n} {row.backend}"
            print(f"{what}: {row.status} {row.reason or ''}{_summary(row)}", flush=True)
    meta = {
        "command": machine.command_line(SCRIPT, argv),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "effattn": effattn.__version__,
        "cpu": machine.cpu_name(),
        "cpu_count": os.cpu_count(),
        "setup": setup.record(),
        "model": asdict(shape),
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "mem_limit_gib": args.mem_limit_gib,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, meta)
    (args.out / "README.md").write_text(text)
    results = {"meta": meta, "rows": [asdict(r) for r in rows], "targets": targets(rows)}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(text, flush=True)
    return rows


def _summary(row: GenerateRow) -> str:
    if row.status != "ok":
        return ""
    return (
        f" prefill {table.fmt_number(row.prefill_s)} s, {table.fmt_number(row.ms_per_token)} "
        f"ms/token, x{table.fmt_number(row.x_hf_sdpa)} HF sdpa"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
