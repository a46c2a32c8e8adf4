"""Two runs of a sweep compared cell by cell: what changed, whether it is more than noise, and how
well the two runs agree (as ``pyperf compare_to`` and Criterion's change report do).

    effattn compare RUN_A RUN_B [--noise 5] [--fail-on-regression 10] [--out FILE.md]

A cell is a point measured ``ok`` in both runs (same key). For each cell:

- time: median(B) / median(A) - 1, with the 95% interval of that ratio from the two runs' timed
  runs (effattn.harness.stats.change_interval: each run resampled on its own, rounds then runs);
- speed-up vs ``sdpa`` and vs ``full``: the same on the per-round ratios of each run (a
  bootstrap over rounds).

A change is *significant* when its interval excludes 0 and it is larger than the noise
threshold (``noise_pct``, default 5%: the size of change this shared machine makes between
runs). Rows of a run without rounds (no timings kept) are compared by their medians, and
never called significant.

Agreement, the check that two runs of the same commit repeat (:func:`agreement`): the share of
cells whose two medians are within ``tolerance_pct`` of each other, and the share whose run-A
95% repeat interval (effattn.harness.stats.repeat_interval, the ``±`` of the tables) holds run
B's median: about 95% when the intervals are honest. (Run A's 95% *confidence* interval would
hold it only about 83% of the time even then: it is for the true median, and B's median varies
as much as A's.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from effattn.harness import stats
from effattn.harness.rows import repeat_intervals
from effattn.harness.stats import METRICS, NOISE_PCT, TOLERANCE_PCT
from effattn.harness.store import ResultsFile, resolve_run
from effattn.harness.table import fmt_number
from effattn.harness.table import render as render_table
from effattn.sweep.report import SECTION, section_title


@dataclass(frozen=True)
class Change:
    """One metric of one cell in both runs. For time, larger is slower; for a speed-up, larger
    is faster."""

    a: float  # run A's median
    b: float  # run B's median
    a_interval: stats.Interval | None  # run A's 95% repeat interval (None: the row has none)
    ratio: stats.Interval | None  # b / a with its 95% interval (None: no timings kept)
    significant: bool  # the interval excludes 1 and |b / a - 1| >= the noise threshold

    @property
    def pct(self) -> float:
        return 100 * (self.b / self.a - 1)


@dataclass(frozen=True)
class Cell:
    """A point measured ok in both runs, and its changes per metric (absent: not measured)."""

    section: str  # the table's title (mode, dtype, device, B/H/D, causal, threads)
    label: str  # the backend with options
    n: int
    mode: str
    causal: bool
    changes: dict[str, Change]  # metric (METRICS) -> its change

    def describe(self) -> str:
        return f"{self.mode}{' causal' if self.causal else ''} {self.label} N={self.n}"


def _rows(run: Path | str) -> tuple[str, dict[str, dict[str, Any]]]:
    path = resolve_run(run)
    rows = {r["key"]: r for r in ResultsFile(path).read()}  # the last row of a key wins
    if not rows:
        raise ValueError(f"run: {path} holds no rows yet")
    return path.parent.name, rows


def _change(
    a: dict[str, Any],
    b: dict[str, Any],
    metric: str,
    repeats: dict[str, stats.Interval],
    noise_pct: float,
) -> Change | None:
    if metric == "time":
        median, stem = "time_ms_median", "time_ms"
        rounds_a, rounds_b = a.get("times_ms"), b.get("times_ms")
    else:
        median = stem = f"speedup_{metric}"
        rounds_a = [[x] for x in a.get(f"{stem}_rounds") or []]
        rounds_b = [[x] for x in b.get(f"{stem}_rounds") or []]
    if a.get(median) is None or b.get(median) is None:
        return None
    ratio = None
    if rounds_a and rounds_b:
        ratio = stats.change_interval(rounds_a, rounds_b)
    value = b[median] / a[median]
    significant = ratio is not None and not ratio.holds(1.0) and abs(100 * (value - 1)) >= noise_pct
    return Change(a[median], b[median], repeats.get(stem), ratio, significant)


def compare_runs(
    run_a: Path | str, run_b: Path | str, *, noise_pct: float = NOISE_PCT
) -> tuple[str, str, list[Cell]]:
    """(name of A, name of B, the cells measured ok in both), in run B's order."""
    name_a, rows_a = _rows(run_a)
    name_b, rows_b = _rows(run_b)
    cells = []
    for key, b in rows_b.items():
        a = rows_a.get(key)
        if a is None or a["status"] != "ok" or b["status"] != "ok":
            continue
        repeats = repeat_intervals(a)  # run A's repeat interval of each metric
        changes = {m: c for m in METRICS if (c := _change(a, b, m, repeats, noise_pct)) is not None}
        section = section_title(tuple(b.get(k) for k in SECTION))
        cells.append(Cell(section, b["label"], b["n"], b["mode"], b["causal"], changes))
    if not cells:
        raise ValueError(f"compare: no point was measured ok in both {name_a} and {name_b}")
    return name_a, name_b, cells


@dataclass(frozen=True)
class Agreement:
    """How well two runs repeat on one metric."""

    metric: str
    cells: int  # cells with the metric in both runs (baselines against themselves left out)
    within: int  # medians within the tolerance of each other
    held: int  # run A's repeat interval holds run B's median
    with_interval: int  # cells where run A has an interval


def agreement(
    cells: Sequence[Cell], metric: str, *, tolerance_pct: float = TOLERANCE_PCT
) -> Agreement:
    """The share of cells repeating within ``tolerance_pct``, and held by run A's interval."""
    found = []
    for cell in cells:
        change = cell.changes.get(metric)
        if change is None or (metric != "time" and cell.label == metric.removeprefix("vs_")):
            continue  # a baseline against itself is 1 in every run
        found.append(change)
    within = sum(abs(c.pct) <= tolerance_pct for c in found)
    intervals = [c for c in found if c.a_interval is not None]
    held = sum(c.a_interval.holds(c.b) for c in intervals)
    return Agreement(metric, len(found), within, held, len(intervals))


def regressions(cells: Sequence[Cell], metric: str, pct: float) -> list[tuple[Cell, Change]]:
    """Significant changes for the worse (time up, speed-up down) by more than ``pct``%."""
    worse = []
    for cell in cells:
        change = cell.changes.get(metric)
        if change is None or not change.significant:
            continue
        if (change.pct if metric == "time" else -change.pct) > pct:
            worse.append((cell, change))
    return worse


_WORDS = {
    "time": ("slower", "faster"),
    "vs_sdpa": ("better", "worse"),
    "vs_full": ("better", "worse"),
}
_NAMES = {"time": "time", "vs_sdpa": "speed-up vs sdpa", "vs_full": "speed-up vs full"}


def _change_text(metric: str, change: Change | None) -> str:
    if change is None:
        return ""
    if change.ratio is None:
        return f"{change.pct:+.0f}% (?)"
    up, down = _WORDS[metric]
    if not change.significant:
        return f"{change.pct:+.0f}%"
    return f"{change.pct:+.0f}% **{up if change.b > change.a else down}**"


def _value_text(change: Change | None, unit: str) -> str:
    if change is None:
        return ""
    return f"{fmt_number(change.a)}{unit} → {fmt_number(change.b)}{unit}"


def summary(cells: Sequence[Cell], metric: str) -> str:
    """One line: how many cells changed significantly each way, the largest, the rest."""
    found = [(c, c.changes[metric]) for c in cells if metric in c.changes]
    if metric != "time":
        found = [(c, ch) for c, ch in found if c.label != metric.removeprefix("vs_")]
    up, down = _WORDS[metric]
    ups = [(c, ch) for c, ch in found if ch.significant and ch.b > ch.a]
    downs = [(c, ch) for c, ch in found if ch.significant and ch.b < ch.a]

    def worst(items: list) -> str:
        if not items:
            return ""
        cell, change = max(items, key=lambda x: abs(math.log(x[1].b / x[1].a)))
        return f" (largest: {cell.describe()} {change.pct:+.0f}%)"

    rest = len(found) - len(ups) - len(downs)
    return (
        f"{_NAMES[metric]}: {len(ups)} of {len(found)} cells significantly {up}{worst(ups)}, "
        f"{len(downs)} {down}{worst(downs)}, {rest} unchanged"
    )


def render(
    name_a: str,
    name_b: str,
    cells: Sequence[Cell],
    *,
    noise_pct: float = NOISE_PCT,
    tolerance_pct: float = TOLERANCE_PCT,
    changed_only: bool = False,
) -> str:
    """The comparison as Markdown: a table per section, the summary lines, the agreement."""
    out = [f"# effattn compare: {name_a} (A) → {name_b} (B)", ""]
    out.append(
        f"A change is significant (**bold**) when its 95% bootstrap interval excludes 0 and it is "
        f"larger than {noise_pct:g}%; (?) = a run without per-round timings."
    )
    out.append("")
    metrics = [m for m in METRICS if any(m in c.changes for c in cells)]
    by_section: dict[str, list[Cell]] = {}
    for cell in cells:
        by_section.setdefault(cell.section, []).append(cell)
    for section, part in by_section.items():
        if changed_only:
            part = [c for c in part if any(ch.significant for ch in c.changes.values())]
            if not part:
                continue
        table = []
        for cell in part:
            row = {"backend": cell.label, "N": cell.n}
            for m in metrics:
                unit = " ms" if m == "time" else "x"
                row[f"{_NAMES[m]} A → B"] = _value_text(cell.changes.get(m), unit)
                row[f"{_NAMES[m]} change"] = _change_text(m, cell.changes.get(m))
            table.append(row)
        out += [f"## {section}", "", render_table(pd.DataFrame(table), "md"), ""]
    out += ["## Summary", ""]
    out += [f"- {summary(cells, m)}" for m in metrics]
    out += ["", "## Agreement", ""]
    for m in metrics:
        found = agreement(cells, m, tolerance_pct=tolerance_pct)
        out.append(f"- {agreement_text(found, tolerance_pct)}")
        for section, part in by_section.items():
            found = agreement(part, m, tolerance_pct=tolerance_pct)
            if found.cells and len(by_section) > 1:
                out.append(f"  - {section}: {agreement_text(found, tolerance_pct)}")
    return "\n".join(out) + "\n"


def agreement_text(found: Agreement, tolerance_pct: float = TOLERANCE_PCT) -> str:
    def pct(k: int, n: int) -> str:  # rounded down: 95 of 106 reads 89%, never a target's 90%
        return f"{k} of {n} ({100 * k // n}%)" if n else "no cell"

    return (
        f"{_NAMES[found.metric]}: within ±{tolerance_pct:g}% in {pct(found.within, found.cells)}; "
        f"run A's 95% repeat interval holds run B's median in "
        f"{pct(found.held, found.with_interval)}"
    )
