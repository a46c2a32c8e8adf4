"""Plots of a quality run (matplotlib, imported only here; Agg backend). Each ``plot_*``
returns a Figure; effattn.harness.figures.save_figure writes it; :func:`write_plots` makes them all.

- plot_bubbles: LRA's Figure 3 for one task: x training steps/s, y test accuracy, bubble area
  proportional to peak memory, one labelled bubble per backend (a panel per N);
- plot_accuracy_vs_n: test accuracy against N, one line per backend and direction, the seeds'
  range as error bars (MQAR: where a pattern's reach falls behind the sequence).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from effattn.harness.figures import save_figure
from effattn.quality.report import summarize

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(ncols: int, width: float = 6.0, height: float = 4.8) -> tuple[Figure, list]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _name(row: pd.Series) -> str:
    return row["label"] + (" (causal)" if row["causal"] else "")


def plot_bubbles(table: pd.DataFrame, task: str) -> Figure:
    """One task of :func:`effattn.quality.report.summarize`'s table: a panel per N, a bubble
    per backend at (steps/s, test accuracy %), its area proportional to peak memory."""
    part = table[(table["task"] == task) & (table["seeds"] > 0)]
    ns = sorted(part["n"].unique())
    fig, axes = _figure(max(1, len(ns)))
    biggest = part["peak_mem_mib"].max() if len(part) else 1.0
    for ax, n in zip(axes, ns, strict=False):
        rows = part[part["n"] == n]
        sizes = 2000 * rows["peak_mem_mib"] / biggest
        ax.scatter(rows["steps_per_s"], rows["acc"], s=sizes, alpha=0.35, c=range(len(rows)),
                   cmap="tab10", edgecolors="black", linewidths=0.5)  # fmt: skip
        for _, r in rows.iterrows():
            ax.annotate(_name(r), (r["steps_per_s"], r["acc"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")  # fmt: skip
        chance = rows["chance"].iloc[0]
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1)
        ax.text(ax.get_xlim()[0], chance, " chance", fontsize=7, color="grey", va="bottom")
        ax.set_xlabel("training steps/s (higher is faster)")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"{task}, N={n} (bubble area: peak MiB of a step)", fontsize=9)
        ax.grid(True, alpha=0.3)
    if not ns:
        axes[0].text(0.5, 0.5, f"no finished run of {task}", ha="center", va="center")
        axes[0].set_axis_off()
    return fig


def plot_accuracy_vs_n(table: pd.DataFrame, task: str = "mqar") -> Figure:
    """Test accuracy % against N for ``task``: one line per backend and direction (its options
    scale with N), error bars from the lowest to the highest seed."""
    part = table[(table["task"] == task) & (table["seeds"] > 0)]
    fig, (ax,) = _figure(1, width=7.0)
    for (backend, causal), rows in part.groupby(["backend", "causal"], sort=False):
        rows = rows.sort_values("n")
        err = [rows["acc"] - rows["acc_min"], rows["acc_max"] - rows["acc"]]
        name = backend + (" (causal)" if causal else "")
        ax.errorbar(rows["n"], rows["acc"], yerr=err, marker="o", capsize=3, label=name)
    ns = sorted(int(n) for n in part["n"].unique())
    if ns:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.axhline(part["chance"].iloc[0], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("sequence length N (options scaled with N: see the report)")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"{task}: accuracy against N", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def write_plots(frame: pd.DataFrame, out: Path, prefix: str) -> list[Path]:
    """PREFIX-<task>-bubbles.png/svg per task and PREFIX-mqar-vs-n.png/svg (when mqar ran at
    several N) into ``out``."""
    table = summarize(frame)
    written = []
    for task in dict.fromkeys(table["task"]):
        written += save_figure(plot_bubbles(table, task), Path(out) / f"{prefix}-{task}-bubbles")
    mqar = table[table["task"] == "mqar"]
    if mqar["n"].nunique() > 1:
        written += save_figure(plot_accuracy_vs_n(table, "mqar"), Path(out) / f"{prefix}-mqar-vs-n")
    return written
