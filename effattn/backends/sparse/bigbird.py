"""`bigbird`: BigBird block-sparse attention (Zaheer et al. 2020, the ITC variant).

Positions are cut into blocks of ``block_size``. Query block t attends to
  - its window: key blocks t-r .. t+r, with ``num_window_blocks = 2r + 1`` (3 by default);
  - the global blocks: the first ceil(g/2) and the last floor(g/2) key blocks
    (``num_global_blocks = g``, first and last by default); the global query blocks (the same
    places) attend to every key;
  - ``num_random_blocks`` random key blocks, distinct, none of them a window or global block.
A pair in the pattern is counted once. Block pattern for 8 blocks, 1 random block (r), head 0::

    key block:  0 1 2 3 4 5 6 7
    q block 0   G G G G G G G G     (global row)
    q block 1   G W W W . r . G
    q block 2   G W W W r . . G
    ...
    q block 7   G G G G G G G G     (global row)

Random blocks are drawn per head from ``torch.Generator().manual_seed(seed)`` for the given
(Nq, Nk, H): fixed, the same on every call (never redrawn per call or step); change ``seed`` for
another draw. Bidirectional only (BigBird's ITC pattern is not causal): causal=True raises.
A short sequence with fewer key blocks than the pattern needs (window + global + random) falls
back to dense attention over all keys: denser, still exact over its own pattern().
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from effattn.backend import Backend, predicate_pattern
from effattn.backends.sparse.blocked import (
    block_bias,
    gathered_attention,
    num_blocks,
    query_blocks,
    rows_attention,
    rows_bias,
)
from effattn.backends.sparse.dispatch import (
    Impl,
    SparseImplMixin,
    triton_sparse_attention,
    uses_triton,
)
from effattn.ops import attention_flops, cached
from effattn.patterns import Pattern, Predicate, block_table
from effattn.registry import register_backend


@register_backend("bigbird")
@dataclass(frozen=True)
class BigBirdAttention(SparseImplMixin, Backend):
    """BigBird ITC: window + global + random key blocks per query block; global rows dense."""

    block_size: int = 64  # positions per block, for queries and keys
    num_window_blocks: int = 3  # odd: the query's own block and (n-1)/2 on each side
    num_global_blocks: int = 2  # global blocks: ceil(n/2) first and floor(n/2) last
    num_random_blocks: int = 3  # random key blocks per query block (and head)
    seed: int = 0  # seed of the random blocks; fixed per (Nq, Nk, H, seed)
    impl: Impl = "auto"  # torch, triton (fused block-sparse kernel), auto: triton on CUDA

    exact = False  # attends to a subset of the pairs full attention would
    supports_causal = False
    complexity = "O(N)"
    memory_complexity = "O(N)"
    tay_class = "FP+M"
    description = "BigBird ITC: window, global and seeded random blocks (bidirectional)"

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size: expected an int >= 1, got {self.block_size}")
        if self.num_window_blocks < 1 or self.num_window_blocks % 2 == 0:
            raise ValueError(
                f"num_window_blocks: expected an odd int >= 1, got {self.num_window_blocks}"
            )
        if self.num_global_blocks < 0:
            raise ValueError(
                f"num_global_blocks: expected an int >= 0, got {self.num_global_blocks}"
            )
        if self.num_random_blocks < 0:
            raise ValueError(
                f"num_random_blocks: expected an int >= 0, got {self.num_random_blocks}"
            )

    # -- the block pattern ------------------------------------------------------------------
    def is_dense(self, kv_len: int) -> bool:
        """True when Nk has too few blocks for distinct window, global and random blocks."""
        needed = self.num_window_blocks + self.num_global_blocks + self.num_random_blocks
        return num_blocks(kv_len, self.block_size) < needed

    def _global_rows(self, nbq: int) -> tuple[int, int]:
        """(first, last): how many global query blocks lead and trail ``nbq`` blocks."""
        first = min((self.num_global_blocks + 1) // 2, nbq)
        return first, min(self.num_global_blocks // 2, nbq - first)

    def _global_blocks(self, count: int, device: torch.device) -> Tensor:
        first = (self.num_global_blocks + 1) // 2
        last = self.num_global_blocks // 2
        ids = torch.cat([torch.arange(first), torch.arange(count - last, count)])
        return ids.clamp(0, count - 1).unique().to(device)

    def key_blocks(self, q_len: int, kv_len: int, heads: int, device: torch.device) -> Tensor:
        """(H, nbq, w + g + r) int64: the key blocks of each query block, -1 = none (out of
        range, or a global block already in the window). Rows of global query blocks are
        listed too but computed densely."""
        nbq, nbk = num_blocks(q_len, self.block_size), num_blocks(kv_len, self.block_size)
        radius = self.num_window_blocks // 2
        rows = torch.arange(nbq)[:, None]  # (nbq, 1)
        window = rows + torch.arange(-radius, radius + 1)  # (nbq, w)
        window = torch.where((window >= 0) & (window < nbk), window, -1)
        global_ids = self._global_blocks(nbk, torch.device("cpu"))  # (g,)
        globals_ = global_ids.expand(nbq, -1)  # (g,) -> (nbq, g)
        in_window = (globals_ >= rows - radius) & (globals_ <= rows + radius)
        globals_ = torch.where(in_window, -1, globals_)
        # Random blocks: the r largest of seeded uniforms, window and global blocks excluded.
        fixed = torch.zeros(nbq, nbk + 1, dtype=torch.bool)  # column nbk catches the -1s
        fixed.scatter_(1, torch.where(window < 0, nbk, window), True)
        fixed = fixed[:, :nbk]
        fixed[:, global_ids] = True
        generator = torch.Generator().manual_seed(self.seed)
        draws = torch.rand(heads, nbq, nbk, generator=generator).masked_fill(fixed, -1.0)
        random = draws.topk(self.num_random_blocks, dim=-1).indices  # (H, nbq, r)
        fixed_lists = torch.cat([window, globals_], dim=1).expand(heads, -1, -1)  # (H, nbq, w+g)
        return torch.cat([fixed_lists, random], dim=2).to(device)

    def _middle_lists(
        self, q_len: int, kv_len: int, heads: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """The key blocks (H, nb, m) of the non-global query blocks, -1 = none, and their key
        positions (H, nb, m*b), -1 = none or past Nk."""
        b, nbq = self.block_size, num_blocks(q_len, self.block_size)
        first, last = self._global_rows(nbq)
        lists = self.key_blocks(q_len, kv_len, heads, device)[:, first : nbq - last]
        positions = lists[..., None] * b + torch.arange(b, device=device)  # (H, nb, m, b)
        positions = torch.where((lists[..., None] < 0) | (positions >= kv_len), -1, positions)
        return lists, positions.flatten(2)  # (H, nb, m), (H, nb, m*b)

    def block_table(self, q_len: int, kv_len: int, heads: int, device: torch.device) -> Tensor:
        """(H, nbq, nbk) bool: True where query block t attends to key block s."""
        nbq, nbk = num_blocks(q_len, self.block_size), num_blocks(kv_len, self.block_size)
        if self.is_dense(kv_len):
            return torch.ones(heads, nbq, nbk, dtype=torch.bool, device=device)
        lists = self.key_blocks(q_len, kv_len, heads, device)
        table = torch.zeros(heads, nbq, nbk + 1, dtype=torch.bool, device=device)
        table.scatter_(2, torch.where(lists < 0, nbk, lists), True)  # -1 -> a spare column
        table = table[:, :, :nbk]
        table[:, self._global_blocks(nbq, device)] = True  # global query blocks see everything
        return table

    def predicate(
        self, q_len: int, kv_len: int, *, causal: bool = False, heads: int = 1
    ) -> Predicate:
        """The pure pattern (no key padding); it has a head dim: (H, Nq, Nk) on a dense grid."""
        if causal:
            raise ValueError("causal: expected False (bigbird is bidirectional only), got True")
        table = self.block_table(q_len, kv_len, heads, torch.device("cpu"))
        return block_table(table, self.block_size)

    # -- the computation --------------------------------------------------------------------
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
        _, heads, q_len, _ = q.shape
        kv_len, b = k.shape[2], self.block_size
        key = (self, q_len, kv_len, heads)  # the pattern is fixed by these (cache key)
        if uses_triton(self.impl, q):
            table = cached(
                (key, "table", str(q.device)),
                lambda: self.block_table(q_len, kv_len, heads, q.device),
            )
            return triton_sparse_attention(
                block_table(table, b),  # (H, nbq, nbk) table -> (H, Nq, Nk) predicate
                q, k, v, key_padding_mask=key_padding_mask, scale=scale, cache_key=key,
            )  # fmt: skip
        dense_bias = None  # global rows see every key: a mask only for key padding
        if key_padding_mask is not None:
            one_row = torch.arange(1, device=q.device)  # the same mask for every row
            dense_bias = rows_bias(None, one_row, kv_len, key_padding_mask, q.dtype, key)
        if self.is_dense(kv_len):
            return rows_attention(q, k, v, dense_bias, scale)
        nbq = num_blocks(q_len, b)
        first, last = self._global_rows(nbq)
        qb = query_blocks(q, b)  # (B, H, nbq, b, D)
        pieces = []
        if first or last:  # the global query blocks, first and last in one call
            rows = torch.cat([qb[:, :, :first], qb[:, :, nbq - last :]], dim=2)
            rows = rows.flatten(2, 3)  # (B, H, first+last, b, D) -> (B, H, (first+last)*b, D)
            dense = rows_attention(rows, k, v, dense_bias, scale)  # (B, H, (first+last)*b, D)
            pieces.append(dense[:, :, : first * b])
        if nbq - first - last > 0:
            lists, positions = cached(
                (key, "lists"), lambda: self._middle_lists(q_len, kv_len, heads, q.device)
            )
            bias = block_bias(None, None, positions, kv_len, key_padding_mask, q.dtype, key)
            qm = qb[:, :, first : nbq - last]  # (B, H, nb, b, D)
            pad = num_blocks(kv_len, b) * b - kv_len  # whole key blocks are gathered
            k_blocks, v_blocks = (F.pad(x, (0, 0, 0, pad)) if pad else x for x in (k, v))
            middle = gathered_attention(qm, k_blocks, v_blocks, lists, bias, scale, key_block=b)
            pieces.append(middle.flatten(2, 3))  # (B, H, nb, b, D) -> (B, H, nb*b, D)
        if last:
            pieces.append(dense[:, :, first * b :])  # (B, H, last*b, D)
        return torch.cat(pieces, dim=2)[:, :, :q_len]  # (B, H, nbq*b, D) -> (B, H, Nq, D)

    def pattern(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
    ) -> Pattern:
        def predicate(q_len: int, kv_len: int, *, causal: bool) -> Predicate:
            return self.predicate(q_len, kv_len, causal=causal, heads=q.shape[1])

        return predicate_pattern(predicate, q, k, causal, key_padding_mask)

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
        """Forward FLOPs of the computed blocks: b x b pairs per listed key block of each
        non-global query block (absent ones included), and global query blocks over all keys."""
        b, nbq = self.block_size, num_blocks(q_len, self.block_size)
        if self.is_dense(kv_len):
            return attention_flops(batch, heads, head_dim, q_len * kv_len)
        global_rows = min(self.num_global_blocks, nbq)
        listed = self.num_window_blocks + self.num_global_blocks + self.num_random_blocks
        pairs = (nbq - global_rows) * b * listed * b + global_rows * b * kv_len
        return attention_flops(batch, heads, head_dim, pairs)
