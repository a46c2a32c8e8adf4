"""`nystrom`: Nystromformer attention (Xiong et al. 2021), Tay class LR.

The softmax matrix is approximated from m landmarks, the means of Q and of K over m contiguous
segments (effattn.backends.lowrank.projections; m = min(landmarks, Nq, Nk))::

    out = softmax(s Q K~^T) pinv(softmax(s Q~ K~^T)) softmax(s Q~ K^T) V
               (Nq, m)              (m, m)              (m, Nk)

with pinv the paper's iterative pseudo-inverse (``pinv_iterations``, 6 as in the paper; None:
the exact one), taken per sequence and head (effattn.backends.lowrank.pinv). Computed right to
left: softmax(s Q~ K^T) V and the product with the (Nq, m) factor run as torch's fused
attention, so no (Nq, m) or (m, Nk) matrix is held: O(N m + m^3) time, O(N + m^2) memory.
m = N landmarks with the exact pseudo-inverse give exact attention.

Key padding: the key means are over kept keys only and masked keys are left out of the
(m, Nk) softmax; a landmark whose segment keeps no key is dropped (its column of the first
factor, its row and column of the middle one). No masked key adds to any sum.

Not causal: the landmarks are means over segments that reach into the future and the middle
factor couples every landmark, so no query's row can be restricted to past keys (the paper
gives no causal form).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from effattn._validate import check_int_option
from effattn.backend import Backend
from effattn.backends.lowrank.pinv import iterative_pinv
from effattn.backends.lowrank.projections import segment_means
from effattn.ops import attention_flops
from effattn.reference import masked_softmax
from effattn.registry import register_backend


@register_backend("nystrom")
@dataclass(frozen=True)
class NystromAttention(Backend):
    """Nystrom approximation of softmax attention from segment-mean landmarks."""

    landmarks: int = 256  # m, the segments whose means are the landmarks (at most Nq, Nk)
    pinv_iterations: int | None = 6  # iterations of the pseudo-inverse; None: exact (pinv)

    exact = False
    supports_causal = False
    why_unsupported: ClassVar[dict[str, str]] = {
        "causal": "Nystromformer's landmarks are means over segments that reach into the "
        "future, and its middle factor couples every landmark"
    }
    complexity = "O(N*m)"
    memory_complexity = "O(N+m^2)"
    tay_class = "LR"
    has_pattern = False
    description = "Nystromformer: segment-mean landmarks, iterative pseudo-inverse"

    def __post_init__(self) -> None:
        check_int_option("nystrom", "landmarks", self.landmarks)
        iters = self.pinv_iterations
        if iters is not None and (
            not isinstance(iters, int) or isinstance(iters, bool) or iters < 0
        ):
            raise ValueError(
                f"nystrom: option 'pinv_iterations' expected None or an int >= 0, got {iters!r}"
            )

    def _landmarks(
        self, q: Tensor, k: Tensor, keep: Tensor | None, scale: float
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Landmark queries and keys (B, H, m, D), which landmarks are kept ((B, 1, 1, m) or
        None) and the pseudo-inverse (B, H, m, m) of their kernel."""
        m = min(self.landmarks, q.shape[2], k.shape[2])
        q_marks, _ = segment_means(q, m)  # (B, H, m, D)
        k_marks, counts = segment_means(k, m, keep)  # counts (B or 1, 1, m, 1)
        kept = None if keep is None else (counts > 0).transpose(-2, -1)  # (B, 1, 1, m)
        kernel = masked_softmax(scale * (q_marks @ k_marks.transpose(-2, -1)), kept)  # (B,H,m,m)
        if kept is not None:
            kernel = kernel * kept.transpose(-2, -1)  # a dropped landmark's row is zero too
        return q_marks, k_marks, kept, iterative_pinv(kernel, self.pinv_iterations)

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
        dtype, wide = q.dtype, q.dtype if q.element_size() >= 4 else torch.float32
        q, k, v = q.to(wide), k.to(wide), v.to(wide)
        q_marks, k_marks, kept, inverse = self._landmarks(q, k, key_padding_mask, scale)
        key_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        # softmax(s Q~ K^T) V: the m landmark queries over all keys -> (B, H, m, D)
        summary = F.scaled_dot_product_attention(q_marks, k, v, attn_mask=key_mask, scale=scale)
        mixed = inverse @ summary  # (B, H, m, m) @ (B, H, m, D) -> (B, H, m, D)
        # softmax(s Q K~^T) (pinv ...): every query over the landmark keys -> (B, H, Nq, D)
        out = F.scaled_dot_product_attention(q, k_marks, mixed, attn_mask=kept, scale=scale)
        return out.to(dtype)

    def attention_matrix(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor:
        """(B, H, Nq, Nk) float64: the product of the three factors of the module docstring,
        built densely with the same landmarks and pseudo-inverse."""
        scale = self._checked(q, k, v, causal, key_padding_mask, scale, dense=True)
        q, k = q.double(), k.double()
        q_marks, k_marks, kept, inverse = self._landmarks(q, k, key_padding_mask, scale)
        key_keep = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        first = masked_softmax(scale * (q @ k_marks.transpose(-2, -1)), kept)  # (B, H, Nq, m)
        last = masked_softmax(scale * (q_marks @ k.transpose(-2, -1)), key_keep)  # (B,H,m,Nk)
        return first @ inverse @ last

    def flops(
        self,
        batch: int,
        heads: int,
        q_len: int,
        kv_len: int,
        head_dim: int,
        *,
        causal: bool = False,
    ) -> int:
        """Forward FLOPs, 2 per multiply-add of a matmul: the two attentions (4 D per pair,
        Nq m + m Nk pairs), the landmark kernel (2 m^2 D), the pseudo-inverse (4 matmuls of
        2 m^3 per iteration; the exact one not counted) and pinv @ (m, D) (2 m^2 D); the means
        (Nq + Nk) D."""
        m = min(self.landmarks, q_len, kv_len)
        pinv = 8 * m**3 * (self.pinv_iterations or 0)
        small = 4 * m * m * head_dim + pinv + (q_len + kv_len) * head_dim
        return attention_flops(batch, heads, head_dim, (q_len + kv_len) * m) + batch * heads * small
