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
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path
from typing import TextIO

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


def run_in_worker(point: Point, spec: SweepSpec, log: Path | None = None) -> tuple[str, str, dict]:
    """Measure one point in a worker process: (status, reason, measured fields). The worker's
    stdout and stderr go to ``log`` (appended) when given."""
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=worker_main, args=(child, point, spec.settings, list(spec.plugins), log), daemon=True
    )
    proc.start()
    child.close()
    limit = spec.settings.time_limit_s
    with parent:
        ready = wait([parent, proc.sentinel], timeout=limit)
        result = None
        if parent in ready or parent.poll(0):
            try:
                result = parent.recv()
            except EOFError:
                result = None
    if result is None and not ready:
        proc.kill()
        proc.join()
        return "timeout", f"over the time limit of {limit:g} s", {}
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result is not None:
        return result.pop("status"), result.pop("reason"), result
    code = proc.exitcode
    if code == -signal.SIGKILL:
        return "oom", "killed by SIGKILL (likely the kernel's out-of-memory killer)", {}
    see = f" (see {log.name})" if log else ""
    if code is not None and code < 0:
        return "crashed", f"killed by {_signal_name(code)}{see}", {}
    return "crashed", f"worker exited with code {code} without a result{see}", {}


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
    stream: TextIO = sys.stderr
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
    stream: TextIO = sys.stderr,
    on_row: Callable[[Row], None] | None = None,
) -> Path:
    """Measure every point of ``spec`` not already in ``run_dir``; returns the results path.

    strict: unknown backends raise instead of being skipped with a message.
    """
    load_plugins(spec.plugins)
    points, messages = expand(spec, strict=strict)
    for message in messages:
        stream.write(message + "\n")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_env(run_dir, environment((p.threads for p in points), dataclasses.asdict(spec)))
    results = ResultsFile(run_dir / RESULTS)
    done = {row["key"]: row for row in results.read()}
    progress = Progress(len(points), stream)
    started = time.monotonic()
    for point in points:
        if point.key in done:
            progress.done += 1
            continue
        reasons = _unsupported(point)
        cut = None if reasons else _cut_off(point, done)
        if reasons:
            row = Row.make(point, "unsupported", "; ".join(reasons))
        elif cut:
            row = Row.make(point, "skipped", cut)
        else:
            progress.show(point.describe())
            t0 = time.monotonic()
            status, reason, measured = run_in_worker(point, spec, run_dir / WORKER_LOG)
            wall = time.monotonic() - t0
            progress.measured_s += wall
            progress.measured += 1
            row = Row.make(point, status, reason, wall_s=round(wall, 3), **measured)
        results.append(row)
        done[row.key] = dataclasses.asdict(row)
        progress.done += 1
        if on_row is not None:
            on_row(row)
    if stream.isatty():
        stream.write("\n")
    elapsed = _duration(time.monotonic() - started)
    stream.write(
        f"sweep {run_dir.name}: {len(points)} points, {elapsed} (results: {results.path})\n"
    )
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
