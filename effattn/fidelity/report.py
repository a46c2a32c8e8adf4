"""Tables and plot of a fidelity run (the sweep's table reads its CSV:
effattn.sweep.report.load_fidelity), from its rows and what they were measured on (a
FidelityRun; effattn.fidelity.runner.load_run reads one back from its run folder).

- :func:`to_frame`: one row per setting (``COLUMNS``: the CSV's columns, a fixed list, not every
  field of a stored row); per-layer errors as ``layer_error_<i>``;
- :func:`render_markdown` and :func:`write_report`: reports/fidelity-<device>.md and .csv, and
  the plot reports/plots/fidelity-<device>.png/.svg;
- :func:`plot_fidelity`: 1 - cosine and the per-layer error against the FLOPs fraction, one curve
  per backend over its options (a Figure; saved with effattn.harness.figures.save_figure);
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from effattn.fidelity.measure import FidelityRow, FidelityRun

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLUMNS = [
    *("curve", "label", "backend", "causal", "status", "reason", "documents", "seq_len"),
    *("flops_fraction", "pairs_fraction", "cosine_mean", "cosine_min"),
    *("recall_at_1", "recall_at_1_exact", "recall_at_1_mixed", "time_s"),
    *("layer_error_mean", "layer_error_max"),
]  # then layer_error_0 .. layer_error_{L-1}
CAPTION = (
    "`flops/dense`: the backend's forward FLOPs over dense attention's at N (for sparse "
    "backends, the (query, key) pairs it computes, whole blocks counted); `pairs`: the distinct "
    "pairs its pattern() attends on the model's real q, k, over all pairs (sparse backends "
    "only); `cosine`: sentence-embedding cosine similarity against exact attention, mean and "
    "minimum over documents; `layer error`: ||out - exact|| / ||exact|| of each attention "
    "layer's output recomputed by the backend from the real q, k, v of the exact run, mean "
    "over documents, then mean and max over the layers (per layer in the csv); `recall@1`: "
    "first halves retrieving their own second half, both embedded with the backend; `vs exact "
    "index`: the backend's first halves against second halves embedded with exact attention."
)


def to_frame(rows: Iterable[FidelityRow]) -> pd.DataFrame:
    """One record per row, in ``COLUMNS`` order, then ``layer_error_0 .. layer_error_{L-1}``
    (a row's other fields, its key, options, host and so on, are left out)."""
    records = []
    for row in rows:
        record = {k: v for k, v in dataclasses.asdict(row).items() if k in COLUMNS}
        errors = row.layer_errors
        record["layer_error_mean"] = sum(errors) / len(errors) if errors else None
        record["layer_error_max"] = max(errors) if errors else None
        record.update({f"layer_error_{i}": e for i, e in enumerate(errors)})
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    return frame.reindex(columns=COLUMNS + per_layer_columns(frame))


def per_layer_columns(frame: pd.DataFrame) -> list[str]:
    """``layer_error_0``, ``layer_error_1``, ... in layer order."""
    layers = [c for c in frame.columns if re.fullmatch(r"layer_error_\d+", c)]
    return sorted(layers, key=lambda c: int(c.rsplit("_", 1)[1]))


def _number(value: object, digits: int) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.{digits}g}"


def _cosine(value: object) -> str:
    """A cosine with enough digits to tell 0.99999 from 1."""
    return "" if value is None or pd.isna(value) else f"{value:.5f}"


def render_markdown(
    run: FidelityRun, frame: pd.DataFrame, plot: str | None = None, command: str | None = None
) -> str:
    """The report: what was measured on what (and by ``command``), the table of ok rows, the
    rows not measured with their reasons, and a link to ``plot``."""
    config = run.config
    ok = frame[frame["status"] == "ok"]
    per_layer = per_layer_columns(frame)
    table = pd.DataFrame(
        {
            "setting": ok["label"] + ok["causal"].map({True: " (causal)", False: ""}),
            "flops/dense": ok["flops_fraction"].map(lambda x: _number(x, 3)),
            "pairs": ok["pairs_fraction"].map(lambda x: _number(x, 3)),
            "cosine mean": ok["cosine_mean"].map(_cosine),
            "cosine min": ok["cosine_min"].map(_cosine),
            "layer error mean": ok["layer_error_mean"].map(lambda x: _number(x, 3)),
            "layer error max": ok["layer_error_max"].map(lambda x: _number(x, 3)),
            f"per layer (1..{len(per_layer)})": ok[per_layer].apply(
                lambda r: " ".join(_number(x, 2) for x in r), axis=1
            )
            if per_layer and len(ok)
            else "",
            "recall@1": ok["recall_at_1"].map(lambda x: _number(x, 3)),
            "vs exact index": ok["recall_at_1_mixed"].map(lambda x: _number(x, 3)),
        }
    )
    exact_recall = ", ".join(
        f"{value:.3f} ({'causal' if causal else 'bidirectional'})"
        for causal, value in ok.groupby("causal")["recall_at_1_exact"].first().items()
    )
    versions = ", ".join(f"{k} {v}" for k, v in run.versions.items())
    lines = [
        f"# Fidelity in a real pretrained model ({config.device})",
        "",
        "Each backend runs inside all-MiniLM-L6-v2 (BERT: 6 layers, 12 heads of dim 32) through "
        'effattn\'s HuggingFace integration (`attn_implementation="effattn_..."`), on real '
        "English text, against the model's own exact attention (transformers' `sdpa`). "
        "Causal-only backends (`xl`) run causally against the same model made causal.",
        "",
        f"- Text: {len(run.corpus_modules)} documents, each two halves of N = {config.seq_len} "
        f"tokens: the docstrings of Python {run.python}'s standard-library modules "
        f"({', '.join(run.corpus_modules)}); token digest `{run.corpus_digest[:16]}`.",
        f"- Exact attention's recall@1: {exact_recall or 'not measured'}.",
        f"- {versions}; float32, {config.device}, "
        + (f"{config.threads} threads" if config.threads else "default threads")
        + f", batch {config.batch_size}; the whole run took {run.wall_s:.0f} s.",
        f"- Command: `{command or 'effattn fidelity'}`.",
        "",
        CAPTION,
        "",
        _markdown(table) if len(table) else "(no setting measured)",
        "",
    ]
    skipped = frame[frame["status"] != "ok"]
    if len(skipped):
        lines += ["Not measured:", ""]
        lines += [f"- `{r.label}`: {r.status}: {r.reason}" for r in skipped.itertuples()]
        lines.append("")
    if plot:
        lines += [f"![fidelity against cost]({plot})", ""]
    return "\n".join(lines)


def _markdown(table: pd.DataFrame) -> str:
    """The table as formatted (tabulate would re-parse "0.99999" as a number and round it)."""
    right = ["left" if column in ("setting",) or "per layer" in column else "right"
             for column in table.columns]  # fmt: skip
    return table.to_markdown(index=False, disable_numparse=True, colalign=right)


MARKERS = "os^vDPX*<>"  # with tab20's colours: no two curves look alike


def plot_fidelity(frame: pd.DataFrame) -> Figure:
    """1 - mean cosine (left) and mean per-layer error (right) against the FLOPs fraction, log
    axes, one curve per backend over its options, each point marked with the option that
    varies. Exact backends (1 - cosine about 0) are left out."""
    import matplotlib.pyplot as plt

    from effattn.harness.figures import new_figure
    from effattn.registry import backend_class, list_backends

    exact = {name for name in list_backends() if backend_class(name).exact}
    fig, (left, right) = new_figure(2)
    ok = frame[(frame["status"] == "ok") & ~frame["backend"].isin(exact)]
    for i, (curve, rows) in enumerate(ok.groupby("curve", sort=False)):
        rows = rows.sort_values("flops_fraction")
        x = rows["flops_fraction"]
        style = {"marker": MARKERS[i % len(MARKERS)], "color": plt.get_cmap("tab20")(i % 20)}
        left.plot(x, (1 - rows["cosine_mean"]).clip(lower=1e-7), label=curve, **style)
        right.plot(x, rows["layer_error_mean"].clip(lower=1e-9), **style)
        for (_, row), text in zip(rows.iterrows(), _varying_options(rows["label"]), strict=True):
            for ax, y in ((left, 1 - row["cosine_mean"]), (right, row["layer_error_mean"])):
                ax.annotate(text, (row["flops_fraction"], y), fontsize=6, alpha=0.8)
    n = int(frame["seq_len"].iloc[0]) if len(frame) else 0
    for ax, ylabel in (
        (left, "1 - sentence-embedding cosine vs exact (mean over documents)"),
        (right, "attention-output relative error (mean over layers, documents)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"forward FLOPs / dense attention's at N={n} (sparse: pairs computed)")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.axvline(1.0, color="gray", lw=0.8, ls="--")
        ax.grid(True, which="major", alpha=0.3)
    left.set_title("all-MiniLM-L6-v2 on real text: lower is closer to exact", fontsize=9)
    right.set_title("each layer recomputed from the model's real q, k, v", fontsize=9)
    if len(ok):
        left.legend(fontsize=7)
    return fig


def _varying_options(labels: pd.Series) -> list[str]:
    """Per label, the ``opt=value`` items that differ within the curve (all of them if none)."""
    items = [label.partition(":")[2].split(",") if ":" in label else [] for label in labels]
    common = set.intersection(*map(set, items)) if items else set()
    return [",".join(i for i in parts if i not in common) or ",".join(parts) for parts in items]


def write_report(
    run: FidelityRun, prefix: Path, plots: Path, command: str | None = None
) -> list[Path]:
    """Write PREFIX.csv, PREFIX.md and plots/<PREFIX's name>.png/.svg; returns the paths.
    ``command``: the command line that made the run, quoted in the report."""
    from effattn.harness.figures import save_figure

    prefix, plots = Path(prefix), Path(plots)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    frame = to_frame(run.rows)
    csv = prefix.with_name(prefix.name + ".csv")
    frame.to_csv(csv, index=False)
    figures = save_figure(plot_fidelity(frame), plots / prefix.name)
    md = prefix.with_name(prefix.name + ".md")
    link = Path(_relative(figures[0], md.parent)).as_posix()
    md.write_text(render_markdown(run, frame, plot=link, command=command))
    return [md, csv, *figures]


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())
