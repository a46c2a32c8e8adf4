"""The sweep's inference axes: grouped key/value heads (kv_heads), keys other than the queries
(kv_seq_lens: cross-attention), and mode decode (one token at context N against each backend's
decoding state), from the spec to the rows and the report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from effattn.cli import main
from effattn.harness.store import RESULTS, ResultsFile
from effattn.sweep.runner import run_sweep
from effattn.sweep.spec import Grid, Point, Settings, SweepSpec, expand, load_preset

FAST = Settings(min_run_time_s=0.01, time_limit_s=60, rounds=2, passes=1)
DECODE = Grid(
    backends=("full", "sdpa", "local:window=8", "linear", "strided", "bigbird:block_size=8"),
    seq_lens=(32, 64),
    heads=(4,),
    kv_heads=(2,),
    head_dim=(8,),
    device=("cpu",),
    causal=(True,),
    threads=(1,),
    mode=("decode",),
)


def _rows(run_dir: Path) -> dict[tuple[str, int], dict]:
    return {(r["label"], r["n"]): r for r in ResultsFile(run_dir / RESULTS).read()}


def test_decode_rows_hold_the_time_per_token_and_the_state(tmp_path):
    run_sweep(SweepSpec("decode", FAST, (DECODE,)), tmp_path)
    rows = _rows(tmp_path)
    for label in ("full", "sdpa", "local:window=8", "linear"):
        for n in (32, 64):
            row = rows[(label, n)]
            assert row["status"] == "ok", row["reason"]
            assert row["time_ms_median"] > 0 and row["state_mib"] > 0
            assert row["kv_heads"] == 2 and row["flops"] is None
            assert row["tokens_per_s"] == pytest.approx(1e3 / row["time_ms_median"])  # B = 1
    mib = 2**20
    # K/V cache: keys and values, B * Hkv * N * D float32 each (room reserved for N positions)
    assert rows[("sdpa", 32)]["state_mib"] * mib == 2 * 1 * 2 * 32 * 8 * 4
    assert rows[("sdpa", 64)]["state_mib"] * mib == 2 * 1 * 2 * 64 * 8 * 4
    for label in ("local:window=8", "linear"):  # constant in N
        assert rows[(label, 32)]["state_mib"] == rows[(label, 64)]["state_mib"]
    assert rows[("strided", 32)]["status"] == "unsupported"
    assert "cannot decode with a state: not implemented yet" in rows[("strided", 32)]["reason"]
    assert "bidirectional only" in rows[("bigbird:block_size=8", 32)]["reason"]


def test_the_decode_report_shows_the_state(tmp_path, capsys):
    run_sweep(SweepSpec("decode", FAST, (DECODE,)), tmp_path / "run")
    assert main(["report", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert "decoding one token at context N" in text and "H=4 Hkv=2" in text
    assert "state_mib: what the decoding state holds" in text
    assert "| O(w) " in text and "| O(1) " in text  # the state's complexity beside it


def test_grouped_heads_and_cross_attention_points(tmp_path):
    grid = dataclasses.replace(
        DECODE, backends=("full", "sdpa", "local:window=8"), mode=("fwd",), causal=(False,),
        seq_lens=(32,), kv_heads=(None, 1), kv_seq_lens=(None, 48),
    )  # fmt: skip
    points, _ = expand(SweepSpec("gqa", FAST, (grid,)), strict=True)
    assert {(p.key_heads, p.keys) for p in points} == {(4, 32), (1, 32), (4, 48), (1, 48)}
    run_sweep(SweepSpec("gqa", FAST, (grid,)), tmp_path)
    rows = ResultsFile(tmp_path / RESULTS).read()
    assert len(rows) == len(points) and {r["status"] for r in rows} == {"ok"}
    assert {(r["kv_heads"], r["kv_n"]) for r in rows} == {(None, None), (1, None), (None, 48),
                                                           (1, 48)}  # fmt: skip


def test_a_point_without_the_new_axes_keeps_its_key():
    point = Point("full", (), 1024, 1, 8, 64, "float32", "cpu", False, 2, "fwd")
    fields = json.loads(point.key)
    assert "kv_heads" not in fields and "kv_n" not in fields
    assert json.loads(dataclasses.replace(point, kv_heads=2).key)["kv_heads"] == 2


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"kv_heads": (3,)}, r"kv_heads: expected divisors of every H \[4\], got 3"),
        ({"kv_seq_lens": (16,)}, r"kv_seq_lens: mode decode attends over its context N"),
        ({"causal": (False,)}, r"causal: mode decode decodes causally"),
        ({"mode": ("step",), "causal": (True,)}, r"kv_heads: mode step runs an encoder"),
        ({"kv_heads": (0,)}, r"kv_heads: expected positive integers, got 0"),
    ],
)
def test_bad_axes_are_refused(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        expand(SweepSpec("bad", FAST, (dataclasses.replace(DECODE, **change),)), strict=True)


def test_the_decode_preset_expands():
    spec = load_preset("decode")
    points, _ = expand(spec, strict=True)
    modes = {p.mode for p in points}
    assert "decode" in modes
    assert {p.key_heads for p in points if p.mode == "decode"} == {8}
    assert max(p.n for p in points if p.mode == "decode") >= 65536


def test_the_cli_takes_the_axes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EFFATTN_SWEEP_TINY", "1")
    code = main([
        "sweep", "smoke", "--backends", "sdpa", "local:window=8", "--mode", "decode",
        "--causal", "--kv-heads", "1", "--out", str(tmp_path), "--run-id", "d", "--quiet",
    ])  # fmt: skip
    assert code == 0
    rows = ResultsFile(tmp_path / "d" / RESULTS).read()
    assert rows and {r["mode"] for r in rows} == {"decode"} and {r["kv_heads"] for r in rows} == {1}
