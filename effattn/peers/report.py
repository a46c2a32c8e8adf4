"""The report of `effattn peers`: the ratio table (one line per (ours, peer) pair, computed from
the run's rows by effattn.peers.measure; units in the header, written by effattn.harness.table),
the versions of the peers, and the report folder (results.json with the pairs, agreement
included, and how they were made; README.md with the table; the rows themselves are in the run
folder, OUT/run by default)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from effattn.harness import machine, table
from effattn.peers.inputs import B, D, H

PEER_PACKAGES = (
    "torch",
    "transformers",
    "local-attention",
    "reformer-pytorch",
    "performer-pytorch",
    "linear-attention-transformer",
    "linformer",
    "nystrom-attention",
)
HOW = (
    "Shape (B, H, N, D) = (1, 8, N, 64), fp32, forward, bidirectional (causal where the "
    "key says so), under no_grad (xl: qlen N/2 + memory N/2, d_model 512; linformer and "
    "nystrom layers: x (1, N, 512) with the peer's q/k/v/out projections). "
    "Every candidate is a case of effattn.harness.cases: those with the same N and causality "
    "are timed in interleaved rounds (each once per round), one row each in the run folder. "
    "Time: the median of the timed runs of all rounds; noise in brackets: the median over "
    "rounds of IQR / median within a round, and the spread (max - min) / median of the "
    "rounds' medians (load changes). "
    "`time ours/peer` is the median of the per-round ratios; < 1 means ours is faster. "
    "Peak MiB: memory of one call above its inputs (profiler memory events, MiB = 2**20). "
    "Agreement: max |ours - peer| and ||ours - peer|| / ||peer|| where the semantics match. "
    "The machine is shared: compare ratios within this table, not "
    "absolute times across runs."
)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _timing(ms: float | None, iqr: float | None, spread: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f} ({iqr:.0%}, {spread:.0%})"


def _cells(p: Mapping[str, Any]) -> dict[str, str]:
    """The table's cells of one pair (effattn.peers.measure), by column (units in the names)."""
    return {
        "algorithm": p["algorithm"],
        "ours": p["ours"],
        "peer": p["peer"],
        "status": p["status"] if p["status"] == "ok" else f"{p['status']}: {p['reason']}",
        "ours ms (IQR/med, repeat spread)": _timing(
            p["ours_ms"], p["ours_iqr_over_median"], p["ours_spread_over_rounds"]
        ),
        "peer ms (same)": _timing(
            p["peer_ms"], p["peer_iqr_over_median"], p["peer_spread_over_rounds"]
        ),
        "time ours/peer": _fmt(p["time_ratio_ours_over_peer"], ".2f"),
        "speed-up peer/ours": _fmt(p["speedup_peer_over_ours"], ".2f"),
        "ours peak MiB": _fmt(p["ours_peak_mib"], ".1f"),
        "peer peak MiB": _fmt(p["peer_peak_mib"], ".1f"),
        "mem ours/peer": _fmt(p["mem_ratio_ours_over_peer"], ".2f"),
        "max abs diff": _fmt(p["max_abs_diff"], ".1e"),
        "rel err": _fmt(p["rel_err"], ".1e"),
        "agreement": p["agreement_note"],
    }


def markdown(pairs: Sequence[Mapping[str, Any]]) -> str:
    """The ratio table: one line per (ours, peer) pair; units in the header."""
    return table.markdown([_cells(p) for p in pairs])


def environment() -> dict[str, object]:
    """Versions of torch and the peers, and the machine of this run."""
    versions = {}
    for package in PEER_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "versions": versions,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "shape": f"B={B}, H={H}, N=n, D={D}, float32, forward, no_grad",
    }


def write_report(out: Path, pairs: Sequence[Mapping[str, Any]], meta: dict[str, Any]) -> None:
    """``out``/results.json (the pairs, agreement included, + meta) and ``out``/README.md (the
    table and how it was made); ``meta``: :func:`environment` with the run's command, n,
    repeats, run_dir, wall_s and effattn.harness.machine.CpuSetup.record()."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "pairs": list(pairs)}
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    text = [
        "# effattn beside the peers (CPU)",
        "",
        f"Produced by `{meta['command']}` in one process: {machine.describe(meta)}; "
        f"N={meta['n']}, {meta['repeats']} interleaved rounds, {versions}; "
        f"{meta['machine']}, {meta['cpu_count']} cores; {meta['wall_s']:.0f} s in all. "
        f"The rows of every candidate: `effattn report {meta['run_dir']}`.",
        "",
        HOW,
        "",
        markdown(pairs) if pairs else "(no rows)",
        "",
    ]
    (out / "README.md").write_text("\n".join(text))
