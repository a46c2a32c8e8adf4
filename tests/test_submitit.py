"""Sweeps beyond one process: submitit's local executor gives the rows of a local sweep, a task
killed mid-run is retried or marked (never lost), concurrent appends keep lines whole, several
workers keep a curve's cut-off, GPUs are handed out one per worker, runs merge without
duplicates."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import sys
from pathlib import Path

import pytest

from effattn import registry
from effattn.cli import main
from effattn.harness.rows import Row
from effattn.harness.store import RESULTS, ResultsFile, merge_rows
from effattn.harness.worker import load_plugins
from effattn.sweep import runner
from effattn.sweep.runner import gpu_slots, measure_points, run_sweep
from effattn.sweep.spec import Grid, Point, Settings, SweepSpec, expand, load_preset

TINY = Grid(backends=("full",), seq_lens=(32,), heads=(1,), head_dim=(8,), device=("cpu",),
            threads=(1,))  # fmt: skip
FAST = Settings(min_run_time_s=0.01, time_limit_s=60)

_KILLERS = """
import os, signal
from dataclasses import dataclass
from pathlib import Path
from effattn.backends.full import FullAttention
from effattn.registry import register_backend

MARKER = Path({marker!r})


def kill_the_task():
    server = os.getppid()  # the worker's parent is the array task's forkserver
    task = int(Path(f"/proc/{{server}}/stat").read_text().rsplit(")", 1)[1].split()[1])
    os.kill(task, signal.SIGKILL)


@register_backend("killonce")
@dataclass(frozen=True)
class KillOnce(FullAttention):
    def forward(self, q, k, v, **kwargs):
        if not MARKER.exists():  # the first attempt only
            MARKER.touch()
            kill_the_task()
        return super().forward(q, k, v, **kwargs)


@register_backend("killalways")
@dataclass(frozen=True)
class KillAlways(FullAttention):
    def forward(self, q, k, v, **kwargs):
        kill_the_task()
"""


@pytest.fixture(autouse=True)
def _restore_registry():
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


def _submit(spec: SweepSpec, run_dir: Path, **options) -> None:
    pytest.importorskip("submitit", reason="submitit not installed (pip install effattn[cluster])")
    from effattn.sweep import executors

    opts = executors.SlurmOptions(
        **{"gpus_per_task": 0, "array_parallelism": 1, "time_min": 5, **options}
    )
    load_plugins(spec.plugins)
    points = executors.cluster_points(spec, opts, strict=True)
    executors.submit_sweep(spec, points, run_dir, opts, cluster="local")


def test_submitit_local_gives_the_rows_of_a_local_sweep_and_resumes(tmp_path: Path):
    spec = load_preset("smoke")
    run_sweep(spec, tmp_path / "local")
    _submit(spec, tmp_path / "array", array_parallelism=2)
    local, array = _rows(tmp_path / "local"), _rows(tmp_path / "array")
    assert sorted((r["key"], r["status"]) for r in array) == sorted(
        (r["key"], r["status"]) for r in local
    )
    assert len({r["key"] for r in array}) == len(array)
    assert all(r["host"] and r["job_id"] and r["device_name"] for r in array)
    assert len({r["job_id"] for r in array}) == 2  # two array tasks wrote into one store
    before = (tmp_path / "array" / RESULTS).read_bytes()
    _submit(spec, tmp_path / "array")  # everything measured: nothing is submitted again
    assert (tmp_path / "array" / RESULTS).read_bytes() == before


def test_task_killed_mid_run_is_retried_or_marked(tmp_path: Path):
    plugin = tmp_path / "killers.py"
    plugin.write_text(_KILLERS.format(marker=str(tmp_path / "killed-once")))
    grids = (
        dataclasses.replace(TINY, backends=("killonce",)),
        dataclasses.replace(TINY, backends=("killalways",), seq_lens=(32, 64)),
    )
    spec = SweepSpec("kill", FAST, grids, (str(plugin),))
    _submit(spec, tmp_path / "run", array_parallelism=2, retries=1)
    rows = {(r["backend"], r["n"]): r for r in _rows(tmp_path / "run")}
    assert (tmp_path / "killed-once").exists()  # the first attempt did die
    assert set(rows) == {("killonce", 32), ("killalways", 32), ("killalways", 64)}
    assert rows[("killonce", 32)]["status"] == "ok", rows[("killonce", 32)]["reason"]
    for n in (32, 64):  # died on every attempt: marked, with the task and its state
        row = rows[("killalways", n)]
        assert row["status"] == "crashed"
        assert "array task died before measuring it, 2 attempt(s)" in row["reason"]


def _append_many(path: str, writer: int) -> None:
    point = Point("full", (), 32, 1, 1, 8, "float32", "cpu", False, 1, "fwd")
    store = ResultsFile(Path(path))
    for i in range(50):
        point = dataclasses.replace(point, n=1000 * writer + i + 1)
        store.append(Row.make(point, "crashed", "x" * 6000))  # a line longer than PIPE_BUF


def test_concurrent_appends_keep_every_line_whole(tmp_path: Path):
    path = tmp_path / RESULTS
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    lines = path.read_bytes().splitlines()
    assert len(lines) == 200
    assert len({json.loads(line)["n"] for line in lines}) == 200


def test_parallel_slots_give_the_same_rows_and_keep_the_cut_off(tmp_path: Path):
    grid = dataclasses.replace(TINY, backends=("full", "sdpa"), seq_lens=(2048, 4096), heads=(4,))
    spec = SweepSpec("par", dataclasses.replace(FAST, mem_limit_mib=8), (grid,))
    points, _ = expand(spec, strict=True)
    measure_points(points, spec, tmp_path, slots=[None, None])  # the scheduler, without GPUs
    rows = {(r["backend"], r["n"]): r for r in _rows(tmp_path)}
    assert len(rows) == len(points) == 4
    assert rows[("full", 2048)]["status"] == "oom"
    assert rows[("full", 4096)]["status"] == "skipped"  # waited for its smaller N
    assert rows[("sdpa", 2048)]["status"] == "ok"


def test_gpu_slots_one_gpu_per_worker(monkeypatch):
    cuda = Point("full", (), 32, 1, 1, 8, "float32", "cuda", False, 1, "fwd")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert gpu_slots(2, [cuda]) == ["3", "5"]
    assert gpu_slots(1, [cuda]) == [None]
    with pytest.raises(ValueError, match="at most 2"):
        gpu_slots(3, [cuda])
    with pytest.raises(ValueError, match="CPU points"):
        gpu_slots(2, [dataclasses.replace(cuda, device="cpu")])
    assert runner.gpu_slots is gpu_slots


def test_workers_on_cpu_are_refused_before_running(tmp_path: Path, capsys):
    assert main(["sweep", "smoke", "--workers", "2", "--out", str(tmp_path)]) == 2
    assert "expected 1 for a sweep with CPU points" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_report_merge_gives_one_row_per_point(tmp_path: Path, capsys):
    spec = SweepSpec("m", FAST, (dataclasses.replace(TINY, seq_lens=(32, 64)),))
    points, _ = expand(spec, strict=True)
    for name, chosen in (("a", points), ("b", points[1:])):  # b measured N=64 again, later
        store = ResultsFile(tmp_path / name / RESULTS)
        store.path.parent.mkdir()
        for p in chosen:
            store.append(Row.make(p, "ok", time_ms_median=1.0 if name == "a" else 2.0, runs=5))
    merged = merge_rows([tmp_path / "a" / RESULTS, tmp_path / "b" / RESULTS])
    assert sorted(r["n"] for r in merged) == [32, 64]
    assert {r["n"]: r["time_ms_median"] for r in merged} == {32: 1.0, 64: 2.0}
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--merge"]) == 0
    out = capsys.readouterr().out
    assert "a+b" not in out or "N=64" in out
