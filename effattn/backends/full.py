"""`full`: vanilla quadratic attention, the "Transformer" row of the LRA table.

Builds the (B, H, Nq, Nk) score matrix, takes its softmax and multiplies by V, as the original
Transformer does. It is the baseline every other backend is measured against. Grouped key/value
heads are read in place (query head h reads key/value head h // (H / Hkv)), never repeated.
Decodes with a K/V cache (effattn.backends.kv_cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from effattn.backend import Backend
from effattn.backends.kv_cache import KVCache
from effattn.decoding import StateShape
from effattn.ops import keep_mask
from effattn.registry import register_backend


@register_backend("full")
@dataclass(frozen=True)
class FullAttention(Backend):
    """softmax(scale * Q K^T + mask) V with the whole score matrix in memory."""

    exact = True
    complexity = "O(N^2)"
    memory_complexity = "O(N^2)"
    tay_class = "-"
    native_gqa = True
    state_complexity = "O(N)"
    description = "vanilla softmax(QK^T)V; builds the N x N score matrix"

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
        kv_heads = k.shape[1]
        groups = heads // kv_heads
        q = q.reshape(batch, kv_heads, groups * q_len, dim)  # (B, H, Nq, D) -> (B, Hkv, G*Nq, D)
        keep = keep_mask(
            batch,
            q_len,
            k.shape[2],
            causal=causal,
            key_padding_mask=key_padding_mask,
            device=q.device,
        )
        # (B, Hkv, G*Nq, D) @ (B, Hkv, D, Nk) -> (B, Hkv, G*Nq, Nk) -> (B, H, Nq, Nk); scaled
        # and masked in place, so the baseline holds one score matrix and one probability
        # matrix, as a careful vanilla implementation would.
        scores = (q @ k.transpose(-2, -1)).view(batch, heads, q_len, -1).mul_(scale)
        if keep is not None:
            scores.masked_fill_(~keep, torch.finfo(scores.dtype).min)
        wide = torch.float32 if q.element_size() < 4 else None
        probs = torch.softmax(scores, dim=-1, dtype=wide).to(v.dtype)
        probs = probs.view(batch, kv_heads, groups * q_len, -1)  # -> (B, Hkv, G*Nq, Nk)
        out = (probs @ v).view(batch, heads, q_len, dim)  # (B, Hkv, G*Nq, D) -> (B, H, Nq, D)
        if keep is not None:
            out = out * keep.any(dim=-1, keepdim=True)  # a row that keeps no key gives zeros
        return out

    def decode_state(self, shape: StateShape) -> KVCache:
        return KVCache(self, shape)
