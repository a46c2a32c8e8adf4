"""Where the Triton kernels can run, decided without importing triton.

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, read by triton when a kernel is decorated, i.e. when
``effattn.kernels.flash`` is first imported). This module never imports triton, so the backend
can explain a skip on a machine without it.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

# Head dims the kernels take: D is padded inside the kernel to a power of two >= 16.
MAX_HEAD_DIM = 256


def interpreting() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def unavailable_reasons(device: str) -> list[str]:
    """Why the kernels cannot run on ``device`` ("cpu" or "cuda") here; [] when they can."""
    if not triton_installed():
        return ["triton is not installed (pip install 'effattn[triton]')"]
    if device == "cpu" and not interpreting():
        return ["device=cpu needs CUDA or TRITON_INTERPRET=1 (Triton's CPU interpreter)"]
    if device == "cuda" and interpreting():
        return ["device=cuda with TRITON_INTERPRET=1 (the interpreter runs on CPU tensors)"]
    return []


def padded_head_dim(head_dim: int) -> int:
    """The kernel's head-dim tile: the next power of two, at least 16 (tl.dot's minimum)."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim: expected 1 to {MAX_HEAD_DIM}, got {head_dim}")
    return max(16, 1 << (head_dim - 1).bit_length())


def check_block_size(name: str, value: int) -> int:
    """A kernel tile size: a power of two from 16 to 256."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < 16 or value > 256 or value & (value - 1):
        raise ValueError(f"{name}: expected a power of two from 16 to 256, got {value}")
    return value


def upcast_in_kernel(dtype: torch.dtype) -> bool:
    """Whether the kernels convert loaded tiles to float32 before their matmuls.

    Only under the interpreter and only for bfloat16: numpy has no bfloat16, and the interpreter's
    bf16 arithmetic and tl.dot give garbage (checked with triton 3.9). On GPU the tensor cores
    take bf16 directly.
    """
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: exact float32 products for float32 inputs (not TF32), so that
    a float32 call is as accurate as torch's default float32 matmul; ignored for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def new_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised buffer for a kernel to fill (outputs, LSE, delta, gradients).

    One place, so that the tests can poison every buffer (fill it with NaN) and check that the
    kernels write every element.
    """
    return torch.empty(shape, dtype=dtype, device=device)
