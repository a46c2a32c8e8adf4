"""An independent float64 reference for attention, written from the definition (not from effattn).

Every helper here computes in float64 with explicit index comparisons, so that a mistake shared
by the library's own masks and softmax cannot hide in the tests.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_keep(q_len: int, kv_len: int) -> Tensor:
    """(Nq, Nk) bool: query i keeps key j iff j - i <= Nk - Nq (last query sees the last key)."""
    i = torch.arange(q_len, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(kv_len, dtype=torch.float64).unsqueeze(0)
    return (j - i) <= (kv_len - q_len)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    mask: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """float64 attention. q: (B, H, Nq, D), k, v: (B, H, Nk, D) -> (B, H, Nq, D).

    key_padding_mask: (B, Nk), True = takes part. mask / weight / bias: broadcastable to
    (B, H, Nq, Nk); kept pairs contribute weight * exp(score + bias). Rows with nothing kept -> 0.
    """
    q64, k64, v64 = q.double(), k.double(), v.double()
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    scores = torch.einsum("bhid,bhjd->bhij", q64, k64) * scale
    if bias is not None:
        scores = scores + bias.double()
    keep = torch.ones(scores.shape, dtype=torch.bool)
    if causal:
        keep = keep & causal_keep(q.shape[2], k.shape[2])
    if key_padding_mask is not None:
        keep = keep & key_padding_mask.cpu()[:, None, None, :]
    if mask is not None:
        keep = keep & mask.cpu()
    w = torch.ones_like(scores) if weight is None else weight.double().cpu().expand_as(scores)
    keep = keep & (w > 0)
    # Subtract the largest kept score of each row for stability; empty rows stay all-zero.
    masked = torch.where(keep, scores, torch.full_like(scores, -torch.inf))
    row_max = masked.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    unnorm = torch.where(keep, w * torch.exp(masked - row_max), torch.zeros_like(scores))
    denom = unnorm.sum(dim=-1, keepdim=True)
    probs = unnorm / torch.where(denom == 0, torch.ones_like(denom), denom)
    return torch.einsum("bhij,bhjd->bhid", probs, v64)
