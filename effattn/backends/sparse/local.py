"""`local`: exact sliding-window attention, optionally with Longformer-style global tokens.

Query i attends to the keys within an inclusive offset ``window`` of its diagonal key
``i + Nk - Nq`` (the same alignment as causal): ``|j - i| <= w`` bidirectional, ``0 <= i - j <= w``
causal (style.md #4). Not lucidrains' 3-block approximation: the band is exact. ``window=1``,
N = 5, bidirectional and causal::

        k: 0 1 2 3 4            k: 0 1 2 3 4
    q0     1 1 . . .        q0     1 . . . .
    q1     1 1 1 . .        q1     1 1 . . .
    q2     . 1 1 1 .        q2     . 1 1 . .
    q3     . . 1 1 1        q3     . . 1 1 .
    q4     . . . 1 1        q4     . . . 1 1

Queries run in blocks of ``block_size`` (32 by default, 128 under autograd); each block scores
the contiguous span of keys its queries need (b + 2w keys, b + w causal) as an overlapping
strided view of k and v (padded by the window at the two ends: one copy), masked at the band's
edges, in one batched call of torch's fused attention (effattn.backends.sparse.blocked). With
global tokens each block's keys are its span plus the global keys (gathered: a copy) and the
global rows are computed densely, O(g * Nk). Masks are built once per (options, Nq, Nk) and cached.

Decodes with a ring of the last ``window`` keys (effattn.backends.sparse.window_state), constant in
N; not with global tokens or LRA's blocks (see ``decode_state``).
"""

from __future__ import annotations

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
from effattn.backends.sparse.window_state import WindowState
from effattn.decoding import StateShape
from effattn.ops import attention_flops
from effattn.patterns import Predicate, and_, blocked, global_tokens, or_, sliding_window
from effattn.patterns import causal as causal_pattern
from effattn.registry import register_backend

# Query block when block_size is None. Without autograd 32 was the fastest of 16/32/64/128 at
# w=256 on the 2-core CPU; with autograd the gradient of each block's span (b + 2w keys) is
# materialised, (b + 2w) / b times the size of k, so larger blocks keep backward memory low.
DEFAULT_BLOCK = 32
DEFAULT_BLOCK_WITH_GRAD = 128


@register_backend("local")
@dataclass(frozen=True)
class LocalAttention(SparseImplMixin, Backend):
    """Sliding-window attention: exact band ``|i - j| <= window``, plus ``num_global`` global
    tokens (the first positions attend to, and are attended by, every position), or with
    ``blocked=True`` LRA's non-overlapping blocks of ``window`` positions.

    Tay class FP (fixed pattern); FP+M in the survey's terms when ``num_global > 0``.
    """

    window: int = 256  # inclusive offset w: |i - j| <= w (causal: 0 <= i - j <= w)
    num_global: int = 0  # the first num_global positions are global tokens (Longformer)
    blocked: bool = False  # LRA variant: non-overlapping blocks of `window` positions instead
    block_size: int | None = None  # query block (None: 32, 128 with autograd; blocked: window)
    impl: Impl = "auto"  # torch, triton (fused block-sparse kernel), auto: triton on CUDA

    exact = False  # attends to a subset of the pairs full attention would
    complexity = "O(N*(k+m))"
    memory_complexity = "O(N*(k+m))"
    tay_class = "FP"
    state_complexity = "O(w)"
    description = "exact sliding window |i-j|<=w (+ global tokens, or LRA blocks), blocked views"

    def __post_init__(self) -> None:
        lowest = 1 if self.blocked else 0
        if self.window < lowest:
            raise ValueError(f"window: expected an int >= {lowest}, got {self.window}")
        if self.num_global < 0:
            raise ValueError(f"num_global: expected an int >= 0, got {self.num_global}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size: expected an int >= 1 or None, got {self.block_size}")

    def predicate(self, q_len: int, kv_len: int, *, causal: bool) -> Predicate:
        """The pure pattern (no key padding) that pattern(), masks and block lists derive from."""
        offset = kv_len - q_len
        band = blocked(self.window, offset) if self.blocked else sliding_window(self.window, offset)
        pred = or_(band, global_tokens(self.num_global)) if self.num_global else band
        return and_(causal_pattern(q_len, kv_len), pred) if causal else pred

    def _tiling(
        self, q_len: int, kv_len: int, causal: bool, grad: bool = False
    ) -> tuple[int, int, int]:
        """(block size, span left, span right) of the computation (``grad``: with autograd)."""
        if self.blocked:
            b = self.window
            aligned = (kv_len - q_len) % b == 0
            left = right = 0 if aligned else b - 1  # misaligned blocks straddle two key blocks
            return min(b, q_len) if aligned else b, left, right
        default = DEFAULT_BLOCK_WITH_GRAD if grad else DEFAULT_BLOCK
        b = min(self.block_size or default, q_len)
        return b, self.window, 0 if causal else self.window

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
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        b, left, right = self._tiling(q_len, kv_len, causal, grad)
        extra = None
        if self.num_global:
            extra = torch.arange(min(self.num_global, kv_len), device=q.device)
        return banded_attention(
            q,
            k,
            v,
            pred=self.predicate(q_len, kv_len, causal=causal),
            block_size=b,
            left=left,
            right=right,
            extra_keys=extra,
            global_rows=self.num_global,
            key_padding_mask=key_padding_mask,
            scale=scale,
            cache_key=(self, q_len, kv_len, causal, b),
        )

    def decode_state(self, shape: StateShape) -> WindowState:
        """A ring of the last ``window`` keys; refused with global tokens (a global query
        attends to every key before it, so its state would grow with N) and with LRA's blocks
        (aligned to absolute positions, which the ring does not keep)."""
        if self.num_global:
            raise ValueError(
                f"backend 'local' cannot decode with num_global={self.num_global}: a global "
                "token attends to every key, so no window ring holds what it needs"
            )
        if self.blocked:
            raise ValueError(
                "backend 'local' cannot decode with blocked=True: LRA's blocks are aligned to "
                "absolute positions, which a window ring does not keep"
            )
        return WindowState(self, shape, self.window)

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
        """Forward FLOPs of the computed blocks (inference tiling): every (query, key) pair of
        each query block's span and global keys (masked band edges included), plus the global
        rows over all keys."""
        b, left, right = self._tiling(q_len, kv_len, causal)
        span = b + min(left, kv_len) + min(right, max(q_len - 1, 0))
        keys = span + min(self.num_global, kv_len)
        pairs = num_blocks(q_len, b) * b * keys + min(self.num_global, q_len) * kv_len
        return attention_flops(batch, heads, head_dim, pairs)
