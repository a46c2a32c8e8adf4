"""One comparison group of a sweep, measured: the schedule of its interleaved rounds, its
worker's passes, and the rows made from what the worker reported.

A :class:`GroupRun` starts a worker (effattn.sweep.worker.group_main) per pass on the group's
points, with the rounds of that pass in a fresh shuffled order each (:func:`round_schedule`;
with bracketing, the anchor between every k points: :func:`bracket_refs`), keeps every round
it hears, restarts a worker that died on the points it had not finished, and makes the rows:
the median time with its interval (effattn.harness.rows.timing_fields) and the speed-ups vs
``full`` and ``sdpa`` taken within rounds (effattn.harness.rows.ratio_fields).
effattn.sweep.runner schedules the groups.
"""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from effattn.harness import stats
from effattn.harness.rows import Row, ratio_fields, timing_fields
from effattn.harness.worker import RunningWorker
from effattn.sweep.spec import BASELINES, Point, SweepSpec
from effattn.sweep.worker import group_main


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
