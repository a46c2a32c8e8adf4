"""Interleaved timing of callables: the one loop effattn.harness.cases and the peers share.

Every repeat times each callable once, in the order given, with meters.time_cpu (threads
pinned), so that a change of machine load lands on every candidate of the same repeat instead of
on one candidate's whole run. What is kept is each callable's meters.Timing of every repeat; the
statistics are taken over the repeats:

    median_ms(a)                  median over repeats of each repeat's median time
    timing_iqr_over_median(a)     median over repeats of one timing's IQR / median
                                  (noise within a timing)
    repeat_range_over_median(a)   (max - min) / median of the per-repeat medians
                                  (load changes between repeats)
    repeat_iqr_over_median(a)     IQR / median of the per-repeat medians; 0 with one repeat
    ratio(a, b)                   median over repeats of time[a] / time[b], both times from the
                                  same repeat: the median of per-repeat ratios, NOT the ratio of
                                  the medians

For example, with three repeats (per-repeat medians in ms):

    repeat    0    1    2
    a        10   20   12     median_ms(a) = 12
    b         5   12    4     median_ms(b) = 5
    a / b   2.0  1.7  3.0     ratio(a, b) = 2.0   (median_ms(a) / median_ms(b) would be 2.4)
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from effattn.harness.meters import Timing, time_cpu


@dataclass(frozen=True)
class Interleaved:
    """The timings of one interleaved run. A statistic of a callable without timings (it
    raised, or was not among the calls) is None."""

    timings: dict[str, list[Timing]]  # per callable that never raised, in call order: its
    # Timing of each repeat, in repeat order
    errors: dict[str, str]  # callables that raised (drop_failing only): "TypeName: message"

    def times_ms(self, name: str) -> list[float]:
        """The per-repeat median times of ``name`` in ms, in repeat order ([] when none)."""
        return [t.median_ms for t in self.timings.get(name, [])]

    def median_ms(self, name: str) -> float | None:
        """Median over repeats of each repeat's median time of ``name``, in ms."""
        times = self.times_ms(name)
        return statistics.median(times) if times else None

    def timing_iqr_over_median(self, name: str) -> float | None:
        """Median over repeats of IQR / median of one timing of ``name`` (noise within one)."""
        timings = self.timings.get(name, [])
        return statistics.median(t.iqr_ms / t.median_ms for t in timings) if timings else None

    def repeat_range_over_median(self, name: str) -> float | None:
        """(max - min) / median of the per-repeat medians of ``name`` (load between repeats)."""
        times = self.times_ms(name)
        return (max(times) - min(times)) / statistics.median(times) if times else None

    def repeat_iqr_over_median(self, name: str) -> float | None:
        """IQR / median of the per-repeat medians of ``name`` (quartiles as statistics.quantiles
        computes them, method "exclusive"); 0 when ``name`` completed a single repeat."""
        times = self.times_ms(name)
        if not times:
            return None
        q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (0.0, 0.0, 0.0)
        return (q3 - q1) / statistics.median(times)

    def ratio(self, name: str, baseline: str) -> float | None:
        """Median over repeats of time[name] / time[baseline], each pair from the same repeat:
        the median of per-repeat ratios, not the ratio of the medians. Only the repeats both
        completed count; None when there is none. < 1: ``name`` is faster than ``baseline``."""
        pairs = zip(self.times_ms(name), self.times_ms(baseline), strict=False)
        ratios = [a / b for a, b in pairs]
        return statistics.median(ratios) if ratios else None


def time_interleaved(
    calls: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    threads: int,
    min_run_time_s: float = 1.0,
    drop_failing: bool = False,
    timer: Callable[[Callable[[], object]], Timing] | None = None,
) -> Interleaved:
    """Time every callable once per repeat, in the order of ``calls``, ``repeats`` times:
    a0 b0 c0 a1 b1 c1 ... Each timing is meters.time_cpu(fn, threads=threads,
    min_run_time_s=min_run_time_s), which warms ``fn`` up once before it measures; ``timer``
    replaces it (``lambda fn: meters.time_cuda(fn)`` on a GPU).

    Grad mode is the caller's: wrap the call in ``torch.no_grad()`` for forward-only timings.
    A callable that raises stops the run, unless ``drop_failing``: then its error is recorded
    in ``errors`` and its timings are dropped (a call that raised is never reported as if it
    ran), and it is left out of the later repeats. ``calls`` may be empty (every candidate
    failed to build)."""
    if repeats < 1:
        raise ValueError(f"time_interleaved: expected repeats >= 1, got {repeats}")
    timings: dict[str, list[Timing]] = {name: [] for name in calls}
    errors: dict[str, str] = {}
    for _ in range(repeats):
        for name, fn in calls.items():
            if name in errors:
                continue
            try:
                if timer is None:
                    timing = time_cpu(fn, threads=threads, min_run_time_s=min_run_time_s)
                else:
                    timing = timer(fn)
            except Exception as e:
                if not drop_failing:
                    raise
                errors[name] = f"{type(e).__name__}: {e}"
                del timings[name]
                continue
            timings[name].append(timing)
    return Interleaved(timings=timings, errors=errors)
