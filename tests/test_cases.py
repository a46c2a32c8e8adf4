"""effattn.harness.cases, the benchmark scripts' shared main helper, at toy sizes: rows written
through the run store, rounds interleaved, a case that raises becomes a row, the run resumed or
rewritten, and `effattn report` / `effattn compare` reading the run."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import effattn
from effattn import cli
from effattn.harness import cases
from effattn.harness.store import ResultsFile

FAST = ["--rounds", "2", "--min-run-s", "0.002", "--threads", "1"]


def _call(name: str, n: int, calls: list[str] | None = None):
    q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))  # (B, H, N, D)
    backend = effattn.get_backend(name)

    def fn():
        if calls is not None:
            calls.append(name)
        with torch.no_grad():
            return backend(q, k, v)

    return fn


def _raises(error: Exception):
    def build():
        raise error

    return build


def _case(backend: str, n: int = 32, label: str | None = None, build=None, **kw) -> cases.Case:
    build = build or (lambda: _call(backend, n))
    return cases.Case(
        backend=backend, label=label or backend, n=n, heads=2, head_dim=8, build=build, **kw
    )


@pytest.fixture(autouse=True)
def _threads(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr("effattn.harness.machine.keep_freed_memory", lambda: False)
    yield
    torch.set_num_threads(threads)


def test_rows_are_written_with_rounds_and_speedups(tmp_path):
    found = [_case(b, n) for n in (32, 64) for b in ("full", "sdpa", "local")]
    rows = cases.main(found, [*FAST, "--run-dir", str(tmp_path)], script="benchmarks.toy")
    assert [(r["label"], r["n"]) for r in rows] == [(c.label, c.n) for c in found]
    assert all(r["status"] == "ok" and len(r["times_ms"]) == 2 for r in rows)
    assert all(r["threads"] == 1 and r["peak_mem_mib"] is not None for r in rows)
    sdpa = next(r for r in rows if r["label"] == "sdpa")
    assert sdpa["speedup_vs_sdpa_rounds"] == [1.0, 1.0]
    assert all(r["speedup_vs_full"] is not None for r in rows)
    assert len(ResultsFile(tmp_path / "results.jsonl").read()) == 6
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["spec"]["script"] == "benchmarks.toy" and env["spec"]["rounds"] == 2


def test_rounds_are_interleaved(tmp_path):
    calls: list[str] = []
    found = [_case(b, build=lambda b=b: _call(b, 32, calls)) for b in ("full", "sdpa")]
    cases.run(found, tmp_path, rounds=3, min_run_s=0.0, memory=False)
    switches = sum(a != b for a, b in itertools.pairwise(calls))
    assert switches >= 5  # full.. sdpa.. full.. sdpa.. full.. sdpa..: once per round each


def test_a_case_that_raises_is_a_row_not_a_crash(tmp_path):
    def late():
        def fn():
            raise RuntimeError("kernel failed")

        return fn

    found = [
        _case("sdpa"),
        _case("peer:missing", label="missing peer", build=_raises(ImportError("no module x"))),
        _case("peer:broken", label="broken peer", build=_raises(ValueError("bad shape"))),
        _case("peer:late", label="late peer", build=late),
        _case("peer:big", label="big peer", build=_raises(MemoryError("too big"))),
    ]
    rows = cases.run(found, tmp_path, rounds=2, min_run_s=0.0)
    status = {r["label"]: (r["status"], r["reason"]) for r in rows}
    assert status["sdpa"][0] == "ok"
    assert status["missing peer"] == ("skipped", "not importable: ImportError: no module x")
    assert status["broken peer"] == ("crashed", "ValueError: bad shape")
    assert status["late peer"] == ("crashed", "RuntimeError: kernel failed")
    assert status["big peer"][0] == "oom"
    assert all(r["time_ms_median"] is None for r in rows if r["status"] != "ok")


def test_resume_keeps_rows_and_a_rerun_rewrites(tmp_path):
    first = [_case("sdpa"), _case("full")]
    rows = cases.run(first, tmp_path, rounds=1, min_run_s=0.0, memory=False)
    more = [*first, _case("local")]
    resumed = cases.run(more, tmp_path, rounds=1, min_run_s=0.0, memory=False, resume=True)
    assert [r["finished_at"] for r in resumed[:2]] == [r["finished_at"] for r in rows]
    assert resumed[2]["status"] == "ok" and "speedup_vs_sdpa" in resumed[2]
    assert len(ResultsFile(tmp_path / "results.jsonl").read()) == 3
    cases.run(first, tmp_path, rounds=1, min_run_s=0.0, memory=False)  # rewritten
    assert len(ResultsFile(tmp_path / "results.jsonl").read()) == 2
    assert list(tmp_path.glob("results-*.jsonl.old"))


def test_only_selects_by_the_words_of_label_causality_and_mode():
    found = [
        _case("local", label="local:window=4", causal=True),
        _case("local", label="local:window=4", mode="fwd_bwd"),
        _case("peer:local-attention", label="local-attention w=4", causal=True),
        _case("sdpa"),
    ]
    picked = cases.select(found, "local causal forward")
    assert [(c.label, c.causal) for c in picked] == [
        ("local:window=4", True),
        ("local-attention w=4", True),
    ]
    assert cases.select(found, "") == found
    assert cases.select(found, "sdpa, backward") == [found[1], found[3]]


def test_ratio_and_spread_are_taken_per_round():
    a = {"times_ms": [[10.0], [20.0], [12.0]]}
    b = {"times_ms": [[5.0], [12.0], [4.0]]}
    assert cases.ratio(a, b) == pytest.approx(2.0)  # not 12 / 5
    assert cases.spread({"times_ms": [[3.0]]}) == 0.0


def test_report_and_compare_read_the_run(tmp_path, capsys):
    found = [_case("full"), _case("sdpa")]
    found.append(_case("peer:toy", label="toy peer (sdpa)", build=lambda: _call("sdpa", 32)))
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    for run in (run_a, run_b):
        cases.main(found, [*FAST, "--run-dir", str(run)], script="benchmarks.toy")
    assert cli.main(["report", str(run_a), "--out", str(tmp_path / "rep")]) in (0, None)
    text = (tmp_path / "rep.md").read_text()
    peer_line = next(line for line in text.splitlines() if line.startswith("| toy peer"))
    assert "| -" in peer_line  # a peer has no declarations
    capsys.readouterr()
    assert cli.main(["compare", str(run_a), str(run_b)]) in (0, None)
    assert "toy peer (sdpa)" in capsys.readouterr().out
