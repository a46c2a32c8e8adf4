"""The runs behind the committed reports are committed, and each report rebuilds from its run
with the same numbers: the command that made it, in its report-only form, writes the report
again into a temporary folder, and it equals the committed one byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from effattn.cli import main

ROOT = Path(__file__).resolve().parents[1]
# committed report (reports/<name>.md and .csv) -> its run folder and the command that rebuilds
# it into OUT (paths as the Makefile gives them, from the repository's root)
COMMITTED = {
    "tay-cpu": (
        "reports/runs/tay-cpu",
        ["report", "reports/runs/tay-cpu", "--format", "md", "csv", "--out", "{out}",
         "--fidelity", "reports/fidelity-cpu.csv"],
    ),
    "decode-cpu": (
        "reports/runs/decode-cpu",
        ["report", "reports/runs/decode-cpu", "--format", "md", "csv", "--out", "{out}"],
    ),
    "quality-cpu": (
        "reports/runs/quality-cpu",
        ["quality", "quality", "--report-only", "--run-id", "quality-cpu", "--out",
         "reports/runs", "--report", "{out}", "--quiet"],
    ),
    "fidelity-cpu": (
        "reports/runs/fidelity-cpu",
        ["fidelity", "--report-only", "--run-id", "fidelity-cpu", "--out", "{out}", "--plots",
         "{plots}", "--quiet"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_the_run_behind_a_report_is_committed(name):
    run, _ = COMMITTED[name]
    for file in ("results.jsonl", "env.json"):
        assert (ROOT / run / file).is_file(), f"{run}/{file} is not committed"


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_a_committed_report_rebuilds_from_its_run(name, tmp_path, capsys, monkeypatch):
    _, command = COMMITTED[name]
    out = tmp_path / name
    monkeypatch.chdir(ROOT)  # paths as make gives them (the CSV keeps the run's folder)
    args = [a.format(out=out, plots=tmp_path / "plots") for a in command]
    assert main(args) == 0
    capsys.readouterr()
    for ext in ("md", "csv"):
        rebuilt = out.with_name(f"{name}.{ext}").read_text()
        committed = (ROOT / "reports" / f"{name}.{ext}").read_text()
        assert rebuilt == committed, f"reports/{name}.{ext} differs from its run's report"
