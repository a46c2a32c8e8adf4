"""Benchmark cases on one shared main helper: a script is a list of :class:`Case` and a report.

A :class:`Case` is the identity of a timing row (effattn.harness.rows.Row) and ``build``, a
function that makes the callable to time (inputs allocated, model built, peer imported). A public
implementation timed beside ours is a case whose ``backend`` is ``peer:<name>``, its label saying
what it is. The cases of one comparison group (same N, mode, dtype, device, causal, threads, B, H,
D: :attr:`Case.group_key`) are timed in interleaved rounds (effattn.harness.interleave: each round
times every case of the group once, so that a change of machine load lands on all of them), and
:func:`run` writes one row per case through the run store into a run folder (results.jsonl +
env.json), the format `effattn report` and `effattn compare` read:

- ok: the per-call times of every round, the median with its intervals, the speed-ups vs the
  group's ``full`` and ``sdpa`` taken per round (effattn.harness.rows), the peak memory of one
  call above its inputs (effattn.harness.meters), the case's FLOPs when it gives them;
- a build that raises ImportError: ``skipped`` (a peer that is not installed); MemoryError or
  torch.OutOfMemoryError: ``oom``; any other exception, in the build, a timed call or the memory
  meter: ``crashed``, with "TypeName: message". A case that raised is never timed as if it ran.

A run folder is rewritten by default (the earlier results set aside as ``*.old``); with
``--resume`` the cases that have a row keep it, and a group with cases left is timed whole again
(the ratios need its baselines in the same rounds), writing only the missing rows. A script's
report reads the rows :func:`run` returns; :func:`ratio` and :func:`spread` give its columns.

A worked example, ``benchmarks/my_bench.py``::

    import torch
    import effattn
    from effattn.harness import cases

    def backend_call(name, n, **options):
        q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))  # (B, H, N, D)
        backend = effattn.get_backend(name, **options)
        return torch.no_grad()(lambda: backend(q, k, v))

    def make_cases(args):
        return [
            case
            for n in (1024, 2048)
            for case in (
                cases.Case(backend="sdpa", label="sdpa", n=n,
                           build=lambda n=n: backend_call("sdpa", n)),
                cases.Case(backend="local", label="local:window=256", n=n,
                           options=(("window", 256),),
                           build=lambda n=n: backend_call("local", n, window=256)),
                cases.Case(backend="peer:local-attention", label="local-attention w=256", n=n,
                           build=lambda n=n: local_attention_call(n)),  # ImportError: skipped
            )
        ]

    if __name__ == "__main__":
        cases.main(make_cases, script="benchmarks.my_bench")  # -> reports/runs/my_bench/

    $ python -m benchmarks.my_bench --rounds 5 --only local --threads 2
    $ effattn report reports/runs/my_bench --out reports/my_bench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from effattn.harness import machine, meters, stats
from effattn.harness.interleave import time_interleaved
from effattn.harness.rows import Row, ratio_fields, timing_fields
from effattn.harness.store import (
    RESULTS,
    RUNS_DIR,
    ResultsFile,
    archive_results,
    finish_env,
    write_env,
)

BASELINES = ("full", "sdpa")  # labels every speed-up is taken against, within rounds
PEER = "peer:"  # the backend prefix of a public implementation
MODE_WORDS = {"fwd": "forward", "fwd_bwd": "forward+backward", "step": "training step"}


@dataclass(frozen=True, kw_only=True)
class Case:
    """One thing to time: the identity of its row, and how to make the callable."""

    backend: str  # registered name, or peer:<name> for a public implementation
    label: str  # what it is: "local:window=256", "local-attention 1.11.2 w=256"
    n: int  # sequence length N (the context, for a layer or a decode step)
    build: Callable[[], Callable[[], object]] = field(repr=False, compare=False)  # -> the
    # callable to time (raises ImportError when a peer is not installed)
    batch: int = 1  # B
    heads: int = 8  # H
    head_dim: int = 64  # D
    dtype: str = "float32"
    device: str = "cpu"
    causal: bool = False
    threads: int = 2  # CPU intra-op threads while timing (main sets --threads)
    mode: str = "fwd"  # fwd, fwd_bwd, step, or what else the call is (decode)
    options: tuple[tuple[str, Any], ...] = ()  # the backend's options (sorted pairs)
    flops: int | None = field(default=None, compare=False)  # FLOPs of one call, if counted

    IDENTITY = (
        "backend",
        "label",
        "options",
        "n",
        "batch",
        "heads",
        "head_dim",
        "dtype",
        "device",
        "causal",
        "threads",
        "mode",
    )

    @property
    def key(self) -> str:
        """The identity of its row, for resuming: the identity fields as canonical JSON."""
        return json.dumps({k: getattr(self, k) for k in self.IDENTITY}, sort_keys=True)

    @property
    def group_key(self) -> tuple:
        """The comparison group: every identity field but backend, label and options."""
        return tuple(getattr(self, k) for k in self.IDENTITY[3:])

    def describe(self) -> str:
        """``local:window=256 causal forward``: what ``--only`` matches."""
        causal = "causal" if self.causal else "bidirectional"
        return f"{self.label} {causal} {MODE_WORDS.get(self.mode, self.mode)}"


def select(cases: Sequence[Case], only: str) -> list[Case]:
    """The cases matching ``only``: comma-separated items, a case matching an item when every
    word of the item occurs in its :meth:`Case.describe` (case-insensitive); "" keeps all."""
    items = [item.lower().split() for item in only.split(",") if item.strip()]
    if not items:
        return list(cases)
    return [c for c in cases if any(all(w in c.describe().lower() for w in i) for i in items)]


def _status(error: BaseException) -> tuple[str, str]:
    reason = f"{type(error).__name__}: {error}"
    if isinstance(error, ImportError):
        return "skipped", f"not importable: {reason}"
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return "oom", reason
    return "crashed", reason


def _peak_mib(fn: Callable[[], object], device: str) -> float:
    peak = meters.peak_memory_cuda(fn) if device == "cuda" else meters.peak_memory_cpu(fn)
    return peak / meters.MIB


def measure_group(
    group: Sequence[Case], *, rounds: int, min_run_s: float, memory: bool = True
) -> list[Row]:
    """Time the cases of one comparison group in ``rounds`` interleaved rounds; a row each."""
    calls: dict[str, Callable[[], object]] = {}
    failed: dict[str, tuple[str, str]] = {}
    for case in group:
        try:
            calls[case.key] = case.build()
        except Exception as e:
            failed[case.key] = _status(e)
    first = group[0]
    timer = meters.time_cuda if first.device == "cuda" else None
    timed = time_interleaved(
        calls,
        repeats=rounds,
        threads=first.threads,
        min_run_time_s=min_run_s,
        drop_failing=True,
        timer=timer,
    )
    failed.update({key: ("crashed", error) for key, error in timed.errors.items()})
    times = {key: [list(t.times_ms) for t in ts] for key, ts in timed.timings.items()}
    bases = {c.label: c.key for c in group if c.label in BASELINES and c.key in times}
    rows = []
    for case in group:
        if case.key in failed:
            rows.append(Row.make(case, *failed[case.key]))
            continue
        fields = timing_fields(times[case.key])
        for label, base in bases.items():
            ratios = stats.round_ratios(times[base], times[case.key])
            fields.update(ratio_fields(f"speedup_vs_{label}", ratios))
        try:
            if memory:
                fields["peak_mem_mib"] = _peak_mib(calls[case.key], case.device)
        except Exception as e:
            rows.append(Row.make(case, *_status(e)))
            continue
        rows.append(Row.make(case, "ok", **fields))
    return rows


def run(
    cases: Sequence[Case],
    run_dir: Path | str,
    *,
    rounds: int,
    min_run_s: float,
    resume: bool = False,
    memory: bool = True,
    spec: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Measure ``cases`` group by group into ``run_dir`` (created; earlier results set aside
    unless ``resume``) and return their rows as written, in the order of ``cases``."""
    keys = [c.key for c in cases]
    if len(set(keys)) != len(keys):
        raise ValueError("cases: expected each case once, got a repeated identity")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        archive_results(run_dir)
    results = ResultsFile(run_dir / RESULTS)
    done = {r["key"] for r in results.read()}
    threads = {c.threads for c in cases} or {torch.get_num_threads()}
    settings = {"rounds": rounds, "min_run_s": min_run_s, "cases": len(cases)}
    write_env(run_dir, machine.environment(threads, {**(spec or {}), **settings}))
    groups: dict[tuple, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.group_key, []).append(case)
    for group in groups.values():
        if all(c.key in done for c in group):
            continue
        for row in measure_group(group, rounds=rounds, min_run_s=min_run_s, memory=memory):
            if row.key not in done:
                results.append(row)
                print(_line(row), flush=True)
    finish_env(run_dir)
    latest = {r["key"]: r for r in results.read()}
    return [latest[k] for k in keys if k in latest]


def _line(row: Row) -> str:
    what = f"{row.mode} {row.label} N={row.n}{' causal' if row.causal else ''}"
    if row.status != "ok":
        return f"{what}: {row.status}: {row.reason}"
    memory = "" if row.peak_mem_mib is None else f", {row.peak_mem_mib:.1f} MiB"
    return f"{what}: {row.time_ms_median:.3g} ms{memory}"


def round_medians(row: Mapping[str, Any]) -> list[float | None]:
    """The median time of each round of a row (ms; None for a round without a timing)."""
    return [statistics.median(r) if r else None for r in row.get("times_ms") or []]


def ratio(row: Mapping[str, Any], baseline: Mapping[str, Any]) -> float | None:
    """Median over rounds of time(row) / time(baseline), both times from the same round (not
    the ratio of the medians); None when no round timed both. < 1: ``row`` is faster."""
    pairs = zip(round_medians(row), round_medians(baseline), strict=False)
    ratios = [a / b for a, b in pairs if a is not None and b]
    return statistics.median(ratios) if ratios else None


def _iqr_over_median(values: Sequence[float]) -> float:
    """IQR / median of ``values`` (0 for a single value)."""
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (0.0, 0.0, 0.0)
    return (q3 - q1) / statistics.median(values)


def spread(row: Mapping[str, Any]) -> float | None:
    """IQR / median of a row's per-round medians (load changes between rounds); 0 with one."""
    medians = [m for m in round_medians(row) if m is not None]
    return _iqr_over_median(medians) if medians else None


def noise(row: Mapping[str, Any]) -> float | None:
    """Median over rounds of IQR / median of a round's timed runs (noise within a round)."""
    within = [_iqr_over_median(r) for r in row.get("times_ms") or [] if r]
    return statistics.median(within) if within else None


def add_arguments(parser: argparse.ArgumentParser, *, rounds: int = 3, min_run_s: float = 1.0):
    """The options every benchmark script shares, added to ``parser``."""
    parser.add_argument("--threads", type=int, default=2, help="CPU intra-op threads (pinned)")
    parser.add_argument(
        "--rounds",
        "--repeats",
        dest="rounds",
        type=int,
        default=rounds,
        help="interleaved rounds: each times every case of a group once",
    )
    parser.add_argument(
        "--min-run-s",
        "--min-run-time",
        "--min-time",
        dest="min_run_s",
        type=float,
        default=min_run_s,
        help="timed seconds per case and round (CPU)",
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="LABELS",
        help="comma-separated; a case is kept when every word of an item is in its label, "
        "'causal' or 'bidirectional' and its mode ('local causal forward')",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="the run folder (results.jsonl + env.json) that `effattn report` and `effattn "
        "compare` read",
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep the rows the run folder has; measure the rest"
    )
    machine.add_system_malloc_flag(parser)


Report = Callable[[argparse.Namespace, machine.CpuSetup, list[dict[str, Any]]], None]


def main(
    cases: Sequence[Case] | Callable[[argparse.Namespace], Sequence[Case]],
    argv: Sequence[str] | None = None,
    *,
    script: str,
    description: str = "",
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    report: Report | None = None,
    run_dir: Callable[[argparse.Namespace], Path] | None = None,
    rounds: int = 3,
    min_run_s: float = 1.0,
) -> list[dict[str, Any]]:
    """A benchmark script's main: parse the shared options (and the script's: ``arguments``),
    ready the CPU (machine.prepare_cpu), measure the cases (a list, or made from the parsed
    options) that ``--only`` keeps, with ``--threads``, into the run folder (``--run-dir``,
    else ``run_dir(args)``, else reports/runs/<script's last name>), then call ``report``.
    ``script``: the module, ``benchmarks.bench_sparse``. Returns the rows."""
    parser = argparse.ArgumentParser(description=description.split("\n")[0])
    add_arguments(parser, rounds=rounds, min_run_s=min_run_s)
    if arguments is not None:
        arguments(parser)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    setup = machine.prepare_cpu(args.threads, system_malloc=args.system_malloc)
    chosen = cases(args) if callable(cases) else cases
    chosen = [dataclasses.replace(c, threads=args.threads) for c in select(chosen, args.only)]
    folder = args.run_dir or (run_dir(args) if run_dir else RUNS_DIR / script.split(".")[-1])
    spec = {"script": script, "command": machine.command_line(script, argv), **setup.record()}
    rows = run(
        chosen, folder, rounds=args.rounds, min_run_s=args.min_run_s, resume=args.resume, spec=spec
    )
    if report is not None:
        report(args, setup, rows)
    return rows
