"""benchmarks/gpu_bench.py's --dry-run: the GPU script's cases, FLOP counts and table, run on
CPU under Triton's interpreter (no timing), so that the script a GPU session runs is known to
work end to end."""

from __future__ import annotations

import pytest

from effattn.kernels import _runtime

pytestmark = pytest.mark.skipif(
    not (_runtime.triton_installed() and _runtime.interpreting()),
    reason="needs triton and TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)",
)


def test_dry_run_checks_every_case(tmp_path):
    from benchmarks import gpu_bench

    out = tmp_path / "gpu.md"
    assert gpu_bench.main(["--dry-run", "--modes", "fwd+bwd", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    cases = {line.split(" | ")[0].strip("| ") for line in rows}
    assert cases == {"dense", "causal", "sliding_window_16", "bigbird_16_3"}
    assert all(" | dry-run | " in line for line in rows)


def test_flop_counts():
    from benchmarks.gpu_bench import dense_flops, sparse_flops

    assert dense_flops(4, 16, 1024, 64, causal=False, mode="fwd") == 4 * 4 * 16 * 1024**2 * 64
    # causal halves the forward; forward+backward is 3.5x the forward
    assert dense_flops(4, 16, 1024, 64, causal=True, mode="fwd+bwd") == 448 * 1024**2 * 64
    # 10 tiles of 64 x 64 over all heads of one batch element, batch 2, D 128
    assert sparse_flops(2, 128, 10, 64, 64, "fwd") == 4 * 2 * 128 * 10 * 64 * 64
