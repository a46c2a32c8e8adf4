"""Runs a quality spec: each point (task, N, backend, direction, seed) trained in a worker
process of its own, one at a time (timings on shared cores would measure each other), rows
appended as points finish; resumable.

For each point, in the order of effattn.quality.spec.expand:
- already in results.jsonl (same key)          -> skipped silently (resume), unless
  ``retry_failed`` and its last row failed (oom, timeout, crashed): then trained again, the new
  row appended (readers keep the last row of a key);
- the backend declares it cannot run the point  -> row ``unsupported`` (no worker started);
- otherwise a worker (effattn.quality.train.worker_main, started through
  effattn.harness.worker.RunningWorker.start_target) trains it under the time limit and memory cap
  of ``settings``; an exception becomes ``oom`` or ``crashed``, a worker that dies ``crashed``
  (or ``oom`` for a SIGKILL we did not send), one that runs out of time ``timeout``.

Only this driver writes rows, each one atomic append (effattn.harness.store.ResultsFile): a
driver killed at any moment (kill -9 included) loses at most the point in training, which the
same command trains again, with no duplicate row. A worker left behind by a killed driver
notices that its forkserver is gone and stops at its next step.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, TextIO

from effattn.harness.allocator import can_keep_freed_memory
from effattn.harness.machine import busy_warning, environment
from effattn.harness.progress import Progress
from effattn.harness.store import (
    RESULTS,
    ResultsFile,
    archive_results,
    finish_env,
    make_row,
    write_env,
)
from effattn.harness.worker import WORKER_LOG, RunningWorker
from effattn.quality.spec import QualityPoint, QualitySpec, expand
from effattn.quality.train import worker_main
from effattn.registry import get_backend

STATUSES = ("ok", "unsupported", "oom", "timeout", "crashed")
FAILED = ("oom", "timeout", "crashed")  # what ``retry_failed`` trains again


@dataclass(frozen=True)
class QualityRow:
    """One result line: the point, what happened, and (status ok) what the run measured."""

    key: str  # QualityPoint.key: identity for resuming
    task: str
    task_options: dict[str, Any]
    n: int  # sequence length N
    backend: str  # registered name
    label: str  # name with options, ``local:window=32``
    options: dict[str, Any]
    causal: bool  # the direction it ran (a backend with one direction runs that one)
    seed: int
    model: dict[str, Any]  # ModelConfig
    train: dict[str, Any]  # TrainConfig
    status: str  # one of STATUSES
    reason: str = ""  # why, for every status but ok
    test_acc: float | None = None  # accuracy on the test set at the end of the budget, 0..1
    val_acc: float | None = None  # accuracy on the validation set at the end
    val_curve: list[list[float]] | None = None  # [step, validation accuracy] during training
    chance_acc: float | None = None  # uniform guess
    majority_acc: float | None = None  # always the test set's most frequent answer
    shortcut_acc: float | None = None  # the task's shortcut (listops: the outermost operator)
    loss_first: float | None = None  # mean training loss of the first tenth of the steps
    loss_last: float | None = None  # ... of the last tenth
    loss_curve: list[float] | None = None  # mean training loss of each tenth
    steps: int | None = None  # training steps run
    step_ms_median: float | None = None  # median time of a training step (fwd, bwd, AdamW), ms
    step_ms_iqr: float | None = None  # interquartile range of the step times, ms
    steps_per_s: float | None = None  # 1000 / step_ms_median
    tokens_per_s: float | None = None  # batch * N / median step time
    train_s: float | None = None  # wall seconds of the training loop (data and validation too)
    peak_mem_mib: float | None = None  # peak memory of one training step, MiB = 2**20 bytes
    params: int | None = None  # model parameters
    flops_fraction: float | None = None  # backend.flops() / full's, per attention call
    pair_fraction: float | None = None  # pairs in backend.pattern() / full's; None: no pattern
    reach_1: float | None = None  # share of answers whose position one layer's pattern reaches
    reach_all: float | None = None  # ... that the layers' composed patterns reach
    wall_s: float | None = None  # wall-clock seconds of the worker
    finished_at: str = ""  # UTC ISO time the row was written
    host: str = ""  # hostname of the machine that wrote the row
    job_id: str = ""

    @classmethod
    def make(
        cls, point: QualityPoint, status: str, reason: str = "", **measured: Any
    ) -> QualityRow:
        return make_row(cls, STATUSES, point, status, reason, measured)


def unsupported(point: QualityPoint) -> list[str]:
    """Why the point's backend cannot train on CPU in the point's direction ([] if it can)."""
    import torch

    backend = get_backend(point.backend, **dict(point.options))
    return backend.not_supported_reasons(
        device="cpu",
        dtype=torch.float32,
        causal=point.causal,
        backward=True,
        head_dim=point.model.head_dim,
    )


def run_quality(
    spec: QualitySpec,
    run_dir: Path,
    *,
    stream: TextIO | None = None,  # None: sys.stderr at call time
    on_row: Callable[[QualityRow], None] | None = None,
    retry_failed: bool = False,
) -> Path:
    """Train every point of ``spec`` not already in ``run_dir``'s results (with
    ``retry_failed``, also those whose last row failed: FAILED); returns the results path.
    env.json records the environment, the spec, the threads and the load average at the
    start and the end (a warning at the end when the machine was busy)."""
    stream = sys.stderr if stream is None else stream
    points = expand(spec)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = environment((p.train.threads for p in points), dataclasses.asdict(spec))
    env["freed_memory_kept"] = can_keep_freed_memory()  # each worker keeps it (train.worker_main)
    write_env(run_dir, env)
    results = ResultsFile(run_dir / RESULTS)
    last = {row["key"]: row["status"] for row in results.read()}  # the last row of a key
    done = {key for key, status in last.items() if not (retry_failed and status in FAILED)}
    retried = sum(p.key in last and p.key not in done for p in points)
    if retried:
        stream.write(f"training {retried} failed point(s) again (--retry-failed)\n")
    progress = Progress(len(points), stream)
    progress.done = sum(p.key in done for p in points)
    started = time.monotonic()
    for point in points:
        if point.key in done:
            continue
        reasons = unsupported(point)
        if reasons:
            row = QualityRow.make(point, "unsupported", "; ".join(reasons))
        else:
            progress.show(point.describe())
            row = _train_in_worker(point, spec, run_dir / WORKER_LOG)
            progress.measured_s += row.wall_s or 0.0
            progress.measured += 1
        results.append(row)
        done.add(point.key)
        progress.done += 1
        if on_row is not None:
            on_row(row)
    end = finish_env(run_dir)
    minutes, seconds = divmod(int(time.monotonic() - started), 60)
    stream.write(
        f"quality {run_dir.name}: {len(points)} points, {minutes}m{seconds:02d}s "
        f"(results: {results.path})\n"
    )
    threads = max((p.train.threads for p in points), default=1)
    busy = busy_warning(env["load_average_start"], end, env.get("cpu_count") or 1, threads)
    if busy:
        stream.write(f"warning: {busy}\n")
    return results.path


def _train_in_worker(point: QualityPoint, spec: QualitySpec, log: Path) -> QualityRow:
    """Train ``point`` in a worker process; its row, whatever happened."""
    limit = spec.settings.time_limit_s
    worker = RunningWorker.start_target(
        point, worker_main, (point, spec.settings.mem_limit_mib, log), limit, log
    )
    while True:
        answer = worker.poll()
        if answer is not None:
            break
        wait(worker.waitables(), timeout=max(0.0, min(worker.deadline() - time.monotonic(), 1)))
    status, reason, fields = answer
    wall = round(time.monotonic() - worker.started, 3)
    return QualityRow.make(point, status, reason, wall_s=wall, **fields)


def prepare_run_dir(run_dir: Path, fresh: bool, stream: TextIO | None = None) -> None:
    """``--fresh``: set the run's earlier results aside (effattn.harness.store.archive_results)."""
    if fresh and (old := archive_results(run_dir)) is not None:
        (sys.stderr if stream is None else stream).write(f"earlier results set aside: {old}\n")
