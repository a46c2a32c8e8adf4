"""effattn fidelity's run in the run store: rows appended as measured, resumed, set aside by
--fresh, and a report rebuilt from the run alone.

A fake stands in for the model here (effattn.fidelity.runner.measure replaced), so these run in
any environment; tests/test_fidelity.py resumes and rebuilds a run of the real model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from effattn.fidelity import cli, extra, runner
from effattn.fidelity.corpus import MODULES, Corpus
from effattn.fidelity.grid import settings_of
from effattn.fidelity.measure import FidelityConfig, FidelityRow, FidelityRun
from effattn.fidelity.report import COLUMNS, write_report
from effattn.harness.store import ENV, RESULTS, ResultsFile

CONFIG = FidelityConfig(documents=3, threads=1)
VERSIONS = {"torch": "2.13.0", "transformers": "5.23.0", extra.MODEL_PACKAGE: "0.1.2"}
GRID = (("exact", ("full",)), ("local", ("local:window=32", "local:window=64")),
        ("mine", ("not_a_backend:x=1",)))  # fmt: skip
# The CSV's columns the sweep's report reads (effattn.sweep.report.load_fidelity): unchanged.
CSV_HEADER = (
    "curve,label,backend,causal,status,reason,documents,seq_len,flops_fraction,pairs_fraction,"
    "cosine_mean,cosine_min,recall_at_1,recall_at_1_exact,recall_at_1_mixed,time_s,"
    "layer_error_mean,layer_error_max,layer_error_0,layer_error_1,layer_error_2,layer_error_3,"
    "layer_error_4,layer_error_5"
)


def corpus_of(digest: str = "ab" * 32) -> Corpus:
    ids = torch.zeros(CONFIG.documents, CONFIG.seq_len, dtype=torch.long)
    return Corpus(MODULES[: CONFIG.documents], ids, ids, digest, "3.11.7")


class FakeMeasure:
    """effattn.fidelity.measure.measure without a model: each point's metrics from its label
    (floats that need all 17 digits), handed to ``on_row`` one by one."""

    def __init__(self, corpus: Corpus | None = None) -> None:
        self.corpus = corpus or corpus_of()
        self.calls: list[list[str]] = []  # the labels measured, per call
        self.rows: list[FidelityRow] = []  # every row handed to on_row

    def __call__(self, points, config, progress=None, on_row=None, on_corpus=None):
        self.calls.append([p.label for p in points])
        on_corpus(self.corpus)
        rows = []
        for point in points:
            k = len(point.label)
            row = FidelityRow.make(
                point,
                "ok",
                flops_fraction=k / 37,
                pairs_fraction=None if point.backend == "full" else 1 / k,
                cosine_mean=1 - 1 / (7 * k),
                cosine_min=1 - 1 / (3 * k),
                layer_errors=tuple(i / (11 * k) for i in range(6)),
                recall_at_1=2 / 3,
                recall_at_1_exact=1.0,
                recall_at_1_mixed=1 / 3,
                time_s=k / 9,
            )
            on_row(row)
            rows.append(row)
            self.rows.append(row)
        return FidelityRun(tuple(rows), (), "", "", config)


@pytest.fixture
def fake(monkeypatch) -> FakeMeasure:
    fake = FakeMeasure()
    monkeypatch.setattr(runner, "measure", fake)
    monkeypatch.setattr(runner, "versions", lambda: dict(VERSIONS))
    return fake


def plan_of(grid=GRID, config: FidelityConfig = CONFIG) -> runner.Plan:
    return runner.Plan.of(*settings_of(grid), config)


def results_of(run_dir: Path) -> list[dict]:
    return ResultsFile(run_dir / RESULTS).read()


def test_rows_are_appended_and_read_back_as_measured(fake, tmp_path):
    plan, run_dir = plan_of(), tmp_path / "fidelity-cpu"
    runner.run_fidelity(plan, run_dir)
    assert fake.calls == [["full", "local:window=32", "local:window=64"]]  # not the unknown one
    stored = results_of(run_dir)
    assert [r["label"] for r in stored] == [
        "not_a_backend:x=1", "full", "local:window=32", "local:window=64"
    ]  # fmt: skip
    assert stored[0]["status"] == "unsupported" and "not registered" in stored[0]["reason"]
    assert stored[2]["options"] == {"window": 32} and stored[2]["key"] == plan.points[1].key
    env = json.loads((run_dir / ENV).read_text())
    assert env["spec"]["config"]["documents"] == 3 and env["threads"] == [1]
    assert env["corpus"] == {"modules": list(MODULES[:3]), "digest": "ab" * 32, "python": "3.11.7"}
    assert env["versions"] == VERSIONS and env["wall_s"] >= 0 and env["finished_at"]

    run, missing = runner.load_run(plan, run_dir)
    assert missing == []
    assert [r.label for r in run.rows] == [p.label for p in plan.points]  # the plan's order
    by_label = {r.label: r for r in run.rows}
    k = len("local:window=64")
    assert by_label["local:window=64"].cosine_mean == 1 - 1 / (7 * k)  # every digit
    assert by_label["local:window=64"].layer_errors == tuple(i / (11 * k) for i in range(6))
    assert run.config == CONFIG and run.versions == VERSIONS
    assert (run.corpus_modules, run.corpus_digest, run.python) == (MODULES[:3], "ab" * 32, "3.11.7")


def test_the_report_of_a_stored_run_is_that_of_its_measurements(fake, tmp_path):
    """What the command wrote before the run store (the rows as measured, in memory) is what it
    writes now from the run's rows and env.json, byte for byte."""
    plan, run_dir = plan_of(), tmp_path / "runs" / "fidelity-cpu"
    runner.run_fidelity(plan, run_dir)
    run, _ = runner.load_run(plan, run_dir)
    unknown = plan.points[-1]
    rows = [*fake.rows, FidelityRow.make(unknown, "unsupported", plan.not_registered[unknown.key])]
    in_memory = FidelityRun(
        tuple(rows), MODULES[:3], "ab" * 32, "3.11.7", CONFIG, VERSIONS, run.wall_s
    )
    assert [r.key for r in run.rows] == [r.key for r in in_memory.rows]
    stored_paths = write_report(run, tmp_path / "a" / "fidelity-cpu", tmp_path / "a", "effattn x")
    memory_paths = write_report(
        in_memory, tmp_path / "b" / "fidelity-cpu", tmp_path / "b", "effattn x"
    )
    for stored, memory in zip(stored_paths[:3], memory_paths[:3], strict=True):
        assert stored.read_bytes() == memory.read_bytes(), stored.name
    assert stored_paths[1].read_text().splitlines()[0] == CSV_HEADER
    assert CSV_HEADER.startswith(",".join(COLUMNS))


def test_a_second_run_measures_nothing_new(fake, tmp_path):
    plan, run_dir = plan_of(), tmp_path / "fidelity-cpu"
    runner.run_fidelity(plan, run_dir)
    before = (run_dir / RESULTS).read_bytes()
    lines = []
    runner.run_fidelity(plan, run_dir, progress=lines.append)
    assert len(fake.calls) == 1, "nothing left: no corpus, no model"
    assert (run_dir / RESULTS).read_bytes() == before
    assert "fidelity-cpu: 4 of 4 settings already measured, 0 left" in lines
    env = json.loads((run_dir / ENV).read_text())
    assert len(env["resumed"]) == 1 and env["resumed"][0]["wall_s"] == 0.0
    # One more setting: only it is measured, on the same corpus.
    more = (*GRID, ("local", ("local:window=128",)))
    runner.run_fidelity(plan_of(more), run_dir)
    assert fake.calls[1:] == [["local:window=128"]]
    assert len(results_of(run_dir)) == 5


def test_a_resumed_run_refuses_another_config_or_corpus(fake, tmp_path):
    run_dir = tmp_path / "fidelity-cpu"
    runner.run_fidelity(plan_of(), run_dir)
    other = FidelityConfig(documents=4, threads=1)
    with pytest.raises(ValueError, match=r"expected documents=3 .* got documents=4; .*--fresh"):
        runner.run_fidelity(plan_of(config=other), run_dir)
    fake.corpus = corpus_of("cd" * 32)
    with pytest.raises(ValueError, match=r"corpus: expected the run's \(digest abab"):
        runner.run_fidelity(plan_of((("local", ("local:window=16",)),)), run_dir)
    assert len(results_of(run_dir)) == 4  # no row of another corpus


def test_more_threads_resume_the_same_run(fake, tmp_path):
    run_dir = tmp_path / "fidelity-cpu"
    runner.run_fidelity(plan_of(), run_dir)
    runner.run_fidelity(plan_of(config=FidelityConfig(documents=3, threads=2)), run_dir)
    assert len(fake.calls) == 1
    run, _ = runner.load_run(plan_of(), run_dir)
    assert run.config.threads == 1  # the first session's


def test_fresh_sets_the_run_aside_and_measures_again(fake, tmp_path):
    plan, run_dir = plan_of(), tmp_path / "fidelity-cpu"
    runner.run_fidelity(plan, run_dir)
    runner.prepare_run_dir(run_dir, fresh=True)
    assert not (run_dir / RESULTS).exists() and not (run_dir / ENV).exists()
    assert len(list(run_dir.glob("results-*.jsonl.old"))) == 1
    assert len(list(run_dir.glob("env-*.json.old"))) == 1
    runner.run_fidelity(plan, run_dir)
    assert len(fake.calls) == 2 and len(results_of(run_dir)) == 4
    assert "resumed" not in json.loads((run_dir / ENV).read_text())


# -- the command ----------------------------------------------------------------------------------
def _args(tmp_path: Path, **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--documents", "3", "--threads", "1", "--quiet"])
    paths = dict(out=tmp_path / "fidelity-cpu", plots=tmp_path / "plots", runs=tmp_path / "runs")
    return argparse.Namespace(**{**vars(args), **paths, **overrides})


@pytest.fixture
def command(fake, monkeypatch):
    """The command with the fake model: the extra is taken as installed."""
    pytest.importorskip("transformers")  # the command turns transformers' progress bars off
    monkeypatch.setattr(extra, "require_extra", lambda: None)
    return fake


def _report(tmp_path: Path) -> dict[str, bytes]:
    paths = (tmp_path / "fidelity-cpu.md", tmp_path / "fidelity-cpu.csv",
             tmp_path / "plots" / "fidelity-cpu.png")  # fmt: skip
    return {p.name: p.read_bytes() for p in paths}


def test_report_only_rebuilds_the_same_report(command, tmp_path, capsys):
    backends = ["full", "local:window=32", "local:window=64"]
    assert cli.run(_args(tmp_path, backends=backends)) == 0
    assert (tmp_path / "runs" / "fidelity-cpu" / RESULTS).is_file()  # the default run id
    first = _report(tmp_path)
    assert (
        "`effattn fidelity --documents 3 --threads 1 --backends full"
        in first["fidelity-cpu.md"].decode()
    )
    for path in (tmp_path / "fidelity-cpu.md", tmp_path / "fidelity-cpu.csv"):
        path.unlink()
    assert cli.run(_args(tmp_path, backends=backends, report_only=True)) == 0
    assert _report(tmp_path) == first
    assert len(command.calls) == 1
    # Asked for one more setting than the run has: reported without it, and said so.
    capsys.readouterr()
    more = [*backends, "local:window=128"]
    assert cli.run(_args(tmp_path, backends=more, report_only=True)) == 0
    assert "has no row of 1 setting(s) (local:window=128)" in capsys.readouterr().err
    assert pd.read_csv(tmp_path / "fidelity-cpu.csv")["label"].tolist() == backends


def test_command_resumes_and_fresh_starts_over(command, tmp_path):
    args = _args(tmp_path, backends=["local:window=32"], run_id="mine")
    assert cli.run(args) == 0
    first = _report(tmp_path)
    assert cli.run(args) == 0
    assert len(command.calls) == 1 and _report(tmp_path) == first
    assert cli.run(_args(tmp_path, backends=["local:window=32"], run_id="mine", fresh=True)) == 0
    assert len(command.calls) == 2
    assert len(list((tmp_path / "runs" / "mine").glob("*.old"))) == 2


def test_report_only_without_a_run_or_with_fresh_says_so(tmp_path):
    with pytest.raises(ValueError, match=r"run: expected a run folder with results\.jsonl"):
        cli.run(_args(tmp_path, backends=["full"], report_only=True))
    with pytest.raises(ValueError, match="expected --fresh or --report-only, got both"):
        cli.run(_args(tmp_path, backends=["full"], report_only=True, fresh=True))


def test_report_only_with_other_options_finds_no_row(fake, tmp_path):
    runner.run_fidelity(plan_of(), tmp_path / "runs" / "fidelity-cpu")
    with pytest.raises(ValueError, match=r"expected rows of the settings asked for, got none"):
        cli.run(_args(tmp_path, backends=["full"], documents=4, report_only=True))
