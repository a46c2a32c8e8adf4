"""`sdpa`: torch.nn.functional.scaled_dot_product_attention, what a user would pick instead.

On CPU torch dispatches to a tiled flash kernel; on CUDA to FlashAttention-2, memory-efficient or
cuDNN kernels. Causal with Nq != Nk is passed as a bottom-right aligned mask (SDPA's own
``is_causal`` aligns top-left), and key padding as a (B, 1, 1, Nk) mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from effattn.backend import Backend
from effattn.ops import keep_mask
from effattn.registry import register_backend


@register_backend("sdpa")
@dataclass(frozen=True)
class SDPAAttention(Backend):
    """torch's fused attention; exact, O(N) extra memory in its flash and efficient kernels."""

    exact = True
    complexity = "O(N^2)"
    memory_complexity = "O(N)"
    tay_class = "-"
    description = "torch.nn.functional.scaled_dot_product_attention (flash kernels)"

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
        batch, _, q_len, _ = q.shape
        kv_len = k.shape[2]
        if key_padding_mask is None and (not causal or q_len == kv_len):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        # A bool mask (True = take part). Causal with padding materialises (B, 1, Nq, Nk) bools,
        # as a user of SDPA would have to; SDPA gives rows that keep no key zeros.
        keep = keep_mask(
            batch, q_len, kv_len, causal=causal, key_padding_mask=key_padding_mask, device=q.device
        )
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
