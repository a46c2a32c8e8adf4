"""Interleaving. effattn.harness.interleave (the peers' helper): the calls are timed in
interleaved order, and median, spreads and ratio (the median of per-repeat ratios, not the ratio
of medians) are what the docstring says; a fake meter stands in for meters.time_cpu: each timing
is scripted, nothing depends on speed. The sweep's rounds (effattn.sweep.runner): a fresh
shuffled order each round, and calls that really alternate between a group's backends."""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from effattn import registry
from effattn.harness import interleave
from effattn.harness.interleave import Interleaved, time_interleaved
from effattn.harness.meters import Timing
from effattn.harness.store import RESULTS, ResultsFile
from effattn.sweep.group import GroupRun, bracket_refs, round_schedule
from effattn.sweep.runner import run_sweep
from effattn.sweep.spec import Grid, Settings, SweepSpec, expand


def _fake_meter(
    monkeypatch: pytest.MonkeyPatch, script: dict[str, Iterator[tuple[float, float]]], log: list
) -> None:
    """Replace time_cpu: call fn once (it logs its name), then return the next scripted
    (median_ms, iqr_ms) of that callable; record the meter's keyword arguments too."""

    def fake_time_cpu(fn: Callable[[], object], *, threads: int, min_run_time_s: float) -> Timing:
        name = fn()
        log.append((name, threads, min_run_time_s))
        median_ms, iqr_ms = next(script[name])
        return Timing(median_ms=median_ms, iqr_ms=iqr_ms, runs=10)

    monkeypatch.setattr(interleave, "time_cpu", fake_time_cpu)


def _named(name: str) -> Callable[[], str]:
    return lambda: name


def test_calls_are_interleaved_in_order_with_the_meter_settings(monkeypatch):
    log: list = []
    script = {k: iter([(1.0, 0.1)] * 3) for k in "abc"}
    _fake_meter(monkeypatch, script, log)
    timed = time_interleaved(
        {k: _named(k) for k in "abc"}, repeats=3, threads=2, min_run_time_s=0.25
    )
    assert [name for name, _, _ in log] == list("abcabcabc")  # a0 b0 c0 a1 b1 c1 ...
    assert {(t, m) for _, t, m in log} == {(2, 0.25)}
    assert list(timed.timings) == list("abc") and timed.errors == {}


def test_median_spreads_and_ratio_semantics(monkeypatch):
    # The module docstring's example: per-repeat medians a = 10, 20, 12 and b = 5, 12, 4.
    script = {
        "a": iter([(10.0, 1.0), (20.0, 4.0), (12.0, 6.0)]),
        "b": iter([(5.0, 0.5), (12.0, 1.2), (4.0, 0.4)]),
    }
    _fake_meter(monkeypatch, script, [])
    timed = time_interleaved({"a": _named("a"), "b": _named("b")}, repeats=3, threads=1)
    assert timed.times_ms("a") == [10.0, 20.0, 12.0]
    assert timed.median_ms("a") == 12.0 and timed.median_ms("b") == 5.0
    # median of per-repeat ratios (2.0, 1.67, 3.0), not median_ms(a) / median_ms(b) = 2.4
    assert timed.ratio("a", "b") == pytest.approx(2.0)
    assert timed.ratio("b", "a") == pytest.approx(0.5)  # median of (0.5, 0.6, 0.33)
    assert timed.ratio("a", "a") == 1.0
    # noise within one timing: median of IQR / median per repeat (0.1, 0.2, 0.5)
    assert timed.timing_iqr_over_median("a") == pytest.approx(0.2)
    # load between repeats: (max - min) / median of the per-repeat medians
    assert timed.repeat_range_over_median("a") == pytest.approx((20 - 10) / 12)
    q1, _, q3 = statistics.quantiles([10.0, 20.0, 12.0], n=4)
    assert timed.repeat_iqr_over_median("a") == pytest.approx((q3 - q1) / 12)


def test_one_repeat_has_zero_repeat_iqr(monkeypatch):
    _fake_meter(monkeypatch, {"a": iter([(3.0, 0.3)])}, [])
    timed = time_interleaved({"a": _named("a")}, repeats=1, threads=1)
    assert timed.repeat_iqr_over_median("a") == 0.0
    assert timed.repeat_range_over_median("a") == 0.0
    assert timed.median_ms("a") == 3.0 and timed.ratio("a", "a") == 1.0


def test_a_failing_call_raises_by_default(monkeypatch):
    def broken() -> str:
        raise RuntimeError("kernel exploded")

    _fake_meter(monkeypatch, {"a": iter([(1.0, 0.1)] * 2)}, [])
    with pytest.raises(RuntimeError, match="kernel exploded"):
        time_interleaved({"a": _named("a"), "b": broken}, repeats=2, threads=1)


def test_drop_failing_records_the_error_and_stops_timing_that_call(monkeypatch):
    log: list = []
    calls_of_b = []

    def flaky() -> str:  # completes repeat 0, raises in repeat 1
        calls_of_b.append(1)
        if len(calls_of_b) > 1:
            raise RuntimeError("out of memory")
        return "b"

    def broken() -> str:
        raise ValueError("bad shape")

    script = {"a": iter([(2.0, 0.2)] * 3), "b": iter([(4.0, 0.4)] * 3)}
    _fake_meter(monkeypatch, script, log)
    timed = time_interleaved(
        {"a": _named("a"), "b": flaky, "c": broken}, repeats=3, threads=1, drop_failing=True
    )
    assert [name for name, _, _ in log] == ["a", "b", "a", "a"]  # b and c not timed again
    assert timed.errors == {"b": "RuntimeError: out of memory", "c": "ValueError: bad shape"}
    assert timed.times_ms("a") == [2.0, 2.0, 2.0]
    assert timed.times_ms("b") == []  # a call that raised is never reported as timed
    for stat in (
        timed.median_ms,
        timed.timing_iqr_over_median,
        timed.repeat_range_over_median,
        timed.repeat_iqr_over_median,
    ):
        assert stat("b") is None and stat("c") is None and stat("never given") is None
    assert timed.ratio("b", "a") is None and timed.ratio("a", "c") is None


def test_no_calls_and_bad_repeats():
    assert time_interleaved({}, repeats=2, threads=1) == Interleaved(timings={}, errors={})
    with pytest.raises(ValueError, match="expected repeats >= 1, got 0"):
        time_interleaved({"a": _named("a")}, repeats=0, threads=1)


def test_with_the_real_meter():
    timed = time_interleaved(
        {"a": _named("a"), "b": _named("b")}, repeats=2, threads=1, min_run_time_s=0.001
    )
    assert [len(timed.times_ms(k)) for k in "ab"] == [2, 2]
    assert all(t > 0 for k in "ab" for t in timed.times_ms(k))
    assert timed.ratio("a", "b") > 0


# -- the sweep's interleaved rounds (effattn.sweep.runner) -------------------------------------
_LOGGING = """
from dataclasses import dataclass
from pathlib import Path
from effattn.backends.full import FullAttention
from effattn.registry import register_backend

LOG = Path({log!r})


def _logged(name):
    @register_backend(name)
    @dataclass(frozen=True)
    class Logged(FullAttention):
        def forward(self, q, k, v, **kwargs):
            with LOG.open("a") as f:
                f.write(name + "\\n")
            return super().forward(q, k, v, **kwargs)

    return Logged


A, B = _logged("log_a"), _logged("log_b")
"""


def test_round_schedule_is_a_fresh_shuffle_of_every_point_each_round():
    keys = [f"k{i}" for i in range(6)]
    schedule = round_schedule(keys, 5, seed=3)
    assert [r for r, _ in schedule] == [r for r in range(5) for _ in keys]
    orders = [[k for r, k in schedule if r == i] for i in range(5)]
    assert all(sorted(order) == keys for order in orders)  # each round: every point, once
    assert len({tuple(o) for o in orders}) > 1  # shuffled afresh, not one order five times
    assert round_schedule(keys, 5, seed=3) == schedule  # a seed repeats it


def test_round_schedule_brackets_the_others_with_the_anchor():
    keys = ["A", *(f"k{i}" for i in range(7))]
    schedule = round_schedule(keys, 4, seed=1, anchor="A", every=3)
    orders = [[k for r, k in schedule if r == i] for i in range(4)]
    for order in orders:  # A x x x A x x x A x A
        assert [i for i, k in enumerate(order) if k == "A"] == [0, 4, 8, 10]
        assert sorted(k for k in order if k != "A") == keys[1:]
    assert len({tuple(o) for o in orders}) > 1
    assert round_schedule(keys, 2, seed=1, anchor="A", every=0) == round_schedule(keys, 2, seed=1)


def test_bracket_refs_are_the_anchor_timings_beside_each_point():
    sequence = [("A", 1.0), ("x", 5.0), ("y", 6.0), ("A", 3.0), ("z", 7.0)]
    assert bracket_refs(sequence, "A") == {"A": 2.0, "x": 2.0, "y": 2.0, "z": 3.0}
    assert bracket_refs([("x", 5.0)], "A") == {}  # no anchor timing in the round: no refs


class _Offline(GroupRun):
    """A GroupRun fed by the test instead of a worker."""

    def _launch(self) -> None:
        self.worker = None


def _drifting_group(every: int, rounds: int = 12) -> dict[str, dict]:
    """A group (full, sdpa and two others) on a machine whose speed drifts by up to 2x within
    each round: every point's true time is fixed, each timing is true time x the speed then."""
    grid = Grid(backends=("full", "sdpa", "local", "performer"), seq_lens=(64,), heads=(1,),
                head_dim=(8,), device=("cpu",), threads=(1,))  # fmt: skip
    spec = SweepSpec("drift", Settings(rounds=rounds, bracket_every=every), (grid,))
    points, _ = expand(spec, strict=True)
    group = _Offline(points, [], spec, seed=0)
    true_ms = {p.key: t for p, t in zip(points, (8.0, 2.0, 1.0, 4.0), strict=True)}
    for i, (r, key) in enumerate(group.schedule):
        speed = 1.5 + 0.5 * np.sin(0.7 * i)
        group.heard(key, r, [true_ms[key] * speed])
    group.fields = {p.key: {} for p in points}
    return {row.label: dataclasses.asdict(row) for row in group.rows()}


def test_bracketing_cancels_a_drift_of_the_machine_within_a_round():
    bracketed, plain = _drifting_group(every=1), _drifting_group(every=0)
    for label, vs_sdpa in (("full", 0.25), ("local", 2.0), ("performer", 0.5)):
        ours = np.array(bracketed[label]["speedup_vs_sdpa_rounds"])
        theirs = np.array(plain[label]["speedup_vs_sdpa_rounds"])
        assert len(ours) == len(theirs) == 12
        spread_ours = np.abs(np.log(ours / vs_sdpa)).max()
        spread_theirs = np.abs(np.log(theirs / vs_sdpa)).max()
        assert spread_ours < 0.15 < spread_theirs  # within 15% each round; unbracketed not
        assert bracketed[label]["speedup_vs_sdpa"] == pytest.approx(vs_sdpa, rel=0.05)
    assert bracketed["sdpa"]["speedup_vs_full"] == pytest.approx(4.0, rel=0.05)
    assert bracketed["sdpa"]["rounds"] == 12 and bracketed["sdpa"]["speedup_vs_sdpa"] == 1.0


def test_a_bracketed_sweep_writes_every_row_with_its_per_round_ratios(tmp_path: Path):
    grid = Grid(backends=("full", "sdpa", "local"), seq_lens=(32,), heads=(1,), head_dim=(8,),
                device=("cpu",), threads=(1,))  # fmt: skip
    settings = Settings(min_run_time_s=0.03, rounds=3, bracket_every=1)
    run_sweep(SweepSpec("bracketed", settings, (grid,)), tmp_path / "run")
    rows = {r["label"]: r for r in ResultsFile(tmp_path / "run" / RESULTS).read()}
    assert {r["status"] for r in rows.values()} == {"ok"}
    for row in rows.values():
        assert row["rounds"] == 3 and len(row["speedup_vs_sdpa_rounds"]) == 3
        assert len(row["speedup_vs_full_rounds"]) == 3
    assert rows["sdpa"]["speedup_vs_sdpa_rounds"] == [1.0, 1.0, 1.0]


def test_a_new_worker_takes_the_anchor_timings_its_round_still_lacks():
    grid = Grid(backends=("full", "sdpa", "local", "performer", "linear"), seq_lens=(64,),
                heads=(1,), head_dim=(8,), device=("cpu",), threads=(1,))  # fmt: skip
    spec = SweepSpec("resume", Settings(rounds=2, bracket_every=2), (grid,))
    points, _ = expand(spec, strict=True)
    group = _Offline(points, [], spec, seed=0)
    first_round = [(r, k) for r, k in group.schedule if r == 0]
    assert [k for _, k in first_round].count(group.anchor) == 3  # A x x A x x A
    for r, key in first_round[:5]:  # the worker died after A x x A x
        group.heard(key, r, [1.0])
    assert group._todo() == group.schedule[5:]


def test_the_sweep_times_a_group_in_interleaved_rounds(tmp_path: Path):
    """Two backends of one group, 4 rounds: their calls alternate at least once a round (a
    sweep that timed one point after the other would switch once), and each row keeps 4
    rounds and its ratios to full, taken round by round."""
    log = tmp_path / "calls.log"
    plugin = tmp_path / "logged.py"
    plugin.write_text(_LOGGING.format(log=str(log)))
    grid = Grid(backends=("full", "log_a", "log_b"), seq_lens=(32,), heads=(1,), head_dim=(8,),
                device=("cpu",), threads=(1,))  # fmt: skip
    rounds = 4
    spec = SweepSpec("rounds", Settings(min_run_time_s=0.02, rounds=rounds), (grid,),
                     (str(plugin),))  # fmt: skip
    try:
        run_sweep(spec, tmp_path / "run")
    finally:
        for name in ("log_a", "log_b"):
            registry._REGISTRY.pop(name, None)
    calls = [line for line in log.read_text().split() if line]
    switches = sum(a != b for a, b in itertools.pairwise(calls))
    assert switches >= rounds + 2  # set-up a b, >= 1 switch a round, memory a b
    rows = {r["label"]: r for r in ResultsFile(tmp_path / "run" / RESULTS).read()}
    assert set(rows) == {"full", "log_a", "log_b"}
    for row in rows.values():
        assert row["status"] == "ok" and row["rounds"] == rounds
        assert len(row["times_ms"]) == rounds and len(row["speedup_vs_full_rounds"]) == rounds
        assert "speedup_vs_sdpa" not in row or row["speedup_vs_sdpa"] is None  # no sdpa here
