"""`effattn quality` end to end: the smoke preset trains (and lowers full's loss), a driver
killed with SIGKILL resumes with no duplicate row, failures become cells, bad input is one
line naming it (effattn.quality)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from effattn.harness.store import RESULTS, ResultsFile, read_runs
from effattn.quality import report
from effattn.quality.__main__ import main
from effattn.quality.runner import run_quality
from effattn.quality.spec import Grid, expand, load_preset, with_overrides

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "quality-smoke"


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "effattn.quality", SMOKE, "--out", str(out), "--run-id",
            "smoke", "--quiet", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke preset, its driver killed with SIGKILL after two rows, then run again."""
    out = tmp_path_factory.mktemp("quality")
    results = out / "smoke" / RESULTS
    driver = subprocess.Popen(_command(out), cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while len(ResultsFile(results).read()) < 2 and driver.poll() is None:
        assert time.monotonic() < deadline, "the smoke run wrote no two rows in 300 s"
        time.sleep(0.1)
    assert driver.poll() is None, "the driver finished before it could be killed"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    killed_with = len(ResultsFile(results).read())
    assert killed_with < len(expand(load_preset(SMOKE)))
    done = subprocess.run(_command(out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out / "smoke"


def test_killed_run_resumes_without_duplicate_rows(killed_and_resumed: Path):
    rows = ResultsFile(killed_and_resumed / RESULTS).read()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys))  # no duplicate row
    assert set(keys) == {p.key for p in expand(load_preset(SMOKE))}  # and none missing
    assert {r["status"] for r in rows} == {"ok"}, [r["reason"] for r in rows]
    env = json.loads((killed_and_resumed / "env.json").read_text())
    assert env["resumed"] and env["threads"] == [1]
    for key in ("torch", "cpu", "git_commit", "command", "spec"):
        assert key in env


def test_smoke_training_lowers_the_loss_of_full(killed_and_resumed: Path):
    rows = ResultsFile(killed_and_resumed / RESULTS).read()
    fulls = [r for r in rows if r["backend"] == "full"]
    assert {r["task"] for r in fulls} == {"mqar", "listops", "nearest_recall"}
    for r in fulls:
        if r["task"] == "mqar":
            assert r["loss_last"] < r["loss_first"] - 0.05, r["loss_curve"]
        assert 0 <= r["test_acc"] <= 1 and r["steps_per_s"] > 0 and r["peak_mem_mib"] > 0
        assert r["val_curve"][-1][0] == r["steps"]


def test_rows_state_direction_fraction_and_reach(killed_and_resumed: Path):
    rows = {(r["task"], r["label"], r["seed"]): r
            for r in ResultsFile(killed_and_resumed / RESULTS).read()}  # fmt: skip
    xl = rows[("mqar", "xl:mem_len=8,segment_len=8", 0)]
    assert xl["causal"] is True  # causal only: ran the causal variant, and says so
    local = rows[("mqar", "local:window=4", 0)]
    assert local["causal"] is False and 0 < local["pair_fraction"] < 1
    assert 0 < local["reach_1"] < 1 and local["reach_1"] <= local["reach_all"]
    assert rows[("mqar", "full", 0)]["reach_1"] == 1.0
    assert rows[("listops", "full", 0)]["reach_1"] is None  # the answer is no one position


def test_report_and_plots_from_the_run(killed_and_resumed: Path, tmp_path: Path):
    code = main([SMOKE, "--out", str(killed_and_resumed.parent), "--run-id", "smoke",
                 "--report-only", "--quiet", "--report", str(tmp_path / "q"),
                 "--plots", str(tmp_path / "plots")])  # fmt: skip
    assert code == 0
    text = (tmp_path / "q.md").read_text()
    assert "## mqar, N = 32" in text and "36.37 (Transformer)" in text
    assert "full (bidir.) reaches" in text
    csv = (tmp_path / "q.csv").read_text().splitlines()
    assert csv[0].startswith("task,n,label") and len(csv) == 1 + 6  # task x N x label x dir.
    assert (tmp_path / "plots" / "q-mqar-bubbles.png").stat().st_size > 0


def test_second_run_trains_nothing(killed_and_resumed: Path):
    before = (killed_and_resumed / RESULTS).read_bytes()
    run_quality(load_preset(SMOKE), killed_and_resumed)
    assert (killed_and_resumed / RESULTS).read_bytes() == before


def _one_point_spec(n: int = 32, **settings):
    spec = load_preset(SMOKE)
    grid = Grid(task="mqar", seq_lens=(n,), backends=("full",),
                task_options=(("num_kv_pairs", 4), ("vocab_size", 16)))  # fmt: skip
    return dataclasses.replace(with_overrides(spec, settings=settings), grids=(grid,), name="one")


@pytest.mark.parametrize(
    ("settings", "status", "words"),
    [
        ({"time_limit_s": 0.05}, "timeout", "time limit"),
        ({"n": 2048, "mem_limit_mib": 32}, "oom", ""),  # scores: 8 x 2 x 2048^2 floats, 256 MiB
    ],
)
def test_budget_failures_become_cells(tmp_path: Path, settings, status, words):
    run_quality(_one_point_spec(**settings), tmp_path)
    (row,) = ResultsFile(tmp_path / RESULTS).read()
    assert row["status"] == status, row["reason"]
    assert words in row["reason"] and row["test_acc"] is None
    table = report.summarize(read_runs([tmp_path]))
    assert table["seeds"].tolist() == [0] and table["failed"].tolist() == [status]


def test_retry_failed_trains_a_failed_point_again(tmp_path: Path):
    run_quality(_one_point_spec(time_limit_s=0.05), tmp_path)  # the point runs out of time
    run_quality(_one_point_spec(), tmp_path)  # a plain resume keeps the failure

    def statuses() -> list[str]:
        return [r["status"] for r in ResultsFile(tmp_path / RESULTS).read()]

    assert statuses() == ["timeout"]
    stream = io.StringIO()
    run_quality(_one_point_spec(), tmp_path, retry_failed=True, stream=stream)
    assert "training 1 failed point(s) again" in stream.getvalue()
    assert statuses() == ["timeout", "ok"]
    assert read_runs([tmp_path])["status"].tolist() == ["ok"]  # the last row of a key wins
    run_quality(_one_point_spec(), tmp_path, retry_failed=True)  # nothing failed: no training
    assert statuses() == ["timeout", "ok"]


def test_direction_follows_what_the_backend_supports():
    spec = with_overrides(load_preset(SMOKE), tasks=("mqar",),
                          backends=("full", "xl", "bigbird:block_size=8"))  # fmt: skip
    spec = dataclasses.replace(
        spec, grids=tuple(dataclasses.replace(g, causal=(True,)) for g in spec.grids)
    )
    causal = {p.backend: p.causal for p in expand(spec)}
    assert causal == {"full": True, "xl": True, "bigbird": False}


def test_seq_lens_choose_among_the_presets_or_replace():
    spec = load_preset("quality")
    chosen = expand(with_overrides(spec, tasks=("mqar",), seq_lens=(128,), seeds=(0,)))
    assert {p.n for p in chosen} == {128} and len(chosen) == 11
    assert ("window", 16) in next(p.options for p in chosen if p.backend == "local")
    replaced = expand(with_overrides(spec, tasks=("mqar",), seq_lens=(64,), seeds=(0,)))
    # both MQAR grids (N=128 and 256) moved to N=64: full (both directions) and linear, which
    # have no option scaled with N, are the same point in both and trained once
    assert {p.n for p in replaced} == {64} and len(replaced) == 22 - 3


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["no-such-preset"], "unknown preset 'no-such-preset'"),
        ([SMOKE, "--tasks", "sorting"], "unknown task 'sorting'"),
        ([SMOKE, "--backends", "local:windw=4"], "unknown option 'windw'"),
        ([SMOKE, "--backends", "nosuch"], "unknown backend 'nosuch'"),
        ([SMOKE, "--backends", "local:window=abc"], "'window'"),
    ],
)
def test_bad_input_is_one_line_naming_it(argv, words, capsys, tmp_path: Path):
    code = main([*argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert words in err and err.count("\n") == 1 and err.startswith("effattn quality: error:")
    assert not any(tmp_path.iterdir())  # nothing ran


def test_bad_preset_file_names_the_key(tmp_path: Path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[train]\nstep = 3\n[[grid]]\ntask = "mqar"\nseq_lens = [32]\nbackends = ["full"]\n'
    )
    assert main([str(bad), "--out", str(tmp_path)]) == 2
    assert "unknown train 'step'" in capsys.readouterr().err
