"""The quality report: LRA's Table 1 shape (accuracy per backend and task) with the speed and
memory of the same training runs, and an explanation of the order of the backends written
from the measured numbers.

summarize(frame)   -> a row per (task, N, backend label, direction): accuracy over the ok
                      seeds (mean, min, max, count), steps/s, peak memory (and both vs full of
                      the same task, N and direction), pair and FLOP fractions, reach.
render_markdown(frame) / write_report(frame, prefix): reports/quality-cpu.md and .csv.

Accuracies are in % of the scored positions of the test set at the end of the step budget.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from effattn.harness.store import ENV
from effattn.harness.table import fmt_number, render
from effattn.registry import backend_class

# Long Range Arena (Tay et al. 2020), Table 1, ListOps accuracy (%), for backends with a row
# (sdpa computes what full computes: the Transformer's row).
LRA_LISTOPS = {
    "full": ("Transformer", 36.37),
    "sdpa": ("Transformer", 36.37),
    "local": ("Local Attention", 15.82),
    "strided": ("Sparse Trans.", 17.07),
    "lsh": ("Reformer", 37.27),
    "bigbird": ("BigBird", 36.05),
    "linformer": ("Linformer", 35.70),
    "performer": ("Performer", 18.01),
    "linear": ("Linear Trans.", 16.13),
}
GROUP = ["task", "n", "label", "backend", "causal"]
STATUS_TEXT = {"oom": "OOM", "timeout": "timeout", "unsupported": "n/a", "crashed": "crashed"}

# Why a backend can miss an answer, by what it computes (the measured reach completes it).
MECHANISM = {
    "local": "attends only within its window",
    "strided": "attends to a band and to every stride-th key",
    "bigbird": "attends to a window of blocks, a few global blocks and a few random blocks",
    "xl": "attends causally to its segment and a memory of the positions just before it",
    "lsh": (
        "attends only within the hash buckets of its rounds: a query finds its key when both "
        "hash alike, which depends on the learned projections"
    ),
    "linformer": (
        "projects the N keys and values down to `rank` rows with a fixed random matrix: a "
        "query sees mixtures of positions, never one position alone"
    ),
    "nystrom": (
        "approximates the attention matrix through segment-mean landmarks: a sharp lookup of "
        "one position among N is not low-rank"
    ),
    "performer": (
        "replaces exp(q.k) by a product of random features: too few features blur a sharp "
        "lookup of one key among many"
    ),
    "linear": (
        "replaces the softmax by elu(q)+1 . elu(k)+1: with D-dimensional features it cannot "
        "single out one key among many"
    ),
}


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """A row per (task, N, label, backend, causal): accuracies in % over the ok seeds, speed
    and memory (means over the ok seeds) and their ratios to full of the same task, N and
    direction, fractions, reach, and the status of failed seeds."""
    out = []
    for key, rows in frame.groupby(GROUP, sort=False):
        ok = rows[rows["status"] == "ok"]
        record = dict(zip(GROUP, key, strict=True))
        acc = 100 * ok["test_acc"] if len(ok) else pd.Series(dtype=float)
        failed = rows[rows["status"] != "ok"]
        record.update(
            seeds=len(ok),
            failed=", ".join(sorted(set(failed["status"]))),
            reasons="; ".join(dict.fromkeys(failed["reason"])),
            acc=acc.mean() if len(ok) else math.nan,
            acc_min=acc.min() if len(ok) else math.nan,
            acc_max=acc.max() if len(ok) else math.nan,
            val_acc=100 * ok["val_acc"].mean() if len(ok) else math.nan,
            chance=100 * rows["chance_acc"].dropna().mean() if "chance_acc" in rows else math.nan,
            majority=100 * rows["majority_acc"].dropna().mean(),
            shortcut=100 * _mean(rows, "shortcut_acc"),
            val_90_step=_steps_to(ok, 0.9),
            steps_per_s=ok["steps_per_s"].mean() if len(ok) else math.nan,
            peak_mem_mib=ok["peak_mem_mib"].mean() if len(ok) else math.nan,
            loss_first=ok["loss_first"].mean() if len(ok) else math.nan,
            loss_last=ok["loss_last"].mean() if len(ok) else math.nan,
            pair_fraction=_first(rows, "pair_fraction"),
            flops_fraction=_first(rows, "flops_fraction"),
            reach_1=_first(rows, "reach_1"),
            reach_all=_first(rows, "reach_all"),
            layers=rows["model"].iloc[0]["layers"],
            steps=rows["train"].iloc[0]["steps"],
        )
        out.append(record)
    table = pd.DataFrame(out)
    base = table[table["backend"] == "full"][
        ["task", "n", "causal", "steps_per_s", "peak_mem_mib", "acc"]
    ]
    base = base.drop_duplicates(["task", "n", "causal"]).rename(
        columns={"steps_per_s": "_s", "peak_mem_mib": "_m", "acc": "full_acc"}
    )
    table = table.merge(base, on=["task", "n", "causal"], how="left")
    table["speed_vs_full"] = table["steps_per_s"] / table["_s"]
    table["mem_vs_full"] = table["peak_mem_mib"] / table["_m"]
    return table.drop(columns=["_s", "_m"])


def _mean(rows: pd.DataFrame, column: str) -> float:
    if column not in rows:
        return math.nan
    values = rows[column].dropna()
    return float(values.mean()) if len(values) else math.nan


def _steps_to(ok: pd.DataFrame, level: float) -> float:
    """The first validation step at which every ok seed was at ``level`` or above (the latest
    seed's); NaN when a seed never got there (or none ran)."""
    if not len(ok):
        return math.nan
    firsts = []
    for curve in ok["val_curve"]:
        reached = [step for step, acc in curve if acc >= level]
        if not reached:
            return math.nan
        firsts.append(reached[0])
    return float(max(firsts))


def _first(rows: pd.DataFrame, column: str) -> float:
    if column not in rows:
        return math.nan
    values = rows[column].dropna()
    return float(values.iloc[0]) if len(values) else math.nan


def _pct(value: float, digits: int = 3) -> str:
    return "-" if pd.isna(value) else fmt_number(100 * value, digits)


def _direction(causal: bool) -> str:
    return "causal" if causal else "bidir."


def _acc_cell(row: pd.Series) -> str:
    """``97.3 (96.1-98.5)``: the mean over the seeds and their range; a failure's status."""
    if row["seeds"] == 0:
        return STATUS_TEXT.get(row["failed"].split(", ")[0], row["failed"] or "-")
    text = fmt_number(row["acc"])
    if row["seeds"] > 1:
        text += f" ({fmt_number(row['acc_min'])}-{fmt_number(row['acc_max'])})"
    if row["failed"]:
        text += f" [{row['failed']}]"
    return text


def _lra(backend: str) -> str:
    name, value = LRA_LISTOPS.get(backend, (None, None))
    return "-" if name is None else f"{value:.2f} ({name})"


def _row_name(row: pd.Series, by_label: set[str]) -> str:
    """The backend's name, or its label where it ran with several options at one task and N
    (``by_label``: those backends)."""
    name = row["label"] if row["backend"] in by_label else row["backend"]
    return f"{name} ({_direction(row['causal'])})"


def _column(task: str, n: int) -> str:
    return f"{task} N={n}"


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """LRA Table 1's shape: a row per backend and direction, a column per task and N (test
    accuracy %, mean (min-max) over seeds), their average, and LRA's ListOps number."""
    tasks = list(dict.fromkeys(table["task"]))  # in the preset's order, each task's N rising
    pairs = sorted(set(zip(table["task"], table["n"], strict=True)))
    columns = [_column(t, n) for t, n in sorted(pairs, key=lambda p: (tasks.index(p[0]), p[1]))]
    labels = table.groupby(["task", "n", "backend", "causal"])["label"].nunique()
    by_label = {key[2] for key, count in labels.items() if count > 1}
    rows: dict[str, dict[str, str]] = {}
    means: dict[str, list[float]] = {}
    for _, row in table.iterrows():
        name = _row_name(row, by_label)
        rows.setdefault(name, {"backend": name})[_column(row["task"], row["n"])] = _acc_cell(row)
        means.setdefault(name, []).append(row["acc"])
    out = []
    for name, cells in rows.items():
        values = means[name]
        average = sum(values) / len(values) if len(values) == len(columns) else math.nan
        out.append(
            {
                **{c: "-" for c in columns},
                **cells,
                "avg": fmt_number(average),
                "LRA ListOps": _lra(name.split(" ")[0].split(":")[0]),
                "_sort": average,
            }
        )
    frame = pd.DataFrame(out).sort_values("_sort", ascending=False, na_position="last")
    return frame.drop(columns="_sort")[["backend", *columns, "avg", "LRA ListOps"]]


def detail_table(part: pd.DataFrame) -> pd.DataFrame:
    """One task at one N, best accuracy first: what each backend computed, what it scored,
    and the speed and memory of the same runs."""
    part = part.sort_values("acc", ascending=False, na_position="last")
    listops = part["task"].iloc[0] == "listops"
    reach = part["reach_1"].notna().any()
    learned = part["val_90_step"].notna().any()
    out = []
    for _, r in part.iterrows():
        row = {
            "backend": r["label"],
            "direction": _direction(r["causal"]),
            "pairs %": _pct(r["pair_fraction"], 2),
            "FLOPs %": _pct(r["flops_fraction"], 2),
        }
        if reach:
            row[f"reach 1 / {r['layers']} layers %"] = (
                "-" if pd.isna(r["reach_1"])
                else f"{_pct(r['reach_1'], 2)} / {_pct(r['reach_all'], 2)}"
            )  # fmt: skip
        row["test acc %"] = _acc_cell(r)
        row["val acc %"] = fmt_number(r["val_acc"])
        if learned:
            row["val >= 90% at step"] = (
                "-" if pd.isna(r["val_90_step"]) else f"{r['val_90_step']:.0f}"
            )
        row["steps/s (x full)"] = _ratio(r["steps_per_s"], r["speed_vs_full"])
        row["peak MiB (x full)"] = _ratio(r["peak_mem_mib"], r["mem_vs_full"])
        if listops:
            row["LRA ListOps"] = _lra(r["backend"])
        out.append(row)
    return pd.DataFrame(out)


def _ratio(value: float, ratio: float) -> str:
    if pd.isna(value):
        return "-"
    tail = "" if pd.isna(ratio) else f" ({fmt_number(ratio, 2)}x)"
    return f"{fmt_number(value)}{tail}"


def explain(part: pd.DataFrame, margin: float = 5.0) -> list[str]:
    """Sentences on one task at one N, from its numbers: where full stands against chance and
    the majority answer, which backends fall behind (more than ``margin`` points below full of
    the same direction) or pull ahead, and why, with the reach the pattern measured."""
    first = part.iloc[0]
    lines = []
    fulls = part[(part["backend"] == "full") & (part["seeds"] > 0)]
    shortcut = ""
    if not pd.isna(first["shortcut"]):
        shortcut = f", the outermost operator alone {fmt_number(first['shortcut'])}%"
    for _, f in fulls.iterrows():
        lines.append(
            f"full ({_direction(f['causal'])}) reaches {fmt_number(f['acc'])}% after "
            f"{f['steps']} steps (chance {fmt_number(first['chance'])}%, always the most "
            f"frequent answer {fmt_number(first['majority'])}%{shortcut})."
        )
    full_90 = fulls["val_90_step"].min() if len(fulls) else math.nan
    for _, r in part.sort_values("acc", ascending=False, na_position="last").iterrows():
        if r["backend"] == "full":
            continue
        if r["seeds"] == 0:
            lines.append(f"`{r['label']}` did not finish: {r['reasons']}.")
            continue
        gap = r["acc"] - r["full_acc"] if not pd.isna(r["full_acc"]) else math.nan
        faster = r["val_90_step"] < full_90 if not pd.isna(full_90) else r["val_90_step"] > 0
        if faster and (pd.isna(gap) or gap >= -margin):
            when = "never" if pd.isna(full_90) else f"by step {full_90:.0f}"
            lines.append(
                f"`{r['label']}` ({_direction(r['causal'])}) learned faster: 90% validation "
                f"accuracy by step {r['val_90_step']:.0f}, full {when}"
                + (f"; it {MECHANISM[r['backend']]}" if r["backend"] in MECHANISM else "")
                + "."
            )
        if pd.isna(gap) or abs(gap) <= margin:
            continue
        side = "below" if gap < 0 else "above"
        why = MECHANISM.get(r["backend"], "")
        text = (
            f"`{r['label']}` ({_direction(r['causal'])}): {fmt_number(r['acc'])}%, "
            f"{fmt_number(abs(gap), 2)} points {side} full"
        )
        if why:
            text += f"; it {why}"
        if not pd.isna(r["reach_1"]):
            text += (
                f"; its pattern reaches {_pct(r['reach_1'], 2)}% of the answer positions in "
                f"one layer and {_pct(r['reach_all'], 2)}% through {r['layers']} layers"
            )
            text += _reach_reading(r)
        lines.append(text + ".")
    return lines


def _reach_reading(r: pd.Series) -> str:
    """What the reach says about a backend that fell behind: the answers it cannot reach, or
    the hops it did not learn."""
    acc, full = r["acc"] / 100, r["full_acc"] / 100
    if r["reach_all"] >= 0.9 and acc < 0.5 * full:
        return (
            ": all but a few answers are reachable, but only through an intermediate position "
            "(a first layer must copy the pair there), which the model did not learn within the "
            "budget"
        )
    if acc <= 0.5 * r["reach_1"] * full:
        return (
            ": it did not even learn the answers within its reach (their share of the "
            "training signal is small)"
        )
    if acc <= 1.2 * r["reach_all"] * full:
        return ": the answers out of its reach are lost (keys beyond its window)"
    return ""


def _environment(frame: pd.DataFrame) -> list[str]:
    lines = []
    for run, rows in frame.groupby("run", sort=False):
        path = Path(rows["run_dir"].iloc[0]) / ENV
        if not path.exists():
            continue
        env = json.loads(path.read_text())
        commit = (env.get("git_commit") or "?")[:10] + ("+dirty" if env.get("git_dirty") else "")
        sessions = [env, *env.get("resumed", [])]  # the first start, then each resume
        loads = "; ".join(
            f"{s.get('started_at')}: {s.get('load_average_start')} -> {s.get('load_average_end')}"
            for s in sessions
        )
        lines.append(
            f"run {run}: {env.get('cpu')}, torch {env.get('torch')}, python "
            f"{env.get('python')}, threads {env.get('threads')} (pinned), commit {commit}; "
            f"load average (1, 5, 15 min) at the start -> end of each session: {loads}"
        )
    return lines


def _settings_line(frame: pd.DataFrame) -> str:
    model, train = frame["model"].iloc[0], frame["train"].iloc[0]
    return (
        f"Model: d_model {model['d_model']}, {model['layers']} layers, {model['heads']} heads, "
        f"FFN {model['ffn_mult']}x, learned positions, pre-norm nn.TransformerEncoderLayer with "
        f"effattn.MultiheadAttention. Training: AdamW lr {train['lr']:g} (warm-up "
        f"{train['warmup']:g} of the steps, cosine to 0), weight decay {train['weight_decay']:g}, "
        f"clip {train['grad_clip']:g}, batch {train['batch']}, fresh data every step; test "
        f"{train['test_size']} sequences, validation {train['val_size']} (fixed streams, the "
        "same for every backend and seed)."
    )


def _task_line(rows: pd.DataFrame) -> str:
    from effattn.quality.tasks import make_task

    r = rows.iloc[0]
    task = make_task(r["task"], int(r["n"]), r["task_options"])
    options = ", ".join(f"{k}={v}" for k, v in task.options().items() if k != "seq_len")
    steps = ", ".join(str(s) for s in dict.fromkeys(t["steps"] for t in rows["train"]))
    return f"`{task.name}` ({options}; {steps} steps): {task.description}."


def render_markdown(frame: pd.DataFrame, notes: str | None = None) -> str:
    """The report: environment, summary table, per task and N the detail table and the
    sentences of :func:`explain`; ``notes``: a hand-written section inserted after the summary
    (the order of the backends and why, written after looking at the numbers)."""
    table = summarize(frame)
    out = ["# effattn quality: what each attention gives up (LRA Table 1 shape)", ""]
    out += [f"- {line}" for line in _environment(frame)]
    out += ["", _settings_line(frame), ""]
    for _, rows in frame.groupby("task", sort=False):
        out.append(f"- {_task_line(rows)}")
    out += [
        "",
        "## Test accuracy (%) per backend and task",
        "",
        "Mean over the seeds (min-max), at the end of the step budget; `avg` over the columns; "
        "LRA Table 1's ListOps number where the backend has a row there (their models: 4-6 "
        "layers, 5K steps, N up to 2K; ours are far smaller, so compare orders, not values).",
        "",
        render(summary_table(table), "md"),
        "",
    ]
    if notes:
        out += [notes.strip(), ""]
    tasks = list(dict.fromkeys(table["task"]))
    groups = sorted(
        table.groupby(["task", "n"], sort=False), key=lambda g: (tasks.index(g[0][0]), g[0][1])
    )
    for (task, n), part in groups:
        out += [f"## {task}, N = {n}", ""]
        out += [render(detail_table(part), "md"), ""]
        out += [f"- {line}" for line in explain(part)]
        notes_failed = part[part["reasons"] != ""]
        out += [
            f"- `{r['label']}` {r['failed']}: {r['reasons']}" for _, r in notes_failed.iterrows()
        ]
        out.append("")
    out += [
        "Columns: `pairs %` = (query, key) pairs in the backend's pattern() / full's, per head "
        "(- for low-rank and kernel backends, which mix every position); `FLOPs %` = "
        "backend.flops() / full's flops for one attention call; `reach` = the share of the "
        "answer positions the pattern reaches from the query in one layer, and through all "
        "layers (patterns composed); steps/s = 1 / median training step (forward, backward, "
        "AdamW) of the same runs; peak MiB = peak memory allocated during one training step.",
        "",
    ]
    return "\n".join(out)


def write_report(frame: pd.DataFrame, prefix: Path, notes: str | None = None) -> list[Path]:
    """PREFIX.md (render_markdown) and PREFIX.csv (the summary, a row per task, N, backend
    and direction); returns the paths."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md, csv = prefix.with_suffix(".md"), prefix.with_suffix(".csv")
    md.write_text(render_markdown(frame, notes))
    table = summarize(frame)
    table["lra_listops"] = [LRA_LISTOPS.get(b, (None, None))[1] for b in table["backend"]]
    csv.write_text(render(table, "csv"))
    return [md, csv]


def declared_class(backend: str) -> str:
    """Tay's class of a backend (FP, LP, LR, KR, RC, ...), for plot labels."""
    try:
        return backend_class(backend).tay_class
    except ValueError:
        return "?"
