"""Statistics of interleaved rounds: medians, bootstrap intervals, changes between runs.

A sweep measures the points of one comparison group in R rounds (effattn.sweep.runner). What
one point keeps is ``rounds``: per round, the per-call time of each timed run (a run is a block
of calls timed together), e.g. for R = 3::

    rounds = [[10.1, 10.3, 9.9], [12.0, 11.8], [10.2, 10.0, 10.4]]    # ms per call

- :func:`median_interval` gives the median of all timed runs and its 95% confidence interval by
  a two-level bootstrap: resample the R rounds with replacement, then the runs within each drawn
  round, take the median of what was drawn; the interval is the 2.5% and 97.5% quantiles of
  ``resamples`` such medians. Resampling rounds first keeps the load changes between rounds in
  the interval (they are what moves a number between runs); resampling runs second keeps the
  noise within a round.
- A ratio (speed-up vs ``full`` or ``sdpa``) is computed per round, both times from the same
  round (:func:`round_ratios`), each divided by the anchor timings taken beside it when the
  sweep brackets (effattn.sweep.runner), and its interval is :func:`median_interval` of those
  R values, one per round (a bootstrap over rounds).
- :func:`change_interval` compares two measurements of the same cell (two runs): the ratio of
  their medians, with a bootstrap interval drawing both sides independently.

- :func:`repeat_interval` is the 95% *repeat interval*: where the median of a second run of the
  same cell will land (Student's prediction interval over the rounds, on a log scale). The
  confidence interval is for the true median; a second run's median varies as much as the
  first's, so even under identical conditions it falls inside the first run's 95% confidence
  interval only about 83% of the time. The repeat interval is what the tables show and what two
  runs are checked against (effattn.sweep.compare).

An interval is *unstable* (:func:`is_unstable`) when its half-width exceeds ``UNSTABLE_PCT``
percent of the median: ``max(hi / median - 1, 1 - lo / median) > UNSTABLE_PCT / 100``; the
sweep applies it to the repeat intervals.

The bootstrap is seeded (``SEED``): the same timings always give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95  # of every interval
RESAMPLES = 2000  # bootstrap resamples
SEED = 0  # of the bootstrap's generator
UNSTABLE_PCT = 15.0  # a repeat interval wider than +-15% of its median: the cell is unstable
# Comparing two runs (effattn.sweep.compare):
METRICS = ("time", "vs_sdpa", "vs_full")  # time, and the speed-ups vs sdpa and vs full
NOISE_PCT = 5.0  # a change smaller than this is noise, significant or not
TOLERANCE_PCT = 10.0  # agreement: two medians within +-10% of each other


@dataclass(frozen=True)
class Interval:
    """A median and an interval around it: a confidence or a repeat interval (lo <= median <=
    hi, same unit)."""

    median: float
    lo: float
    hi: float

    @property
    def half_width_pct(self) -> float:
        """The larger side of the interval, in percent of the median."""
        if self.median == 0:
            return 0.0
        return 100 * max(self.hi / self.median - 1, 1 - self.lo / self.median)

    def holds(self, value: float) -> bool:
        return self.lo <= value <= self.hi


def _check_rounds(rounds: Sequence[Sequence[float]]) -> list[np.ndarray]:
    arrays = [np.asarray(r, dtype=float) for r in rounds]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError(f"rounds: expected one or more non-empty rounds, got {list(rounds)!r}")
    if any(not np.isfinite(a).all() for a in arrays):
        raise ValueError("rounds: expected finite values, got NaN or inf")
    return arrays


def _bootstrap_medians(arrays: list[np.ndarray], rng: np.random.Generator, resamples: int):
    """``resamples`` medians of two-level resamples (rounds, then values within each round)."""
    sizes = np.array([a.size for a in arrays])
    width = int(sizes.max())
    table = np.full((len(arrays), width), np.nan)  # (R, max runs), NaN-padded
    for i, a in enumerate(arrays):
        table[i, : a.size] = a
    picked = rng.integers(0, len(arrays), size=(resamples, len(arrays)))  # (S, R) rounds
    n = sizes[picked][..., None]  # (S, R, 1) runs of each drawn round
    within = np.floor(rng.random((resamples, len(arrays), width)) * n).astype(int)
    values = table[picked[..., None], within]  # (S, R, width)
    values = np.where(np.arange(width) < n, values, np.nan)  # only n draws from a round of n
    return np.nanmedian(values.reshape(resamples, -1), axis=1)  # (S,)


def _quantiles(medians: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(medians, [tail, 1 - tail])
    return float(lo), float(hi)


def median_interval(
    rounds: Sequence[Sequence[float]],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """The median of every value of every round, with its bootstrap interval (see the module
    docstring). One value per round is a plain bootstrap over rounds."""
    arrays = _check_rounds(rounds)
    median = float(np.median(np.concatenate(arrays)))
    medians = _bootstrap_medians(arrays, np.random.default_rng(seed), resamples)
    lo, hi = _quantiles(medians, confidence)
    return Interval(median, min(lo, median), max(hi, median))


def round_medians(rounds: Sequence[Sequence[float]]) -> list[float]:
    """The median of each round."""
    return [float(np.median(a)) for a in _check_rounds(rounds)]


def round_ratios(
    numerator: Sequence[Sequence[float] | None],
    denominator: Sequence[Sequence[float] | None],
    numerator_refs: Sequence[float | None] | None = None,
    denominator_refs: Sequence[float | None] | None = None,
) -> list[float]:
    """Per round, median(numerator) / median(denominator), both from that round; a round that
    either side lacks (None or empty) is left out. ``speed-up vs full = round_ratios(full, x)``.

    ``*_refs``: per round, the anchor's time (ms) measured beside that side's timings (the
    runner's bracketing). Each side's median is divided by its ref first, so a change of machine
    speed between the two sides' timings cancels; a round where either ref is None uses the
    plain medians."""
    rounds = len(numerator)
    for name, seq in (("denominator", denominator), ("numerator_refs", numerator_refs),
                      ("denominator_refs", denominator_refs)):  # fmt: skip
        if seq is not None and len(seq) != rounds:
            raise ValueError(
                f"rounds: expected the same rounds on both sides, got {rounds} and "
                f"{len(seq)} ({name})"
            )
    no_refs = [None] * rounds
    ratios = []
    for a, b, ra, rb in zip(
        numerator, denominator, numerator_refs or no_refs, denominator_refs or no_refs, strict=True
    ):
        if a is None or b is None or not len(a) or not len(b):
            continue
        ratio = float(np.median(a)) / float(np.median(b))
        if ra is not None and rb is not None:
            ratio *= rb / ra
        ratios.append(ratio)
    return ratios


def change_interval(
    before: Sequence[Sequence[float]],
    after: Sequence[Sequence[float]],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """median(after) / median(before) with a bootstrap interval: each side resampled on its own
    (two levels, as :func:`median_interval`), the interval taken over the ratios of the pairs.
    1 inside the interval: no significant change at this confidence."""
    a, b = _check_rounds(before), _check_rounds(after)
    rng = np.random.default_rng(seed)
    ratios = _bootstrap_medians(b, rng, resamples) / _bootstrap_medians(a, rng, resamples)
    median = float(np.median(np.concatenate(b)) / np.median(np.concatenate(a)))
    lo, hi = _quantiles(ratios, confidence)
    return Interval(median, min(lo, median), max(hi, median))


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom: exact for 1 and 2, the
    Cornish-Fisher expansion above (Abramowitz and Stegun 26.7.5; within 1% from 3 on)."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"t_quantile: expected 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(term / df ** (i + 1) for i, term in enumerate(terms))


def repeat_interval(
    per_round: Sequence[float], median: float, confidence: float = CONFIDENCE
) -> Interval | None:
    """Where the median of a repeat run of the same cell lands, ``confidence`` of the time:
    Student's prediction interval for the median of R more rounds, on a log scale, around this
    run's ``median``. ``per_round``: one value per round (a round's median time, or its ratio),
    R >= 2 of them; None below 2 rounds (one round says nothing of the next run's load).

    With s the standard deviation of log(per_round), the median of R rounds varies by about
    ``sqrt(pi / 2) * s / sqrt(R)`` (the median's efficiency for normal data), the difference of
    two runs' medians by sqrt(2) times that, and s itself is estimated from R rounds, hence
    ``t(R - 1)``: median * exp(+-t(R - 1) * sqrt(pi / R) * s); +-1.27 s for 10 rounds.
    (Widening the bootstrap interval of the median instead held a second run's median less
    often and was wider, in the four pairs of sweeps whose runs were kept:
    reports/tay-cpu-agreement-history.md.)"""
    values = np.asarray(per_round, dtype=float)
    if values.size < 2:
        return None
    if not (np.isfinite(values).all() and (values > 0).all() and 0 < median < math.inf):
        raise ValueError(
            f"per_round: expected positive finite values and median, got {list(per_round)!r}, "
            f"{median!r}"
        )
    spread = float(np.std(np.log(values), ddof=1))
    half = t_quantile(0.5 + confidence / 2, values.size - 1) * math.sqrt(math.pi / values.size)
    factor = math.exp(half * spread)
    return Interval(median, median / factor, median * factor)


def is_unstable(interval: Interval | None, threshold_pct: float = UNSTABLE_PCT) -> bool:
    """True when the interval is wider than ``threshold_pct`` percent of its median."""
    return interval is not None and interval.half_width_pct > threshold_pct
