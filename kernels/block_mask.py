"""Block lists that drive the block-sparse kernel, built from a pattern predicate.

The (Nq, Nk) pattern is cut into tiles of block_m x block_n. A tile is *full* when every pair in
it is kept (the kernel applies no element mask), *partial* when some are (the kernel applies the
tile's element mask, stored once in ``tiles``), and skipped when none is. As FlexAttention's
BlockMask, the forward and dQ use per-query-block lists of key blocks; the dK/dV pass uses the
transposed, per-key-block lists of query blocks. Pairs past Nq or Nk count as not kept, so the
ragged last row and column of tiles are partial, never full.

Example, causal with Nq = Nk = 6 and 2 x 2 tiles (F = full, P = partial, . = skipped)::

    pairs        tiles     kv lists (forward)             q lists (dK/dV)
    1 0 0 0 0 0  P . .     q-block 0: full []    partial [0]   k-block 0: full [1, 2] partial [0]
    1 1 0 0 0 0  F P .     q-block 1: full [0]   partial [1]   k-block 1: full [2]    partial [1]
    1 1 1 0 0 0  F F P     q-block 2: full [0,1] partial [2]   k-block 2: full []     partial [2]
    ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from effattn.ops import attention_flops
from effattn.patterns import Predicate

_EMPTY, _PARTIAL, _FULL = 0, 1, 2
# Pairs evaluated at once when building the lists: bounds the temporary bool tensor (64 MiB).
_CHUNK_PAIRS = 1 << 26


def _lists(state: Tensor, wanted: int) -> tuple[Tensor, Tensor]:
    """Per row of ``state`` (Hm, R, C), the ascending column indices whose state is ``wanted``:
    counts (Hm, R) int32 and indices (Hm, R, max(1, max count)) int32, padded with 0."""
    hit = state == wanted
    counts = hit.sum(dim=-1)
    width = max(1, int(counts.max()) if counts.numel() else 1)
    # A stable sort of "not hit" puts the hit columns first, in ascending order.
    order = torch.sort((~hit).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    order = torch.where(torch.arange(width, device=state.device) < counts[..., None], order, 0)
    return counts.to(torch.int32).contiguous(), order.to(torch.int32).contiguous()


def _tile_ids(tile_id: Tensor, indices: Tensor) -> Tensor:
    """The tile id of each listed block: tile_id (Hm, R, C) gathered at indices (Hm, R, W)."""
    return tile_id.gather(2, indices.long()).clamp_min(0).contiguous()


def _pattern_heads(pred: Predicate, device: torch.device | str | None) -> int:
    """Hm: 1 for a predicate of (q_idx, kv_idx) alone, else the size of its leading head dim."""
    probe = torch.zeros(1, 1, dtype=torch.long, device=device)
    shape = tuple(pred(probe, probe).shape)
    if len(shape) <= 2:
        return 1
    if len(shape) == 3:
        return shape[0]
    raise ValueError(
        f"pred: expected a (Nq, Nk) or (heads, Nq, Nk) result, got {len(shape)} dims {shape}"
    )


@dataclass(frozen=True)
class BlockMask:
    """Which (query block, key block) tiles a block-sparse call computes, and how.

    With Mb = cdiv(Nq, block_m), Nb = cdiv(Nk, block_n), T partial tiles and Hm pattern heads
    (the fields below). Hm = 1 when one pattern serves every head; Hm = H when the pattern
    differs per head (BigBird's random blocks), and then head h of the input uses lists h. The
    kernels run with BLOCK_M = block_m and BLOCK_N = block_n. Build with
    :meth:`from_predicate`; move with :meth:`to`.
    """

    q_len: int  # Nq
    kv_len: int  # Nk
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    kv_num_blocks: Tensor  # (Hm, Mb) int32: partial key blocks of each query block
    kv_indices: Tensor  # (Hm, Mb, >=1) int32: their key block indices, ascending
    kv_tile_ids: Tensor  # (Hm, Mb, >=1) int32: their element masks, rows of ``tiles``
    full_kv_num_blocks: Tensor  # (Hm, Mb) int32: full key blocks of each query block
    full_kv_indices: Tensor  # (Hm, Mb, >=1) int32: their key block indices, ascending
    q_num_blocks: Tensor  # (Hm, Nb) int32: partial query blocks of each key block (transposed)
    q_indices: Tensor  # (Hm, Nb, >=1) int32
    q_tile_ids: Tensor  # (Hm, Nb, >=1) int32
    full_q_num_blocks: Tensor  # (Hm, Nb) int32: full query blocks of each key block
    full_q_indices: Tensor  # (Hm, Nb, >=1) int32
    tiles: Tensor  # (max(T, 1), block_m, block_n) uint8: element masks of the partial tiles

    @classmethod
    def from_predicate(
        cls,
        pred: Predicate,
        q_len: int,
        kv_len: int,
        block_m: int,
        block_n: int,
        device: torch.device | str | None = None,
    ) -> BlockMask:
        """Evaluate ``pred(q_idx, kv_idx)`` densely, a chunk of query blocks at a time, and
        reduce each tile to empty / partial / full. The indices passed are within [0, Nq) and
        [0, Nk).

        ``pred`` returns (Nq', Nk') for index tensors (Nq', 1) and (1, Nk'), or (Hm, Nq', Nk')
        for a per-head pattern (such as ``patterns.block_table`` of an (Hm, ., .) table).
        Exact for any predicate (no sampling of tile corners, which is wrong for non-monotone
        patterns such as strided or random blocks). Cost: Hm * Nq * Nk predicate evaluations,
        with at most 2**26 pairs alive at once, plus block_m * block_n bytes per partial tile;
        fine up to N = 32K on a GPU (about a second at 32K per head), a few seconds at 8K on CPU.
        """
        for name, value in (("q_len", q_len), ("kv_len", kv_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name, value in (("block_m", block_m), ("block_n", block_n)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 16:
                raise ValueError(f"{name}: expected a power of two >= 16, got {value!r}")
            if value & (value - 1):
                raise ValueError(f"{name}: expected a power of two >= 16, got {value}")
        heads = _pattern_heads(pred, device)
        m_blocks = -(-q_len // block_m)
        n_blocks = -(-kv_len // block_n)
        state = torch.empty(heads, m_blocks, n_blocks, dtype=torch.int8, device=device)
        tile_id = torch.full((heads, m_blocks, n_blocks), -1, dtype=torch.int32, device=device)
        tiles: list[Tensor] = []
        n_tiles = 0
        kv_idx = torch.arange(n_blocks * block_n, device=device)
        kv_in_range = kv_idx.clamp(max=kv_len - 1)
        chunk = max(1, _CHUNK_PAIRS // (heads * block_m * n_blocks * block_n))
        for first in range(0, m_blocks, chunk):
            rows = min(chunk, m_blocks - first)
            q_idx = torch.arange(first * block_m, (first + rows) * block_m, device=device)
            # Tiles reach past Nq and Nk; the predicate only sees indices inside them (tables
            # such as BigBird's stay in range), and the pairs past them are dropped below.
            keep = pred(q_idx.clamp(max=q_len - 1)[:, None], kv_in_range[None, :])
            keep = keep.expand(heads, q_idx.numel(), kv_idx.numel())
            keep = keep & (q_idx[:, None] < q_len) & (kv_idx[None, :] < kv_len)
            # (Hm, rows*bm, Nb*bn) -> (Hm, rows, bm, Nb, bn) -> (Hm, rows, Nb, bm, bn)
            blocks = keep.view(heads, rows, block_m, n_blocks, block_n).permute(0, 1, 3, 2, 4)
            kept = blocks.sum(dim=(3, 4))  # (Hm, rows, Nb)
            chunk_state = torch.where(kept == block_m * block_n, _FULL, _PARTIAL)
            chunk_state = torch.where(kept == 0, _EMPTY, chunk_state).to(torch.int8)
            state[:, first : first + rows] = chunk_state
            partial = chunk_state == _PARTIAL
            count = int(partial.sum())
            ids = torch.arange(n_tiles, n_tiles + count, dtype=torch.int32, device=device)
            tile_id[:, first : first + rows][partial] = ids  # row-major, like blocks[partial]
            tiles.append(blocks[partial].to(torch.uint8))  # (count, bm, bn)
            n_tiles += count
        if n_tiles == 0:
            tiles.append(torch.zeros(1, block_m, block_n, dtype=torch.uint8, device=device))
        kv_num, kv_idx_list = _lists(state, _PARTIAL)
        full_kv_num, full_kv_idx = _lists(state, _FULL)
        by_key = state.transpose(1, 2)  # (Hm, Nb, Mb)
        q_num, q_idx_list = _lists(by_key, _PARTIAL)
        full_q_num, full_q_idx = _lists(by_key, _FULL)
        return cls(
            q_len=q_len,
            kv_len=kv_len,
            block_m=block_m,
            block_n=block_n,
            kv_num_blocks=kv_num,
            kv_indices=kv_idx_list,
            kv_tile_ids=_tile_ids(tile_id, kv_idx_list),
            full_kv_num_blocks=full_kv_num,
            full_kv_indices=full_kv_idx,
            q_num_blocks=q_num,
            q_indices=q_idx_list,
            q_tile_ids=_tile_ids(tile_id.transpose(1, 2), q_idx_list),
            full_q_num_blocks=full_q_num,
            full_q_indices=full_q_idx,
            tiles=torch.cat(tiles).contiguous(),
        )

    def to(self, device: torch.device | str) -> BlockMask:
        """The same lists on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **moved)

    @property
    def heads(self) -> int:
        """Hm: 1 when one pattern serves every head, else the number of heads it has."""
        return self.kv_num_blocks.shape[0]

    @property
    def num_computed_blocks(self) -> int:
        """Tiles the kernel computes (full and partial), summed over the Hm pattern heads."""
        return int(self.kv_num_blocks.sum()) + int(self.full_kv_num_blocks.sum())

    def flops(self, batch: int, heads: int, head_dim: int) -> int:
        """Forward FLOPs of a call on (batch, heads) inputs, counting every computed tile whole
        (block_m * block_n pairs), masked pairs inside partial tiles included: that is the work
        the kernel does. ``heads`` must be a multiple of Hm."""
        if heads % self.heads:
            raise ValueError(f"heads: expected a multiple of the mask's {self.heads}, got {heads}")
        pairs = self.num_computed_blocks * self.block_m * self.block_n
        return attention_flops(batch, heads // self.heads, head_dim, pairs)

    def to_dense(self) -> Tensor:
        """The (Hm, Nq, Nk) bool pattern the lists encode (for tests and pictures)."""
        heads, m_blocks = self.kv_num_blocks.shape
        n_blocks = self.q_num_blocks.shape[1]
        dense = torch.zeros(
            heads, m_blocks, self.block_m, n_blocks, self.block_n, dtype=torch.bool,
            device=self.tiles.device,
        )  # fmt: skip
        for h in range(heads):
            for i in range(m_blocks):
                full = self.full_kv_indices[h, i, : int(self.full_kv_num_blocks[h, i])]
                dense[h, i][:, full.long()] = True  # (bm, Nb, bn) view
                count = int(self.kv_num_blocks[h, i])
                partial = self.kv_indices[h, i, :count].long()
                tiles = self.tiles[self.kv_tile_ids[h, i, :count].long()]  # (count, bm, bn)
                dense[h, i][:, partial] = tiles.bool().transpose(0, 1)  # (bm, count, bn)
        # (Hm, Mb, bm, Nb, bn) -> (Hm, Mb*bm, Nb*bn), cut to (Hm, Nq, Nk)
        return dense.reshape(heads, m_blocks * self.block_m, -1)[:, : self.q_len, : self.kv_len]
