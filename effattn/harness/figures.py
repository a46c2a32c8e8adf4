"""Figures for every study's plots: a matplotlib Figure made without pyplot's global state, and
one way to save it (PNG and SVG)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.5) -> tuple[Figure, list]:
    """A figure of ``ncols`` axes side by side, each ``width`` x ``height`` inches; (fig, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Write ``stem``.png and ``stem``.svg; returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ext) for ext in (".png", ".svg")]
    for path in paths:
        fig.savefig(path, dpi=120)
    return paths
