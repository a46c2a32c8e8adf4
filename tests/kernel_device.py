"""Where the Triton kernel tests run: on CUDA when there is a GPU (the kernels compiled for
it), else on CPU under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 without CUDA).
The same tests thus check the kernels on a GPU machine: ``PYTHONPATH=. python -m pytest
tests/test_triton_flash.py tests/test_triton_block_sparse.py tests/test_sparse_triton.py``."""

from __future__ import annotations

import pytest
import torch

from effattn.kernels._runtime import interpreting, unavailable_reasons

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")

needs_kernels = pytest.mark.skipif(
    bool(unavailable_reasons(DEVICE.type)), reason="; ".join(unavailable_reasons(DEVICE.type))
)
