"""Runs a sweep: the points of each comparison group in interleaved rounds, in a worker process
of their own; rows appended as groups finish; resumable.

A comparison group is every point with the same N, B, H, D, dtype, device, causal, threads and
mode (Point.group_key): the cells one column of a table compares. For each group, in order (see
effattn.sweep.spec.expand):
- points already in results.jsonl (same key)     -> skipped silently (resume);
- the backend declares it cannot run the point    -> row ``unsupported`` (no worker started);
- a smaller N of the same curve ran out of budget -> row ``skipped`` ("out of budget at N=...");
- the rest are measured together by one worker (effattn.sweep.worker.group_main): set up once,
  then ``settings.rounds`` rounds, each timing every point once in a fresh shuffled order
  (:func:`round_schedule`), then memory and error.

Bracketing (``settings.bracket_every`` k > 0; off by default): the group's anchor, ``sdpa``
(else ``full``), does not take a place in the shuffled order; each round times it first and
again after every k of the other points (:func:`round_schedule`), and a point's ratios divide
its time by the mean of the anchor timings just before and after it (:func:`bracket_refs`,
effattn.harness.stats.round_ratios), so that a ratio compares timings taken seconds apart, not up
to a round apart. Off in the presets; what it bought is in docs/methodology.md and
reports/tay-cpu-agreement-history.md.

Passes (``settings.passes`` P > 1): the rounds are shared out over P passes through the sweep's
groups (10 rounds in 3 passes: rounds 0-3 of every group, then 4-6 of every group, then 7-9),
each pass of a group in a fresh worker (set-up and warm-up again), memory and error in the
last. A disturbance of the machine that lasts a minute or two then lands on a few rounds of
many groups, which their medians over rounds shrug off, rather than on every round of one
group, which moves its cells.
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
  append (effattn.harness.store); a sweep killed in the middle of a round measures that group's
  missing points again, with no duplicate and no lost row. When some rows of a group are
  already written (killed between appends, or split over array tasks), the group's baselines
  (``full``, ``sdpa``) are timed again beside the missing points, as references without rows,
  so that every ratio is still taken within rounds.

Each ok row keeps its per-round timings and the statistics of effattn.harness.stats: the median
time with its 95% bootstrap interval, and the speed-ups vs ``full`` and vs ``sdpa`` (baseline's
time / this time, taken per round) with theirs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, TextIO

import torch

from effattn.harness import stats
from effattn.harness.allocator import can_keep_freed_memory
from effattn.harness.machine import busy_cores, busy_warning, environment, flush_writes
from effattn.harness.progress import Progress, duration
from effattn.harness.rows import Row, repeat_intervals
from effattn.harness.store import RESULTS, ResultsFile, finish_env, write_env
from effattn.harness.worker import WORKER_LOG, load_plugins
from effattn.sweep import measure
from effattn.sweep.group import GroupRun
from effattn.sweep.spec import BASELINES, DTYPES, Point, SweepSpec, expand

OUT_OF_BUDGET = ("oom", "timeout")


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
    reasons = backend.not_supported_reasons(
        device=point.device,
        dtype=DTYPES[point.dtype],
        causal=point.causal,
        backward=point.mode in ("fwd_bwd", "step"),
        head_dim=point.head_dim,
    )
    if point.mode == "decode" and not reasons:
        reasons = measure.decode_refusals(point)
    return reasons


def _cut_off(point: Point, done: dict[str, dict]) -> str | None:
    """Why ``point`` is not worth running: a smaller N of its curve was out of budget."""
    for row in done.values():
        smaller = row["status"] in OUT_OF_BUDGET and row["n"] < point.n
        if smaller and dataclasses.replace(point, n=row["n"]).key == row["key"]:
            return f"out of budget at N={row['n']} ({row['status']})"
    return None


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
    Flushes pending file writes first (effattn.harness.machine.flush_writes). env.json records the
    load average at the start and the end, and the cores other work kept busy just before the
    first point (effattn.harness.machine.busy_cores); at the end, warnings for a
    busy machine and for the cells whose interval is too wide (effattn.harness.stats.UNSTABLE_PCT).

    strict, strict_device: unknown backends, missing devices raise instead of being skipped
    with a message (effattn.sweep.spec.expand).
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
    elapsed = duration(time.monotonic() - started)
    stream.write(f"sweep {run_dir.name}: {len(points)} points, {elapsed} (results: {results})\n")
    for warning in sweep_warnings(rows, env["load_average_start"], end, env):
        stream.write(warning + "\n")
    return results


_SHORT = {"time_ms": "time", "speedup_vs_full": "vs full", "speedup_vs_sdpa": "vs sdpa"}


def unstable_cells(rows: Sequence[Row | dict[str, Any]]) -> list[tuple[str, float]]:
    """(description, widest half-width in %) of each ok row whose time or speed-up repeat
    interval (effattn.harness.rows.repeat_intervals) is wider than
    effattn.harness.stats.UNSTABLE_PCT percent of its median."""
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
    busy machine (effattn.harness.machine.busy_warning), and the unstable cells, widest first."""
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
    scheduler = GroupScheduler(
        points, spec, run_dir, stream=stream, on_row=on_row, references=references
    )
    scheduler.run(slots)
    return scheduler.results.path


class GroupScheduler:
    """The comparison groups of a sweep still to measure, the workers measuring them, and the
    rows recorded so far: starts each group's passes on free slots, and records each group's
    rows in the order of its points once its last pass is done (:meth:`run`)."""

    def __init__(
        self,
        points: list[Point],
        spec: SweepSpec,
        run_dir: Path,
        *,
        stream: TextIO | None = None,
        on_row: Callable[[Row], None] | None = None,
        references: Sequence[Point] = (),
    ) -> None:
        self.spec = spec
        self.run_dir = Path(run_dir)
        self.results = ResultsFile(self.run_dir / RESULTS)
        self.done = {row["key"]: row for row in self.results.read()}  # key -> row as written
        self.passes = spec.settings.passes
        self.on_row = on_row
        self.progress = Progress(
            len(points), sys.stderr if stream is None else stream, passes=self.passes
        )
        self.groups: dict[str, list[Point]] = {}  # group key -> its points not started yet
        for point in points:
            if point.key in self.done:
                self.progress.done += 1
            else:
                self.groups.setdefault(point.group_key, []).append(point)
        self.baselines: dict[str, list[Point]] = {}  # group key -> its full / sdpa points
        for point in dict.fromkeys([*points, *references]):
            if point.label in BASELINES:
                self.baselines.setdefault(point.group_key, []).append(point)
        self.curves = {key: {_curve(p) for p in group} for key, group in self.groups.items()}
        # group key -> its points and the rows held back until its last pass (not run ones)
        self.held: dict[str, tuple[list[Point], dict[str, Row]]] = {}
        self.later: list[GroupRun] = []  # groups waiting for their next pass

    def record(self, row: Row) -> None:
        self.results.append(row)
        self.done[row.key] = dataclasses.asdict(row)
        self.progress.done += 1
        if self.on_row is not None:
            self.on_row(row)

    def not_run(self, point: Point) -> Row | None:
        """The row of a point that will not run (unsupported, or cut off); None for one that
        will."""
        reasons = _unsupported(point)
        cut = None if reasons else _cut_off(point, self.done)
        if reasons or cut:
            status, why = ("unsupported", "; ".join(reasons)) if reasons else ("skipped", cut)
            return Row.make(point, status, why)
        return None

    def finish(self, key: str, rows: list[Row]) -> None:
        """Record a group's rows, measured or not, in the order of its points (those not
        recorded at the end of an earlier pass)."""
        group, kept = self.held.pop(key)
        by_key = {**kept, **{row.key: row for row in rows}}
        for point in group:
            if point.key not in self.done:
                self.record(by_key[point.key])

    def record_failed(self, key: str, run: GroupRun) -> None:
        """After a pass that is not the last: record the rows of the points that failed in it
        (final, and a failure that cuts larger N must be known before they run)."""
        group, kept = self.held[key]
        failed = {row.key: row for row in run.failed_rows()}
        for point in group:
            row = kept.get(point.key) or failed.get(point.key)
            if row is not None and point.key not in self.done:
                self.record(row)

    def _references(self, key: str, mine: set[str]) -> list[Point]:
        """The group's baselines with rows already (or elsewhere) that can be timed beside it."""
        return [
            p
            for p in self.baselines.get(key, [])
            if p.key not in mine
            and self.done.get(p.key, {}).get("status", "ok") == "ok"
            and not _unsupported(p)
            and _cut_off(p, self.done) is None
        ]

    def start(self, key: str, gpu: str | None) -> GroupRun | None:
        """The first pass of group ``key`` on ``gpu``; None when none of its points runs."""
        group = self.groups.pop(key)
        kept = {p.key: row for p in group if (row := self.not_run(p)) is not None}
        self.held[key] = (group, kept)
        todo = [p for p in group if p.key not in kept]
        if not todo:
            self.finish(key, [])
            return None
        refs = self._references(key, {p.key for p in todo})
        names = ", ".join(p.label for p in todo)
        extra = f" (+ {', '.join(p.label for p in refs)} as references)" if refs else ""
        head = dataclasses.replace(todo[0], backend="*", options=())
        self.progress.show(
            f"{head.describe()}: {names}{extra}, {self.spec.settings.rounds} rounds"
            + self._pass_text(0)
        )
        return GroupRun(todo, refs, self.spec, self.run_dir / WORKER_LOG, gpu)

    def resume(self, run: GroupRun) -> GroupRun | None:
        """The group's next pass, or None when it has nothing left to measure."""
        skipped = {}
        for point in run.points:
            if point.key not in run.failed and (why := _cut_off(point, self.done)):
                skipped[point.key] = why
        if run.next_pass(skipped):
            head = dataclasses.replace(run.points[0], backend="*", options=())
            self.progress.show(f"{head.describe()}{self._pass_text(run.pass_index)}")
            return run
        self.end_pass(run)  # a pass with nothing to do
        return None

    def end_pass(self, run: GroupRun) -> None:
        """Count a finished pass of ``run``; record its rows after the last pass, else its
        failures, and queue it for the next pass."""
        spent, run.accounted_s = run.wall_s() - run.accounted_s, run.wall_s()
        self.progress.add_pass(spent, len(run.points), run.last_pass)
        if run.last_pass:
            self.finish(run.points[0].group_key, run.rows())
        else:
            self.record_failed(run.points[0].group_key, run)
            self.later.append(run)

    def _pass_text(self, index: int) -> str:
        return f", pass {index + 1}/{self.passes}" if self.passes > 1 else ""

    def _next_run(self, queue: list, busy: set[str], gpu: str | None) -> GroupRun | None:
        """Start (or resume) the first queued group that shares no curve with ``busy``; groups
        with nothing to run are taken off the queue on the way. None when none can start."""
        while True:
            item = next((it for it in queue if not self.curves[it[0]] & busy), None)
            if item is None:
                return None
            queue.remove(item)
            key, earlier = item
            if earlier is None:
                run = self.start(key, gpu)
            else:
                earlier.gpu = gpu
                run = self.resume(earlier)
            if run is not None:
                return run

    def run(self, slots: Sequence[str | None]) -> None:
        """Measure every group, ``len(slots)`` at once (slot i pinned to GPU ``slots[i]``), pass
        after pass through the groups, until every row is recorded."""
        queue: list[tuple[str, GroupRun | None]] = [(key, None) for key in self.groups]
        running: dict[int, GroupRun] = {}  # slot index -> its group
        while queue or running or self.later:
            if not queue and not running:  # a pass through every group is done: the next one
                queue, self.later = [(r.points[0].group_key, r) for r in self.later], []
            busy = set().union(*(self.curves[r.points[0].group_key] for r in running.values()))
            for slot in (i for i in range(len(slots)) if i not in running):
                run = self._next_run(queue, busy, slots[slot])
                if run is not None:
                    running[slot] = run
                    busy |= self.curves[run.points[0].group_key]
            if running:
                self._wait(running)

    def _wait(self, running: dict[int, GroupRun]) -> None:
        """Wait for news from the running groups (or the next deadline); end the passes that
        finished."""
        soonest = min(run.deadline() for run in running.values())
        wait([x for run in running.values() for x in run.waitables()],
             timeout=max(0.0, min(soonest - time.monotonic(), 1.0)))  # fmt: skip
        for slot, run in list(running.items()):
            phase = run.phase
            if not run.poll():
                if self.progress.stream.isatty() and run.phase != phase:
                    self.progress.show(run.phase)
                continue
            del running[slot]
            self.end_pass(run)
