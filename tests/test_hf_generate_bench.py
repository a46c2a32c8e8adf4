"""benchmarks/hf_generate.py at toy sizes: a tiny Llama, prompts of 16 and 32 tokens, 3 new
tokens, one round. Checks the report's shape, not the speeds (the machine may be busy)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip(
    "transformers", reason="transformers is an optional extra: pip install 'effattn[hf]'"
)

from benchmarks import hf_generate

BACKENDS = ["full", "sdpa", "local:window=256", "linear", "performer", "lsh"]
TOY = ["--tiny", "--new-tokens", "3", "--repeats", "1", "--threads", "1", "--system-malloc"]


def test_every_backend_and_prompt_beside_hf_sdpa(tmp_path):
    argv = [*TOY, "--prompts", "16", "32", "--backends", *BACKENDS, "--out", str(tmp_path)]
    rows = hf_generate.main(argv)

    labels = [hf_generate.HF_SDPA, *BACKENDS]  # lsh cannot decode: it falls back and runs
    assert [(r.prompt, r.backend) for r in rows] == [(n, b) for n in (16, 32) for b in labels]
    for row in rows:
        assert row.status == "ok", row.reason
        assert row.prefill_s > 0 and row.rounds == 1
        assert row.in_call_ms_per_token > 0 and row.x_hf_in_call > 0
        # (t_T - t_1) / (T - 1) at a toy size is a difference of a few ms: finite, sign not
        # checked (on a busy machine one call's noise can exceed two decode steps)
        assert math.isfinite(row.ms_per_token) and math.isfinite(row.x_hf_sdpa)
    assert all(r.x_hf_sdpa == 1 for r in rows if r.backend == hf_generate.HF_SDPA)

    readme = (tmp_path / "README.md").read_text()
    for label in labels:
        assert f"| {label} " in readme
    assert "python -m benchmarks.hf_generate --tiny" in readme
    assert "threads pinned" in readme
    assert "linear ms/token at N=32 / at N=16 <= 1.3" in readme
    assert "effattn sdpa ms/token at N=16 / HF sdpa's <= 1.2" in readme
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["rows"]) == len(rows) and len(results["targets"]) == 4
    statuses = ("met", "not met", "no figure (<= 0: noise)")
    assert all(t["status"] in statuses for t in results["targets"])


def test_a_failing_backend_is_a_row(tmp_path, monkeypatch):
    from effattn.integrations import huggingface

    real = huggingface.decoding_cache

    def out_of_memory(model):
        if model.config._attn_implementation == "effattn_full":
            raise MemoryError("toy out of memory")
        return real(model)

    monkeypatch.setattr(huggingface, "decoding_cache", out_of_memory)
    argv = [*TOY, "--prompts", "16", "--backends", "full", "sdpa", "--out", str(tmp_path)]
    rows = {r.backend: r for r in hf_generate.main(argv)}

    assert rows["full"].status == "oom" and "toy out of memory" in rows["full"].reason
    assert rows["full"].ms_per_token is None
    assert rows["sdpa"].status == "ok" and rows["sdpa"].x_hf_in_call > 0
    assert rows[hf_generate.HF_SDPA].status == "ok"
    assert "oom: MemoryError: toy out of memory" in (tmp_path / "README.md").read_text()


def test_bad_new_tokens_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        hf_generate.main(["--tiny", "--new-tokens", "1", "--out", str(tmp_path)])
