"""The one table writer: a pandas DataFrame (or rows: dataclasses or dicts) rendered as Markdown,
CSV, LaTeX or HTML, and the number format every table shares.

    table.render(frame, "md")        # GitHub Markdown, pipes escaped in cells
    table.markdown([row_a, row_b])   # rows -> the same Markdown, one column per field
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

FORMATS = ("md", "csv", "tex", "html")


def fmt_number(value: float | None, digits: int = 3) -> str:
    """``digits`` significant digits (whole numbers from 10**digits on); "-" for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"


def as_frame(rows: pd.DataFrame | Sequence[Any]) -> pd.DataFrame:
    """``rows`` as a DataFrame: a DataFrame as it is, dataclasses by their fields, mappings by
    their keys (in the order of the first row)."""
    if isinstance(rows, pd.DataFrame):
        return rows
    records = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in rows]
    return pd.DataFrame.from_records(records)


def _cell(value: Any, floatfmt: str) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else format(value, floatfmt)
    if value is None:
        return ""
    return str(value).replace("|", "/").replace("\n", " ")


def markdown(rows: pd.DataFrame | Sequence[Mapping | Any], floatfmt: str = ".3g") -> str:
    """Rows as a GitHub Markdown table: floats in ``floatfmt``, cells as written (no number
    re-parsing), pipes and line breaks in cells made harmless."""
    frame = as_frame(rows)
    cells = frame.apply(lambda col: col.map(lambda v: _cell(v, floatfmt)))
    return cells.to_markdown(index=False, disable_numparse=True)


def render(frame: pd.DataFrame, fmt: str, *, caption: str | None = None) -> str:
    """``frame`` as ``fmt`` (one of FORMATS); ``caption`` for LaTeX."""
    if fmt == "md":
        return frame.to_markdown(index=False)
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "tex":
        return frame.to_latex(index=False, caption=caption, escape=True)
    if fmt == "html":
        return frame.to_html(index=False, border=0, escape=True)
    raise ValueError(f"fmt: expected one of {', '.join(FORMATS)}, got {fmt!r}")
