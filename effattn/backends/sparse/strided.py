"""`strided`: the Sparse Transformer pattern (Child et al. 2019): a local band plus strided keys.

Query i attends to the keys within ``window`` of its diagonal key ``i + Nk - Nq`` (as `local`)
and to every ``stride``-th key, the summary positions ``j % stride == stride - 1`` (the last
key of each stride-long block, Child et al.'s "fixed" summaries with c = 1); causal keeps only
those at or before the diagonal. With window ~ stride ~ sqrt(N) each query sees O(sqrt(N))
keys: O(N*sqrt(N)) in all. ``window=1, stride=3``, N = 6, bidirectional and causal::

        k: 0 1 2 3 4 5            k: 0 1 2 3 4 5
    q0     1 1 1 . . 1        q0     1 . . . . .
    q1     1 1 1 . . 1        q1     1 1 . . . .
    q2     . 1 1 1 . 1        q2     . 1 1 . . .
    q3     . . 1 1 1 1        q3     . . 1 1 . .
    q4     . . 1 1 1 1        q4     . . 1 1 1 .
    q5     . . 1 . 1 1        q5     . . 1 . 1 1

Each query block scores its band span and the summary keys outside that span (gathered once
per block, each pair counted once) in one batched fused-attention call
(effattn.backends.sparse.blocked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from effattn.backend import Backend
from effattn.backends.sparse.blocked import banded_attention, num_blocks
from effattn.backends.sparse.dispatch import (
    Impl,
    SparseImplMixin,
    triton_sparse_attention,
    uses_triton,
)
from effattn.ops import attention_flops
from effattn.patterns import Predicate, and_, or_, sliding_window, strided
from effattn.patterns import causal as causal_pattern
from effattn.registry import register_backend

MIN_BLOCK = 128  # smallest query block; it grows as 2 * stride so that memory stays O(N)


@register_backend("strided")
@dataclass(frozen=True)
class StridedAttention(SparseImplMixin, Backend):
    """Sparse Transformer attention: band ``|i - j| <= window`` plus every ``stride``-th key
    (``j % stride == stride - 1``); both default to ceil(sqrt(Nk))."""

    window: int | None = None  # inclusive offset of the band; None: ceil(sqrt(Nk))
    stride: int | None = None  # distance between summary keys; None: ceil(sqrt(Nk))
    block_size: int | None = None  # query block of the computation; None: max(128, 2*stride)
    impl: Impl = "auto"  # torch, triton (fused block-sparse kernel), auto: triton on CUDA

    exact = False  # attends to a subset of the pairs full attention would
    complexity = "O(N*sqrt(N))"
    memory_complexity = "O(N*sqrt(N))"
    tay_class = "FP"
    decode_refusal = (
        "not implemented yet (its state would be a window ring plus every stride-th key)"
    )
    description = "Sparse Transformer: band |i-j|<=w plus every stride-th key (w, s ~ sqrt(N))"

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 0:
            raise ValueError(f"window: expected an int >= 0 or None, got {self.window}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride: expected an int >= 1 or None, got {self.stride}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size: expected an int >= 1 or None, got {self.block_size}")

    def resolved(self, kv_len: int) -> tuple[int, int]:
        """(window, stride) for ``kv_len`` keys: the options, or ceil(sqrt(Nk)) where None."""
        root = max(1, math.isqrt(kv_len - 1) + 1) if kv_len > 1 else 1
        return (
            root if self.window is None else self.window,
            root if self.stride is None else self.stride,
        )

    def predicate(self, q_len: int, kv_len: int, *, causal: bool) -> Predicate:
        """The pure pattern (no key padding) that pattern(), masks and block lists derive from."""
        window, stride = self.resolved(kv_len)
        pred = or_(sliding_window(window, kv_len - q_len), strided(stride))
        return and_(causal_pattern(q_len, kv_len), pred) if causal else pred

    def _block(self, q_len: int, stride: int) -> int:
        return min(self.block_size or max(MIN_BLOCK, 2 * stride), q_len)

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
        q_len, kv_len = q.shape[2], k.shape[2]
        if uses_triton(self.impl, q):
            return triton_sparse_attention(
                self.predicate(q_len, kv_len, causal=causal),
                q,
                k,
                v,
                key_padding_mask=key_padding_mask,
                scale=scale,
                cache_key=(self, q_len, kv_len, causal),
            )
        window, stride = self.resolved(kv_len)
        end = max(kv_len, stride - 1)  # no summary key when stride > Nk
        summaries = torch.arange(stride - 1, end, stride, device=q.device)  # (Nk/stride,)
        return banded_attention(
            q,
            k,
            v,
            pred=self.predicate(q_len, kv_len, causal=causal),
            block_size=self._block(q_len, stride),
            left=window,
            right=0 if causal else window,
            extra_keys=summaries,
            global_rows=0,
            key_padding_mask=key_padding_mask,
            scale=scale,
            cache_key=(self, q_len, kv_len, causal),
        )

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
        """Forward FLOPs of the computed blocks: every (query, key) pair of each query block's
        band span and its summary keys (masked entries included)."""
        window, stride = self.resolved(kv_len)
        b = self._block(q_len, stride)
        span = b + min(window, kv_len) + (0 if causal else min(window, max(q_len - 1, 0)))
        pairs = num_blocks(q_len, b) * b * (span + kv_len // stride)
        return attention_flops(batch, heads, head_dim, pairs)
