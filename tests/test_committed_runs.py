"""The runs behind the committed reports are committed, and the reports rebuild from them with
the same numbers: `effattn report` on reports/runs/tay-cpu writes reports/tay-cpu.md as it is
committed (the Makefile's `make sweep` adds the real-model column from reports/fidelity-cpu.csv)."""

from __future__ import annotations

from pathlib import Path

import pytest

from effattn.cli import main

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"
# committed report prefix -> its run folder, and the extra `effattn report` options make sweep uses
COMMITTED = {
    "tay-cpu": ("runs/tay-cpu", ["--fidelity", "reports/fidelity-cpu.csv"]),
}


@pytest.mark.parametrize("prefix", sorted(COMMITTED))
def test_the_run_behind_a_report_is_committed(prefix):
    run, _ = COMMITTED[prefix]
    for name in ("results.jsonl", "env.json"):
        assert (REPORTS / run / name).is_file(), f"reports/{run}/{name} is not committed"


@pytest.mark.parametrize("prefix", sorted(COMMITTED))
def test_a_committed_report_rebuilds_from_its_run(prefix, tmp_path, capsys, monkeypatch):
    run, options = COMMITTED[prefix]
    out = tmp_path / prefix
    monkeypatch.chdir(ROOT)  # paths as make sweep gives them (the CSV keeps the run's folder)
    command = ["report", f"reports/{run}", "--format", "md", "csv", "--out", str(out)]
    assert main([*command, *options]) == 0
    capsys.readouterr()
    for ext in ("md", "csv"):
        rebuilt = out.with_name(f"{prefix}.{ext}").read_text()
        committed = (REPORTS / f"{prefix}.{ext}").read_text()
        assert rebuilt == committed, f"reports/{prefix}.{ext} differs from its run's report"
