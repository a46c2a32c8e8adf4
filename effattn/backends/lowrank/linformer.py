"""`linformer`: Linformer attention (Wang et al. 2020, "Self-Attention with Linear
Complexity"), Tay class LR.

Keys and values are projected along the sequence to k = ``rank`` rows, E K and F V (k, D), and
every query attends to those k rows (the option is not called ``k``: that is the keys'
argument of ``effattn.attention(q, k, v, ...)``)::

    out = softmax(scale * Q (E K)^T) (F V)        E, F: (k, Nk)

In the paper E and F are learned; here, as a function without parameters, they are fixed:

- ``projection="gaussian"`` (default): E and F have iid N(0, 1/k) entries (the paper's
  Johnson-Lindenstrauss construction), drawn from ``seed`` once and cached
  (effattn.backends.lowrank.projections.gaussian_projection). **Any N:** the paper fixes a
  maximum length n and zero-pads shorter inputs; here column j of E and F depends only on
  (seed, j), so a sequence of Nk keys uses the first Nk columns of one unbounded projection:
  the same as padding to any maximum, and no N is too long. :meth:`projections` returns them.
- ``projection="mean"``: the paper's pooling projection: E = F = means over k contiguous
  segments of the keys (min(rank, Nk) segments; rank >= Nk gives exact attention). Cheaper (no
  (k, Nk) matmul) and, unlike untrained random projections, it converges to softmax attention
  as k grows.

Key padding: a masked key is zeroed before the projection (its column of E and F is not used),
so it adds to no projected row; with ``mean`` the means are over kept keys, and a segment
without kept keys is left out of the softmax. Not causal: every projected row mixes all
positions, the future included.

Cost: 2 (k, Nk) x (Nk, D) projections and attention of Nq queries over k rows (torch's fused
attention): O(N k) time, O(N + k) extra memory beyond the projections (k x Nk, cached).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from effattn._validate import check_int_option, check_seed_option
from effattn.backend import Backend
from effattn.backends.lowrank.projections import (
    gaussian_projection,
    segment_matrix,
    segment_means,
)
from effattn.ops import attention_flops
from effattn.reference import masked_softmax
from effattn.registry import register_backend


@register_backend("linformer")
@dataclass(frozen=True)
class LinformerAttention(Backend):
    """Keys and values projected along the sequence to k rows; bidirectional only."""

    rank: int = 256  # k in the paper: rows of the projected keys and values
    projection: Literal["gaussian", "mean"] = "gaussian"  # seeded N(0, 1/k), or segment means
    seed: int = 0  # seed of the Gaussian projections (fixed: not redrawn between calls)

    exact = False
    supports_causal = False
    why_unsupported: ClassVar[dict[str, str]] = {
        "causal": "Linformer projects keys and values along the whole sequence, so every "
        "projected key mixes future positions"
    }
    complexity = "O(N*k)"
    memory_complexity = "O(N*k)"
    tay_class = "LR"
    has_pattern = False
    description = "Linformer: keys, values projected along N to k rows (seeded E, F or means)"

    def __post_init__(self) -> None:
        check_int_option("linformer", "rank", self.rank)
        if self.projection not in ("gaussian", "mean"):
            raise ValueError(
                f"linformer: option 'projection' expected 'gaussian' or 'mean', "
                f"got {self.projection!r}"
            )
        check_seed_option("linformer", self.seed)

    def projections(
        self,
        kv_len: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> tuple[Tensor, Tensor]:
        """E and F (rows, Nk) for Nk keys without padding: the Gaussian projections, or the
        segment-mean matrix (rows = min(k, Nk)) for both."""
        if self.projection == "mean":
            mean = segment_matrix(kv_len, min(self.rank, kv_len), dtype=dtype, device=device)
            return mean, mean  # (rows, Nk)
        return tuple(
            gaussian_projection(self.rank, kv_len, self.seed, which, dtype=dtype, device=device)
            for which in (0, 1)
        )

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
        kv_len = k.shape[2]
        mask = None
        if self.projection == "mean":
            rows = min(self.rank, kv_len)
            keys, counts = segment_means(k, rows, key_padding_mask)  # (B, H, rows, D)
            values, _ = segment_means(v, rows, key_padding_mask)
            if key_padding_mask is not None:
                mask = (counts > 0).transpose(-2, -1)  # (B, 1, rows, 1) -> (B, 1, 1, rows)
        else:
            if key_padding_mask is not None:
                dropped = ~key_padding_mask[:, None, :, None]  # (B, Nk) -> (B, 1, Nk, 1)
                k, v = k.masked_fill(dropped, 0.0), v.masked_fill(dropped, 0.0)
            e, f = self.projections(kv_len, wide, q.device)  # (k, Nk) each
            keys, values = e @ k, f @ v  # (k, Nk) @ (B, H, Nk, D) -> (B, H, k, D)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
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
        """(B, H, Nq, Nk) float64: softmax(scale Q (E' K)^T) F', where E', F' are E and F with
        the columns of masked keys zeroed (``mean``: renormalised over the kept keys of each
        segment, empty segments left out of the softmax)."""
        scale = self._checked(q, k, v, causal, key_padding_mask, scale, dense=True)
        q, k = q.double(), k.double()
        e, f = self.projections(k.shape[2], torch.float64, q.device)  # (rows, Nk)
        rows_kept = None
        if key_padding_mask is not None:
            kept = key_padding_mask[:, None, :].double()  # (B, Nk) -> (B, 1, Nk)
            if self.projection == "mean":
                member = (e > 0).double() * kept  # (B, rows, Nk): kept members of each segment
                counts = member.sum(dim=-1, keepdim=True)  # (B, rows, 1)
                e = f = member / counts.clamp_min(1.0)
                rows_kept = (counts > 0).transpose(-2, -1)[:, None]  # (B, 1, 1, rows)
            else:
                e, f = e * kept, f * kept  # (B, rows, Nk)
            e, f = e[:, None], f[:, None]  # (B, 1, rows, Nk)
        scores = scale * (q @ (e @ k).transpose(-2, -1))  # (B, H, Nq, rows)
        return masked_softmax(scores, rows_kept) @ f  # (B, H, Nq, rows) @ (.., rows, Nk)

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
        """Forward FLOPs: attention of Nq queries over the projected rows (4 D per pair), plus
        the projections: Gaussian 2 x 2 k Nk D (two matmuls), mean 2 Nk D (sums)."""
        rows = min(self.rank, kv_len) if self.projection == "mean" else self.rank
        project = 2 * kv_len * head_dim * (2 * rows if self.projection == "gaussian" else 1)
        return attention_flops(batch, heads, head_dim, q_len * rows) + batch * heads * project
