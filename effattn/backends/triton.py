"""`triton`: exact attention by effattn's own fused Triton kernels (FlashAttention-2 style).

Forward with an online softmax in float32 and a backward of three kernels (delta, dK/dV, dQ);
never builds the (Nq, Nk) scores, so its extra memory is O(N) (the output's LSE rows). Runs on
CUDA tensors, and on CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1``, slow:
for tests). Triton is imported on the first call, so ``import effattn`` works without it.
The kernels live in kernels/ (``effattn.kernels.flash``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from effattn.backend import Backend
from effattn.registry import register_backend

MAX_HEAD_DIM = 256  # the kernels pad D to a power of two up to this


def _kernels_runtime() -> ModuleType | None:
    """effattn.kernels._runtime (never imports triton), or None when kernels/ is not mapped to
    effattn.kernels (a source tree used without ``pip install -e .``)."""
    try:
        from effattn.kernels import _runtime
    except ImportError:
        return None
    return _runtime


@register_backend("triton")
@dataclass(frozen=True)
class TritonFlashAttention(Backend):
    """Fused flash attention in Triton; exact, causal (bottom-right aligned), key padding."""

    block_m: int | None = None  # query rows per tile (power of two, 16..256); None = autotuned
    block_n: int | None = None  # keys per tile (power of two, 16..256); None = autotuned

    exact = True
    devices = ("cuda", "cpu")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    complexity = "O(N^2)"
    memory_complexity = "O(N)"
    tay_class = "-"
    decode_refusal = "not implemented yet for the Triton kernel (use 'sdpa' or 'full')"
    description = "effattn's fused Triton flash attention (online softmax, fp32 accumulation)"

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value > 256 or value & (value - 1)):
                raise ValueError(f"{name}: expected a power of two from 16 to 256, got {value}")

    def not_supported_reasons(
        self,
        *,
        device: str,
        dtype: torch.dtype,
        causal: bool = False,
        padding_mask: bool = False,
        backward: bool = False,
        head_dim: int | None = None,
    ) -> list[str]:
        reasons = super().not_supported_reasons(
            device=device,
            dtype=dtype,
            causal=causal,
            padding_mask=padding_mask,
            backward=backward,
            head_dim=head_dim,
        )
        runtime = _kernels_runtime()
        if runtime is None:
            reasons.append("effattn.kernels is not importable (install effattn: pip install -e .)")
        elif device in self.devices:
            reasons += runtime.unavailable_reasons(device)
        if head_dim is not None and head_dim > MAX_HEAD_DIM:
            reasons.append(f"head_dim={head_dim} (supported: 1 to {MAX_HEAD_DIM})")
        return reasons

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool,
        key_padding_mask: Tensor | None,
        scale: float,
    ) -> Tensor:
        from effattn.kernels.flash import flash_attention  # imports triton

        return flash_attention(
            q,
            k,
            v,
            causal=causal,
            key_padding_mask=key_padding_mask,
            scale=scale,
            block_m=self.block_m,
            block_n=self.block_n,
        )
