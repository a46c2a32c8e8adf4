"""benchmarks/decode_vs_sdpa.py at toy sizes: every state and the SDPA call timed, the ratio
table written, the run readable by `effattn report`."""

from __future__ import annotations

from benchmarks import decode_vs_sdpa
from effattn.cli import main


def test_the_states_are_timed_beside_one_sdpa_call(tmp_path, capsys):
    rows = decode_vs_sdpa.main(
        ["--ns", "32", "--rounds", "1", "--min-run-s", "0.01", "--threads", "1",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert {(r["label"], r["status"]) for r in rows} == {
        ("sdpa", "ok"), ("full", "ok"), ("one SDPA call", "ok")
    }  # fmt: skip
    text = (tmp_path / "README.md").read_text()
    assert "| 32  | sdpa" in text and "state / SDPA call" in text
    capsys.readouterr()
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "decoding one token at context N" in capsys.readouterr().out
