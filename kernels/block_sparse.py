"""Block-sparse fused attention in Triton, driven by a :class:`BlockMask`.

The forward and dQ kernels run one program per (query block, batch*head) over the query block's
full key blocks (no element mask) and then its partial ones (the tile's element mask); the
dK/dV kernel runs one program per (key block, batch*head) over the transposed lists. The tile
steps, online softmax and LSE conventions are those of the dense kernels (see _tiles.py), so a
block mask of a dense pattern gives the dense kernels' results.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from effattn.kernels import _runtime
from effattn.kernels._tiles import (
    attend_block,
    dkdv_block,
    dq_block,
    finish_forward,
    key_block_start,
    query_block_start,
    query_grad_rows,
    store_rows,
)
from effattn.kernels.block_mask import BlockMask
from effattn.kernels.flash import (
    LOG2E,
    fixed_launch,
    kernel_flags,
    new_like,
    padding_as_uint8,
    row_delta,
)


@triton.jit
def _tile_keep(TILES, tile_id, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) bool element mask of partial tile ``tile_id``."""
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    return tl.load(TILES + tile_id.to(tl.int64) * BLOCK_M * BLOCK_N + offs) != 0


@triton.jit
def _tile_keep_t(TILES, tile_id, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The transposed (BLOCK_N, BLOCK_M) element mask of partial tile ``tile_id``."""
    offs = tl.arange(0, BLOCK_N)[:, None] + tl.arange(0, BLOCK_M)[None, :] * BLOCK_N
    return tl.load(TILES + tile_id.to(tl.int64) * BLOCK_M * BLOCK_N + offs) != 0


@triton.jit
def _list_row(bh, mask_heads):
    """The row of this program's lists: the pattern head (bh % Hm; 0 when Hm = 1) times the
    rows per head (the grid's first dim), plus this program's block."""
    return (bh % mask_heads) * tl.num_programs(0) + tl.program_id(0)


@triton.jit
def _sparse_fwd(
    Q, K, V, KPM, OUT, LSE,
    FULL_NUM, FULL_IDX, PART_NUM, PART_IDX, PART_TILE, TILES,
    full_width, part_width, mask_heads, q_len, kv_len, heads, head_dim, qk_scale,
    HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid (Mb, B*H). The lists are the BlockMask's kv lists, (Mb,) counts and (Mb, width)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    row = _list_row(bh, mask_heads)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q, k_base, v_base, kpm_base = query_block_start(
        Q, K, V, KPM, bh, offs_m, offs_d, q_len, kv_len, heads, head_dim, UPCAST
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for i in range(0, tl.load(FULL_NUM + row)):
        start_n = tl.load(FULL_IDX + row * full_width + i) * BLOCK_N
        acc, m_i, l_i = attend_block(
            acc, m_i, l_i, q, k_base, v_base, kpm_base, start_n, offs_d, kv_len, head_dim,
            qk_scale, 0, BLOCK_N, HAS_KPM, False, UPCAST, DOT_PRECISION,
        )  # fmt: skip
    for i in range(0, tl.load(PART_NUM + row)):
        start_n = tl.load(PART_IDX + row * part_width + i) * BLOCK_N
        keep = _tile_keep(TILES, tl.load(PART_TILE + row * part_width + i), BLOCK_M, BLOCK_N)
        acc, m_i, l_i = attend_block(
            acc, m_i, l_i, q, k_base, v_base, kpm_base, start_n, offs_d, kv_len, head_dim,
            qk_scale, keep, BLOCK_N, HAS_KPM, True, UPCAST, DOT_PRECISION,
        )  # fmt: skip
    finish_forward(
        acc, m_i, l_i, OUT + bh * q_len * head_dim, LSE + bh * q_len, offs_m, q_len, offs_d,
        head_dim,
    )  # fmt: skip


@triton.jit
def _sparse_bwd_dq(
    Q, K, V, KPM, DO, LSE, DELTA, DQ,
    FULL_NUM, FULL_IDX, PART_NUM, PART_IDX, PART_TILE, TILES,
    full_width, part_width, mask_heads, q_len, kv_len, heads, head_dim, qk_scale, sm_scale,
    HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid (Mb, B*H): dQ of one query block over its key-block lists."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    row = _list_row(bh, mask_heads)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q, k_base, v_base, kpm_base = query_block_start(
        Q, K, V, KPM, bh, offs_m, offs_d, q_len, kv_len, heads, head_dim, UPCAST
    )
    do, lse, delta = query_grad_rows(DO, LSE, DELTA, bh, offs_m, offs_d, q_len, head_dim, UPCAST)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for i in range(0, tl.load(FULL_NUM + row)):
        start_n = tl.load(FULL_IDX + row * full_width + i) * BLOCK_N
        dq = dq_block(
            dq, q, do, lse, delta, k_base, v_base, kpm_base, start_n, offs_d, kv_len, head_dim,
            qk_scale, 0, BLOCK_N, HAS_KPM, False, UPCAST, DOT_PRECISION,
        )  # fmt: skip
    for i in range(0, tl.load(PART_NUM + row)):
        start_n = tl.load(PART_IDX + row * part_width + i) * BLOCK_N
        keep = _tile_keep(TILES, tl.load(PART_TILE + row * part_width + i), BLOCK_M, BLOCK_N)
        dq = dq_block(
            dq, q, do, lse, delta, k_base, v_base, kpm_base, start_n, offs_d, kv_len, head_dim,
            qk_scale, keep, BLOCK_N, HAS_KPM, True, UPCAST, DOT_PRECISION,
        )  # fmt: skip
    store_rows(DQ + bh * q_len * head_dim, dq * sm_scale, offs_m, q_len, offs_d, head_dim)


@triton.jit
def _sparse_bwd_dkdv(
    Q, K, V, KPM, DO, LSE, DELTA, DK, DV,
    FULL_NUM, FULL_IDX, PART_NUM, PART_IDX, PART_TILE, TILES,
    full_width, part_width, mask_heads, q_len, kv_len, heads, head_dim, qk_scale, sm_scale,
    HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid (Nb, B*H): dK, dV of one key block over its transposed (query-block) lists."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    row = _list_row(bh, mask_heads)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k, v, key_in, q_base, do_base, lse_base, delta_base = key_block_start(
        Q, K, V, KPM, DO, LSE, DELTA, bh, offs_n, offs_d, q_len, kv_len, heads, head_dim,
        HAS_KPM, UPCAST,
    )  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for i in range(0, tl.load(FULL_NUM + row)):
        start_m = tl.load(FULL_IDX + row * full_width + i) * BLOCK_M
        dk, dv = dkdv_block(
            dk, dv, k, v, key_in, q_base, do_base, lse_base, delta_base, start_m, offs_d, q_len,
            head_dim, qk_scale, 0, BLOCK_M, HAS_KPM, False, UPCAST, DOT_PRECISION,
        )  # fmt: skip
    for i in range(0, tl.load(PART_NUM + row)):
        start_m = tl.load(PART_IDX + row * part_width + i) * BLOCK_M
        tile = tl.load(PART_TILE + row * part_width + i)
        keep_t = _tile_keep_t(TILES, tile, BLOCK_M, BLOCK_N)
        dk, dv = dkdv_block(
            dk, dv, k, v, key_in, q_base, do_base, lse_base, delta_base, start_m, offs_d, q_len,
            head_dim, qk_scale, keep_t, BLOCK_M, HAS_KPM, True, UPCAST, DOT_PRECISION,
        )  # fmt: skip
    store_rows(DK + bh * kv_len * head_dim, dk * sm_scale, offs_n, kv_len, offs_d, head_dim)
    store_rows(DV + bh * kv_len * head_dim, dv, offs_n, kv_len, offs_d, head_dim)


def _kv_lists(mask: BlockMask) -> tuple:
    """The forward (per query block) lists, their row widths and Hm, in argument order."""
    return (
        mask.full_kv_num_blocks, mask.full_kv_indices, mask.kv_num_blocks, mask.kv_indices,
        mask.kv_tile_ids, mask.tiles, mask.full_kv_indices.shape[-1], mask.kv_indices.shape[-1],
        mask.heads,
    )  # fmt: skip


def _q_lists(mask: BlockMask) -> tuple:
    """The transposed (per key block) lists, their row widths and Hm, in argument order."""
    return (
        mask.full_q_num_blocks, mask.full_q_indices, mask.q_num_blocks, mask.q_indices,
        mask.q_tile_ids, mask.tiles, mask.full_q_indices.shape[-1], mask.q_indices.shape[-1],
        mask.heads,
    )  # fmt: skip


class BlockSparseAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the block-sparse kernels; inputs are contiguous (B, H, N, D)."""

    @staticmethod
    def forward(ctx, q, k, v, kpm, mask, has_kpm, scale):
        batch, heads, q_len, head_dim = q.shape
        kv_len = k.shape[2]
        o = new_like(q)
        lse = _runtime.new_buffer((batch * heads, q_len), torch.float32, q.device)
        flags = {"HAS_KPM": has_kpm, **kernel_flags(q)}
        tiles = (mask.block_m, mask.block_n, flags["BLOCK_D"])
        grid = (mask.kv_num_blocks.shape[1], batch * heads)
        _sparse_fwd[grid](
            q, k, v, kpm, o, lse, *_kv_lists(mask), q_len, kv_len, heads, head_dim,
            scale * LOG2E, **flags, **fixed_launch("fwd", *tiles),
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse, kpm)
        ctx.mask, ctx.has_kpm, ctx.scale = mask, has_kpm, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kpm = ctx.saved_tensors
        mask, scale = ctx.mask, ctx.scale
        do = do.contiguous()
        batch, heads, q_len, head_dim = q.shape
        kv_len = k.shape[2]
        delta = row_delta(o, do)
        dq, dk, dv = new_like(q), new_like(k), new_like(v)
        flags = {"HAS_KPM": ctx.has_kpm, **kernel_flags(q)}
        tiles = (mask.block_m, mask.block_n, flags["BLOCK_D"])
        sizes = (q_len, kv_len, heads, head_dim, scale * LOG2E, scale)
        common = (q, k, v, kpm, do, lse, delta)
        q_grid = (mask.kv_num_blocks.shape[1], batch * heads)
        _sparse_bwd_dq[q_grid](
            *common, dq, *_kv_lists(mask), *sizes, **flags, **fixed_launch("dq", *tiles)
        )
        k_grid = (mask.q_num_blocks.shape[1], batch * heads)
        _sparse_bwd_dkdv[k_grid](
            *common, dk, dv, *_q_lists(mask), *sizes, **flags, **fixed_launch("dkdv", *tiles)
        )
        return dq, dk, dv, None, None, None, None


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    *,
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Attention over the pairs of ``block_mask``: q (B, H, Nq, D), k, v (B, H, Nk, D) ->
    (B, H, Nq, D), differentiable in q, k, v.

    block_mask: built for (Nq, Nk) on q's device (``BlockMask.from_predicate``), with one
    pattern for all heads or one per head; causality, if wanted, is part of its predicate.
    key_padding_mask: (B, Nk) bool, True = the key takes part. scale: 1/sqrt(D) when None.
    Rows that keep no key give 0 (and zero gradients). float16, bfloat16 or float32, D from 1
    to 256, float32 accumulation.
    """
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask: expected a BlockMask, got {type(block_mask).__name__}")
    if (block_mask.q_len, block_mask.kv_len) != (q.shape[2], k.shape[2]):
        raise ValueError(
            f"block_mask: expected one built for (Nq, Nk) = {(q.shape[2], k.shape[2])}, "
            f"got {(block_mask.q_len, block_mask.kv_len)}"
        )
    if block_mask.heads not in (1, q.shape[1]):
        raise ValueError(
            f"block_mask: expected one pattern for every head or one per head ({q.shape[1]}), "
            f"got {block_mask.heads} pattern heads"
        )
    if block_mask.tiles.device != q.device:
        raise ValueError(
            f"block_mask: expected device {q.device} like q, got {block_mask.tiles.device} "
            "(use block_mask.to(device))"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = (t.contiguous() for t in (q, k, v))
    kpm = padding_as_uint8(key_padding_mask, q)
    has_kpm = key_padding_mask is not None
    return BlockSparseAttentionFunction.apply(q, k, v, kpm, block_mask, has_kpm, scale)
