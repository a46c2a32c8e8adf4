"""Softmax attention with its log-sum-exp, and the backward pass, as separate calls: the pieces
the sparse backends' gathered blocks (effattn.backends.sparse.blocked) and the `lsh` rounds
(effattn.backends.lsh.rounds) are built from.

On CPU these are torch's tiled flash-attention kernel and its backward
(``aten::_scaled_dot_product_flash_attention_for_cpu[_backward]``, what
F.scaled_dot_product_attention runs there), called directly for two things SDPA does not give:
the log-sum-exp of each row, which merges attention over disjoint key sets exactly, and a
backward pass that takes a merged output and log-sum-exp (FlashAttention's split-key rule).
Elsewhere the same functions run in plain torch (:func:`plain_attention`), O(Lq * Lk) memory
per call; the sparse backends' CUDA path is the Triton kernel instead.
"""

from __future__ import annotations

import torch
from torch import Tensor


def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """Softmax attention and its log-sum-exp, the forward half of :func:`flash_attention_backward`.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D), views allowed (last dim contiguous); mask: None or
    additive (0 / -inf), broadcasting against (B, H, Lq, Lk). Returns out (B, H, Lq, D) and lse
    (B, H, Lq) = log sum_j exp(scale * q.k_j + mask_j) (float32 for 16-bit inputs); a row that
    keeps no key gives out 0 and lse 0. On CPU this is torch's tiled flash kernel (never more
    than a tile of scores at once); elsewhere the same function in plain torch, O(Lq * Lk)
    memory per call (the CUDA paths of the sparse backends use the Triton kernel instead).
    """
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale
        )
    return plain_attention(q, k, v, mask, scale)


def plain_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """:func:`flash_attention` in plain torch (its path off CPU), O(Lq * Lk) memory."""
    probs, lse = _probs(q, k, mask, scale, None)  # (B, H, Lq, Lk), (B, H, Lq)
    return probs.to(v.dtype) @ v, lse


def flash_attention_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of :func:`flash_attention` for ``grad`` = dL/d(out), shapes as
    q, k, v. ``out`` and ``lse`` may be those of a softmax over MORE keys than k holds (the
    merged result of several calls over disjoint key sets): the gradients are then this key
    set's share, dS = P * (dP - rowsum(grad * out)) with P = exp(S - lse), as in FlashAttention
    with split keys."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale
        )
    return plain_attention_backward(grad, q, k, v, out, lse, mask, scale)


def plain_attention_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`flash_attention_backward` in plain torch (its path off CPU)."""
    probs, _ = _probs(q, k, mask, scale, lse)  # (B, H, Lq, Lk)
    grad_probs = (grad @ v.transpose(-1, -2)).to(probs.dtype)  # (B, H, Lq, Lk)
    delta = (grad * out).sum(-1, keepdim=True).to(probs.dtype)  # (B, H, Lq, 1)
    grad_scores = (probs * (grad_probs - delta) * scale).to(q.dtype)
    dq = grad_scores @ k  # (B, H, Lq, D)
    dk = grad_scores.transpose(-1, -2) @ q  # (B, H, Lk, D)
    dv = probs.to(v.dtype).transpose(-1, -2) @ grad  # (B, H, Lk, D)
    return dq, dk, dv


def _probs(
    q: Tensor, k: Tensor, mask: Tensor | None, scale: float, lse: Tensor | None
) -> tuple[Tensor, Tensor]:
    """exp(S - lse) and lse (computed when None) of S = scale * q k^T + mask, at least float32;
    a row without keys has lse 0 and probabilities 0."""
    wide = torch.promote_types(q.dtype, torch.float32)
    scores = (q @ k.transpose(-1, -2)).to(wide) * scale  # (B, H, Lq, Lk)
    if mask is not None:
        scores = scores + mask
    if lse is None:
        lse = scores.logsumexp(-1)  # (B, H, Lq)
        lse = lse.masked_fill(lse == float("-inf"), 0.0)
    return (scores - lse[..., None]).exp(), lse
