"""Reports and plots from results files: the Tay-style table's cells (intervals, unstable
marks, speed-ups vs full and sdpa, efficiency lengths), several runs side by side, scaling
exponents, and every output file written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from effattn.cli import main
from effattn.harness import figures, stats
from effattn.harness.rows import Row
from effattn.harness.store import RESULTS, ResultsFile
from effattn.sweep import plots, report
from effattn.sweep.spec import Point


def _point(backend: str, n: int, mode: str = "fwd") -> Point:
    return Point(backend, (), n, 1, 8, 64, "float32", "cpu", False, 2, mode)


STEADY = (0.98, 0.99, 1.0, 1.01, 1.02)  # per-round values / their median: 5 rounds
SHAKY = (0.7, 0.85, 1.0, 1.15, 1.3)  # a repeat interval far wider than UNSTABLE_PCT


def _repeat_pct(spread: tuple) -> float:
    """The half-width (% of the median) of the repeat interval of rounds spread so."""
    return stats.repeat_interval(spread, 1.0).half_width_pct


def _write_run(folder: Path, speed: float = 1.0, modes: tuple = ("fwd", "fwd_bwd")) -> Path:
    """A run where full costs N^2 and sdpa N^1 (time and memory), sdpa OOMs at the largest N
    in fwd_bwd, and an approximate backend has an error."""
    store = ResultsFile(folder / RESULTS)
    folder.mkdir(parents=True)
    (folder / "env.json").write_text(json.dumps({"torch": "x", "cpu": "test cpu"}))
    for mode in modes:
        for n in (1024, 2048, 4096):
            k = n / 1024
            store.append(
                Row.make(
                    _point("full", n, mode),
                    "ok",
                    time_ms_median=10 * k * k / speed,
                    time_ms_iqr=1.0,
                    runs=5,
                    peak_mem_mib=32 * k * k,
                    flops=10**9,
                )
            )
            if mode == "fwd_bwd" and n == 4096:
                store.append(Row.make(_point("sdpa", n, mode), "oom", "RuntimeError: can't"))
                continue
            median = 5 * k / speed
            spread = STEADY if n < 4096 else SHAKY
            ratio = 2 * k * 1.01  # the rows' own, taken per round
            store.append(
                Row.make(
                    _point("sdpa", n, mode),
                    "ok",
                    time_ms_median=median,
                    time_ms_lo=median * (0.97 if n < 4096 else 0.8),  # the bootstrap CI
                    time_ms_hi=median * 1.02,
                    time_ms_iqr=0.5,
                    times_ms=[[median * f] for f in spread],
                    runs=5,
                    rounds=5,
                    speedup_vs_full=ratio,
                    speedup_vs_full_lo=ratio * 0.98 / 1.01,
                    speedup_vs_full_hi=ratio * 1.04 / 1.01,
                    speedup_vs_full_rounds=[ratio * f for f in STEADY],
                    peak_mem_mib=1 * k,
                    flops=10**9,
                    rel_error=0.01 * k if mode == "fwd" else None,
                )
            )
    store.append(Row.make(_point("lsh", 1024), "crashed", "killed by SIGSEGV"))
    return folder


def test_tidy_frame_has_relative_columns(tmp_path: Path):
    frame = report.load_runs([_write_run(tmp_path / "a")])
    row = frame[(frame["label"] == "sdpa") & (frame["n"] == 2048) & (frame["mode"] == "fwd")]
    assert row["speedup_vs_full"].item() == pytest.approx(4 * 1.01)  # the row's own ratio
    assert row["speedup_vs_full_ci_pct"].item() == pytest.approx(100 * 0.03 / 1.01)
    assert row["time_ci_pct"].item() == pytest.approx(3.0)
    assert row["time_repeat_pct"].item() == pytest.approx(_repeat_pct(STEADY))
    assert not row["unstable"].item()
    assert row["mem_vs_full"].item() == pytest.approx(2 / 128)
    assert row["noise_pct"].item() == pytest.approx(100 * 0.5 / 10)
    full = frame[(frame["label"] == "full") & (frame["n"] == 2048) & (frame["mode"] == "fwd")]
    # full against sdpa: a row without per-round ratios gets the ratio of the medians
    assert full["speedup_vs_sdpa"].item() == pytest.approx(10 / 40)
    unstable = frame[(frame["label"] == "sdpa") & (frame["n"] == 4096) & (frame["mode"] == "fwd")]
    assert unstable["unstable"].item() and unstable["time_ci_pct"].item() == pytest.approx(20)
    assert unstable["time_repeat_pct"].item() == pytest.approx(_repeat_pct(SHAKY))


def test_scaling_exponent_is_the_log_log_slope():
    assert report.scaling_exponent([1024, 2048, 4096], [1, 4, 16]) == pytest.approx(2.0)
    assert report.scaling_exponent([1024], [1]) is None


def test_tay_table_cells_and_columns(tmp_path: Path):
    frame = report.load_runs([_write_run(tmp_path / "a")])
    sections = report.tay_tables(frame)
    assert len(sections) == 2  # fwd, fwd_bwd
    fwd = sections[0]
    speed = fwd.speed.set_index("backend")
    assert list(speed.index[:2]) == ["full", "sdpa"]
    steady, shaky = _repeat_pct(STEADY), _repeat_pct(SHAKY)
    # t(4) sqrt(pi / 5) times the SD of the logs: 2.776 * 0.793 * 0.0158 -> +-3.5%
    assert steady == pytest.approx(3.5, abs=0.1) and shaky > stats.UNSTABLE_PCT
    # the 95% repeat intervals; wider than UNSTABLE_PCT: marked unstable
    assert speed.loc["sdpa", "N=2048"] == f"10 ±{steady:.0f}% (4x ±{steady:.0f}%)"
    assert speed.loc["sdpa", "N=4096"] == f"20 ±{shaky:.0f}%! (8.1x ±{steady:.0f}%)"
    assert speed.loc["full", "N=2048"] == "40 (1x)"  # no interval recorded: none shown
    assert speed.loc["sdpa", "faster than full from N"] == "≤1024"
    assert speed.loc["full", "faster than full from N"] == ""
    vs_sdpa = fwd.vs_sdpa.set_index("backend")
    assert vs_sdpa.loc["full", "N=2048"] == "0.25x"
    assert vs_sdpa.loc["full", "faster than sdpa from N"] == "not in range"
    assert speed.loc["full", "time exp."] == "2"
    assert speed.loc["sdpa", "complexity"] == "O(N^2)"
    assert "rel_error, Gaussian (N=4096)" in speed.columns
    assert speed.loc["lsh", "N=1024"] == "crashed"
    memory = fwd.memory.set_index("backend")
    assert memory.loc["sdpa", "memory exp."] == "1"
    assert sections[1].speed.set_index("backend").loc["sdpa", "N=4096"] == "OOM"
    assert any("SIGSEGV" in note for note in fwd.notes)


def test_real_model_column_matches_settings_not_spellings(tmp_path: Path):
    folder = tmp_path / "run"
    folder.mkdir()
    store = ResultsFile(folder / RESULTS)
    for backend, options in (("full", ()), ("bigbird", ()), ("local", (("window", 256),))):
        point = Point(backend, options, 1024, 1, 8, 64, "float32", "cpu", False, 2, "fwd")
        store.append(Row.make(point, "ok", time_ms_median=1.0, runs=3, peak_mem_mib=1.0))
    csv = tmp_path / "fidelity.csv"
    csv.write_text(
        "label,status,cosine_mean,cosine_min\n"
        "full,ok,1.0,1.0\n"
        "bigbird:block_size=64,ok,0.9995,0.9989\n"  # the sweep's bare `bigbird`: the same setting
        "local:window=32,ok,0.82,0.62\n"
        "local:window=256,error,,\n"  # a failed setting gives no cell
    )
    cosines = report.load_fidelity(csv)
    speed = report.tay_tables(report.load_runs([folder]), cosines)[0].speed.set_index("backend")
    assert speed.columns[-1] == report.FIDELITY_COLUMN
    assert speed.loc["bigbird", report.FIDELITY_COLUMN] == "1.000 (min 0.999)"
    assert speed.loc["local:window=256", report.FIDELITY_COLUMN] == ""
    assert speed.loc["full", report.FIDELITY_COLUMN] == ""  # exact: nothing to measure
    assert report.FIDELITY_COLUMN not in report.tay_tables(report.load_runs([folder]))[0].speed
    with pytest.raises(FileNotFoundError, match="fidelity: expected the CSV"):
        report.load_fidelity(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("label,cosine\nfull,1\n")
    with pytest.raises(ValueError, match="lacks the column"):
        report.load_fidelity(tmp_path / "bad.csv")


def test_two_runs_side_by_side(tmp_path: Path):
    frame = report.load_runs([_write_run(tmp_path / "cpu"), _write_run(tmp_path / "gpu", 10)])
    speed = report.tay_tables(frame)[0].speed
    assert {"N=1024 cpu", "N=1024 gpu", "time exp. cpu", "time exp. gpu"} <= set(speed.columns)


def test_report_writes_every_format(tmp_path: Path, capsys):
    run = _write_run(tmp_path / "a")
    prefix = tmp_path / "out" / "table"
    assert (
        main(["report", str(run), "--format", "md", "csv", "tex", "html", "--out", str(prefix)])
        == 0
    )
    for ext in ("md", "csv", "tex", "html"):
        assert (prefix.parent / f"table.{ext}").stat().st_size > 0
    assert "| backend" in capsys.readouterr().out
    assert "<table" in (prefix.parent / "table.html").read_text()
    csv = (prefix.parent / "table.csv").read_text()
    assert "time_ms_median" in csv and "speedup_vs_sdpa" in csv and "times_ms" not in csv
    assert "Speed-up vs sdpa" in (prefix.parent / "table.md").read_text()


def test_plot_writes_png_and_svg(tmp_path: Path):
    run = _write_run(tmp_path / "a", modes=("fwd",))
    out = tmp_path / "plots"
    assert main(["plot", str(run), "--out", str(out), "--prefix", "t"]) == 0
    names = {p.name for p in out.iterdir()}
    for kind in ("time", "memory", "speedup", "error"):
        assert f"t-fwd-{kind}.png" in names and f"t-fwd-{kind}.svg" in names
    assert "t-patterns.png" in names


def test_plot_functions_return_figures(tmp_path: Path):
    frame = report.load_runs([_write_run(tmp_path / "a")])
    fwd = frame[frame["mode"] == "fwd"]
    fig = plots.plot_time(fwd)
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_yscale() == "log"
    assert "time_ms_median" in fig.axes[0].get_ylabel()
    paths = figures.save_figure(fig, tmp_path / "x")
    assert [p.suffix for p in paths] == [".png", ".svg"]


def test_a_quality_run_is_refused_with_its_own_command(tmp_path: Path):
    folder = tmp_path / "quality-cpu"
    folder.mkdir()
    (folder / RESULTS).write_text(json.dumps({"key": "k", "task": "mqar", "status": "ok"}) + "\n")
    with pytest.raises(ValueError, match="run of `effattn quality`, not a sweep"):
        report.load_runs([folder])
