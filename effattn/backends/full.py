"""`full`: vanilla quadratic attention, the "Transformer" row of the LRA table.

Builds the (B, H, Nq, Nk) score matrix, takes its softmax and multiplies by V, as the original
Transformer does. It is the baseline every other backend is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from effattn.backend import Backend
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
        batch, _, q_len, _ = q.shape
        keep = keep_mask(
            batch,
            q_len,
            k.shape[2],
            causal=causal,
            key_padding_mask=key_padding_mask,
            device=q.device,
        )
        # (B, H, Nq, D) @ (B, H, D, Nk) -> (B, H, Nq, Nk); scaled and masked in place, so the
        # baseline holds one score matrix and one probability matrix, as a careful vanilla
        # implementation would.
        scores = (q @ k.transpose(-2, -1)).mul_(scale)
        if keep is not None:
            scores.masked_fill_(~keep, torch.finfo(scores.dtype).min)
        wide = torch.float32 if q.element_size() < 4 else None
        probs = torch.softmax(scores, dim=-1, dtype=wide).to(v.dtype)
        out = probs @ v  # (B, H, Nq, Nk) @ (B, H, Nk, D) -> (B, H, Nq, D)
        if keep is not None:
            out = out * keep.any(dim=-1, keepdim=True)  # a row that keeps no key gives zeros
        return out
