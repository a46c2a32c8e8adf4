"""`sdpa`: torch.nn.functional.scaled_dot_product_attention, what a user would pick instead.

On CPU torch dispatches to a tiled flash kernel; on CUDA to FlashAttention-2, memory-efficient or
cuDNN kernels. Causal with Nq != Nk is passed as a bottom-right aligned mask (SDPA's own
``is_causal`` aligns top-left), and key padding as a (B, 1, 1, Nk) mask. Grouped key/value heads
go to SDPA as they are (``enable_gqa``), or, where every query keeps the same keys
(bidirectional, or one causal query), as G * Nq query rows over their key/value head. Decodes
with a K/V cache (effattn.backends.kv_cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from effattn.backend import Backend
from effattn.backends.kv_cache import KVCache
from effattn.decoding import StateShape
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
    native_gqa = True
    state_complexity = "O(N)"
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
        batch, heads, q_len, dim = q.shape
        kv_heads, kv_len = k.shape[1], k.shape[2]
        causal = causal and q_len > 1  # one query, bottom-right aligned, keeps every key
        if kv_heads != heads and not causal:
            # Every query row keeps the same keys: the G query heads of a key/value head become
            # G * Nq rows over it, one SDPA call without enable_gqa (which CPU kernels lack).
            folded = q.reshape(batch, kv_heads, heads // kv_heads * q_len, dim)
            out = self.forward(
                folded, k, v, causal=False, key_padding_mask=key_padding_mask, scale=scale
            )  # (B, Hkv, G*Nq, D)
            return out.reshape(batch, heads, q_len, dim)  # CUDA kernels return it strided
        gqa = kv_heads != heads
        if key_padding_mask is None and (not causal or q_len == kv_len):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa
            )
        # A bool mask (True = take part). Causal with padding materialises (B, 1, Nq, Nk) bools,
        # as a user of SDPA would have to; SDPA gives rows that keep no key zeros.
        keep = keep_mask(
            batch, q_len, kv_len, causal=causal, key_padding_mask=key_padding_mask, device=q.device
        )
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=gqa)

    def decode_state(self, shape: StateShape) -> KVCache:
        return KVCache(self, shape)
