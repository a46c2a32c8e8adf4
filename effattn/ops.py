"""Small tensor helpers shared by the torch backends: the keep-mask of causality and key
padding, a softmax that gives empty rows zeros, and pair counts for FLOP accounting."""

from __future__ import annotations

import torch
from torch import Tensor

from effattn.patterns import causal as causal_predicate
from effattn.patterns import dense_mask


def keep_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    key_padding_mask: Tensor | None,
    device: torch.device | str,
) -> Tensor | None:
    """The dense keep-mask of causality and key padding, or None when every pair is kept.

    Returns a bool tensor of shape (B or 1, 1, Nq or 1, Nk) that broadcasts against scores of
    shape (B, H, Nq, Nk); True = the pair takes part. Causal is bottom-right aligned
    (see :func:`effattn.patterns.causal`).
    """
    keep = None
    if causal:
        keep = dense_mask(causal_predicate(q_len, kv_len), q_len, kv_len, device)[None, None]
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]  # (B, Nk) -> (B, 1, 1, Nk)
        keep = padding if keep is None else keep & padding
    return keep


def masked_softmax(scores: Tensor, keep: Tensor | None) -> Tensor:
    """Softmax over the last dim of ``scores`` restricted to ``keep``, in float32 or wider.

    scores: (..., Nq, Nk); keep: None or bool broadcastable to scores. A row that keeps no key
    gets all-zero probabilities (not NaN), and its gradient is zero.
    """
    s = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    if keep is None:
        return torch.softmax(s, dim=-1)
    s = s.masked_fill(~keep, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(s - row_max)
    return p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def pair_count(q_len: int, kv_len: int, *, causal: bool) -> int:
    """Number of (query, key) pairs a dense pattern computes; causal is bottom-right aligned."""
    if not causal:
        return q_len * kv_len
    # Query i keeps min(kv_len, max(0, i + kv_len - q_len + 1)) keys.
    kept = torch.arange(q_len, dtype=torch.int64).add_(kv_len - q_len + 1).clamp_(0, kv_len)
    return int(kept.sum())


def attention_flops(batch: int, heads: int, head_dim: int, pairs: int) -> int:
    """Forward FLOPs of exact attention over ``pairs`` (query, key) pairs per head:
    2*D for the score and 2*D for the weighted value sum, i.e. 4*B*H*pairs*D."""
    return 4 * batch * heads * pairs * head_dim
