"""Tay-style tables (the Long Range Arena's speed and memory table) from one or several runs.

load_runs(...)   -> one tidy DataFrame, a row per measured point, with derived columns:
                    noise_pct (100 * IQR / median), time_ci_pct and speedup_vs_*_ci_pct (the
                    half-width of each 95% confidence interval in % of its median),
                    time_repeat_pct and speedup_vs_*_repeat_pct (the same of each 95% repeat
                    interval: where a second run's median lands), unstable (a repeat interval
                    wider than effattn.harness.stats.UNSTABLE_PCT), mem_vs_full (this / full's).
                    speedup_vs_full and speedup_vs_sdpa are the rows' own (median over rounds of
                    the baseline's time / this time, both from the same round); rows of a run
                    without rounds get the ratio of the medians, without an interval.
tay_tables(...)  -> per section (mode, dtype, device, causal, B, H, D, threads): a speed table,
                    a speed-up-vs-sdpa table (when sdpa ran) and a memory table, rows = backends,
                    columns = N (x runs when several), plus the backends' declarations, the
                    measured scaling exponents (slope of the log-log fit of time and memory
                    against N) and the efficiency lengths (:func:`efficiency_length`).
render_*/write_report: Markdown, CSV (the tidy frame), LaTeX, a self-contained HTML page.

A speed cell reads ``61.3 ±1% (3.2x ±2%)``: the median time in ms, then the speed-up vs full;
each ``±`` is the half-width of its 95% repeat interval in % of the median: a second run of the
same sweep puts its median there 95% of the time (effattn.harness.stats.repeat_interval); a ``!``
after it marks an interval wider than ±UNSTABLE_PCT% (the cell is unstable).
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

from effattn.backend import Backend
from effattn.harness.rows import INTERVALS, repeat_intervals
from effattn.harness.stats import UNSTABLE_PCT
from effattn.harness.store import ENV, read_runs
from effattn.harness.table import fmt_number, render
from effattn.registry import backend_class, parse_backend_spec
from effattn.sweep.spec import BASELINES

FIDELITY_COLUMN = "cosine, real model (N=512)"  # from `effattn fidelity` (report --fidelity)
# The axes a table is made for (its columns are N); kv_heads and kv_n are filled in by
# load_runs where a row has none (Hkv = H; Nk = N, shown as "").
SECTION = [
    "mode", "dtype", "device", "causal", "batch", "heads", "head_dim", "threads", "kv_heads", "kv_n"
]  # fmt: skip
STATUS_TEXT = {"oom": "OOM", "timeout": "timeout", "unsupported": "n/a", "skipped": "skipped"}
PEER = "peer:"  # the backend of a public implementation (effattn.harness.cases)
BASELINE = "full"  # the first row of every table; speed-ups and memory are relative to it
# Kept in results.jsonl, left out of the CSV: the timings themselves, per round.
RAW_COLUMNS = ["key", "times_ms", "speedup_vs_full_rounds", "speedup_vs_sdpa_rounds"]


def load_runs(paths: Iterable[Path | str]) -> pd.DataFrame:
    """All rows of the runs, one per point (the last row of a key wins), with derived columns."""
    frame = read_runs(paths)
    not_sweeps = frame["mode"].isna() if "mode" in frame else pd.Series(True, frame.index)
    if not_sweeps.any():
        run_dir = Path(frame.loc[not_sweeps, "run_dir"].iloc[0])
        raise ValueError(
            f"run: {run_dir} is a run of `effattn quality`, not a sweep: its report "
            f"is `effattn quality --report-only --run-id {run_dir.name} "
            f"--out {run_dir.parent} --report PREFIX`"
        )
    for column in ("kv_heads", "kv_n", "state_mib"):
        if column not in frame:
            frame[column] = np.nan
    frame["kv_heads"] = frame["kv_heads"].fillna(frame["heads"]).astype(int)
    frame["kv_n"] = [_nk(value) for value in frame["kv_n"]]
    # what the memory tables show: the decoding state for a decoded token, else the peak
    frame["memory_mib"] = frame["state_mib"].where(frame["mode"] == "decode", frame["peak_mem_mib"])
    for stem, median in INTERVALS.items():
        for column in (median, f"{stem}_lo", f"{stem}_hi"):
            if column not in frame:
                frame[column] = np.nan
    frame = frame.astype(
        {c: float for s, m in INTERVALS.items() for c in (m, f"{s}_lo", f"{s}_hi")}
    )
    ok = frame["status"] == "ok"
    frame["noise_pct"] = (100 * frame["time_ms_iqr"] / frame["time_ms_median"]).where(ok)
    for label in BASELINES:  # rows without rounds: the ratio of the medians
        base = frame[ok & (frame["label"] == label)]
        base = base[["run", *SECTION, "n", "time_ms_median"]].drop_duplicates(
            ["run", *SECTION, "n"]
        )
        base = base.rename(columns={"time_ms_median": "_base"})
        merged = frame.merge(base, on=["run", *SECTION, "n"], how="left")["_base"]
        column = f"speedup_vs_{label}"
        frame[column] = frame[column].fillna(merged / frame["time_ms_median"]).where(ok)
    base = frame[ok & (frame["label"] == BASELINE)][["run", *SECTION, "n", "memory_mib"]]
    base = base.drop_duplicates(["run", *SECTION, "n"])
    frame = frame.merge(base, on=["run", *SECTION, "n"], how="left", suffixes=("", "_full"))
    frame["mem_vs_full"] = frame["memory_mib"] / frame["memory_mib_full"]
    repeats = [repeat_intervals(r) if r["status"] == "ok" else {} for _, r in frame.iterrows()]
    widths = []
    for stem, median in INTERVALS.items():
        name = stem.replace("_ms", "")
        frame[f"{name}_ci_pct"] = _half_width_pct(
            frame[median], frame[f"{stem}_lo"], frame[f"{stem}_hi"]
        )
        width = [r[stem].half_width_pct if stem in r else np.nan for r in repeats]
        frame[f"{name}_repeat_pct"] = pd.Series(width, index=frame.index, dtype=float)
        widths.append(frame[f"{name}_repeat_pct"] > UNSTABLE_PCT)
    frame["unstable"] = np.logical_or.reduce(widths) & ok
    return frame.drop(columns=["memory_mib_full"])


def _nk(value: object) -> str:
    """A row's Nk as a section value: "" where the keys are the N queries."""
    return "" if value is None or value == "" or pd.isna(value) else str(int(value))


def load_fidelity(path: Path | str) -> dict[Backend, str]:
    """The real-model column of the speed tables, from `effattn fidelity`'s CSV: for each backend
    setting measured there (as a Backend instance, so that ``bigbird`` and
    ``bigbird:block_size=64`` are one setting), its sentence-embedding cosine against exact
    attention, ``"0.984 (min 0.968)"``. Settings that failed or are no longer registered are
    left out."""
    from effattn.registry import get_backend

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fidelity: expected the CSV of `effattn fidelity`, got {path}")
    table = pd.read_csv(path)
    missing = {"label", "status", "cosine_mean", "cosine_min"} - set(table.columns)
    if missing:
        raise ValueError(f"fidelity: {path} lacks the column(s) {', '.join(sorted(missing))}")
    cosines: dict[Backend, str] = {}
    for row in table[table["status"] == "ok"].itertuples():
        try:
            spec = parse_backend_spec(row.label)
        except (ValueError, TypeError):
            continue
        backend = get_backend(spec.name, **dict(spec.options))
        cosines[backend] = f"{row.cosine_mean:.3f} (min {row.cosine_min:.3f})"
    return cosines


def _fidelity_of(label: str, cosines: dict[Backend, str]) -> str:
    """The cosine of a table row (a sweep label) measured by `effattn fidelity`, or ""."""
    from effattn.registry import get_backend

    try:
        spec = parse_backend_spec(label)
        return cosines.get(get_backend(spec.name, **dict(spec.options)), "")
    except (ValueError, TypeError):  # a plugin backend, not registered here
        return ""


def _half_width_pct(median: pd.Series, lo: pd.Series, hi: pd.Series) -> pd.Series:
    """The larger side of each interval in % of its median (effattn.harness.stats.Interval)."""
    return 100 * np.maximum(hi / median - 1, 1 - lo / median)


def efficiency_length(n: Sequence[float], speedup: Sequence[float]) -> tuple[str, float | None]:
    """From which N a backend is faster than a baseline (CAB's efficiency length), given its
    speed-up over that baseline (baseline's time / its time) at the measured N.

    Returns ``("from", N*)``: slower at the largest measured N below N*, faster from N* on
    through the largest measured N, N* interpolated on the straight line through the two
    measured points around the crossing in log(N)-log(speed-up); ``("below", N0)``: faster at
    every measured N, from the smallest N0 on; ``("none", None)``: slower at the largest N (or
    no N measured): not in range."""
    pairs = sorted((a, b) for a, b in zip(n, speedup, strict=True) if b is not None and b > 0)
    if not pairs or pairs[-1][1] <= 1:
        return "none", None
    slower = [i for i, (_, s) in enumerate(pairs) if s <= 1]
    if not slower:
        return "below", float(pairs[0][0])
    (n0, s0), (n1, s1) = pairs[slower[-1]], pairs[slower[-1] + 1]
    x0, x1, y0, y1 = math.log(n0), math.log(n1), math.log(s0), math.log(s1)
    return "from", math.exp(x0 + (0 - y0) * (x1 - x0) / (y1 - y0))


def _efficiency_text(kind: str, n: float | None) -> str:
    if kind == "none":
        return "not in range"
    if kind == "below":
        return f"≤{n:.0f}"
    return f"≈{float(f'{n:.3g}'):.0f}"


def scaling_exponent(n: Sequence[float], values: Sequence[float]) -> float | None:
    """Slope of log(value) against log(N) (least squares, to 2 decimals: a flat curve is 0,
    not 1e-16); None with fewer than 2 points."""
    pairs = [(a, b) for a, b in zip(n, values, strict=True) if b is not None and b > 0]
    if len({a for a, _ in pairs}) < 2:
        return None
    x, y = np.log([a for a, _ in pairs]), np.log([b for _, b in pairs])
    return round(float(np.polyfit(x, y, 1)[0]), 2) + 0.0  # + 0.0: no "-0"


def _declarations(backend: str, decode: bool = False) -> tuple[dict[str, str], str]:
    """The speed table's declaration columns and the memory table's complexity (``decode``: of
    the decoding state): "-" for a peer (``peer:<name>``, a public implementation a benchmark
    script timed beside ours), "?" for a backend that is not registered here (a plugin)."""
    try:
        cls = backend_class(backend)
    except ValueError:
        unknown = "-" if backend.startswith(PEER) else "?"
        return dict.fromkeys(("complexity", "class", "causal decode", "exact"), unknown), unknown
    return {
        "complexity": cls.complexity,
        "class": cls.tay_class,
        "causal decode": "yes" if cls.state_complexity != "-" else "no",  # decode_state
        "exact": "yes" if cls.exact else "no",
    }, cls.state_complexity if decode else cls.memory_complexity


def _pm(width: float) -> str:
    """`` ±3%`` for a repeat interval's half-width in %, ``!`` after it when unstable; nothing
    for an interval narrower than 0.5% (a baseline against itself) or none at all."""
    if pd.isna(width) or width < 0.5:
        return ""
    return f" ±{width:.0f}%" + ("!" if width > UNSTABLE_PCT else "")


def _cell(row: pd.Series, kind: str) -> str:
    if row["status"] != "ok":
        return STATUS_TEXT.get(row["status"], row["status"])  # the reason is in the notes
    if kind == "memory":
        rel = row["mem_vs_full"]
        tail = "" if pd.isna(rel) else f" ({fmt_number(rel, 2)}x)"
        return f"{fmt_number(row['memory_mib'])}{tail}"
    if kind == "vs_sdpa":
        rel = row["speedup_vs_sdpa"]
        pm = _pm(row["speedup_vs_sdpa_repeat_pct"])
        return "" if pd.isna(rel) else f"{fmt_number(rel, 2)}x{pm}"
    rel = row["speedup_vs_full"]
    pm = _pm(row["speedup_vs_full_repeat_pct"])
    tail = "" if pd.isna(rel) else f" ({fmt_number(rel, 2)}x{pm})"
    value = row["steps_per_s"] if row["mode"] == "step" else row["time_ms_median"]
    return f"{fmt_number(value)}{_pm(row['time_repeat_pct'])}{tail}"


@dataclass(frozen=True)
class Section:
    """The tables of one combination of the non-N axes."""

    title: str  # "fwd · float32 · cpu · B=1 H=8 D=64 · bidirectional · 2 threads"
    speed: pd.DataFrame  # rows = backends, columns = N [x run], plus declarations, exponents
    vs_sdpa: pd.DataFrame | None  # speed-up vs sdpa per N [x run]; None without sdpa
    memory: pd.DataFrame
    notes: list[str]  # the full reason of every failed cell


def section_title(key: tuple) -> str:
    """The title of a section from the values of SECTION: "forward · float32 · cpu · ..."."""
    mode, dtype, device, causal, b, h, d, threads, kv_heads, kv_n = key
    what = {
        "fwd": "forward",
        "fwd_bwd": "forward+backward",
        "step": "encoder training step",
        "decode": "decoding one token at context N",
    }
    grouped = "" if kv_heads in (None, h) or pd.isna(kv_heads) else f" Hkv={int(kv_heads)}"
    keys = f" · Nk={kv_n}" if kv_n not in (None, "") and not pd.isna(kv_n) else ""
    return (
        f"{what.get(mode, mode)} · {dtype} · {device} · B={b} H={h}{grouped} D={d}{keys} · "
        f"{'causal' if causal else 'bidirectional'} · {threads} threads"
    )


def tay_tables(frame: pd.DataFrame, cosines: dict[Backend, str] | None = None) -> list[Section]:
    """The LRA-style tables, one Section per combination of the other axes. With ``cosines``
    (:func:`load_fidelity`), the speed tables of approximate backends gain the real-model
    column for each row measured there."""
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
        speed, vs_sdpa, memory = [], [], []
        has_sdpa = bool(part["speedup_vs_sdpa"].notna().any())
        failures: dict[tuple, list[int]] = {}
        for label in labels:
            rows = part[part["label"] == label]
            backend = rows["backend"].iloc[0]
            s_row, v_row, m_row = {"backend": label}, {"backend": label}, {"backend": label}
            for n, r in columns:
                hit = rows[(rows["n"] == n) & (rows["run"] == r)]
                name = f"N={n}" if len(runs) == 1 else f"N={n} {r}"
                if hit.empty:
                    s_row[name] = v_row[name] = m_row[name] = ""
                    continue
                row = hit.iloc[-1]
                s_row[name], m_row[name] = _cell(row, "speed"), _cell(row, "memory")
                v_row[name] = _cell(row, "vs_sdpa")
                if row["status"] not in ("ok", "skipped"):
                    failures.setdefault((label, r, row["status"], row["reason"]), []).append(n)
            declared, m_row["memory complexity"] = _declarations(backend, key[0] == "decode")
            s_row.update(declared)
            for r in runs:
                ok = rows[(rows["run"] == r) & (rows["status"] == "ok")]
                suffix = "" if len(runs) == 1 else f" {r}"
                s_row[f"time exp.{suffix}"] = fmt_number(
                    scaling_exponent(list(ok["n"]), list(ok["time_ms_median"])), 2
                )
                for base, row_of in (("full", s_row), ("sdpa", v_row)):
                    if label != base and len(ok):
                        found = efficiency_length(ok["n"], ok[f"speedup_vs_{base}"])
                        row_of[f"faster than {base} from N{suffix}"] = _efficiency_text(*found)
                m_row[f"memory exp.{suffix}"] = fmt_number(
                    scaling_exponent(list(ok["n"]), list(ok["memory_mib"])), 2
                )
                errors = ok["rel_error"].dropna() if "rel_error" in ok else []
                if len(errors):
                    n_max = int(ok.loc[errors.index, "n"].max())
                    s_row[f"rel_error, Gaussian (N={n_max}){suffix}"] = f"{errors.iloc[-1]:.2e}"
            if cosines and backend not in BASELINES and (rows["status"] == "ok").any():
                s_row[FIDELITY_COLUMN] = _fidelity_of(label, cosines)
            speed.append(s_row)
            vs_sdpa.append(v_row)
            memory.append(m_row)
        notes = [
            f"{label} N={','.join(map(str, ns))}"
            + (f" ({r})" if len(runs) > 1 else "")
            + f": {status}: {reason}"
            for (label, r, status, reason), ns in failures.items()
        ]
        vs = pd.DataFrame(vs_sdpa).fillna("") if has_sdpa else None
        speed_table = pd.DataFrame(speed).fillna("")
        if FIDELITY_COLUMN in speed_table:  # last, beside the Gaussian error
            speed_table = speed_table[[*speed_table.columns.drop(FIDELITY_COLUMN), FIDELITY_COLUMN]]
        sections.append(Section(section_title(key), speed_table, vs, pd.DataFrame(memory), notes))
    return sections


def _speed_caption(title: str) -> str:
    value = "steps_per_s" if title.startswith("encoder training step") else "time_ms_median"
    if title.startswith("decoding"):
        value = "time_ms_median per decoded token (one token of each of the B sequences)"
    return (
        f"{value} ± (speed-up vs full ±): the median over the timed runs of every "
        "interleaved round, and full's time / this time taken per round" + _CI
    )


_CI = (
    "; `rel_error, Gaussian`: ||out - full|| / ||full|| on random Gaussian q, k, v, whose "
    "attention is diffuse (a worst case for sparse patterns; it ranks little); "
    f"`{FIDELITY_COLUMN}`: sentence-embedding cosine against exact attention inside "
    "all-MiniLM-L6-v2 on real text, mean (min) over documents (`effattn fidelity`)"
    "; ± = the half-width of the 95% repeat interval, in % of the median: where a second run "
    "of the sweep puts its median, 95% of the time (Student's prediction interval over the "
    "rounds; the CSV also has the bootstrap confidence interval of the median)"
    f"; ! = wider than ±{UNSTABLE_PCT:g}% (unstable); `faster than full from N`: the "
    "efficiency length, from which N on it stays faster (interpolated log-log between measured N)"
)
VS_SDPA_CAPTION = (
    "speed-up vs sdpa ±: sdpa's time / this time, taken per interleaved round (median over "
    "rounds)" + _CI.replace("full from", "sdpa from")
)


MEMORY_CAPTION = "peak_mem_mib above the inputs, MiB = 2**20 bytes (x full's)"
STATE_CAPTION = "state_mib: what the decoding state holds, MiB = 2**20 bytes (x full's)"


def memory_caption(title: str) -> str:
    """The caption of a section's memory table (its title says whether it decodes)."""
    return STATE_CAPTION if title.startswith("decoding") else MEMORY_CAPTION


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


def render_markdown(frame: pd.DataFrame, cosines: dict[Backend, str] | None = None) -> str:
    out = ["# effattn sweep: speed and memory (Tay et al.'s LRA table shape)", ""]
    out += [f"- {line}" for line in _environment_lines(frame)]
    out.append("")
    for s in tay_tables(frame, cosines):
        out += [f"## {s.title}", "", f"Speed: {_speed_caption(s.title)}", ""]
        out += [render(s.speed, "md"), ""]
        if s.vs_sdpa is not None:
            out += [f"Speed-up vs sdpa: {VS_SDPA_CAPTION}", ""]
            out += [render(s.vs_sdpa, "md"), ""]
        out += [f"Memory: {memory_caption(s.title)}", "", render(s.memory, "md"), ""]
        out += [f"- {note}" for note in s.notes]
        if s.notes:
            out.append("")
    return "\n".join(out)


def render_latex(frame: pd.DataFrame, cosines: dict[Backend, str] | None = None) -> str:
    out = []
    for s in tay_tables(frame, cosines):
        for caption, part in _tables(s):
            out.append(render(part, "tex", caption=f"{s.title}: {caption}"))
    return "\n".join(out)


def _tables(s: Section) -> list[tuple[str, pd.DataFrame]]:
    """(caption, table) of a section, in order."""
    tables = [(_speed_caption(s.title), s.speed)]
    if s.vs_sdpa is not None:
        tables.append((VS_SDPA_CAPTION, s.vs_sdpa))
    return [*tables, (memory_caption(s.title), s.memory)]


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}caption{text-align:left;
font-style:italic;padding:4px 0}"""


def render_html(frame: pd.DataFrame, cosines: dict[Backend, str] | None = None) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>effattn sweep</title><style>{_CSS}</style></head><body>",
        "<h1>effattn sweep: speed and memory</h1><ul>",
        *(f"<li>{html.escape(line)}</li>" for line in _environment_lines(frame)),
        "</ul>",
    ]
    for s in tay_tables(frame, cosines):
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        for caption, part in _tables(s):
            parts.append(f"<p><em>{html.escape(caption)}</em></p>")
            parts.append(render(part, "html"))
        if s.notes:
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in s.notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    frame: pd.DataFrame,
    prefix: Path,
    formats: Sequence[str],
    cosines: dict[Backend, str] | None = None,
) -> list[Path]:
    """Write PREFIX.md / .csv (the tidy frame) / .tex / .html; returns the paths. ``cosines``:
    the real-model column (:func:`load_fidelity`) of the md, tex and html tables."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = prefix.with_name(prefix.name + "." + fmt)
        if fmt == "md":
            path.write_text(render_markdown(frame, cosines) + "\n")
        elif fmt == "csv":
            path.write_text(
                render(frame.drop(columns=[c for c in RAW_COLUMNS if c in frame]), "csv")
            )
        elif fmt == "tex":
            path.write_text(render_latex(frame, cosines))
        elif fmt == "html":
            path.write_text(render_html(frame, cosines))
        else:
            raise ValueError(f"format: expected md, csv, tex or html, got {fmt!r}")
        written.append(path)
    return written
