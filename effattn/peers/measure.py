"""Time, peak memory and output agreement of one comparison, one :class:`Row` per (ours, peer).

Time: every candidate of a comparison once per repeat, interleaved (effattn.harness.interleave,
meters.time_cpu, threads pinned), under ``torch.no_grad()``; a candidate's time is the median
over repeats of each repeat's median, its noise the median IQR / median and the spread of the
repeats' medians; ``ours / peer`` is the median of the per-repeat ratios (< 1: ours is faster)
and ``speed-up`` the median of peer / ours. Memory: peak bytes above the inputs of one call
(meters.peak_memory_cpu). Agreement: from the timed calls' outputs where the semantics match,
from the peer's own check where it needs other inputs, else the reason. A candidate that cannot
be imported makes a skipped row with the reason; one that raises, a failed row without times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from effattn.harness.interleave import Interleaved, time_interleaved
from effattn.harness.meters import MIB, peak_memory_cpu
from effattn.peers.candidates import Agreement, Call, agreement
from effattn.peers.cases import Comparison, Peer


@dataclass(frozen=True)
class Row:
    algorithm: str  # the comparison's key
    ours: str  # our candidate
    peer: str  # the public implementation
    status: str  # ok, skipped (peer not importable), failed (a call raised)
    reason: str  # why skipped or failed; "" when ok
    threads: int  # torch intra-op threads, pinned
    n: int  # sequence length
    ours_ms: float | None  # median over repeats of the per-repeat median
    peer_ms: float | None
    ours_iqr_over_median: float | None  # median over repeats of IQR / median
    peer_iqr_over_median: float | None
    ours_spread_over_repeats: float | None  # (max - min) / median of the per-repeat medians
    peer_spread_over_repeats: float | None
    time_ratio_ours_over_peer: float | None  # median of per-repeat ratios; < 1: ours faster
    speedup_peer_over_ours: float | None  # median of per-repeat peer / ours
    ours_peak_mib: float | None  # peak memory of one call above its inputs
    peer_peak_mib: float | None
    mem_ratio_ours_over_peer: float | None
    max_abs_diff: float | None  # output agreement; None where the semantics differ
    rel_err: float | None
    agreement_note: str  # how agreement was measured, or why there is none


@dataclass(frozen=True)
class Measured:
    """What one comparison's calls gave: times, peaks and outputs by candidate name, and the
    candidates that could not run with (status, reason)."""

    n: int  # sequence length
    threads: int  # torch intra-op threads, pinned
    timed: Interleaved
    peaks_mib: dict[str, float]
    outputs: dict[str, Tensor]
    problems: dict[str, tuple[str, str]]

    def row(self, key: str, ours: str, peer: Peer) -> Row:
        """The row of our candidate ``ours`` beside ``peer``."""
        bad = [self.problems[x] for x in (ours, peer.name) if x in self.problems]
        status, reason = bad[0] if bad else ("ok", "")
        ok = status == "ok"
        found, note = self._agreement(ours, peer, ok)
        timed, peaks = self.timed, self.peaks_mib
        return Row(
            algorithm=key,
            ours=ours,
            peer=peer.name,
            status=status,
            reason=reason,
            threads=self.threads,
            n=self.n,
            ours_ms=timed.median_ms(ours),
            peer_ms=timed.median_ms(peer.name),
            ours_iqr_over_median=timed.timing_iqr_over_median(ours),
            peer_iqr_over_median=timed.timing_iqr_over_median(peer.name),
            ours_spread_over_repeats=timed.repeat_range_over_median(ours),
            peer_spread_over_repeats=timed.repeat_range_over_median(peer.name),
            time_ratio_ours_over_peer=timed.ratio(ours, peer.name) if ok else None,
            speedup_peer_over_ours=timed.ratio(peer.name, ours) if ok else None,
            ours_peak_mib=peaks.get(ours),
            peer_peak_mib=peaks.get(peer.name),
            mem_ratio_ours_over_peer=_ratio(peaks.get(ours), peaks.get(peer.name)) if ok else None,
            max_abs_diff=found.max_abs_diff if found else None,
            rel_err=found.rel_err if found else None,
            agreement_note=note,
        )

    def _agreement(self, ours: str, peer: Peer, ok: bool) -> tuple[Agreement | None, str]:
        """The agreement of ``ours`` and ``peer`` (None where there is none) and its note."""
        if peer.only_for is not None and ours not in peer.only_for:
            return None, peer.time_only_note  # another candidate of ours: time and memory only
        if ok and peer.agreement_check is not None:
            try:
                return peer.agreement_check(self.n), peer.agreement_note
            except Exception as e:
                return None, f"agreement check failed: {type(e).__name__}: {e}"
        if ok and peer.compare_outputs:
            note = peer.agreement_note
            return agreement(self.outputs[ours], self.outputs[peer.name], note), note
        return None, peer.agreement_note


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _build(comparison: Comparison, n: int) -> tuple[dict[str, Call], dict[str, tuple[str, str]]]:
    """The calls of every candidate that could be built, and (status, reason) of the others."""
    calls: dict[str, Call] = {}
    problems: dict[str, tuple[str, str]] = {}  # name -> (status, reason)
    for name, build in [*comparison.ours.items(), *((p.name, p.build) for p in comparison.peers)]:
        try:
            calls[name] = build(n)
        except ImportError as e:
            problems[name] = ("skipped", f"not importable: {e}")
        except Exception as e:  # a peer that cannot run this shape is a row, not a crash
            problems[name] = ("failed", f"{type(e).__name__}: {e}")
    return calls, problems


def measure(
    comparison: Comparison, n: int, *, repeats: int, threads: int, min_run_s: float
) -> list[Row]:
    """Time (interleaved repeats), peak memory and agreement of every (ours, peer) pair."""
    calls, problems = _build(comparison, n)
    peaks: dict[str, float] = {}
    outputs: dict[str, Tensor] = {}
    with torch.no_grad():
        # A call that raises is a failed row, without times.
        timed = time_interleaved(
            calls, repeats=repeats, threads=threads, min_run_time_s=min_run_s, drop_failing=True
        )
        for name, error in timed.errors.items():
            problems[name] = ("failed", error)
        for name, fn in calls.items():
            if name not in timed.errors:
                peaks[name] = peak_memory_cpu(fn) / MIB
                outputs[name] = fn()
    measured = Measured(n, threads, timed, peaks, outputs, problems)
    return [
        measured.row(comparison.key, ours, peer)
        for ours in comparison.ours
        for peer in comparison.peers
    ]
