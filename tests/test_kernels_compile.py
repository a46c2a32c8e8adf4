"""The kernels compiled for sm_90 (H100/H200) by Triton's real compiler, on this CPU machine.

The interpreter tests check what the kernels compute; these check that every launch the library
makes on a GPU compiles (TTIR -> PTX -> cubin with the ptxas bundled in the triton wheel) and
fits in the shared memory of a block, which the interpreter never does. The compile runs in a
subprocess with TRITON_INTERPRET unset (under the interpreter the kernels are not compilable).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from effattn.kernels import _runtime
from effattn.kernels.compile_check import Compiled, Variant, launch_problems, markdown

needs_triton = pytest.mark.skipif(not _runtime.triton_installed(), reason="needs triton")


def _result(kernel, launch, shared, error=None, dtype="bfloat16", d=128, causal=False):
    variant = Variant(kernel, launch, dtype, d, 64, 64, 4, 2, causal)
    fits = error is None and shared <= 232448
    return Compiled(variant, error, None if error else shared, 128, 0, fits)


def test_launch_problems_need_one_fitting_autotune_config_and_every_fixed_launch():
    fine = [
        _result("flash_fwd", "autotune", 300_000),  # over the limit: skipped by the autotuner
        _result("flash_fwd", "autotune", 100_000),
        _result("sparse_fwd", "fixed", 100_000),
    ]
    assert launch_problems(fine) == []
    bad = [
        _result("flash_dq", "autotune", 300_000, d=256),
        _result("flash_dq", "autotune", 0, error="CompilationError: boom", d=256),
        _result("sparse_dkdv", "fixed", 240_000, dtype="float32"),
    ]
    problems = launch_problems(bad)
    assert problems == [
        "sparse_dkdv float32 D=128 64x64 w4 s2: shared 240000 B over the limit",
        "flash_dq bfloat16 D=256 causal=False: no autotune config fits "
        "(shared 300000 B over the limit; CompilationError: boom)",
    ]
    table = markdown(bad, 90)
    assert "| no: CompilationError: boom |" in table and "| no: shared memory |" in table


@needs_triton
def test_every_launch_compiles_for_sm90(tmp_path):
    """bf16 at D = 128 and 256 (every config, causal and not): at 256 several autotuner
    configs are over the limit, and the fixed block-sparse launches must still fit. float32
    compiles take minutes (FMA code, no tensor cores): the full grid is
    `python -m effattn.kernels.compile_check`, committed in reports/gpu/."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default; set to silence triton 3.9's warning
    out = tmp_path / "compiled.jsonl"
    command = [
        sys.executable, "-m", "effattn.kernels.compile_check", "--arch", "90",
        "--dtypes", "bfloat16", "--head-dims", "128,256", "--jobs", "2", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in out.read_text().splitlines()]
    from effattn.kernels.flash import _BWD_CONFIGS, _FWD_CONFIGS

    autotuned = len(_FWD_CONFIGS) + 2 * len(_BWD_CONFIGS)
    assert len(results) == 2 * (2 * autotuned + 4)  # D x (causal x autotuned + 4 fixed)
    kernels = {r["variant"]["kernel"] for r in results}
    assert kernels == {
        "flash_fwd", "flash_dq", "flash_dkdv", "delta", "sparse_fwd", "sparse_dq", "sparse_dkdv",
    }  # fmt: skip
    assert all(r["error"] is None for r in results)
    assert all(r["fits"] for r in results if r["variant"]["launch"] == "fixed")
    assert not all(r["fits"] for r in results)  # some D=256 configs: the check has teeth
