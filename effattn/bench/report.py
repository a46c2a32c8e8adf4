"""Tay-style tables (the Long Range Arena's speed and memory table) from one or several runs.

load_runs(...)   -> one tidy DataFrame, a row per measured point, with derived columns:
                    noise_pct (100 * IQR / median), speedup_vs_full (full's time / this time, at
                    the same N and other axes of the same run), mem_vs_full (this / full's).
tay_tables(...)  -> per section (mode, dtype, device, causal, B, H, D, threads): a speed table and
                    a memory table, rows = backends, columns = N (x runs when several), plus the
                    backends' declarations and the measured scaling exponents (slope of the
                    log-log fit of time and memory against N).
render_*/write_report: Markdown, CSV (the tidy frame), LaTeX, a self-contained HTML page.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from effattn.bench.store import ENV, RESULTS, ResultsFile
from effattn.registry import backend_class

DEFAULT_RUNS = Path("reports") / "runs"
SECTION = ["mode", "dtype", "device", "causal", "batch", "heads", "head_dim", "threads"]
STATUS_TEXT = {"oom": "OOM", "timeout": "timeout", "unsupported": "n/a", "skipped": "skipped"}
BASELINE = "full"
MIN_RUNS_FOR_NOISE = 3  # an IQR of fewer timed runs says nothing: the cell shows no ±


def resolve_run(path: Path | str) -> Path:
    """A run folder, its results.jsonl, or a run id under reports/runs/."""
    path = Path(path)
    for candidate in (path, DEFAULT_RUNS / path):
        if candidate.is_file() and candidate.name.endswith(".jsonl"):
            return candidate
        if (candidate / RESULTS).is_file():
            return candidate / RESULTS
    raise FileNotFoundError(f"run: expected a run folder with {RESULTS} or a run id, got {path}")


def load_runs(paths: Iterable[Path | str]) -> pd.DataFrame:
    """All rows of the runs, one per point (the last row of a key wins), with derived columns."""
    frames = []
    for path in paths:
        results = resolve_run(path)
        rows = ResultsFile(results).read()
        if not rows:
            raise ValueError(f"run: {results} holds no rows yet")
        frame = pd.DataFrame(rows).drop_duplicates("key", keep="last")
        frame.insert(0, "run", results.parent.name)
        frame.insert(1, "run_dir", str(results.parent))
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    ok = frame["status"] == "ok"
    frame["noise_pct"] = (100 * frame["time_ms_iqr"] / frame["time_ms_median"]).where(ok)
    base = frame[ok & (frame["label"] == BASELINE)]
    base = base[["run", *SECTION, "n", "time_ms_median", "peak_mem_mib"]]
    frame = frame.merge(base, on=["run", *SECTION, "n"], how="left", suffixes=("", "_full"))
    frame["speedup_vs_full"] = frame["time_ms_median_full"] / frame["time_ms_median"]
    frame["mem_vs_full"] = frame["peak_mem_mib"] / frame["peak_mem_mib_full"]
    return frame.drop(columns=["time_ms_median_full", "peak_mem_mib_full"])


def scaling_exponent(n: Sequence[float], values: Sequence[float]) -> float | None:
    """Slope of log(value) against log(N) (least squares); None with fewer than 2 points."""
    pairs = [(a, b) for a, b in zip(n, values, strict=True) if b is not None and b > 0]
    if len({a for a, _ in pairs}) < 2:
        return None
    x, y = np.log([a for a, _ in pairs]), np.log([b for _, b in pairs])
    return float(np.polyfit(x, y, 1)[0])


def _declarations(backend: str) -> tuple[dict[str, str], str]:
    """The speed table's declaration columns and the memory table's complexity ("?" for a
    backend that is not registered here, e.g. a plugin of the run)."""
    try:
        cls = backend_class(backend)
    except ValueError:
        return {"complexity": "?", "class": "?", "causal decode": "?", "exact": "?"}, "?"
    return {
        "complexity": cls.complexity,
        "class": cls.tay_class,
        "causal decode": "yes" if cls.supports_causal else "no",
        "exact": "yes" if cls.exact else "no",
    }, cls.memory_complexity


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"


def _cell(row: pd.Series, kind: str) -> str:
    if row["status"] != "ok":
        return STATUS_TEXT.get(row["status"], row["status"])  # the reason is in the notes
    if kind == "memory":
        rel = row["mem_vs_full"]
        tail = "" if pd.isna(rel) else f" ({_fmt(rel, 2)}x)"
        return f"{_fmt(row['peak_mem_mib'])}{tail}"
    rel = row["speedup_vs_full"]
    tail = "" if pd.isna(rel) else f" ({_fmt(rel, 2)}x)"
    noise = ""
    if not pd.isna(row["noise_pct"]) and row["runs"] >= MIN_RUNS_FOR_NOISE:
        noise = f" ±{row['noise_pct']:.0f}%"
    if row["mode"] == "step":
        return f"{_fmt(row['steps_per_s'])}{noise}{tail}"
    return f"{_fmt(row['time_ms_median'])}{noise}{tail}"


@dataclass(frozen=True)
class Section:
    """The tables of one combination of the non-N axes."""

    title: str  # "fwd · float32 · cpu · B=1 H=8 D=64 · bidirectional · 2 threads"
    speed: pd.DataFrame  # rows = backends, columns = N [x run], plus declarations, exponents
    memory: pd.DataFrame
    notes: list[str]  # the full reason of every failed cell


def _title(key: tuple) -> str:
    mode, dtype, device, causal, b, h, d, threads = key
    what = {"fwd": "forward", "fwd_bwd": "forward+backward", "step": "encoder training step"}
    return (
        f"{what.get(mode, mode)} · {dtype} · {device} · B={b} H={h} D={d} · "
        f"{'causal' if causal else 'bidirectional'} · {threads} threads"
    )


def tay_tables(frame: pd.DataFrame) -> list[Section]:
    """The LRA-style tables, one Section per combination of the other axes."""
    runs = list(dict.fromkeys(frame["run"]))
    sections = []
    for key, part in frame.groupby(SECTION, sort=False):
        labels = list(dict.fromkeys(part["label"]))
        if BASELINE in labels:
            labels.remove(BASELINE)
            labels.insert(0, BASELINE)
        ns = sorted(part["n"].unique())
        present = set(zip(part["n"], part["run"], strict=True))
        columns = [(n, r) for n in ns for r in runs if (n, r) in present]
        speed, memory = [], []
        failures: dict[tuple, list[int]] = {}
        for label in labels:
            rows = part[part["label"] == label]
            backend = rows["backend"].iloc[0]
            s_row, m_row = {"backend": label}, {"backend": label}
            for n, r in columns:
                hit = rows[(rows["n"] == n) & (rows["run"] == r)]
                name = f"N={n}" if len(runs) == 1 else f"N={n} {r}"
                if hit.empty:
                    s_row[name] = m_row[name] = ""
                    continue
                row = hit.iloc[-1]
                s_row[name], m_row[name] = _cell(row, "speed"), _cell(row, "memory")
                if row["status"] not in ("ok", "skipped"):
                    failures.setdefault((label, r, row["status"], row["reason"]), []).append(n)
            declared, m_row["memory complexity"] = _declarations(backend)
            s_row.update(declared)
            for r in runs:
                ok = rows[(rows["run"] == r) & (rows["status"] == "ok")]
                suffix = "" if len(runs) == 1 else f" {r}"
                s_row[f"time exp.{suffix}"] = _fmt(
                    scaling_exponent(list(ok["n"]), list(ok["time_ms_median"])), 2
                )
                m_row[f"memory exp.{suffix}"] = _fmt(
                    scaling_exponent(list(ok["n"]), list(ok["peak_mem_mib"])), 2
                )
                errors = ok["rel_error"].dropna() if "rel_error" in ok else []
                if len(errors):
                    s_row[f"rel_error (N={int(ok.loc[errors.index, 'n'].max())}){suffix}"] = (
                        f"{errors.iloc[-1]:.2e}"
                    )
            speed.append(s_row)
            memory.append(m_row)
        notes = [
            f"{label} N={','.join(map(str, ns))}"
            + (f" ({r})" if len(runs) > 1 else "")
            + f": {status}: {reason}"
            for (label, r, status, reason), ns in failures.items()
        ]
        sections.append(
            Section(_title(key), pd.DataFrame(speed).fillna(""), pd.DataFrame(memory), notes)
        )
    return sections


def _speed_caption(title: str) -> str:
    if title.startswith("encoder training step"):
        return "steps_per_s ±noise (speed-up vs full)" + _NOISE
    return "time_ms_median ±noise (speed-up vs full: full's time / this time)" + _NOISE


_NOISE = f"; noise = IQR/median of the timed runs, shown where there were >= {MIN_RUNS_FOR_NOISE}"


MEMORY_CAPTION = "peak_mem_mib above the inputs, MiB = 2**20 bytes (x full's)"


def _environment_lines(frame: pd.DataFrame) -> list[str]:
    lines = []
    for run in dict.fromkeys(frame["run"]):
        env = load_env(frame, run)
        if env:
            commit = (env.get("git_commit") or "?")[:10]
            commit += "+dirty" if env.get("git_dirty") else ""
            device = env.get("cuda_device") or env.get("cpu")
            lines.append(
                f"run {run}: {device}, torch {env.get('torch')}, triton {env.get('triton')}, "
                f"python {env.get('python')}, threads {env.get('threads')}, commit {commit}, "
                f"started {env.get('started_at')}"
            )
    return lines


def load_env(frame: pd.DataFrame, run: str) -> dict:
    """The env.json of ``run`` (a run name in ``frame``), or {} if it has none."""
    path = Path(frame.loc[frame["run"] == run, "run_dir"].iloc[0]) / ENV
    return json.loads(path.read_text()) if path.exists() else {}


def render_markdown(frame: pd.DataFrame) -> str:
    out = ["# effattn sweep: speed and memory (Tay et al.'s LRA table shape)", ""]
    out += [f"- {line}" for line in _environment_lines(frame)]
    out.append("")
    for s in tay_tables(frame):
        out += [f"## {s.title}", "", f"Speed: {_speed_caption(s.title)}", ""]
        out += [s.speed.to_markdown(index=False), "", f"Memory: {MEMORY_CAPTION}", ""]
        out += [s.memory.to_markdown(index=False), ""]
        out += [f"- {note}" for note in s.notes]
        if s.notes:
            out.append("")
    return "\n".join(out)


def render_latex(frame: pd.DataFrame) -> str:
    out = []
    for s in tay_tables(frame):
        for caption, table in ((_speed_caption(s.title), s.speed), (MEMORY_CAPTION, s.memory)):
            out.append(table.to_latex(index=False, caption=f"{s.title}: {caption}", escape=True))
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}caption{text-align:left;
font-style:italic;padding:4px 0}"""


def render_html(frame: pd.DataFrame) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>effattn sweep</title><style>{_CSS}</style></head><body>",
        "<h1>effattn sweep: speed and memory</h1><ul>",
        *(f"<li>{html.escape(line)}</li>" for line in _environment_lines(frame)),
        "</ul>",
    ]
    for s in tay_tables(frame):
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        for caption, table in ((_speed_caption(s.title), s.speed), (MEMORY_CAPTION, s.memory)):
            parts.append(f"<p><em>{html.escape(caption)}</em></p>")
            parts.append(table.to_html(index=False, border=0, escape=True))
        if s.notes:
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in s.notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(frame: pd.DataFrame, prefix: Path, formats: Sequence[str]) -> list[Path]:
    """Write PREFIX.md / .csv (the tidy frame) / .tex / .html; returns the paths."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = prefix.with_name(prefix.name + "." + fmt)
        if fmt == "md":
            path.write_text(render_markdown(frame) + "\n")
        elif fmt == "csv":
            frame.drop(columns=["key"]).to_csv(path, index=False)
        elif fmt == "tex":
            path.write_text(render_latex(frame))
        elif fmt == "html":
            path.write_text(render_html(frame))
        else:
            raise ValueError(f"format: expected md, csv, tex or html, got {fmt!r}")
        written.append(path)
    return written
