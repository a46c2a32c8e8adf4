"""The readable dense computation that pattern backends' outputs must equal (see ``Pattern``):
softmax attention restricted to the pattern. It is the default of ``Backend.attention_matrix``
and ``Backend.reference``; the low-rank and kernel backends, which have no pattern, override
those with their own dense formula beside their fast path (effattn/backends/kernelized/,
lowrank/), reusing :func:`masked_softmax`.

Quadratic in memory on purpose: it is used for attention weights (``need_weights=True``), for
the error of approximate backends, for tests and for pictures, never on a fast path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effattn.patterns import Pattern


def pattern_probabilities(q: Tensor, k: Tensor, pattern: Pattern, scale: float) -> Tensor:
    """Attention probabilities (B, H, Nq, Nk) of dense softmax restricted to ``pattern``.

    q: (B, H, Nq, D), k: (B, H, Nk, D). Pair weights multiply exp(score), i.e. add log(weight)
    to the score; rows that keep no key are all zero. Computed in float32 or wider.
    """
    key = k if pattern.key is None else pattern.key
    wide = q.dtype if q.element_size() >= 4 else torch.float32
    scores = (q.to(wide) @ key.to(wide).transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    if pattern.bias is not None:
        scores = scores + pattern.bias
    keep = pattern.mask
    if pattern.weight is not None:
        keep = keep & (pattern.weight > 0)
        scores = scores + pattern.weight.clamp_min(1e-30).log()
    return masked_softmax(scores, keep)


def pattern_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float) -> Tensor:
    """Dense attention restricted to ``pattern``: (B, H, Nq, D), in the dtype of ``v``."""
    probs = pattern_probabilities(q, k, pattern, scale)
    return (probs @ v.to(probs.dtype)).to(v.dtype)


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
