"""Plots of a sweep (matplotlib, imported here only; Agg backend). Each ``plot_*`` function
returns a Figure; :func:`save_figure` writes it as PNG and SVG; :func:`write_plots` makes them all.

- plot_time / plot_memory: time_ms_median and peak_mem_mib against N, log-log, one line per
  backend (and run), a band from median - IQR/2 to median + IQR/2 for time;
- plot_speedup: full's time / each backend's time against N;
- plot_error_vs_speed: rel_error against time for the approximate backends;
- plot_patterns: the attention pattern (Backend.pattern) of each backend that does not attend to
  every pair, at N = 1024 (at 256 a 256-window covers every pair).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from effattn.bench.report import SECTION

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.5) -> tuple[Figure, list]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _curves(frame: pd.DataFrame):
    """(label, rows sorted by N) for each backend (and run) of the ok rows."""
    ok = frame[frame["status"] == "ok"]
    several = ok["run"].nunique() > 1
    for (run, label), rows in ok.groupby(["run", "label"], sort=False):
        yield (f"{label} [{run}]" if several else label), rows.sort_values("n")


def _ns(frame: pd.DataFrame) -> list[int]:
    return sorted(int(n) for n in frame.loc[frame["status"] == "ok", "n"].unique())


def _section_title(frame: pd.DataFrame) -> str:
    first = frame.iloc[0]
    causal = "causal" if first["causal"] else "bidirectional"
    return (
        f"{first['mode']} · {first['dtype']} · {first['device']} · B={first['batch']} "
        f"H={first['heads']} D={first['head_dim']} · {causal} · {first['threads']} threads"
    )


def plot_time(frame: pd.DataFrame) -> Figure:
    """Median time against N on log-log axes, with the IQR as a band (one section's rows)."""
    fig, (ax,) = _figure()
    for label, rows in _curves(frame):
        (line,) = ax.plot(rows["n"], rows["time_ms_median"], marker="o", label=label)
        half = rows["time_ms_iqr"] / 2
        ax.fill_between(
            rows["n"],
            (rows["time_ms_median"] - half).clip(lower=1e-6),
            rows["time_ms_median"] + half,
            color=line.get_color(),
            alpha=0.2,
        )
    _log_axes(ax, "time_ms_median (band: IQR)", _section_title(frame), _ns(frame))
    return fig


def plot_memory(frame: pd.DataFrame) -> Figure:
    """Peak memory above the inputs against N on log-log axes."""
    fig, (ax,) = _figure()
    for label, rows in _curves(frame):
        ax.plot(rows["n"], rows["peak_mem_mib"].clip(lower=1e-3), marker="o", label=label)
    _log_axes(ax, "peak_mem_mib (MiB = 2**20 bytes)", _section_title(frame), _ns(frame))
    return fig


def plot_speedup(frame: pd.DataFrame) -> Figure:
    """full's time / each backend's time, against N (1 = as fast as full)."""
    fig, (ax,) = _figure()
    for label, rows in _curves(frame):
        ax.plot(rows["n"], rows["speedup_vs_full"], marker="o", label=label)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    _log_axes(ax, "speed-up vs full (x)", _section_title(frame), _ns(frame))
    return fig


def plot_error_vs_speed(frame: pd.DataFrame) -> Figure:
    """rel_error (vs float64 full) against time, for approximate backends, one point per N."""
    fig, (ax,) = _figure()
    rows = frame[(frame["status"] == "ok") & frame["rel_error"].notna()]
    for label, part in rows.groupby("label", sort=False):
        ax.scatter(part["time_ms_median"], part["rel_error"].clip(lower=1e-12), label=label)
        for _, r in part.iterrows():
            ax.annotate(f"N={r['n']}", (r["time_ms_median"], r["rel_error"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("time_ms_median")
    ax.set_ylabel("rel_error = ||out - ref|| / ||ref||")
    ax.set_title("error vs speed (approximate backends)", fontsize=9)
    if len(rows):
        ax.legend(fontsize=8)
    return fig


def plot_patterns(labels: list[str], n: int = 1024) -> Figure:
    """The mask (or pair weights) that each backend realises on random inputs of length n."""
    from effattn.bench.spec import parse_backend_spec
    from effattn.registry import get_backend

    shown = []
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 16, generator=gen) for _ in range(3))  # (B, H, N, D)
    for label in labels:
        spec = parse_backend_spec(label)
        backend = get_backend(spec.name, **dict(spec.options))
        try:
            causal = not backend.supports_bidirectional  # causal-only backends: causal
            pattern = backend.pattern(q, k, v, causal=causal)
        except (NotImplementedError, ValueError):
            continue
        picture = pattern.mask[0, 0].float()
        if pattern.weight is not None:
            picture = picture * pattern.weight[0, 0]
        if bool(pattern.mask.all()):
            continue  # dense: nothing to see
        shown.append((label, picture))
    fig, axes = _figure(max(1, len(shown)), width=3.2, height=3.4)
    for ax, (label, picture) in zip(axes, shown, strict=False):
        ax.imshow(picture.numpy(), cmap="Greys", interpolation="nearest", vmin=0)
        density = float((picture > 0).float().mean())
        ax.set_title(f"{label}\n{density:.1%} of pairs", fontsize=8)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
    if not shown:
        axes[0].text(0.5, 0.5, "no sparse pattern backend", ha="center", va="center")
        axes[0].set_axis_off()
    fig.suptitle(f"attention patterns at N={n} (black = computed)", fontsize=9)
    return fig


def _log_axes(ax, ylabel: str, title: str, ns: list[int]) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])  # the measured N, written plainly
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("sequence length N")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Write ``stem``.png and ``stem``.svg; returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ext) for ext in (".png", ".svg")]
    for path in paths:
        fig.savefig(path, dpi=120)
    return paths


def write_plots(frame: pd.DataFrame, out: Path, prefix: str) -> list[Path]:
    """Every plot of the runs in ``frame`` into ``out``: PREFIX-<mode>[-causal]-<kind>.png/svg
    (one set per section of the other axes) and PREFIX-patterns.png/svg."""
    out = Path(out)
    written = []
    sections = list(frame.groupby(SECTION, sort=False))
    # (mode, causal) names a section unless other axes vary too
    long_names = len(sections) > len({(k[0], k[3]) for k, _ in sections})
    for key, part in sections:
        mode, dtype, device, causal, b, h, d, threads = key
        name = f"{prefix}-{mode}" + ("-causal" if causal else "")
        if long_names:
            name += f"-{dtype}-{device}-b{b}h{h}d{d}-t{threads}"
        kinds = {"time": plot_time, "memory": plot_memory, "speedup": plot_speedup}
        if part["rel_error"].notna().any():
            kinds["error"] = plot_error_vs_speed
        for kind, plot in kinds.items():
            written += save_figure(plot(part), out / f"{name}-{kind}")
    from effattn.registry import list_backends

    installed = set(list_backends())
    labels = [lab for lab in dict.fromkeys(frame["label"]) if lab.split(":")[0] in installed]
    written += save_figure(plot_patterns(labels), out / f"{prefix}-patterns")
    return written
