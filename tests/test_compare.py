"""``effattn compare`` on two small runs: identical runs show nothing significant and agree
fully; a run with an injected 2x slowdown of one backend is flagged, and
``--fail-on-regression`` sets the exit code only beyond its threshold. The runs are written as
the sweep writes them, from seeded synthetic timings (a real sweep's noise on shared cores
would make the test's outcome depend on the machine's load)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from effattn.cli import main
from effattn.harness import stats
from effattn.harness.rows import Row, ratio_fields, timing_fields
from effattn.harness.store import RESULTS, ResultsFile
from effattn.sweep import compare
from effattn.sweep.spec import Point

ROUNDS = 4
COST = {"full": 2.0, "sdpa": 1.0}  # ms per call at N=32, x N/32


def _write_run(folder: Path, *, slower_full: float = 1.0) -> Path:
    """A run as the sweep writes it (rows.timing_fields, ratio_fields), from seeded synthetic
    timings: 4 rounds, each with its own machine load shared by the group's backends, 3% noise
    per timed run. ``slower_full`` multiplies full's times (the injected regression)."""
    rng = np.random.default_rng(0)  # the same draws for every run: identical runs are identical
    folder.mkdir(parents=True)
    store = ResultsFile(folder / RESULTS)
    for n in (32, 64):
        load = np.exp(rng.normal(0, 0.05, ROUNDS))
        times = {}
        for label, cost in COST.items():
            scale = cost * n / 32 * (slower_full if label == "full" else 1.0)
            times[label] = [list(scale * f * np.exp(rng.normal(0, 0.03, 8))) for f in load]
        for label in COST:
            point = Point(label, (), n, 1, 1, 8, "float32", "cpu", False, 1, "fwd")
            fields = timing_fields(times[label])
            for base in COST:
                ratios = stats.round_ratios(times[base], times[label])
                fields.update(ratio_fields(f"speedup_vs_{base}", ratios))
            store.append(Row.make(point, "ok", **fields))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """a; same: a copy of it; slower: the same timings with full twice as slow."""
    root = tmp_path_factory.mktemp("runs")
    _write_run(root / "a")
    shutil.copytree(root / "a", root / "same")
    _write_run(root / "slower", slower_full=2.0)
    return {name: root / name for name in ("a", "same", "slower")}


def test_the_runs_have_rounds_and_ratios(runs: dict[str, Path]):
    rows = ResultsFile(runs["a"] / RESULTS).read()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    for r in rows:
        assert r["rounds"] == ROUNDS and len(r["times_ms"]) == ROUNDS
        assert r["time_ms_lo"] <= r["time_ms_median"] <= r["time_ms_hi"]
        assert len(r["speedup_vs_full_rounds"]) == len(r["speedup_vs_sdpa_rounds"]) == ROUNDS
    full = next(r for r in rows if r["label"] == "full")
    assert full["speedup_vs_full"] == 1.0  # against itself, round by round


def test_identical_runs_show_nothing_significant(runs: dict[str, Path], capsys):
    name_a, name_b, cells = compare.compare_runs(runs["a"], runs["same"])
    assert (name_a, name_b) == ("a", "same") and len(cells) == 4
    assert not any(c.significant for cell in cells for c in cell.changes.values())
    assert compare.regressions(cells, "time", 0) == []
    found = compare.agreement(cells, "vs_sdpa")
    assert found.cells == 2 and found.within == found.held == 2  # full at 32 and 64
    assert main(["compare", str(runs["a"]), str(runs["same"]), "--fail-on-regression", "1"]) == 0
    out = capsys.readouterr().out
    assert "time: 0 of 4 cells significantly slower" in out
    assert "speed-up vs sdpa: within ±10% in 2 of 2 (100%)" in out


def test_agreement_shares_are_rounded_down():
    """95 of 106 is 89.6%: it must not read as a 90% target met."""
    text = compare.agreement_text(compare.Agreement("vs_sdpa", 106, 95, 106, 106))
    assert "within ±10% in 95 of 106 (89%)" in text and "in 106 of 106 (100%)" in text


def test_a_2x_slowdown_is_flagged_and_fails_the_gate(runs: dict[str, Path], tmp_path, capsys):
    _, _, cells = compare.compare_runs(runs["a"], runs["slower"])
    for cell in cells:
        time = cell.changes["time"]
        if cell.label == "full":
            assert time.significant and time.pct == pytest.approx(100)
            assert cell.changes["vs_sdpa"].significant and cell.changes["vs_sdpa"].pct < -45
        else:
            assert not time.significant
    report = tmp_path / "cmp.md"
    args = ["compare", str(runs["a"]), str(runs["slower"]), "--out", str(report)]
    assert main([*args, "--fail-on-regression", "50"]) == 1
    captured = capsys.readouterr()
    assert "2 of 4 cells significantly slower (largest: fwd full N=" in captured.out
    assert "2 significant regression(s) of time beyond 50%" in captured.err
    assert "**slower**" in report.read_text()
    assert main([*args, "--fail-on-regression", "150"]) == 0  # +100% is below 150%
    assert main([*args, "--fail-on-regression", "40", "--metric", "vs_sdpa"]) == 1  # -50%
    capsys.readouterr()
    assert main(["compare", str(runs["a"]), str(runs["a"]), "--changed-only"]) == 0
    assert "| backend" not in capsys.readouterr().out  # nothing changed: no table


def test_compare_needs_common_cells(runs: dict[str, Path], tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    rows = ResultsFile(runs["a"] / RESULTS).read()
    (other / RESULTS).write_text(json.dumps({**rows[0], "key": "elsewhere"}) + "\n")
    assert main(["compare", str(runs["a"]), str(other)]) == 2
    assert "no point was measured ok in both" in capsys.readouterr().err
