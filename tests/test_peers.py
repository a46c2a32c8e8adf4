"""effattn.peers (`effattn peers`): the comparisons run as cases of effattn.harness.cases into a
run, the side-by-side table is computed from its rows, a missing peer is a skipped row with its
reason, and output agreement is computed where the semantics match (tiny N, short timings)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from effattn.cli import main
from effattn.harness import machine
from effattn.harness.store import ResultsFile
from effattn.peers import candidates, cases, cli, inputs, report
from effattn.peers import measure as peers_measure
from tests.reference import reference_attention

FAST = {"repeats": 1, "threads": 2, "min_run_s": 0.01}


@pytest.fixture
def measure(tmp_path):
    """effattn.peers.measure.measure of one comparison, into a run folder under tmp_path."""

    def run(comparison: cases.Comparison, n: int) -> list[dict]:
        return peers_measure.measure([comparison], n, run_dir=tmp_path / "run", **FAST)

    return run


def _missing_peer(n: int) -> candidates.Call:
    raise ImportError("No module named 'not_a_real_peer'")


def _dense_with_missing_peer() -> cases.Comparison:
    return cases.Comparison(
        "dense",
        {"effattn sdpa": candidates.ours_backend("sdpa")},
        (
            cases.Peer("torch SDPA", candidates.torch_sdpa, agreement_note="outputs compared"),
            cases.Peer("ghost", _missing_peer, agreement_note="outputs compared"),
        ),
    )


def test_missing_peer_is_a_skipped_row_with_its_reason(measure, tmp_path):
    ok, skipped = measure(_dense_with_missing_peer(), 64)
    assert ok["status"] == "ok" and ok["reason"] == ""
    assert ok["ours_ms"] > 0 and ok["peer_ms"] > 0 and ok["time_ratio_ours_over_peer"] > 0
    assert ok["ours_peak_mib"] is not None and ok["peer_peak_mib"] is not None
    assert skipped["status"] == "skipped"
    assert "not_a_real_peer" in skipped["reason"]
    assert skipped["peer_ms"] is None and skipped["max_abs_diff"] is None
    assert skipped["ours_ms"] == ok["ours_ms"]  # ours is still measured
    table = report.markdown([ok, skipped])
    assert "skipped: not importable: ImportError: No module named 'not_a_real_peer'" in table
    rows = {r["label"]: r for r in ResultsFile(tmp_path / "run" / "results.jsonl").read()}
    assert rows["effattn sdpa"]["backend"] == "sdpa" and rows["effattn sdpa"]["mode"] == "fwd"
    assert rows["torch SDPA"]["backend"] == "peer:torch"  # no tag: the first word
    assert rows["ghost"]["status"] == "skipped" and rows["ghost"]["backend"] == "peer:ghost"
    assert (tmp_path / "run" / "env.json").exists()


def test_the_time_ratio_is_taken_per_round(measure):
    """ours/peer is the median of the per-round ratios of the two rows (harness.cases.ratio)."""
    (pair, _) = measure(dataclasses.replace(_dense_with_missing_peer(), causal=True), 64)
    assert pair["causal"] is True and pair["status"] == "ok"
    assert pair["time_ratio_ours_over_peer"] * pair["speedup_peer_over_ours"] == pytest.approx(1)


def test_a_peer_that_raises_is_a_crashed_row(measure):
    def broken(n: int) -> candidates.Call:
        def call() -> torch.Tensor:
            raise RuntimeError("kernel exploded")

        return call

    comparison = cases.Comparison(
        "dense", {"effattn sdpa": candidates.ours_backend("sdpa")}, (cases.Peer("broken", broken),)
    )
    (row,) = measure(comparison, 64)
    assert row["status"] == "crashed" and "kernel exploded" in row["reason"]
    assert row["peer_ms"] is None and row["time_ratio_ours_over_peer"] is None


def test_dense_agreement_is_exact_against_the_reference(measure):
    (row, _) = measure(_dense_with_missing_peer(), 96)
    assert row["max_abs_diff"] < 1e-5 and row["rel_err"] < 1e-5
    q, k, v = inputs.qkv(96)
    want = reference_attention(q.double(), k.double(), v.double())
    got = candidates.ours_backend("sdpa").build(96)()
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_local_agrees_with_local_attention_exact_window(measure):
    pytest.importorskip("local_attention")
    local = cases.comparisons()["local"]
    only_lucid = dataclasses.replace(
        local, peers=tuple(p for p in local.peers if p.name.startswith("local-attention"))
    )
    (row,) = measure(only_lucid, 512)
    assert row["status"] == "ok", row["reason"]
    assert row["max_abs_diff"] < 1e-4 and row["rel_err"] < 1e-5


def test_bigbird_says_why_there_is_no_agreement():
    (peer,) = cases.comparisons()["bigbird"].peers
    assert not peer.compare_outputs and peer.agreement_check is None
    assert peer.agreement_note.startswith("n/a: different random blocks")


def test_only_selects_and_rejects_unknown_keys():
    available = cases.comparisons()
    assert [c.key for c in cases.selected("sdpa,lsh", available)] == ["dense", "lsh"]
    assert len(cases.selected("", available)) == len(available)
    assert [c.key for c in cases.selected("nystrom,performer_causal", available)] == [
        "performer_causal",
        "nystrom",
    ]
    with pytest.raises(ValueError, match="expected some of"):
        cases.selected("cosformer", available)


def _table_cells(text: str) -> list[list[str]]:
    """The cells of the Markdown table lines in ``text`` (header and separator included)."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]


def test_command_writes_the_table(tmp_path, monkeypatch):
    pytest.importorskip("reformer_pytorch")
    pytest.importorskip("transformers")
    calls = []  # recorded, not called: the test process keeps glibc's defaults
    monkeypatch.setattr(machine, "keep_freed_memory", lambda: calls.append(1) or True)
    argv = ["--n", "128", "--only", "lsh", "--repeats", "1", "--min-run-s", "0.01"]
    assert main(["peers", *argv, "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = saved["pairs"]
    assert [r["peer"] for r in rows] == ["reformer-pytorch LSHAttention", "HF LSHSelfAttention"]
    for row in rows:  # one hash at N = 2 * bucket: every pair met, outputs must agree
        assert row["status"] == "ok", row["reason"]
        assert row["max_abs_diff"] < 1e-4 and row["rel_err"] < 1e-5
    readme = (tmp_path / "README.md").read_text()
    header, _, first, second = _table_cells(readme)
    assert header[:4] == ["algorithm", "ours", "peer", "status"]
    assert "time ours/peer" in header and "ours peak MiB" in header
    assert first[:4] == ["lsh", "effattn lsh b=64 h=4", "reformer-pytorch LSHAttention", "ok"]
    assert second[2] == "HF LSHSelfAttention"
    assert "2 threads pinned" in readme and "load average" in readme
    assert saved["meta"]["threads"] == 2 and "torch" in saved["meta"]["versions"]
    assert saved["meta"]["freed_memory_kept"] is True and calls == [1]
    assert "freed memory kept for the next call" in readme
    assert saved["meta"]["command"] == (
        f"effattn peers --n 128 --repeats 1 --only lsh --out {tmp_path} --min-run-s 0.01"
    )
    run = tmp_path / "run"  # the run beside the report: one row per candidate
    assert saved["meta"]["run_dir"] == str(run) and f"effattn report {run}" in readme
    labels = [r["label"] for r in ResultsFile(run / "results.jsonl").read()]
    assert labels == ["effattn lsh b=64 h=4", *(r["peer"] for r in rows)]
    env = json.loads((run / "env.json").read_text())
    assert env["spec"]["study"] == "peers" and env["spec"]["comparisons"] == ["lsh"]


def test_system_malloc_leaves_the_allocator_as_it_comes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(machine, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(cli, "measure", lambda *a, **k: [])  # nothing timed
    assert main(["peers", "--only", "lsh", "--system-malloc", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert calls == [] and saved["meta"]["freed_memory_kept"] is False
    assert saved["meta"]["command"].endswith(" --system-malloc")
    assert "the C library's malloc as it comes" in (tmp_path / "README.md").read_text()
    assert main(["peers", "--only", "lsh", "--out", str(tmp_path)]) == 0
    assert (
        calls == [1]
        and json.loads((tmp_path / "results.json").read_text())["meta"]["freed_memory_kept"]
    )


def test_unknown_only_key_is_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "peers"
    assert main(["peers", "--only", "cosformer", "--out", str(out)]) == 2
    assert "effattn peers: error: --only: expected some of" in capsys.readouterr().err
    assert not out.exists()


def test_importing_the_study_imports_no_peer(tmp_path):
    """effattn.peers and its command build every comparison without importing a peer library:
    each is imported when its candidate is built."""
    peers_libraries = (
        "transformers",
        "local_attention",
        "reformer_pytorch",
        "performer_pytorch",
        "linear_attention_transformer",
        "linformer",
        "nystrom_attention",
    )
    code = (
        "import sys, effattn.cli; effattn.cli.build_parser();"
        "from effattn.peers import cases; cases.comparisons();"
        f"print(sorted(m for m in {peers_libraries!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("key", "package"),
    [
        ("performer", "performer_pytorch"),
        ("performer_causal", "performer_pytorch"),
        ("linear", "linear_attention_transformer"),
        ("linformer", "linformer"),
        ("nystrom", "nystrom_attention"),
    ],
)
def test_kernel_and_lowrank_peers_agree_with_the_same_features_or_weights(key, package):
    """Our features, projections or the peer's weights injected: outputs agree to float32
    rounding (performer: the peer's eps offsets at 0; nystrom: one head). The check the table
    runs, without the timings."""
    pytest.importorskip(package)
    comparison = cases.comparisons()[key]
    (peer,) = comparison.peers
    n = 512 if key == "nystrom" else 64  # nystrom-attention pads N to a multiple of m = 256
    if peer.agreement_check is not None:
        found = peer.agreement_check(n)
    else:
        (ours,) = peer.only_for or tuple(comparison.ours)
        with torch.no_grad():
            found = candidates.agreement(comparison.ours[ours].build(n)(), peer.build(n)(), "")
    assert found.rel_err < 1e-5 and found.max_abs_diff < 1e-4, found


def test_layer_peers_say_what_each_ratio_compares(measure):
    """linformer and nystrom peers are layers with projections: our backend alone is timed
    beside them without agreement (the note says so), our layer with their modules agrees."""
    pytest.importorskip("linformer")
    (peer,) = cases.comparisons()["linformer"].peers
    rows = measure(cases.comparisons()["linformer"], 128)
    alone, layer = rows
    assert alone["max_abs_diff"] is None and alone["agreement_note"].startswith("time only")
    assert "projections" in alone["agreement_note"]
    assert layer["ours"] in peer.only_for and layer["rel_err"] < 1e-5
    assert (alone["ours_backend"], layer["ours_backend"]) == ("linformer", "linformer")


def test_causal_linear_peer_explains_why_there_is_no_agreement():
    (peer,) = cases.comparisons()["linear_causal"].peers
    assert not peer.compare_outputs and peer.agreement_check is None
    assert peer.agreement_note.startswith("n/a:") and "bucket" in peer.agreement_note
