"""The comparisons as cases of effattn.harness.cases, timed into a run, and the ours/peer pairs of
the table computed from the run's rows, with the output agreement the rows do not hold.

Every candidate of a comparison, ours and the peers, is a case (effattn.harness.cases.Case) at
(B, H, N, D) = (1, 8, N, 64), fp32, forward (mode ``fwd``) under ``torch.no_grad()``, causal where
the comparison is; our candidates name the effattn backend they run, a peer is backend
``peer:<tag>``. The cases with the same N and causality are one comparison group, timed in
interleaved rounds (every candidate once per round, threads pinned), and each makes one
effattn.harness.rows.Row in the run folder: a candidate that cannot be imported is a skipped row
with the reason, one that raises a crashed row without times (a call that raised is never timed).

Per (ours, peer) pair, from the two rows: each median time (``time_ms_median``: all timed runs of
all rounds), the noise within a round (median over rounds of IQR / median of the round's runs)
and between rounds ((max - min) / median of the rounds' medians), ``time ours/peer`` the median
of the per-round ratios (effattn.harness.cases.ratio; < 1: ours is faster), ``speed-up`` the
median of peer / ours, the peak memories of one call above its inputs and their ratio.
Agreement: from the outputs of the timed calls where the semantics match (such a candidate is
called once when built, before it is timed), from the peer's own check where it needs other
inputs, else the reason.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from effattn.harness import cases as bench
from effattn.peers.candidates import Agreement, Builder, Call, agreement
from effattn.peers.cases import Comparison, Peer
from effattn.peers.inputs import B, D, H

MODE = "fwd"  # forward under no_grad, the mode of every case


class Candidates:
    """The cases of some comparisons at one N, and the outputs their builds kept for agreement,
    by (comparison key, candidate name)."""

    def __init__(self, comparisons: Sequence[Comparison], n: int, threads: int) -> None:
        self.comparisons = list(comparisons)
        self.n = n
        self.threads = threads
        self.cases: dict[tuple[str, str], bench.Case] = {}
        self.outputs: dict[tuple[str, str], Tensor] = {}
        for comparison in self.comparisons:
            compared = _compared(comparison)
            for name, ours in comparison.ours.items():
                self._add(comparison, name, ours.backend, ours.build, ours.options, compared)
            for peer in comparison.peers:
                self._add(comparison, peer.name, peer.backend, peer.build, (), compared)

    def _add(
        self,
        comparison: Comparison,
        name: str,
        backend: str,
        build: Builder,
        options: tuple[tuple[str, object], ...],
        compared: set[str],
    ) -> None:
        at = (comparison.key, name)
        self.cases[at] = bench.Case(
            backend=backend,
            label=name,
            n=self.n,
            batch=B,
            heads=H,
            head_dim=D,
            causal=comparison.causal,
            threads=self.threads,
            mode=MODE,
            options=options,
            build=lambda: self._built(at, build, keep=name in compared),
        )

    def _built(self, at: tuple[str, str], build: Builder, *, keep: bool) -> Call:
        """The call of candidate ``at`` under no_grad; its output kept when ``keep``."""
        call = torch.no_grad()(build(self.n))
        if keep:
            self.outputs[at] = call()
        return call

    def run(self, run_dir: Path, *, rounds: int, min_run_s: float, spec: dict) -> list[dict]:
        """Time every case into ``run_dir`` (earlier results set aside); the pairs' lines."""
        rows = bench.run(
            list(self.cases.values()), run_dir, rounds=rounds, min_run_s=min_run_s, spec=spec
        )
        by_key = {row["key"]: row for row in rows}
        found = {at: by_key[case.key] for at, case in self.cases.items()}
        return [
            self.pair(comparison, ours, peer, found)
            for comparison in self.comparisons
            for ours in comparison.ours
            for peer in comparison.peers
        ]

    def pair(
        self,
        comparison: Comparison,
        ours: str,
        peer: Peer,
        rows: Mapping[tuple[str, str], Mapping[str, Any]],
    ) -> dict[str, Any]:
        """The line of our candidate ``ours`` beside ``peer``: status, times, memory, agreement."""
        mine, theirs = rows[(comparison.key, ours)], rows[(comparison.key, peer.name)]
        bad = [row for row in (mine, theirs) if row["status"] != "ok"]
        status, reason = (bad[0]["status"], bad[0]["reason"]) if bad else ("ok", "")
        ok = not bad
        found, note = self._agreement(comparison, ours, peer, ok)
        ours_mib, peer_mib = mine.get("peak_mem_mib"), theirs.get("peak_mem_mib")
        return {
            "algorithm": comparison.key,
            "ours": ours,
            "peer": peer.name,
            "status": status,
            "reason": reason,
            "threads": self.threads,
            "n": self.n,
            "causal": comparison.causal,
            "ours_backend": mine["backend"],
            "peer_backend": theirs["backend"],
            **_timing("ours", mine),
            **_timing("peer", theirs),
            "time_ratio_ours_over_peer": bench.ratio(mine, theirs) if ok else None,
            "speedup_peer_over_ours": bench.ratio(theirs, mine) if ok else None,
            "ours_peak_mib": ours_mib,
            "peer_peak_mib": peer_mib,
            "mem_ratio_ours_over_peer": ours_mib / peer_mib if ok and peer_mib else None,
            "max_abs_diff": found.max_abs_diff if found else None,
            "rel_err": found.rel_err if found else None,
            "agreement_note": note,
        }

    def _agreement(
        self, comparison: Comparison, ours: str, peer: Peer, ok: bool
    ) -> tuple[Agreement | None, str]:
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
            outputs = (
                self.outputs[(comparison.key, ours)],
                self.outputs[(comparison.key, peer.name)],
            )
            return agreement(*outputs, note), note
        return None, peer.agreement_note


def _compared(comparison: Comparison) -> set[str]:
    """The candidates whose outputs a peer's agreement compares (the others' are not kept)."""
    names: set[str] = set()
    for peer in comparison.peers:
        if peer.compare_outputs and peer.agreement_check is None:
            names |= {peer.name, *(peer.only_for or comparison.ours)}
    return names


def _timing(side: str, row: Mapping[str, Any]) -> dict[str, float | None]:
    """``<side>_ms``, ``<side>_iqr_over_median`` (median over rounds of IQR / median of the
    round's runs) and ``<side>_spread_over_rounds`` ((max - min) / median of the rounds'
    medians) of a row; None for a row that was not timed."""
    rounds = [r for r in row.get("times_ms") or [] if r]
    if row["status"] != "ok" or not rounds:
        return {
            f"{side}_ms": None,
            f"{side}_iqr_over_median": None,
            f"{side}_spread_over_rounds": None,
        }
    noise = []
    for runs in rounds:
        q1, q3 = np.quantile(runs, [0.25, 0.75])
        noise.append(float(q3 - q1) / statistics.median(runs))
    medians = [statistics.median(r) for r in rounds]
    return {
        f"{side}_ms": row["time_ms_median"],
        f"{side}_iqr_over_median": statistics.median(noise),
        f"{side}_spread_over_rounds": (max(medians) - min(medians)) / statistics.median(medians),
    }


def measure(
    comparisons: Sequence[Comparison],
    n: int,
    *,
    run_dir: Path,
    repeats: int,
    threads: int,
    min_run_s: float,
    spec: dict | None = None,
) -> list[dict[str, Any]]:
    """Time the candidates of ``comparisons`` at N = ``n`` in ``repeats`` interleaved rounds
    into the run folder ``run_dir`` (rewritten), and return one line per (ours, peer) pair, in
    table order: status, times, memory and agreement."""
    candidates = Candidates(comparisons, n, threads)
    spec = {"study": "peers", "n": n, "comparisons": [c.key for c in comparisons], **(spec or {})}
    return candidates.run(Path(run_dir), rounds=repeats, min_run_s=min_run_s, spec=spec)
