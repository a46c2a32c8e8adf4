"""The sweep engine end to end: the smoke preset, budgets and crashes becoming cells, resuming
after a kill, a torn last line."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from effattn import registry
from effattn.harness.allocator import can_keep_freed_memory
from effattn.harness.store import RESULTS, ResultsFile
from effattn.sweep.runner import run_sweep
from effattn.sweep.spec import Grid, Settings, SweepSpec, expand, load_preset

ROOT = Path(__file__).resolve().parents[1]
TINY = Grid(backends=("full",), seq_lens=(32,), heads=(1,), head_dim=(8,), device=("cpu",),
            threads=(1,))  # fmt: skip
FAST = Settings(min_run_time_s=0.01, time_limit_s=60)


@pytest.fixture(autouse=True)
def _restore_registry():
    """Test-only plugin backends (one of them aborts) must not outlive their test."""
    saved = dict(registry._REGISTRY)
    modules = set(sys.modules)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)
    for name in set(sys.modules) - modules:
        if name.startswith("effattn_plugin_"):
            del sys.modules[name]


def _rows(run_dir: Path) -> list[dict]:
    return ResultsFile(run_dir / RESULTS).read()


def test_smoke_preset_end_to_end(tmp_path: Path):
    spec = load_preset("smoke")
    points, _ = expand(spec, strict=True)
    run_sweep(spec, tmp_path)
    rows = _rows(tmp_path)
    assert sorted(r["key"] for r in rows) == sorted(p.key for p in points)
    assert {r["status"] for r in rows} == {"ok"}, [r["reason"] for r in rows]
    for r in rows:
        assert r["time_ms_median"] > 0 and r["peak_mem_mib"] >= 0 and r["flops"] > 0
        assert r["gflop_per_s"] > 0 and r["tokens_per_s"] > 0
    assert {r["mode"] for r in rows} == {"fwd", "fwd_bwd", "step"}
    env = json.loads((tmp_path / "env.json").read_text())
    for key in ("python", "torch", "triton", "cpu", "threads", "git_commit", "command"):
        assert key in env


@pytest.mark.parametrize("passes", [1, 2])
def test_out_of_memory_becomes_a_cell_and_cuts_larger_n(tmp_path: Path, passes: int):
    """With 2 passes, N=2048's oom is written after the first pass, before N=4096 starts."""
    grid = dataclasses.replace(TINY, seq_lens=(2048, 4096), heads=(4,))
    spec = SweepSpec("oom", dataclasses.replace(FAST, mem_limit_mib=8, passes=passes), (grid,))
    run_sweep(spec, tmp_path)
    by_n = {r["n"]: r for r in _rows(tmp_path)}
    assert by_n[2048]["status"] == "oom", by_n[2048]["reason"]
    assert by_n[4096]["status"] == "skipped"
    assert "out of budget at N=2048" in by_n[4096]["reason"]
    assert by_n[4096]["time_ms_median"] is None


def test_timeout_becomes_a_cell(tmp_path: Path):
    spec = SweepSpec("slow", dataclasses.replace(FAST, time_limit_s=0.01), (TINY,))
    run_sweep(spec, tmp_path)
    (row,) = _rows(tmp_path)
    assert row["status"] == "timeout" and "time limit" in row["reason"]


def test_unsupported_becomes_a_cell_without_a_worker(tmp_path: Path):
    plugin = tmp_path / "forward_only.py"
    extra = "supports_backward = False"
    plugin.write_text(_PLUGIN.format(name="fwdonly", body="return q", extra=extra))
    spec = SweepSpec(
        "na",
        FAST,
        (dataclasses.replace(TINY, backends=("fwdonly",), mode=("fwd_bwd",)),),
        (str(plugin),),
    )
    run_sweep(spec, tmp_path / "run")
    (row,) = _rows(tmp_path / "run")
    assert row["status"] == "unsupported" and "backward" in row["reason"]


_PLUGIN = """
import os
from dataclasses import dataclass
from effattn.backend import Backend
from effattn.registry import register_backend


@register_backend("{name}")
@dataclass(frozen=True)
class TestOnly(Backend):
    {extra}

    def forward(self, q, k, v, *, causal, key_padding_mask, scale):
        {body}
"""


def test_crash_becomes_a_cell(tmp_path: Path):
    plugin = tmp_path / "crasher.py"
    plugin.write_text(_PLUGIN.format(name="crasher", body="os.abort()", extra="exact = True"))
    grid = dataclasses.replace(TINY, backends=("crasher", "full"))
    spec = SweepSpec("crash", FAST, (grid,), (str(plugin),))
    run_sweep(spec, tmp_path / "run")
    rows = {r["backend"]: r for r in _rows(tmp_path / "run")}
    assert rows["crasher"]["status"] == "crashed"
    assert "SIGABRT" in rows["crasher"]["reason"]
    assert rows["full"]["status"] == "ok"  # the sweep went on


def test_python_error_becomes_a_crashed_cell(tmp_path: Path):
    plugin = tmp_path / "raiser.py"
    body = "raise RuntimeError('boom')"
    plugin.write_text(_PLUGIN.format(name="raiser", body=body, extra="exact = True"))
    spec = SweepSpec("err", FAST, (dataclasses.replace(TINY, backends=("raiser",)),),
                     (str(plugin),))  # fmt: skip
    run_sweep(spec, tmp_path / "run")
    (row,) = _rows(tmp_path / "run")
    assert row["status"] == "crashed" and "RuntimeError: boom" in row["reason"]


def _sweep_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "effattn", "sweep", "smoke", "--out", str(out),
            "--run-id", "r", "--quiet"]  # fmt: skip


def test_killed_sweep_resumes_without_duplicate_or_loss(tmp_path: Path):
    results = tmp_path / "r" / RESULTS
    proc = subprocess.Popen(
        _sweep_command(tmp_path), cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if results.exists() and len(results.read_bytes().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its workers, mid-run
    proc.wait()
    before = _rows(tmp_path / "r")
    assert 3 <= len(before) < 10
    with open(results, "ab") as f:  # as if killed in the middle of writing a line
        f.write(b'{"key": "torn')
    done = subprocess.run(_sweep_command(tmp_path), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    after = _rows(tmp_path / "r")
    keys = [r["key"] for r in after]
    points, _ = expand(load_preset("smoke"), strict=True)
    assert len(keys) == len(set(keys)) == len(points)
    assert set(keys) == {p.key for p in points}
    assert [r["key"] for r in before] == keys[: len(before)]  # finished rows kept as they were
    assert results.read_bytes().endswith(b"\n")


def test_rerun_of_a_finished_sweep_measures_nothing(tmp_path: Path):
    spec = SweepSpec("again", FAST, (TINY,))
    run_sweep(spec, tmp_path)
    first = (tmp_path / RESULTS).read_bytes()
    run_sweep(spec, tmp_path)
    assert (tmp_path / RESULTS).read_bytes() == first


@pytest.mark.parametrize("n", [0, -3])
def test_non_positive_length_is_refused(n: int):
    with pytest.raises(ValueError, match="positive"):
        expand(SweepSpec("bad", FAST, (dataclasses.replace(TINY, seq_lens=(n,)),)), strict=True)


_SLOW = """
import time
from dataclasses import dataclass
from pathlib import Path
from effattn.backends.full import FullAttention
from effattn.registry import register_backend

LOG = Path({log!r})


@register_backend("slowlog")
@dataclass(frozen=True)
class SlowLog(FullAttention):
    def forward(self, q, k, v, **kwargs):
        with LOG.open("a") as f:  # one line a call, naming N
            f.write(f"{{q.shape[-2]}}\\n")
        time.sleep(0.02)
        return super().forward(q, k, v, **kwargs)
"""


def _slow_sweep(tmp_path: Path, passes: int = 1) -> tuple[list[str], Path]:
    """A sweep of two groups (N=32, N=64) of full, sdpa and a slow logging backend, 4 rounds
    in ``passes`` passes, as a command line; returns it and the call log."""
    log = tmp_path / "calls.log"
    plugin = tmp_path / "slowlog.py"
    plugin.write_text(_SLOW.format(log=str(log)))
    preset = tmp_path / "slow.toml"
    preset.write_text(
        f'plugins = ["{plugin}"]\n'
        f"[settings]\nmin_run_time_s = 0.2\nrounds = 4\npasses = {passes}\n"
        '[[grid]]\nbackends = ["full", "sdpa", "slowlog"]\nseq_lens = [32, 64]\nheads = [1]\n'
        'head_dim = [8]\ndevice = ["cpu"]\nthreads = [1]\n'
    )
    command = [sys.executable, "-m", "effattn", "sweep", str(preset), "--out", str(tmp_path),
               "--run-id", "r", "--quiet"]  # fmt: skip
    return command, log


def test_killed_in_the_middle_of_a_round_resumes_without_duplicate_or_loss(tmp_path: Path):
    command, log = _slow_sweep(tmp_path)
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # set-up (2 calls), then rounds of ~3 calls at N=64
        if log.exists() and log.read_text().split().count("64") >= 6:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its worker, in round 2 of N=64
    proc.wait()
    before = _rows(tmp_path / "r")
    assert {r["n"] for r in before} == {32}  # N=32's rows written, N=64's group lost mid-round
    assert len(before) == 3
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    after = _rows(tmp_path / "r")
    keys = [r["key"] for r in after]
    assert len(keys) == len(set(keys)) == 6
    assert after[:3] == before  # finished rows kept as they were
    assert all(r["status"] == "ok" and r["rounds"] == 4 for r in after)


def _runs_of_n(log: Path) -> list[tuple[int, int]]:
    """The logged calls as (N, calls in a row) runs: which group's worker was calling."""
    runs: list[tuple[int, int]] = []
    for n in map(int, log.read_text().split()) if log.exists() else ():
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return runs


def test_passes_share_out_the_rounds_and_resume_after_a_kill(tmp_path: Path):
    """2 passes of 2 rounds: N=32's group, N=64's, then each again (a fresh worker); killed
    in N=64's second pass, the sweep has written nothing of N=64 and resumes it whole."""
    command, log = _slow_sweep(tmp_path, passes=2)
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        runs = _runs_of_n(log)
        if len(runs) == 4 and runs[-1][1] >= 3:  # set-up and a round of N=64's second pass
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [n for n, _ in _runs_of_n(log)] == [32, 64, 32, 64]
    before = _rows(tmp_path / "r")
    assert {r["n"] for r in before} == {32} and len(before) == 3
    assert all(r["rounds"] == 4 and len(r["speedup_vs_sdpa_rounds"]) == 4 for r in before)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "pass 2/2" in done.stderr
    after = _rows(tmp_path / "r")
    assert len({r["key"] for r in after}) == len(after) == 6
    assert after[:3] == before
    assert all(r["status"] == "ok" and r["rounds"] == 4 for r in after)


def test_passes_are_checked():
    with pytest.raises(
        ValueError, match=r"settings.passes: expected an integer from 1 to rounds \(2\), got 3"
    ):
        Settings(rounds=2, passes=3)
    assert [list(r) for r in Settings(rounds=5, passes=2).pass_rounds()] == [[0, 1, 2], [3, 4]]


@pytest.mark.parametrize("every", [-1, 1.5, True])
def test_bracket_every_is_checked(every):
    with pytest.raises(
        ValueError, match=r"settings\.bracket_every: expected an integer >= 0 \(0: off\), got "
    ):
        Settings(bracket_every=every)


def test_keep_freed_memory_is_checked():
    with pytest.raises(
        ValueError, match=r"settings\.keep_freed_memory: expected true or false, got 'yes'"
    ):
        Settings(keep_freed_memory="yes")


def test_a_group_missing_some_rows_times_its_baselines_again_as_references(tmp_path: Path):
    """Rows of a group written before a kill are kept; the missing point is measured beside
    the group's baselines (timed again, not written again), so its ratios are still taken
    within rounds."""
    grid = dataclasses.replace(TINY, backends=("full", "sdpa", "local:window=8"))
    spec = SweepSpec("refs", dataclasses.replace(FAST, rounds=3), (grid,))
    run_sweep(spec, tmp_path)
    rows = _rows(tmp_path)
    kept = [r for r in rows if r["label"] != "local:window=8"]
    (tmp_path / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in kept))
    lines = []
    run_sweep(spec, tmp_path, on_row=lambda row: lines.append(row.label))
    assert lines == ["local:window=8"]  # only the missing row was written
    after = _rows(tmp_path)
    assert after[:2] == kept and len(after) == 3
    local = after[2]
    assert local["status"] == "ok"
    for base in ("full", "sdpa"):
        assert len(local[f"speedup_vs_{base}_rounds"]) == 3


def test_env_records_the_load_average_at_start_and_end(tmp_path: Path):
    spec = SweepSpec("load", FAST, (TINY,))
    run_sweep(spec, tmp_path)
    env = json.loads((tmp_path / "env.json").read_text())
    assert len(env["load_average_start"]) == len(env["load_average_end"]) == 3
    assert env["finished_at"] >= env["started_at"]
    assert env["unwritten_mib_at_start"] >= 0  # file data flushed before timing (Linux)
    assert env["freed_memory_kept"] is can_keep_freed_memory()  # on by default
    assert 0 <= env["busy_cores_at_start"] <= (os.cpu_count() or 1)  # Linux: /proc/stat
    run_sweep(spec, tmp_path)  # a resumed session records its own
    (resumed,) = json.loads((tmp_path / "env.json").read_text())["resumed"]
    assert len(resumed["load_average_start"]) == len(resumed["load_average_end"]) == 3
