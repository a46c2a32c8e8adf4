"""Plots of a sweep (matplotlib, imported here only; Agg backend). Each ``plot_*`` function
returns a Figure; :func:`save_figure` writes it as PNG and SVG; :func:`write_plots` makes them all.

- plot_time / plot_memory: time_ms_median and peak_mem_mib (decoding: state_mib) against N,
  log-log, one line per backend (and run), with the 95% interval of the time as a band (a run
  without rounds: from median - IQR/2 to median + IQR/2);
- plot_speedup: full's time / each backend's time against N (per round), with its 95% interval;
- plot_error_vs_speed: rel_error against time for the approximate backends;
- plot_patterns: the attention pattern (Backend.pattern) of each backend that does not attend to
  every pair, at N = 1024 (at 256 a 256-window covers every pair).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from effattn.harness.figures import new_figure, save_figure
from effattn.sweep.report import SECTION, section_title

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _curves(frame: pd.DataFrame):
    """(label, rows sorted by N) for each backend (and run) of the ok rows."""
    ok = frame[frame["status"] == "ok"]
    several = ok["run"].nunique() > 1
    for (run, label), rows in ok.groupby(["run", "label"], sort=False):
        yield (f"{label} [{run}]" if several else label), rows.sort_values("n")


def _ns(frame: pd.DataFrame) -> list[int]:
    return sorted(int(n) for n in frame.loc[frame["status"] == "ok", "n"].unique())


def _section_title(frame: pd.DataFrame) -> str:
    """The title of the section the frame's rows belong to (effattn.sweep.report)."""
    first = frame.iloc[0]
    return section_title(tuple(first[k] for k in SECTION))


def _band(ax, rows: pd.DataFrame, color: str, stem: str, median: str) -> None:
    """Shade the 95% interval (``stem``_lo .. ``stem``_hi) where the rows have one."""
    lo, hi = rows.get(f"{stem}_lo"), rows.get(f"{stem}_hi")
    if lo is None or hi is None:
        return
    if stem == "time_ms":  # a run without rounds: median -+ IQR/2
        half = rows["time_ms_iqr"] / 2
        lo = lo.fillna(rows[median] - half)
        hi = hi.fillna(rows[median] + half)
    ax.fill_between(rows["n"], lo.clip(lower=1e-6), hi, color=color, alpha=0.2)


def plot_time(frame: pd.DataFrame) -> Figure:
    """Median time against N on log-log axes, with its 95% interval as a band (one section's
    rows)."""
    fig, (ax,) = new_figure()
    for label, rows in _curves(frame):
        (line,) = ax.plot(rows["n"], rows["time_ms_median"], marker="o", label=label)
        _band(ax, rows, line.get_color(), "time_ms", "time_ms_median")
    axis = "time_ms_median (band: 95% confidence interval)"
    _log_axes(ax, axis, _section_title(frame), _ns(frame))
    return fig


def plot_memory(frame: pd.DataFrame) -> Figure:
    """Peak memory above the inputs (decoding: the state's bytes) against N on log-log axes."""
    fig, (ax,) = new_figure()
    for label, rows in _curves(frame):
        ax.plot(rows["n"], rows["memory_mib"].clip(lower=1e-3), marker="o", label=label)
    decode = (frame["mode"] == "decode").all()
    axis = "state_mib of the decoding state" if decode else "peak_mem_mib"
    _log_axes(ax, f"{axis} (MiB = 2**20 bytes)", _section_title(frame), _ns(frame))
    return fig


def plot_speedup(frame: pd.DataFrame) -> Figure:
    """full's time / each backend's time (per round), against N (1 = as fast as full)."""
    fig, (ax,) = new_figure()
    for label, rows in _curves(frame):
        (line,) = ax.plot(rows["n"], rows["speedup_vs_full"], marker="o", label=label)
        _band(ax, rows, line.get_color(), "speedup_vs_full", "speedup_vs_full")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    axis = "speed-up vs full (x; band: 95% confidence interval)"
    _log_axes(ax, axis, _section_title(frame), _ns(frame))
    return fig


def plot_error_vs_speed(frame: pd.DataFrame) -> Figure:
    """rel_error (vs float64 full) against time, for approximate backends, one point per N."""
    fig, (ax,) = new_figure()
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


def plot_patterns(labels: list[str], n: int = 1024, dense_n: int = 512) -> Figure:
    """What each backend attends to, on random inputs (B = H = 1, D = 16, seed 0).

    Pattern backends (``has_pattern``): the mask (or pair weights) realised at length ``n``;
    dense ones (every pair) are left out. Low-rank and kernel backends, which attend to every
    pair through a formula: their effective attention matrix A (out = A V) from the dense
    reference (``Backend.attention_matrix``) at length ``dense_n``, labelled so, in a diverging
    colour map when A has negative entries (Linformer, Nystromformer)."""
    from effattn.registry import get_backend, parse_backend_spec

    shown = []  # (title, picture (N, N), signed)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 16, generator=gen) for _ in range(3))  # (B, H, N, D)
    for label in labels:
        spec = parse_backend_spec(label)
        backend = get_backend(spec.name, **dict(spec.options))
        causal = not backend.supports_bidirectional  # causal-only backends: causal
        if not backend.has_pattern:
            small = (t[:, :, :dense_n] for t in (q, k, v))  # (B, H, N, D) -> (B, H, dense_n, D)
            try:
                weights = backend.attention_matrix(*small, causal=causal)[0, 0]  # (N, N)
            except ValueError:
                continue
            title = f"{label}\neffective A (out = A V), N={dense_n}"
            shown.append((title, weights.float(), bool((weights < 0).any())))
            continue
        try:
            pattern = backend.pattern(q, k, v, causal=causal)
        except (NotImplementedError, ValueError):
            continue
        picture = pattern.mask[0, 0].float()
        if pattern.weight is not None:
            picture = picture * pattern.weight[0, 0]
        if bool(pattern.mask.all()):
            continue  # dense: nothing to see
        density = float((picture > 0).float().mean())
        shown.append((f"{label}\n{density:.1%} of pairs", picture, False))
    fig, axes = new_figure(max(1, len(shown)), width=3.2, height=3.4)
    for ax, (title, picture, signed) in zip(axes, shown, strict=False):
        if signed:
            top = float(picture.abs().max())
            ax.imshow(picture.numpy(), cmap="RdBu_r", interpolation="nearest", vmin=-top, vmax=top)
        else:
            ax.imshow(picture.numpy(), cmap="Greys", interpolation="nearest", vmin=0)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
    if not shown:
        axes[0].text(0.5, 0.5, "no backend to picture", ha="center", va="center")
        axes[0].set_axis_off()
    fig.suptitle(
        f"attention patterns at N={n} (black = computed); low-rank and kernel backends: "
        f"their effective attention matrix A at N={dense_n} (dense reference)",
        fontsize=9,
    )
    return fig


def _log_axes(ax, ylabel: str, title: str, ns: list[int]) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])  # the measured N, written plainly
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("context N (positions the decoded token sees)" if "decoding" in title
                  else "sequence length N")  # fmt: skip
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def write_plots(frame: pd.DataFrame, out: Path, prefix: str) -> list[Path]:
    """Every plot of the runs in ``frame`` into ``out``: PREFIX-<mode>[-causal]-<kind>.png/svg
    (one set per section of the other axes) and PREFIX-patterns.png/svg."""
    out = Path(out)
    written = []
    sections = list(frame.groupby(SECTION, sort=False))
    # (mode, causal) names a section unless other axes vary too
    long_names = len(sections) > len({(k[0], k[3]) for k, _ in sections})
    for key, part in sections:
        mode, dtype, device, causal, b, h, d, threads, kv_heads, kv_n = key
        name = f"{prefix}-{mode}" + ("-causal" if causal else "")
        if long_names:
            name += f"-{dtype}-{device}-b{b}h{h}d{d}-t{threads}"
            name += ("" if kv_heads == h else f"-hkv{kv_heads}") + (f"-nk{kv_n}" if kv_n else "")
        kinds = {"time": plot_time, "memory": plot_memory, "speedup": plot_speedup}
        if part["rel_error"].notna().any():
            kinds["error"] = plot_error_vs_speed
        for kind, plot in kinds.items():
            written += save_figure(plot(part), out / f"{name}-{kind}")
    from effattn.registry import list_backends

    installed = set(list_backends())  # a peer (peer:<name>) or a plugin has no picture here
    ours = frame[frame["backend"].isin(installed)]
    labels = [lab for lab in dict.fromkeys(ours["label"]) if lab.split(":")[0] in installed]
    written += save_figure(plot_patterns(labels), out / f"{prefix}-patterns")
    return written
