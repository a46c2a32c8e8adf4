"""Runs a sweep: each point in its own worker process, rows appended as they finish, resumable.

For each point, in order (see effattn.bench.spec.expand):
- already in results.jsonl (same key)           -> skipped silently (resume);
- the backend declares it cannot run it         -> row ``unsupported`` (no worker started);
- a smaller N of the same curve ran out of budget -> row ``skipped`` ("out of budget at N=...");
- else a worker measures it; a worker that outlives ``settings.time_limit_s`` is killed
  (``timeout``), one that dies without an answer is ``crashed`` (signal named), SIGKILL that we
  did not send is reported as ``oom`` (the kernel's OOM killer).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, TextIO

import torch

from effattn.bench import measure
from effattn.bench.spec import DTYPES, Point, SweepSpec, expand
from effattn.bench.store import ENV, RESULTS, ResultsFile, Row, environment, write_env
from effattn.bench.worker import load_plugins, worker_main

OUT_OF_BUDGET = ("oom", "timeout")
WORKER_LOG = "worker.log"  # the workers' stdout and stderr (profiler notes, crash messages)
_CONTEXT: mp.context.BaseContext | None = None


def _context() -> mp.context.BaseContext:
    """The forkserver context (torch and effattn preloaded), or spawn where there is none."""
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in mp.get_all_start_methods():
            _CONTEXT = mp.get_context("forkserver")
            _CONTEXT.set_forkserver_preload(["effattn.bench._preload"])
        else:
            _CONTEXT = mp.get_context("spawn")
    return _CONTEXT


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


@dataclasses.dataclass
class RunningWorker:
    """A worker process measuring one point; :meth:`poll` gives its answer once there is one.

    Not only for sweep points: :meth:`start_target` runs any ``target(conn, *args)`` that sends
    one dict ``{"status": ..., "reason": ..., **fields}`` over ``conn`` (the quality runs train
    one model per worker this way), with the same time limit and crash/OOM statuses."""

    point: Any  # what the worker measures: a sweep Point, or any job of the caller's
    proc: mp.process.BaseProcess
    conn: Connection  # the parent's end of the pipe
    limit_s: float  # the point's time limit
    log: Path | None
    started: float = dataclasses.field(default_factory=time.monotonic)

    @classmethod
    def start(
        cls, point: Point, spec: SweepSpec, log: Path | None = None, gpu: str | None = None
    ) -> RunningWorker:
        """Fork a worker for ``point``; ``gpu`` (a CUDA_VISIBLE_DEVICES value) pins its GPU."""
        args = (point, spec.settings, list(spec.plugins), log, gpu)
        return cls.start_target(point, worker_main, args, spec.settings.time_limit_s, log)

    @classmethod
    def start_target(
        cls,
        job: Any,
        target: Callable[..., None],
        args: tuple,
        limit_s: float,
        log: Path | None = None,
    ) -> RunningWorker:
        """Fork a worker (from the forkserver) running ``target(conn, *args)`` for ``job``;
        ``target`` must be importable (a module-level function) and send one result dict."""
        ctx = _context()
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        proc.start()
        child.close()
        return cls(job, proc, parent, limit_s, log)

    def waitables(self) -> list:
        return [self.conn, self.proc.sentinel]

    def deadline(self) -> float:
        return self.started + self.limit_s

    def poll(self) -> tuple[str, str, dict] | None:
        """(status, reason, measured fields) once the worker answered, died or ran out of time;
        None while it is still measuring."""
        if self.conn.poll(0):  # an answer, or EOF: the worker is gone
            try:
                result = self.conn.recv()
            except EOFError:
                result = None
            return self._finish(result)
        if not self.proc.is_alive():
            return self._finish(self.conn.recv() if self.conn.poll(0) else None)
        if time.monotonic() >= self.deadline():
            self.proc.kill()
            self.proc.join()
            self.conn.close()
            return "timeout", f"over the time limit of {self.limit_s:g} s", {}
        return None

    def _finish(self, result: dict | None) -> tuple[str, str, dict]:
        self.conn.close()
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        if result is not None:
            return result.pop("status"), result.pop("reason"), result
        code = self.proc.exitcode
        if code == -signal.SIGKILL:
            return "oom", "killed by SIGKILL (likely the kernel's out-of-memory killer)", {}
        see = f" (see {self.log.name})" if self.log else ""
        if code is not None and code < 0:
            return "crashed", f"killed by {_signal_name(code)}{see}", {}
        return "crashed", f"worker exited with code {code} without a result{see}", {}


def run_in_worker(
    point: Point, spec: SweepSpec, log: Path | None = None, gpu: str | None = None
) -> tuple[str, str, dict]:
    """Measure one point in a worker process: (status, reason, measured fields). The worker's
    stdout and stderr go to ``log`` (appended) when given."""
    worker = RunningWorker.start(point, spec, log, gpu)
    while (answer := worker.poll()) is None:
        wait(worker.waitables(), timeout=max(0.0, worker.deadline() - time.monotonic()))
    return answer


def gpu_slots(workers: int, points: list[Point]) -> list[str | None]:
    """One CUDA_VISIBLE_DEVICES value per worker slot: GPU i for slot i (of the GPUs this process
    sees). A single slot keeps the environment as it is (None). Refused with ValueError: several
    workers for CPU points (timings on shared cores are meaningless), or more workers than GPUs.
    """
    if workers < 1:
        raise ValueError(f"workers: expected a positive integer, got {workers!r}")
    if workers == 1:
        return [None]
    if any(p.device == "cpu" for p in points):
        raise ValueError(
            f"workers: expected 1 for a sweep with CPU points, got {workers} (points timed at "
            "once on shared cores would measure each other; use --device cuda, or --workers 1)"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",")] if visible else None
    count = torch.cuda.device_count()
    ids = (ids or [str(i) for i in range(count)])[:count]
    if workers > len(ids):
        raise ValueError(
            f"workers: expected at most {len(ids)} (one per visible GPU), got {workers}"
        )
    return ids[:workers]


def _unsupported(point: Point) -> list[str]:
    backend = measure.backend_of(point)
    return backend.not_supported_reasons(
        device=point.device,
        dtype=DTYPES[point.dtype],
        causal=point.causal,
        backward=point.mode != "fwd",
        head_dim=point.head_dim,
    )


def _cut_off(point: Point, done: dict[str, dict]) -> str | None:
    """Why ``point`` is not worth running: a smaller N of its curve was out of budget."""
    for row in done.values():
        smaller = row["status"] in OUT_OF_BUDGET and row["n"] < point.n
        if smaller and dataclasses.replace(point, n=row["n"]).key == row["key"]:
            return f"out of budget at N={row['n']} ({row['status']})"
    return None


@dataclasses.dataclass
class Progress:
    """A one-line progress report on a stream: point, n/total, ETA."""

    total: int  # points in the sweep
    # Looked up when a Progress is made, not at import (tests and callers swap sys.stderr).
    stream: TextIO = dataclasses.field(default_factory=lambda: sys.stderr)
    done: int = 0
    measured_s: float = 0.0  # wall time of the points measured in this session
    measured: int = 0

    def show(self, text: str) -> None:
        left = self.total - self.done
        eta = ""
        if self.measured:
            eta = f" ETA {_duration(self.measured_s / self.measured * left)}"
        end = "\r" if self.stream.isatty() else "\n"
        line = f"[{self.done + 1}/{self.total}]{eta} {text}"
        self.stream.write(f"{line[:150]:<150}{end}" if end == "\r" else line + end)
        self.stream.flush()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def run_sweep(
    spec: SweepSpec,
    run_dir: Path,
    *,
    strict: bool = False,
    stream: TextIO | None = None,  # None: sys.stderr at call time
    on_row: Callable[[Row], None] | None = None,
    workers: int = 1,
) -> Path:
    """Measure every point of ``spec`` not already in ``run_dir``; returns the results path.

    strict: unknown backends raise instead of being skipped with a message.
    workers: points measured at once, one GPU each (see :func:`gpu_slots`).
    """
    stream = sys.stderr if stream is None else stream
    load_plugins(spec.plugins)
    points, messages = expand(spec, strict=strict)
    slots = gpu_slots(workers, points)
    for message in messages:
        stream.write(message + "\n")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_env(run_dir, environment((p.threads for p in points), dataclasses.asdict(spec)))
    started = time.monotonic()
    results = measure_points(points, spec, run_dir, slots=slots, stream=stream, on_row=on_row)
    if stream.isatty():
        stream.write("\n")
    elapsed = _duration(time.monotonic() - started)
    stream.write(f"sweep {run_dir.name}: {len(points)} points, {elapsed} (results: {results})\n")
    return results


def _curve(point: Point) -> str:
    """The points of one curve differ only in N (a smaller N's budget cuts the larger ones)."""
    return dataclasses.replace(point, n=0).key


def measure_points(
    points: list[Point],
    spec: SweepSpec,
    run_dir: Path,
    *,
    slots: list[str | None] = (None,),  # type: ignore[assignment]
    stream: TextIO | None = None,  # None: sys.stderr at call time
    on_row: Callable[[Row], None] | None = None,
) -> Path:
    """Measure ``points`` (in order) not already in ``run_dir``'s results, one worker process per
    point, ``len(slots)`` at once, each slot pinned to its GPU (a CUDA_VISIBLE_DEVICES value, or
    None: unchanged). The points of one curve run one after another, so a smaller N that ran out
    of budget still cuts the larger ones; a slot never runs two points at once. Returns the
    results path."""
    results = ResultsFile(Path(run_dir) / RESULTS)
    done = {row["key"]: row for row in results.read()}
    progress = Progress(len(points), sys.stderr if stream is None else stream)
    pending = []
    for point in points:
        if point.key in done:
            progress.done += 1
        else:
            pending.append(point)
    running: dict[int, RunningWorker] = {}  # slot index -> its worker
    curve = {p.key: _curve(p) for p in pending}  # computed once: each pass looks them up

    def record(row: Row) -> None:
        results.append(row)
        done[row.key] = dataclasses.asdict(row)
        progress.done += 1
        if on_row is not None:
            on_row(row)

    while pending or running:
        busy = {curve[w.point.key] for w in running.values()}
        for slot in (i for i in range(len(slots)) if i not in running):
            point = next((p for p in pending if curve[p.key] not in busy), None)
            while point is not None:
                pending.remove(point)
                reasons = _unsupported(point)
                cut = None if reasons else _cut_off(point, done)
                if not (reasons or cut):
                    break
                status, why = ("unsupported", "; ".join(reasons)) if reasons else ("skipped", cut)
                record(Row.make(point, status, why))
                point = next((p for p in pending if curve[p.key] not in busy), None)
            if point is None:
                break
            progress.show(point.describe())
            running[slot] = RunningWorker.start(
                point, spec, Path(run_dir) / WORKER_LOG, slots[slot]
            )
            busy.add(curve[point.key])
        if not running:
            continue
        soonest = min(w.deadline() for w in running.values())
        wait([x for w in running.values() for x in w.waitables()],
             timeout=max(0.0, soonest - time.monotonic()))  # fmt: skip
        for slot, worker in list(running.items()):
            answer = worker.poll()
            if answer is None:
                continue
            del running[slot]
            status, reason, measured = answer
            wall = time.monotonic() - worker.started
            progress.measured_s += wall
            progress.measured += 1
            record(Row.make(worker.point, status, reason, wall_s=round(wall, 3), **measured))
    return results.path


def archive_results(run_dir: Path) -> Path | None:
    """Move an earlier results file aside (``--fresh``); returns its new path."""
    path = Path(run_dir) / RESULTS
    if not path.exists():
        return None
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"results-{stamp}.jsonl.old")
    path.rename(target)
    env = Path(run_dir) / ENV
    if env.exists():
        env.rename(env.with_name(f"env-{stamp}.json.old"))
    return target
