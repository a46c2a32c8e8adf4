"""The timing row: one per measured point of the sweep (effattn.sweep) and of a benchmark script
(effattn.harness.cases), with what a point's interleaved rounds make of it.

- :class:`Row`: the point's identity (backend, label, options, N, B, H, D, dtype, device, causal,
  threads, mode), a status and its reason, and (status ok) the times of every round, the median
  with its interval, the speed-ups vs ``full`` and ``sdpa`` taken within rounds, peak memory, FLOPs;
- :func:`timing_fields` and :func:`ratio_fields`: the row fields of a point's rounds, and of a
  ratio's per-round values (effattn.harness.stats);
- :func:`repeat_intervals`: the 95% repeat interval of each median a row holds.

``backend`` is a registered backend's name, or ``peer:<name>`` for a public implementation timed
beside ours (a benchmark script's case); readers show no declarations for a peer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from effattn.harness import stats
from effattn.harness.store import make_row

STATUSES = ("ok", "unsupported", "oom", "timeout", "crashed", "skipped")

INTERVALS = {  # the stem of a row's interval columns (<stem>_lo, <stem>_hi) -> its median column
    "time_ms": "time_ms_median",
    "speedup_vs_full": "speedup_vs_full",
    "speedup_vs_sdpa": "speedup_vs_sdpa",
}


@dataclass(frozen=True)
class Row:
    """One result line: the point, what happened, and (status ok) what was measured."""

    key: str  # the point's key: identity for resuming
    backend: str  # registered name, or peer:<name> (a public implementation)
    label: str  # name with options, ``local:window=256``
    options: dict[str, Any]  # the backend's options
    n: int  # sequence length N
    batch: int  # B
    heads: int  # H
    head_dim: int  # D
    dtype: str
    device: str
    causal: bool
    threads: int  # CPU intra-op threads while timing
    mode: str  # fwd, fwd_bwd, step, decode
    status: str  # one of STATUSES
    reason: str = ""  # why, for every status but ok
    time_ms_median: float | None = None  # median of the timed runs of all rounds, ms per call
    time_ms_lo: float | None = None  # its 95% interval (effattn.harness.stats.median_interval)
    time_ms_hi: float | None = None
    time_ms_iqr: float | None = None  # interquartile range of the timed runs
    runs: int | None = None  # timed runs (blocks of calls), all rounds
    rounds: int | None = None  # interleaved rounds that timed this point
    times_ms: list[list[float]] | None = None  # per round, ms per call of each timed run
    speedup_vs_full: float | None = None  # full's time / this time: median over rounds
    speedup_vs_full_lo: float | None = None  # its 95% interval (bootstrap over rounds)
    speedup_vs_full_hi: float | None = None
    speedup_vs_full_rounds: list[float] | None = None  # the ratio of each round
    speedup_vs_sdpa: float | None = None  # sdpa's time / this time, likewise
    speedup_vs_sdpa_lo: float | None = None
    speedup_vs_sdpa_hi: float | None = None
    speedup_vs_sdpa_rounds: list[float] | None = None
    peak_mem_mib: float | None = None  # peak memory above the inputs, MiB = 2**20 bytes
    state_mib: float | None = None  # decode: the bytes the decoding state holds, MiB
    flops: int | None = None  # FLOPs of one call (the backend's flops())
    gflop_per_s: float | None = None  # flops / median time
    tokens_per_s: float | None = None  # tokens of a call (B * N; decode: B) / median time
    steps_per_s: float | None = None  # 1 / median time (calls per second)
    rel_error: float | None = None  # approximate backends: ||out - ref|| / ||ref||
    wall_s: float | None = None  # wall-clock seconds the worker took
    finished_at: str = ""  # UTC ISO time the row was written
    host: str = ""  # hostname of the machine that wrote the row
    device_name: str = ""  # the worker's CPU or GPU name ("" when no worker ran)
    gpu: str = ""  # CUDA_VISIBLE_DEVICES the worker ran with ("" when not set)
    job_id: str = ""  # Slurm (array) job id, or submitit's local job id; "" for a local sweep
    kv_heads: int | None = None  # Hkv, key/value heads (None: H)
    kv_n: int | None = None  # Nk, keys (None: N)

    @classmethod
    def make(cls, point: Any, status: str, reason: str = "", **measured: Any) -> Row:
        """The row of ``point``: a frozen dataclass with the identity fields, ``key`` and
        ``label`` (effattn.sweep.spec.Point, effattn.harness.cases.Case); its other fields are
        left out. Rates (steps, tokens, GFLOP per second) follow from an ok row's median."""
        time_ms = measured.get("time_ms_median")
        if status == "ok" and time_ms:
            seconds = time_ms / 1e3
            measured.setdefault("steps_per_s", 1 / seconds)
            tokens = getattr(point, "tokens", point.batch * point.n)
            measured.setdefault("tokens_per_s", tokens / seconds)
            if measured.get("flops"):
                measured.setdefault("gflop_per_s", measured["flops"] / seconds / 1e9)
        return make_row(cls, STATUSES, point, status, reason, measured)


def _six(x: float) -> float:
    return float(f"{x:.6g}")


def timing_fields(rounds: list[list[float]]) -> dict[str, Any]:
    """The row fields of one point's rounds (per-call ms of each timed run, per round): the
    median and its interval (effattn.harness.stats.median_interval), the IQR of all timed runs,
    and the timings themselves (6 significant digits)."""
    interval = stats.median_interval(rounds)
    q1, q3 = np.quantile(np.concatenate(rounds), [0.25, 0.75])
    return {
        "time_ms_median": interval.median,
        "time_ms_lo": interval.lo,
        "time_ms_hi": interval.hi,
        "time_ms_iqr": float(q3 - q1),
        "runs": sum(len(r) for r in rounds),
        "rounds": len(rounds),
        "times_ms": [[_six(t) for t in r] for r in rounds],
    }


def ratio_fields(name: str, ratios: list[float]) -> dict[str, Any]:
    """``name``, ``name_lo``, ``name_hi`` (the median of the per-round ratios and its interval)
    and ``name_rounds`` (the ratios); nothing without a ratio."""
    if not ratios:
        return {}
    interval = stats.median_interval([[r] for r in ratios])
    return {
        name: interval.median,
        f"{name}_lo": interval.lo,
        f"{name}_hi": interval.hi,
        f"{name}_rounds": [_six(r) for r in ratios],
    }


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and value != value)  # NaN


def repeat_intervals(row: Mapping[str, Any]) -> dict[str, stats.Interval]:
    """The 95% repeat interval (effattn.harness.stats.repeat_interval) of each median a row
    holds, by stem (INTERVALS): where a second run's median of that cell lands. Taken over the
    row's rounds: each round's median time (``times_ms``), or a ratio's per-round values (for a
    ratio, the rounds both sides measured); rounds without a timed run are left out. A row as a
    dict, or a pandas row (NaN for a missing value). A row without per-round values (a run
    older than rounds) or with a value that is not positive and finite has none: one odd row
    must not stop a report."""
    found = {}
    for stem, median in INTERVALS.items():
        value = row.get(median)
        if stem == "time_ms":
            rounds = row.get("times_ms")
            timed = [r for r in rounds if r] if isinstance(rounds, list) else []
            per_round = stats.round_medians(timed) if timed else None
        else:
            per_round = row.get(f"{stem}_rounds")
        if not _present(value) or not isinstance(per_round, list):
            continue
        try:
            interval = stats.repeat_interval(per_round, float(value))
        except ValueError:
            continue
        if interval is not None:
            found[stem] = interval
    return found
