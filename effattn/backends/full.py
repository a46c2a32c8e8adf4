"""`full`: vanilla quadratic attention, the "Transformer" row of the LRA table.

Builds the (B, H, Nq, Nk) score matrix, takes its softmax and multiplies by V, as the original
Transformer does. It is the baseline every other backend is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from effattn.backend import Backend
from effattn.ops import keep_mask, masked_softmax
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
        scores = (
            q @ k.transpose(-2, -1)
        ) * scale  # (B, H, Nq, D) @ (B, H, D, Nk) -> (B, H, Nq, Nk)
        probs = masked_softmax(scores, keep).to(v.dtype)
        return probs @ v  # (B, H, Nq, Nk) @ (B, H, Nk, D) -> (B, H, Nq, D)
