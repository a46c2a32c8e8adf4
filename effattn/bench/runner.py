"""Runs a sweep: the points of each comparison group in interleaved rounds, in a worker process
of their own; rows appended as groups finish; resumable.

A comparison group is every point with the same N, B, H, D, dtype, device, causal, threads and
mode (Point.group_key): the cells one column of a table compares. For each group, in order (see
effattn.bench.spec.expand):
- points already in results.jsonl (same key)     -> skipped silently (resume);
- the backend declares it cannot run the point    -> row ``unsupported`` (no worker started);
- a smaller N of the same curve ran out of budget -> row ``skipped`` ("out of budget at N=...");
- the rest are measured together by one worker (effattn.bench.worker.group_main): set up once,
  then ``settings.rounds`` rounds, each timing every point once in a fresh shuffled order
  (:func:`round_schedule`), then memory and error.

Bracketing (``settings.bracket_every`` k > 0; off by default): the group's anchor, ``sdpa``
(else ``full``), does not take a place in the shuffled order; each round times it first and
again after every k of the other points (:func:`round_schedule`), and a point's ratios divide
its time by the mean of the anchor timings just before and after it (:func:`bracket_refs`,
effattn.bench.stats.round_ratios), so that a ratio compares timings taken seconds apart, not up
to a round apart (15 s in the tay preset's largest group). Timed alone, one group at a time,
with the anchor between every two points, it cut the per-round spread of the speed-up vs sdpa
(SD of its log) from 0.09-0.17 to 0.05-0.08; in the tay preset (k = 3, 12 rounds in 2
passes, 1.5x the time per round) from 0.12 to 0.095, and two runs then agreed on 89% of the
speed-ups vs sdpa (18 rounds unbracketed: 87-93%) but 84% of those vs full (91-94%): pair 16
of reports/tay-cpu-agreement-history.md. The preset does not bracket.

Passes (``settings.passes`` P > 1): the rounds are shared out over P passes through the sweep's
groups (10 rounds in 3 passes: rounds 0-3 of every group, then 4-6 of every group, then 7-9),
each pass of a group in a fresh worker (set-up and warm-up again), memory and error in the
last. A disturbance of the machine that lasts a minute or two then lands on a few rounds of
many groups, which their medians over rounds shrug off, rather than on every round of one
group, which moves its cells (two runs of the tay preset disagreed by up to 30% that way; the
machine's speed changed by up to 1.8x between two passes of one run, and the backends' ratios
by up to 25% with it).
A point that fails is final: its row is written at the end of its pass, so that it cuts the
larger N of its curve in the same pass; the other rows of a group are written after its last
pass (a kill loses the group's earlier passes, never a row).

Why one worker per group, not one per point and round: a group's points share their inputs and
their warm-up, a round costs no process start, warm-up or calibration, and the points of a round
are timed seconds apart, so a ratio taken within a round sees one machine load. The guarantees
of a worker per point are kept:
- time limit: a point's set-up, rounds and memory count against ``settings.time_limit_s``; the
  parent kills a worker whose current point outlives its budget (``timeout``);
- isolation: a worker that dies (segfault, abort, the kernel's OOM killer: SIGKILL that we did
  not send is reported as ``oom``) costs the point it was measuring, which the parent knows from
  the worker's last message; a new worker takes the group's other points from where it stopped
  (the rounds already heard are kept), so a crash never costs its neighbours;
- an exception (out of memory under the cap included) costs only its point, in the worker.
- resume: a group's ok rows are written when its last round is done, each row one atomic
  append (effattn.bench.store); a sweep killed in the middle of a round measures that group's
  missing points again, with no duplicate and no lost row. When some rows of a group are
  already written (killed between appends, or split over array tasks), the group's baselines
  (``full``, ``sdpa``) are timed again beside the missing points, as references without rows,
  so that every ratio is still taken within rounds.

Each ok row keeps its per-round timings and the statistics of effattn.bench.stats: the median
time with its 95% bootstrap interval, and the speed-ups vs ``full`` and vs ``sdpa`` (baseline's
time / this time, taken per round) with theirs.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from effattn.bench import measure, stats
from effattn.bench.allocator import can_keep_freed_memory
from effattn.bench.spec import BASELINES, DTYPES, Point, SweepSpec, expand
from effattn.bench.store import (
    ENV,
    RESULTS,
    ResultsFile,
    Row,
    busy_cores,
    busy_warning,
    environment,
    finish_env,
    flush_writes,
    repeat_intervals,
    write_env,
)
from effattn.bench.worker import group_main, load_plugins

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
    """A worker process; :meth:`poll` gives its answer once there is one.

    :meth:`start_target` runs any ``target(conn, *args)`` that sends one dict ``{"status": ...,
    "reason": ..., **fields}`` over ``conn`` (the quality runs train one model per worker this
    way), with a time limit and crash/OOM statuses. The sweep's group workers talk more
    (effattn.bench.worker.group_main); :class:`GroupRun` reads them through ``conn`` and uses
    :meth:`dead` for a worker that died."""

    point: Any  # what the worker measures: a GroupRun of the sweep, or any job of the caller's
    proc: mp.process.BaseProcess
    conn: Connection  # the parent's end of the pipe
    limit_s: float  # the job's time limit
    log: Path | None
    started: float = dataclasses.field(default_factory=time.monotonic)

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
            self.kill()
            return "timeout", f"over the time limit of {self.limit_s:g} s", {}
        return None

    def kill(self) -> None:
        """Kill the worker (SIGKILL) and wait for it."""
        self.proc.kill()
        self.proc.join()
        self.conn.close()

    def dead(self) -> tuple[str, str]:
        """(status, reason) of a worker that stopped without an answer: ``oom`` for a SIGKILL we
        did not send (the kernel's OOM killer), else ``crashed`` naming the signal or exit code."""
        status, reason, _ = self._finish(None)
        return status, reason

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


def round_schedule(
    keys: Sequence[str],
    rounds: int,
    seed: int | None = None,
    *,
    anchor: str | None = None,
    every: int = 0,
) -> list[tuple[int, str]]:
    """The (round, key) measurements of a group: ``rounds`` rounds, each timing every key once,
    in a fresh shuffled order (``seed``: None draws one from the OS).

    ``anchor`` (one of ``keys``) with ``every`` > 0: the anchor brackets the others instead of
    taking a place among them. Each round times it first and again after every ``every`` of the
    others (shuffled) and after the last, e.g. ``every`` = 3 with six others::

        A b e c A f a d A"""
    rng = random.Random(seed)
    bracketed = anchor is not None and every > 0
    others = [k for k in keys if k != anchor] if bracketed else list(keys)
    schedule = []
    for r in range(rounds):
        order = list(others)
        rng.shuffle(order)
        if bracketed:
            chunks = [order[i : i + every] for i in range(0, len(order), every)]
            order = [anchor, *(key for chunk in chunks for key in (*chunk, anchor))]
        schedule += [(r, key) for key in order]
    return schedule


def bracket_refs(sequence: Sequence[tuple[str, float]], anchor: str) -> dict[str, float]:
    """The anchor's time beside each other key of one round: ``sequence`` is the round's
    timings in the order taken, (key, median ms of that timing); a key's ref is the mean of the
    anchor timings just before and just after it (one of them at an end of the round or where
    the worker lost one); the anchor's own ref is the median of its timings. Keys without an
    anchor timing in the round get none."""
    anchor_at = [i for i, (key, _) in enumerate(sequence) if key == anchor]
    if not anchor_at:
        return {}
    refs = {anchor: float(np.median([sequence[i][1] for i in anchor_at]))}
    for i, (key, _) in enumerate(sequence):
        if key == anchor:
            continue
        before = [sequence[j][1] for j in anchor_at if j < i][-1:]
        after = [sequence[j][1] for j in anchor_at if j > i][:1]
        refs[key] = float(np.mean(before + after))
    return refs


def anchor_of(points: Sequence[Point]) -> Point | None:
    """The point that brackets the others of a group: ``sdpa`` (cheap, and the table's
    reference), else ``full``, else None."""
    for label in ("sdpa", "full"):
        for point in points:
            if point.label == label:
                return point
    return None


def _six(x: float) -> float:
    return float(f"{x:.6g}")


class GroupRun:
    """One comparison group being measured: its worker, what the worker said, the time each
    point spent. :meth:`poll` reads the worker, replaces it when it dies or overruns a point's
    budget, and says when the group is done; :meth:`rows` then gives the rows to write.

    points: the points to measure and write; references: baselines (``full``, ``sdpa``) of the
    group timed in the same rounds for the ratios, without rows (their rows exist already, or
    another array task writes them)."""

    def __init__(
        self,
        points: list[Point],
        references: list[Point],
        spec: SweepSpec,
        log: Path | None = None,
        gpu: str | None = None,
        seed: int | None = None,
    ) -> None:
        self.points, self.spec, self.log, self.gpu = points, spec, log, gpu
        self.all = [*points, *references]
        self.limit_s = spec.settings.time_limit_s
        keys = [p.key for p in self.all]
        rounds, every = spec.settings.rounds, spec.settings.bracket_every
        anchor = anchor_of(self.all) if every else None
        self.anchor = anchor.key if anchor is not None else None
        self.schedule = round_schedule(keys, rounds, seed, anchor=self.anchor, every=every)
        # per point and round, the per-call ms of its timed blocks (the anchor's timings of a
        # round, concatenated); per round, (key, median ms) of each timing in the order taken
        self.times: dict[str, list[list[float] | None]] = {k: [None] * rounds for k in keys}
        self.sequence: list[list[tuple[str, float]]] = [[] for _ in range(rounds)]
        self.failed: dict[str, tuple[str, str]] = {}  # key -> (status, reason)
        self.fields: dict[str, dict[str, Any]] = {}  # key -> memory, flops, error, device
        self.spent = dict.fromkeys(keys, 0.0)  # seconds each point had the worker
        self.passes = spec.settings.pass_rounds()
        self.pass_index = 0  # the pass being measured (settings.passes)
        self.written: set[str] = set()  # keys whose rows the caller has taken (failed_rows)
        self.accounted_s = 0.0  # of wall_s(), what the caller's progress counted already
        self.phase = ""  # what the worker said it is doing: "lsh round 2/5"
        self.current: str | None = None
        self.since = time.monotonic()
        self.worker: RunningWorker | None = None
        self._launch()

    @property
    def finished(self) -> bool:
        """The current pass is done (and with it the group, when :attr:`last_pass`)."""
        return self.worker is None

    @property
    def last_pass(self) -> bool:
        return self.pass_index == len(self.passes) - 1

    def _todo(self) -> list[tuple[int, str]]:
        """The (round, key) measurements of the current pass not yet heard, in order."""
        rounds = self.passes[self.pass_index]
        heard = collections.Counter(
            (r, key) for r, timings in enumerate(self.sequence) for key, _ in timings
        )
        todo = []
        for r, key in self.schedule:
            if r not in rounds or key in self.failed:
                continue
            if heard[r, key]:  # heard already (the anchor: one of its timings of round r)
                heard[r, key] -= 1
            else:
                todo.append((r, key))
        return todo

    def _left(self) -> list[Point]:
        """The points the current pass still has to measure: timings, and in the last pass
        memory and error."""
        todo = {k for _, k in self._todo()}
        return [
            p
            for p in self.all
            if p.key not in self.failed
            and (p.key in todo or (self.last_pass and p.key not in self.fields))
        ]

    def _launch(self) -> None:
        left = self._left()
        if not left:
            self.worker = None
            return
        settings, plugins = self.spec.settings, list(self.spec.plugins)
        args = (left, settings, plugins, self._todo(), self.log, self.gpu, self.last_pass)
        self.worker = RunningWorker.start_target(self, group_main, args, self.limit_s, self.log)
        self._switch(left[0].key)  # the start of a worker counts against its first point

    def next_pass(self, skipped: dict[str, str] | None = None) -> bool:
        """Start the next pass (a fresh worker) after a pass that is not the last; ``skipped``:
        points to drop first, with the reason (a smaller N of their curve ran out of budget in
        the meantime). False when the pass has nothing to measure (the group is then done if
        it was the last)."""
        self.pass_index += 1
        for key, reason in (skipped or {}).items():
            self.failed.setdefault(key, ("skipped", reason))
        self._launch()
        return not self.finished

    def failed_rows(self) -> list[Row]:
        """The rows of ``points`` that failed and were not taken yet (each row once)."""
        rows = []
        for point in self.points:
            if point.key in self.failed and point.key not in self.written:
                status, reason = self.failed[point.key]
                rows.append(Row.make(point, status, reason, wall_s=round(self.spent[point.key], 3)))
                self.written.add(point.key)
        return rows

    def _switch(self, key: str | None) -> None:
        now = time.monotonic()
        if self.current is not None:
            self.spent[self.current] += now - self.since
        self.current, self.since = key, now

    def deadline(self) -> float:
        if self.current is None:
            return float("inf")
        return self.since + self.limit_s - self.spent[self.current]

    def waitables(self) -> list:
        return [] if self.worker is None else self.worker.waitables()

    def _fail(self, status: str, reason: str) -> None:
        """The worker is gone: the point it was on gets the status; a new worker goes on."""
        key = self.current
        self._switch(None)
        if key is not None and key not in self.fields:
            self.failed.setdefault(key, (status, reason))
        self._launch()

    def heard(self, key: str, r: int, times: list[float]) -> None:
        """Keep one timing of ``key`` in round ``r`` (per-call ms of its blocks), in the order
        taken."""
        self.times[key][r] = [*(self.times[key][r] or []), *times]
        self.sequence[r].append((key, float(np.median(times))))

    def poll(self) -> bool:
        """Handle what the worker said, its death or its overrun; True once the group is done."""
        worker = self.worker
        while worker is not None and worker is self.worker:
            try:
                if not worker.conn.poll(0):
                    break
                message = worker.conn.recv()
            except (EOFError, OSError):
                self._fail(*worker.dead())
                break
            kind, *rest = message
            if kind == "begin":
                key, phase = rest
                self._switch(key)
                label = next(p.label for p in self.all if p.key == key)
                self.phase = f"{label} {phase}"
            elif kind == "round":
                self.heard(*rest)
            elif kind == "failed":
                key, status, reason = rest
                self.failed[key] = (status, reason)
            elif kind == "done":
                key, fields = rest
                self.fields[key] = fields
            elif kind == "end":
                self._switch(None)
                worker.conn.close()
                worker.proc.join(timeout=30)
                for p in self._left():  # never happens with a sound worker; never silent
                    self.failed[p.key] = ("crashed", "the worker ended without measuring it")
                self.worker = None
        if self.worker is not None and self.worker is worker:
            if not worker.proc.is_alive() and not worker.conn.poll(0):
                self._fail(*worker.dead())
            elif time.monotonic() >= self.deadline():
                worker.kill()
                self._fail("timeout", f"over the time limit of {self.limit_s:g} s")
        return self.finished

    def wall_s(self) -> float:
        """Seconds the group's workers ran, over its passes so far (the time each point had
        a worker, set-ups included)."""
        return sum(self.spent.values())

    def rows(self) -> list[Row]:
        """The rows of ``points`` (not of the references) not taken yet, once the last pass
        is :attr:`finished`."""
        baselines = {p.label: p.key for p in self.all if p.label in BASELINES}
        # per point and round, the anchor's time beside it (None: not bracketed)
        refs: dict[str, list[float | None]] = {p.key: [None] * len(self.sequence) for p in self.all}
        if self.anchor is not None:
            for r, timings in enumerate(self.sequence):
                for key, ref in bracket_refs(timings, self.anchor).items():
                    refs[key][r] = ref
        rows = []
        for point in self.points:
            wall = round(self.spent[point.key], 3)
            if point.key in self.written:
                continue
            if point.key in self.failed:
                status, reason = self.failed[point.key]
                rows.append(Row.make(point, status, reason, wall_s=wall))
                continue
            rounds = [t for t in self.times[point.key] if t is not None]
            timing = timing_fields(rounds)
            for label, base in baselines.items():
                if base not in self.failed:
                    ratios = stats.round_ratios(
                        self.times[base], self.times[point.key], refs[base], refs[point.key]
                    )
                    timing.update(ratio_fields(f"speedup_vs_{label}", ratios))
            rows.append(Row.make(point, "ok", wall_s=wall, **self.fields[point.key], **timing))
        return rows


def timing_fields(rounds: list[list[float]]) -> dict[str, Any]:
    """The row fields of one point's rounds (per-call ms of each timed block, per round): the
    median and its interval (effattn.bench.stats.median_interval), the IQR of all timed runs,
    and the timings themselves (6 significant digits)."""
    interval = stats.median_interval(rounds)
    q1, q3 = np.quantile(np.concatenate(rounds), [0.25, 0.75])
    return {
        "time_ms_median": interval.median,
        "time_ms_lo": interval.lo,
        "time_ms_hi": interval.hi,
        "time_ms_iqr": float(q3 - q1),
        "runs": sum(len(r) for r in rounds),
        "rounds": len(rounds),
        "times_ms": [[_six(t) for t in r] for r in rounds],
    }


def ratio_fields(name: str, ratios: list[float]) -> dict[str, Any]:
    """``name``, ``name_lo``, ``name_hi`` (the median of the per-round ratios and its interval)
    and ``name_rounds`` (the ratios); nothing without a ratio."""
    if not ratios:
        return {}
    interval = stats.median_interval([[r] for r in ratios])
    return {
        name: interval.median,
        f"{name}_lo": interval.lo,
        f"{name}_hi": interval.hi,
        f"{name}_rounds": [_six(r) for r in ratios],
    }


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
    passes: int = 1  # settings.passes: the ETA counts point-passes
    measured_s: float = 0.0  # wall time of the point-passes measured in this session
    measured: int = 0  # point-passes measured in this session
    partial: int = 0  # point-passes done of the points not done yet

    def add_pass(self, seconds: float, points: int, last: bool) -> None:
        """A pass of a group's ``points`` took ``seconds``; ``last``: their rows are done."""
        self.measured_s += seconds
        self.measured += points
        self.partial += -points * (self.passes - 1) if last else points

    def show(self, text: str) -> None:
        left = (self.total - self.done) * self.passes - self.partial
        eta = ""
        if self.measured:
            eta = f" ETA {_duration(self.measured_s / self.measured * max(left, 0))}"
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
    strict_device: bool | None = None,
    stream: TextIO | None = None,  # None: sys.stderr at call time
    on_row: Callable[[Row], None] | None = None,
    workers: int = 1,
) -> Path:
    """Measure every point of ``spec`` not already in ``run_dir``; returns the results path.
    Flushes pending file writes first (effattn.bench.store.flush_writes). env.json records the
    load average at the start and the end, and the cores other work kept busy just before the
    first point (effattn.bench.store.busy_cores); at the end, warnings for a
    busy machine and for the cells whose interval is too wide (effattn.bench.stats.UNSTABLE_PCT).

    strict, strict_device: unknown backends, missing devices raise instead of being skipped
    with a message (effattn.bench.spec.expand).
    workers: groups measured at once, one GPU each (see :func:`gpu_slots`).
    """
    stream = sys.stderr if stream is None else stream
    load_plugins(spec.plugins)
    points, messages = expand(spec, strict=strict, strict_device=strict_device)
    slots = gpu_slots(workers, points)
    for message in messages:
        stream.write(message + "\n")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    unwritten = flush_writes()
    env = environment((p.threads for p in points), dataclasses.asdict(spec))
    env["unwritten_mib_at_start"] = unwritten  # flushed to disk before timing (flush_writes)
    env["busy_cores_at_start"] = busy_cores()  # other work, now (the load average lags)
    env["freed_memory_kept"] = spec.settings.keep_freed_memory and can_keep_freed_memory()
    write_env(run_dir, env)
    started = time.monotonic()
    rows: list[Row] = []

    def collect(row: Row) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    results = measure_points(points, spec, run_dir, slots=slots, stream=stream, on_row=collect)
    end = finish_env(run_dir)
    if stream.isatty():
        stream.write("\n")
    elapsed = _duration(time.monotonic() - started)
    stream.write(f"sweep {run_dir.name}: {len(points)} points, {elapsed} (results: {results})\n")
    for warning in sweep_warnings(rows, env["load_average_start"], end, env):
        stream.write(warning + "\n")
    return results


_SHORT = {"time_ms": "time", "speedup_vs_full": "vs full", "speedup_vs_sdpa": "vs sdpa"}


def unstable_cells(rows: Sequence[Row | dict[str, Any]]) -> list[tuple[str, float]]:
    """(description, widest half-width in %) of each ok row whose time or speed-up repeat
    interval (effattn.bench.store.repeat_intervals) is wider than
    effattn.bench.stats.UNSTABLE_PCT percent of its median."""
    found = []
    for row in rows:
        r = row if isinstance(row, dict) else dataclasses.asdict(row)
        if r["status"] != "ok":
            continue
        widths = {k: i.half_width_pct for k, i in repeat_intervals(r).items()}
        wide = {k: w for k, w in widths.items() if w > stats.UNSTABLE_PCT}
        if wide:
            what = ", ".join(f"{_SHORT[k]} ±{w:.0f}%" for k, w in wide.items())
            causal = " causal" if r["causal"] else ""
            found.append(
                (f"{r['mode']}{causal} {r['label']} N={r['n']}: {what}", max(wide.values()))
            )
    return found


def sweep_warnings(
    rows: Sequence[Row | dict[str, Any]],
    load_start: Sequence[float],
    load_end: Sequence[float],
    env: dict[str, Any],
    *,
    shown: int = 10,
) -> list[str]:
    """The warnings at the end of a sweep (as pyperf warns that a benchmark looks unstable): a
    busy machine (effattn.bench.store.busy_warning), and the unstable cells, widest first."""
    warnings = []
    busy = busy_warning(
        load_start,
        load_end,
        env.get("cpu_count") or 1,
        max(env["threads"], default=1),
        env.get("busy_cores_at_start"),
    )
    if busy:
        warnings.append(f"warning: {busy}")
    cells = sorted(unstable_cells(rows), key=lambda c: -c[1])
    if cells:
        ok = sum(1 for r in rows if (r if isinstance(r, dict) else dataclasses.asdict(r))
                 ["status"] == "ok")  # fmt: skip
        warnings.append(
            f"warning: {len(cells)} of {ok} cells look unstable: a 95% repeat interval wider than "
            f"±{stats.UNSTABLE_PCT:g}% of its median (marked ! in the tables). Rerun on a quieter "
            "machine, or with more --rounds or a longer --min-run-time:"
        )
        warnings += [f"  {text}" for text, _ in cells[:shown]]
        if len(cells) > shown:
            warnings.append(f"  ... and {len(cells) - shown} more")
    return warnings


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
    references: Sequence[Point] = (),
) -> Path:
    """Measure ``points`` not already in ``run_dir``'s results, group by group in the order of
    their first point (see the module docstring), ``len(slots)`` groups at once, each slot
    pinned to its GPU (a CUDA_VISIBLE_DEVICES value, or None: unchanged). A group waits while a
    group sharing one of its curves runs, so a smaller N that ran out of budget still cuts the
    larger ones. ``references``: more points of the sweep (an array task's view of the others'
    points) whose baselines may be timed beside a group without rows. Returns the results
    path."""
    run_dir = Path(run_dir)
    results = ResultsFile(run_dir / RESULTS)
    done = {row["key"]: row for row in results.read()}
    passes = spec.settings.passes
    progress = Progress(len(points), sys.stderr if stream is None else stream, passes=passes)
    groups: dict[str, list[Point]] = {}
    for point in points:
        if point.key in done:
            progress.done += 1
        else:
            groups.setdefault(point.group_key, []).append(point)
    baselines: dict[str, list[Point]] = {}
    for point in dict.fromkeys([*points, *references]):
        if point.label in BASELINES:
            baselines.setdefault(point.group_key, []).append(point)
    curves = {key: {_curve(p) for p in group} for key, group in groups.items()}
    running: dict[int, GroupRun] = {}  # slot index -> its group
    rounds = spec.settings.rounds

    def record(row: Row) -> None:
        results.append(row)
        done[row.key] = dataclasses.asdict(row)
        progress.done += 1
        if on_row is not None:
            on_row(row)

    def not_run(point: Point) -> Row | None:
        """The row of a point that will not run (unsupported, or cut off); None for one that
        will."""
        reasons = _unsupported(point)
        cut = None if reasons else _cut_off(point, done)
        if reasons or cut:
            status, why = ("unsupported", "; ".join(reasons)) if reasons else ("skipped", cut)
            return Row.make(point, status, why)
        return None

    held: dict[str, tuple[list[Point], dict[str, Row]]] = {}  # group -> its points, rows held

    def finish(key: str, rows: list[Row]) -> None:
        """Record a group's rows, measured or not, in the order of its points (those not
        recorded at the end of an earlier pass)."""
        group, kept = held.pop(key)
        by_key = {**kept, **{row.key: row for row in rows}}
        for point in group:
            if point.key not in done:
                record(by_key[point.key])

    def record_failed(key: str, run: GroupRun) -> None:
        """After a pass that is not the last: record the rows of the points that failed in it
        (final, and a failure that cuts larger N must be known before they run)."""
        group, kept = held[key]
        failed = {row.key: row for row in run.failed_rows()}
        for point in group:
            row = kept.get(point.key) or failed.get(point.key)
            if row is not None and point.key not in done:
                record(row)

    def start(key: str, gpu: str | None) -> GroupRun | None:
        group = groups.pop(key)
        kept = {p.key: row for p in group if (row := not_run(p)) is not None}
        held[key] = (group, kept)
        todo = [p for p in group if p.key not in kept]
        if not todo:
            finish(key, [])
            return None
        mine = {p.key for p in todo}
        refs = [
            p
            for p in baselines.get(key, [])
            if p.key not in mine
            and done.get(p.key, {}).get("status", "ok") == "ok"
            and not _unsupported(p)
            and _cut_off(p, done) is None
        ]
        names = ", ".join(p.label for p in todo)
        extra = f" (+ {', '.join(p.label for p in refs)} as references)" if refs else ""
        head = dataclasses.replace(todo[0], backend="*", options=())
        progress.show(f"{head.describe()}: {names}{extra}, {rounds} rounds{_pass_text(0)}")
        return GroupRun(todo, refs, spec, run_dir / WORKER_LOG, gpu)

    def resume(run: GroupRun) -> GroupRun | None:
        """The group's next pass, or None when it has nothing left to measure."""
        skipped = {}
        for point in run.points:
            if point.key not in run.failed and (why := _cut_off(point, done)):
                skipped[point.key] = why
        if run.next_pass(skipped):
            head = dataclasses.replace(run.points[0], backend="*", options=())
            progress.show(f"{head.describe()}{_pass_text(run.pass_index)}")
            return run
        end_pass(run)  # a pass with nothing to do
        return None

    def end_pass(run: GroupRun) -> None:
        """Count a finished pass of ``run``; record its rows after the last pass, else its
        failures, and queue it for the next pass."""
        spent, run.accounted_s = run.wall_s() - run.accounted_s, run.wall_s()
        progress.add_pass(spent, len(run.points), run.last_pass)
        if run.last_pass:
            finish(run.points[0].group_key, run.rows())
        else:
            record_failed(run.points[0].group_key, run)
            later.append(run)

    def _pass_text(index: int) -> str:
        return f", pass {index + 1}/{passes}" if passes > 1 else ""

    queue: list[tuple[str, GroupRun | None]] = [(key, None) for key in groups]
    later: list[GroupRun] = []  # groups waiting for the next pass
    while queue or running or later:
        if not queue and not running:  # a pass through every group is done: the next one
            queue, later = [(run.points[0].group_key, run) for run in later], []
        busy = set().union(*(curves[run.points[0].group_key] for run in running.values()))
        for slot in (i for i in range(len(slots)) if i not in running):
            while True:
                item = next((it for it in queue if not curves[it[0]] & busy), None)
                if item is None:
                    break
                queue.remove(item)
                key, earlier = item
                if earlier is None:
                    run = start(key, slots[slot])
                else:
                    earlier.gpu = slots[slot]
                    run = resume(earlier)
                if run is not None:
                    running[slot] = run
                    busy |= curves[key]
                    break
        if not running:
            continue
        soonest = min(run.deadline() for run in running.values())
        wait([x for run in running.values() for x in run.waitables()],
             timeout=max(0.0, min(soonest - time.monotonic(), 1.0)))  # fmt: skip
        for slot, run in list(running.items()):
            phase = run.phase
            if not run.poll():
                if progress.stream.isatty() and run.phase != phase:
                    progress.show(run.phase)
                continue
            del running[slot]
            end_pass(run)
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
