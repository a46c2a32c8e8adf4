"""The report of `effattn peers`: the ratio table (one line per (ours, peer) pair, units in the
header, written by effattn.harness.table), the versions of the peers, and the report folder
(results.json with the rows and how they were made, README.md with the table)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path

from effattn.harness import machine, table
from effattn.peers.inputs import B, D, H
from effattn.peers.measure import Row

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
    "Time: median over repeats of each repeat's median (torch.utils.benchmark); noise in "
    "brackets: the median IQR / median of one "
    "timing, and the spread (max - min) / median of the repeats' medians (load changes). "
    "`time ours/peer` is the median of the per-repeat ratios; < 1 means ours is faster. "
    "Peak MiB: memory of one call above its inputs (profiler memory events, MiB = 2**20). "
    "Agreement: max |ours - peer| and ||ours - peer|| / ||peer|| where the semantics match. "
    "The machine is shared: compare ratios within this table, not "
    "absolute times across runs."
)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _timing(ms: float | None, iqr: float | None, spread: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f} ({iqr:.0%}, {spread:.0%})"


def _cells(r: Row) -> dict[str, str]:
    """The table's cells of one row, by column (units in the column names)."""
    return {
        "algorithm": r.algorithm,
        "ours": r.ours,
        "peer": r.peer,
        "status": r.status if r.status == "ok" else f"{r.status}: {r.reason}",
        "ours ms (IQR/med, repeat spread)": _timing(
            r.ours_ms, r.ours_iqr_over_median, r.ours_spread_over_repeats
        ),
        "peer ms (same)": _timing(r.peer_ms, r.peer_iqr_over_median, r.peer_spread_over_repeats),
        "time ours/peer": _fmt(r.time_ratio_ours_over_peer, ".2f"),
        "speed-up peer/ours": _fmt(r.speedup_peer_over_ours, ".2f"),
        "ours peak MiB": _fmt(r.ours_peak_mib, ".1f"),
        "peer peak MiB": _fmt(r.peer_peak_mib, ".1f"),
        "mem ours/peer": _fmt(r.mem_ratio_ours_over_peer, ".2f"),
        "max abs diff": _fmt(r.max_abs_diff, ".1e"),
        "rel err": _fmt(r.rel_err, ".1e"),
        "agreement": r.agreement_note,
    }


def markdown(rows: Sequence[Row]) -> str:
    """The ratio table: one line per (ours, peer) pair; units in the header."""
    return table.markdown([_cells(r) for r in rows])


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


def write_report(out: Path, rows: Sequence[Row], meta: dict[str, object]) -> None:
    """``out``/results.json (rows + meta) and ``out``/README.md (the table and how it was made);
    ``meta``: :func:`environment` with the run's command, n, repeats, wall_s and
    effattn.harness.machine.CpuSetup.record()."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    text = [
        "# effattn beside the peers (CPU)",
        "",
        f"Produced by `{meta['command']}` in one process: {machine.describe(meta)}; "
        f"N={meta['n']}, {meta['repeats']} interleaved repeats, {versions}; "
        f"{meta['machine']}, {meta['cpu_count']} cores; {meta['wall_s']:.0f} s in all.",
        "",
        HOW,
        "",
        markdown(rows) if rows else "(no rows)",
        "",
    ]
    (out / "README.md").write_text("\n".join(text))
