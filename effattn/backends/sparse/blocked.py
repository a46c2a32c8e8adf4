"""Blocked sparse attention in plain torch, shared by the `local`, `strided` and `bigbird` backends.

Queries are cut into blocks of b consecutive positions. Each query block attends to its own list
of m keys: a contiguous span of keys (a sliding window; a strided view of the keys, no copy), a
gathered list of key positions (global tokens, strided summaries, BigBird's blocks; a copy), or
both concatenated. Which (query, key) pairs of a block take part is the backend's pattern
predicate evaluated on the block's (query position, key position) grid, so a key listed twice
must be listed as -1 (absent) in one of its places. The blocks run as the heads of torch's fused
attention (the tiled flash kernel on CPU, with an additive 0 / -inf mask where one is needed),
which never builds more than (b, m) scores per block: spans in one call
(:func:`blocks_attention`), gathered keys in chunks whose copies are reused from chunk to chunk
(:func:`gathered_attention`, with its own backward pass through the kernel's). Memory: O(N * m)
for the masks, a bounded buffer for gathered keys, never O(N^2).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from effattn.backends.sparse.flash import flash_attention, flash_attention_backward
from effattn.ops import cached
from effattn.patterns import Predicate


def num_blocks(length: int, block_size: int) -> int:
    """How many blocks of ``block_size`` cover ``length`` positions (the last one padded)."""
    return -(-length // block_size)


def query_blocks(q: Tensor, block_size: int) -> Tensor:
    """q: (B, H, Nq, D) -> (B, H, nb, b, D), zero-padded to nb * b positions."""
    q_len = q.shape[2]
    nb = num_blocks(q_len, block_size)
    if nb * block_size != q_len:
        q = F.pad(q, (0, 0, 0, nb * block_size - q_len))  # (B, H, Nq, D) -> (B, H, nb*b, D)
    return q.unflatten(2, (nb, block_size))  # (B, H, nb*b, D) -> (B, H, nb, b, D)


def unblock(out: Tensor, length: int) -> Tensor:
    """out: (B, H, nb, b, D) -> (B, H, length, D), dropping the padded positions."""
    return out.flatten(2, 3)[:, :, :length]  # (B, H, nb, b, D) -> (B, H, nb*b, D)[:length]


def block_positions(nb: int, block_size: int, device: torch.device) -> Tensor:
    """(nb, b) int64: the query positions of each block (the last block runs past Nq)."""
    return torch.arange(nb * block_size, device=device).view(nb, block_size)


def span_positions(
    nb: int, block_size: int, left: int, right: int, offset: int, device: torch.device
) -> Tensor:
    """(nb, L) int64: the keys of a sliding window per query block. Query block t holds queries
    t*b .. t*b+b-1; its span is the keys ``t*b + offset - left .. t*b + b - 1 + offset + right``
    (L = b + left + right of them; positions outside [0, Nk) are to be masked out)."""
    span = torch.arange(-left, block_size + right, device=device) + offset  # (L,)
    return span + block_size * torch.arange(nb, device=device)[:, None]  # (nb, L)


def span_view(x: Tensor, nb: int, block_size: int, start: int, length: int) -> Tensor:
    """The spans of :func:`span_positions` (block t: keys ``start + t*b`` .. ``+ length - 1``)
    as a strided view of x: (B, H, Nk, D) -> (B, H, nb, L, D), L = ``length``. No copy when
    every position lies in [0, Nk); otherwise the keys the spans cover are copied once,
    zero-padded at the ends (mask those out). Takes the bounds as ints, not the positions
    tensor, so that no device sync reads them back.
    (Views of the inner blocks plus copies of the end blocks would save the copy but need
    several fused calls and a join of their outputs: slower here, most of all under load.)"""
    kv_len = x.shape[2]
    end = start + (nb - 1) * block_size + length
    covered = x[:, :, max(start, 0) : min(end, kv_len)]  # (B, H, <= end - start, D)
    if start < 0 or end > kv_len:
        pads = (0, 0, max(-start, 0), max(end - kv_len, 0))
        covered = F.pad(covered, pads)  # -> (B, H, end - start, D)
    windows = covered.unfold(2, length, block_size)  # (B, H, nb, D, L)
    return windows.transpose(-1, -2)  # (B, H, nb, D, L) -> (B, H, nb, L, D)


def gather_keys(x: Tensor, positions: Tensor) -> Tensor:
    """Keys at given positions, per query block (a copy). x: (B, H, Nk, D); positions:
    (nb, m) or (H, nb, m) int64; a position outside [0, Nk) (-1 = absent) gathers a clamped
    key, to be masked out.
    Returns (B, H, nb, m, D): a transposed view of a copy laid out (B, H, m, nb, D), the layout
    in which torch's CPU attention backward returns the gradient of keys when the blocks are its
    heads, so that the gather's backward (an index_add) reads that gradient as it is (an
    advanced-indexing gather's backward is an index_put with accumulation: several times
    slower, after a zero-filled copy of the gradient)."""
    batch, heads, kv_len, dim = x.shape
    nb, m = positions.shape[-2:]
    rows = _gather_rows(positions, batch, heads, kv_len)  # (B*H*m*nb,)
    out = x.reshape(-1, dim).index_select(0, rows)  # (B*H*Nk, D) -> (B*H*m*nb, D)
    return out.view(batch, heads, m, nb, dim).transpose(2, 3)  # -> (B, H, nb, m, D)


def _gather_rows(positions: Tensor, batch: int, heads: int, kv_len: int) -> Tensor:
    """(B*H*m*nb,) int64: the rows of x viewed (B*H*Nk, D) that :func:`gather_keys` takes, in
    its (B, H, m, nb) order; positions (nb, m) or (H, nb, m), clamped to [0, Nk)."""
    idx = positions.clamp(0, kv_len - 1).transpose(-1, -2)  # (H or 1, m, nb) or (m, nb)
    base = torch.arange(batch * heads, device=positions.device).view(batch, heads, 1, 1)
    return (base * kv_len + idx).flatten()  # (B, H, m, nb) -> (B*H*m*nb,)


CHUNK_PAIRS = 2**20  # (query, key) pairs of a mask evaluated at once (bounds temporaries)
GATHER_CHUNK_BYTES = 2**23  # gathered keys per fused call (8 MiB; see gathered_attention)


def _bias(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """bool -> additive mask: 0 where True, -inf where False, in ``dtype`` (one pass)."""
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    return torch.where(keep, zero, zero - float("inf"))


def block_bias(
    pred: Predicate | None,
    q_pos: Tensor | None,
    k_pos: Tensor,
    kv_len: int,
    key_padding_mask: Tensor | None,
    dtype: torch.dtype,
    cache_key: Hashable | None = None,
) -> Tensor:
    """The additive mask of the blocks: 0 where the pair takes part, -inf elsewhere.

    q_pos: (nb, b) query positions (unused when pred is None); k_pos: (nb, m) or (H, nb, m)
    key positions, -1 = absent. A pair takes part iff ``pred(i, j)``, key j exists
    (0 <= j < Nk) and is not padding; ``pred=None`` keeps every listed key (a block-level
    pattern: the mask then has b = 1). The part without key padding is cached under
    ``cache_key`` (see :func:`cached`). Returns (B or 1, H or 1, nb, b or 1, m) in ``dtype``.
    """
    k_pos = k_pos if k_pos.dim() == 3 else k_pos[None]  # (nb, m) -> (1, nb, m)

    def build() -> Tensor:
        exists = ((k_pos >= 0) & (k_pos < kv_len))[:, :, None, :]  # (H or 1, nb, 1, m)
        if pred is None or q_pos is None:
            return _bias(exists[None], dtype)  # -> (1, H or 1, nb, 1, m)
        heads, nb, m = k_pos.shape
        bias = torch.empty(1, heads, nb, q_pos.shape[1], m, dtype=dtype, device=k_pos.device)
        step = max(1, CHUNK_PAIRS // (heads * q_pos.shape[1] * m))  # bounds the int64 grids
        for t in range(0, nb, step):
            rows = q_pos[None, t : t + step, :, None]  # (1, nb', b, 1)
            keep = pred(rows, k_pos[:, t : t + step, None, :]) & exists[:, t : t + step]
            bias[0, :, t : t + step] = _bias(keep, dtype)  # (H or 1, nb', b, m)
        return bias

    key = None if cache_key is None else (cache_key, "block_bias", dtype, str(k_pos.device))
    bias = cached(key, build)
    if key_padding_mask is not None:
        bias = bias + padding_bias(key_padding_mask, k_pos, kv_len, dtype)
    return bias


def padding_bias(
    key_padding_mask: Tensor, k_pos: Tensor, kv_len: int, dtype: torch.dtype
) -> Tensor:
    """Additive mask (B, H or 1, nb, 1, m) of key padding at positions k_pos (nb, m) or
    (H, nb, m); key_padding_mask: (B, Nk) bool, True = the key takes part."""
    k_pos = k_pos if k_pos.dim() == 3 else k_pos[None]  # (nb, m) -> (1, nb, m)
    padding = key_padding_mask[:, k_pos.clamp(0, kv_len - 1)]  # (B, H or 1, nb, m)
    return _bias(padding[:, :, :, None, :], dtype)  # -> (B, H or 1, nb, 1, m)


def blocks_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
    """Softmax attention of every query block over its own keys.

    q: (B, H, nb, b, D); k, v: (B, H, nb, m, D) (views allowed); bias: (B or 1, H or 1, nb,
    b or 1, m) additive (0 / -inf). Returns (B, H, nb, b, D); a row that keeps no key gives 0.
    Runs torch's fused attention with the 4-D layout (B*H, nb, b, D), so that the CPU takes
    its tiled flash kernel (a 3-D or 5-D mask would send it to the O(b*m) per-block math path,
    which is fine for float64 tests only): one call when the mask folds into that layout
    without growing by H or more (a view, or a copy of a mask with b = 1), else one call per
    batch element. B and H are folded by views, never by selecting q[i] (whose backward
    zero-fills a gradient of the whole input per element).
    """
    batch, heads = q.shape[:2]
    bias_batch, bias_heads, _, bias_rows, _ = bias.shape
    if bias_batch * bias_heads == 1:
        mask = bias[0]  # (1, nb, b or 1, m): broadcast over B*H
    elif batch == 1 or bias_batch * bias_heads == batch * heads or bias_rows == 1:
        mask = bias.expand(batch, heads, -1, -1, -1).reshape(batch * heads, *bias.shape[2:])
    else:  # (B, 1, nb, b, m) masks with b > 1 (key padding over a position-level pattern)
        biases = bias.expand(batch, -1, -1, -1, -1).unbind(0)  # B x (H or 1, nb, b, m)
        parts = zip(q.unbind(0), k.unbind(0), v.unbind(0), biases, strict=True)
        outs = [blocks_attention(*(x[None] for x in part), scale)[0] for part in parts]
        return torch.stack(outs)  # B x (H, nb, b, D) -> (B, H, nb, b, D)
    out = F.scaled_dot_product_attention(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), attn_mask=mask, scale=scale
    )  # (B*H, nb, b, D)
    return out.unflatten(0, (batch, heads))  # (B*H, nb, b, D) -> (B, H, nb, b, D)


def gathered_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    positions: Tensor,
    bias: Tensor,
    scale: float,
    key_block: int = 1,
) -> Tensor:
    """Softmax attention of every query block over keys gathered at ``positions``.

    q: (B, H, nb, b, D); k, v: (B, H, Nk, D); positions: (nb, m) or (H, nb, m) key positions
    per query block, or with ``key_block`` > 1 indices of blocks of ``key_block`` consecutive
    keys (then Nk must be a multiple of key_block; each index stands for key_block keys);
    positions out of range gather a clamped key, to be masked. bias: (B or 1, H or 1, nb,
    b or 1, m * key_block) additive (0 / -inf), one column per gathered key. Returns
    (B, H, nb, b, D); a row that keeps no key gives 0.

    The query blocks run in chunks whose gathered keys take at most ``GATHER_CHUNK_BYTES``:
    each chunk's keys and values are gathered (index_select, rows of key_block keys) into two
    buffers made once per call and reused by every chunk, then :func:`flash_attention` runs
    with the blocks as its heads, without a mask where the chunk's bias is all 0. Gathering
    all blocks at once would make copies of m / b times the size of k and v, fresh memory from
    the kernel (page-faulted and zeroed) on every call: that cost more than the attention
    itself. The backward pass gathers each chunk again (nothing gathered is saved) and adds
    the key and value gradients into (B*H*Nk, D) buffers with index_add_.
    """
    if k.shape[2] % key_block:
        raise ValueError(
            f"key_block: expected a divisor of Nk={k.shape[2]} (pad the keys), got {key_block}"
        )
    k, v = k.contiguous(), v.contiguous()  # (B, H, Nk, D), gathered from as rows (no-op here)
    masked = bias.flatten(3).ne(0).any(-1).flatten(0, 1).any(0).tolist()  # per query block
    return _GatheredAttention.apply(q, k, v, positions, bias, masked, scale, key_block)


class _GatheredAttention(torch.autograd.Function):
    """:func:`gathered_attention` with its backward pass (see there)."""

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        positions: Tensor,
        bias: Tensor,
        masked: list[bool],
        scale: float,
        key_block: int,
    ) -> Tensor:
        out = q.new_empty(q.shape)  # (B, H, nb, b, D)
        lse = q.new_empty(q.shape[:-1], dtype=torch.promote_types(q.dtype, torch.float32))
        for chunk in _chunks(q, k, positions, bias, masked, key_block):
            q_c, k_c, v_c = chunk.gather(q, k, v)
            o_c, lse_c = flash_attention(q_c, k_c, v_c, chunk.mask, scale)  # (B'H, nb', b, ..)
            chunk.rows_of(out).copy_(o_c.unflatten(0, chunk.shape(q)[:2]))
            chunk.rows_of(lse).copy_(lse_c.unflatten(0, chunk.shape(lse)[:2]))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = positions, bias, masked, scale, key_block
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        positions, bias, masked, scale, key_block = ctx.args
        dim = k.shape[-1]
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq = q.new_empty(q.shape) if need_q else None  # every chunk writes its rows
        dk, dv = (torch.zeros_like(k) if n else None for n in (need_k, need_v))
        for chunk in _chunks(q, k, positions, bias, masked, key_block):
            q_c, k_c, v_c = chunk.gather(q, k, v)
            o_c, g_c = (chunk.rows_of(x).flatten(0, 1) for x in (out, grad))  # (B'H, nb', b, D)
            lse_c = chunk.rows_of(lse).flatten(0, 1)  # (B'H, nb', b)
            grads = flash_attention_backward(g_c, q_c, k_c, v_c, o_c, lse_c, chunk.mask, scale)
            if dq is not None:
                chunk.rows_of(dq).copy_(grads[0].unflatten(0, chunk.shape(q)[:2]))
            if dk is None and dv is None:
                continue
            # The kernel lays key gradients out (B'H, m, nb', D) (its heads innermost): added
            # in that order, by the rows of each key, they need no copy.
            rows = chunk.key_rows(*k.shape[1:3])  # (B'*H*m*nb',) in (B', H, m, nb') order
            for acc, g in ((dk, grads[1]), (dv, grads[2])):
                if acc is not None:  # (B'H, nb', m, D) -> (B'H, m, nb', D)
                    acc.view(-1, dim).index_add_(0, rows, g.transpose(1, 2).reshape(-1, dim))
        return dq, dk, dv, None, None, None, None, None


@dataclass(frozen=True)
class _Chunk:
    """Query blocks ``blocks`` of batch elements ``batch`` of :func:`gathered_attention`: what
    they gather and their mask."""

    batch: slice  # batch elements
    blocks: slice  # query blocks
    first_head: int  # B' * H rows of (B*H): the first one
    index: Tensor  # (nb', m) or (H, nb', m) clamped positions (of blocks of key_block keys)
    key_block: int  # keys per position
    mask: Tensor | None  # additive, broadcasting against (B'*H, nb', b, m*key_block); None: 0
    buffers: tuple[Tensor, Tensor]  # flat buffers for the gathered keys and values

    def rows_of(self, x: Tensor) -> Tensor:
        """x: (B, H, nb, ...) -> the chunk's (B', H, nb', ...) view."""
        return x[self.batch, :, self.blocks]

    def shape(self, x: Tensor) -> torch.Size:
        return self.rows_of(x).shape

    def _base(self, heads: int, rows_per_head: int) -> Tensor:
        """(B', H, 1, 1): the first row of each (batch, head) in rows of rows_per_head."""
        count = (self.batch.stop - self.batch.start) * heads
        base = torch.arange(self.first_head, self.first_head + count, device=self.index.device)
        return base.view(-1, heads, 1, 1) * rows_per_head

    def take(self, x: Tensor, rows: Tensor, buffer: int) -> Tensor:
        """x[rows] (x: (R, W)) into the chunk's buffer: (len(rows), W)."""
        out = self.buffers[buffer][: rows.numel() * x.shape[1]].view(rows.numel(), x.shape[1])
        return torch.index_select(x, 0, rows, out=out)

    def gather(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q's rows (B'*H, nb', b, D) and the gathered keys and values (B'*H, nb', m', D),
        contiguous, gathered in rows of key_block keys."""
        batch, heads, kv_len, dim = k.shape
        q_c = self.rows_of(q).flatten(0, 1)  # (B', H, nb', b, D) -> (B'*H, nb', b, D)
        per_head = kv_len // self.key_block
        index = self.index if self.index.dim() == 3 else self.index[None]  # (H or 1, nb', m)
        rows = (self._base(heads, per_head) + index).flatten()  # (B', H, nb', m) order
        shape = (*q_c.shape[:2], -1, dim)  # (B'*H, nb', m', D)
        k_c, v_c = (
            self.take(x.view(batch * heads * per_head, -1), rows, i).view(shape)
            for i, x in enumerate((k, v))
        )
        return q_c, k_c, v_c

    def key_rows(self, heads: int, kv_len: int) -> Tensor:
        """(B'*H*m'*nb',) the keys' rows of k viewed (B*H*Nk, D), in (B', H, m', nb') order."""
        keys = self.index[..., None] * self.key_block + torch.arange(
            self.key_block, device=self.index.device
        )  # (.., nb', m, key_block)
        keys = keys.flatten(-2).transpose(-1, -2)  # (H, m', nb') or (m', nb')
        return (self._base(heads, kv_len) + keys).flatten()


def _chunks(
    q: Tensor, k: Tensor, positions: Tensor, bias: Tensor, masked: list[bool], key_block: int
) -> Iterator[_Chunk]:
    """The chunks of :func:`gathered_attention`: query blocks whose gathered keys and values
    take at most ``GATHER_CHUNK_BYTES`` each (at least one block), over all batch elements at
    once unless the mask would grow by H to fold ((B, 1, nb, b > 1, m): then per element).
    ``masked[t]``: whether query block t's bias is not all 0 (else its chunk runs unmasked)."""
    batch, heads, nb, _, dim = q.shape
    m = positions.shape[-1]
    bias_batch, bias_heads, _, bias_rows, _ = bias.shape
    full = bias_batch * bias_heads
    split = batch > 1 and bias_rows > 1 and full not in (1, batch * heads)
    batches = [slice(i, i + 1) for i in range(batch)] if split else [slice(0, batch)]
    per_block = (1 if split else batch) * heads * m * key_block * dim  # gathered values
    step = max(1, min(nb, GATHER_CHUNK_BYTES // (per_block * k.element_size())))
    buffers = (k.new_empty(step * per_block), k.new_empty(step * per_block))
    index = positions.clamp(0, k.shape[2] // key_block - 1)  # (nb, m) or (H, nb, m)
    for b_slice in batches:
        for t in range(0, nb, step):
            blocks = slice(t, t + step)
            part = bias[b_slice if bias_batch > 1 else slice(0, 1), :, blocks]
            mask = None
            if any(masked[blocks]):
                mask = _fold_mask(part, b_slice.stop - b_slice.start, heads)
            first = b_slice.start * heads
            yield _Chunk(b_slice, blocks, first, index[..., blocks, :], key_block, mask, buffers)


def _fold_mask(bias: Tensor, batch: int, heads: int) -> Tensor:
    """(B' or 1, H or 1, nb', b or 1, m) -> a 4-D mask broadcasting against (B'*H, nb', b, m):
    a view, or a copy (:func:`_chunks` splits the batch where that copy would grow by H)."""
    if bias.shape[0] * bias.shape[1] == 1:
        return bias[0]  # (1, nb', b or 1, m)
    return bias.expand(batch, heads, -1, -1, -1).flatten(0, 1)  # (B'*H, nb', b or 1, m)


def rows_attention(
    q_rows: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float
) -> Tensor:
    """Dense attention of a few query rows (global tokens) over all keys.

    q_rows: (B, H, R, D); k, v: (B, H, Nk, D); bias: (B or 1, H or 1, R or 1, Nk) additive, or
    None (every key).
    Returns (B, H, R, D): O(R * Nk) memory. One call of torch's fused attention in its own
    (B, H, L, D) layout; a row that keeps no key gives 0.
    """
    return F.scaled_dot_product_attention(q_rows, k, v, attn_mask=bias, scale=scale)


def rows_bias(
    pred: Predicate | None,
    rows: Tensor,
    kv_len: int,
    key_padding_mask: Tensor | None,
    dtype: torch.dtype,
    cache_key: Hashable | None = None,
) -> Tensor:
    """Additive mask (B or 1, H or 1, R or 1, Nk) of query positions ``rows`` (R,) over all
    keys; ``pred=None`` keeps every key that is not padding."""
    keys = torch.arange(kv_len, device=rows.device)
    key = None if cache_key is None else (cache_key, "rows", len(rows))
    bias = block_bias(pred, rows[None], keys[None], kv_len, key_padding_mask, dtype, key)
    return bias[:, :, 0]  # (B or 1, H or 1, 1, R, Nk) -> (B or 1, H or 1, R, Nk)


def without(positions: Tensor, span_positions: Tensor) -> Tensor:
    """Extra key positions (m,) per query block, -1 where the block's span already holds them.

    positions: (m,) int64; span_positions: (nb, L) contiguous ranges (:func:`span_positions`).
    Returns (nb, m).
    """
    start, end = span_positions[:, :1], span_positions[:, -1:]  # (nb, 1) each
    inside = (positions[None, :] >= start) & (positions[None, :] <= end)  # (nb, m)
    return torch.where(inside, -1, positions)


def banded_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pred: Predicate,
    block_size: int,
    left: int,
    right: int,
    extra_keys: Tensor | None,
    global_rows: int,
    key_padding_mask: Tensor | None,
    scale: float,
    cache_key: Hashable | None = None,
) -> Tensor:
    """Sliding-window attention plus keys every query may see, exact over ``pred``.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D). Query i's diagonal key is ``i + Nk - Nq``; each
    query block scores the span ``[-left, +right]`` around its diagonal keys (a strided view of
    k and v, padded at the ends) and, when
    ``extra_keys`` (m,) is given (global tokens, strided summaries), those keys too (then the
    keys are gathered: a copy), each pair once. ``pred`` must keep nothing outside these keys
    except for the first ``global_rows`` queries, which are recomputed densely over all keys.
    ``cache_key`` identifies (pred, block_size, left, right, extra_keys) for the mask cache.
    Returns (B, H, Nq, D).
    """
    _, _, q_len, _ = q.shape
    kv_len = k.shape[2]
    left, right = min(left, kv_len), min(right, max(q_len - 1, 0))  # wider spans add nothing
    nb = num_blocks(q_len, block_size)
    span_pos = span_positions(nb, block_size, left, right, kv_len - q_len, q.device)  # (nb, L)
    qb = query_blocks(q, block_size)  # (B, H, nb, b, D)
    q_pos = block_positions(nb, block_size, q.device)
    if extra_keys is not None and extra_keys.numel() > 0:
        extra = without(extra_keys, span_pos)  # (nb, m), -1 where the span holds the key
        k_pos = torch.cat([extra, span_pos], dim=1)  # (nb, m) + (nb, L) -> (nb, m + L)
        bias = block_bias(pred, q_pos, k_pos, kv_len, key_padding_mask, q.dtype, cache_key)
        out = gathered_attention(qb, k, v, k_pos, bias, scale)  # (B, H, nb, b, D)
    else:
        # One view of k and v for every block (a copy padded by the window only at the ends):
        # one fused call, no gathers and no joining of outputs.
        start, length = kv_len - q_len - left, block_size + left + right
        k_keys = span_view(k, nb, block_size, start, length)  # (B, H, nb, L, D)
        v_keys = span_view(v, nb, block_size, start, length)
        bias = block_bias(pred, q_pos, span_pos, kv_len, key_padding_mask, q.dtype, cache_key)
        out = blocks_attention(qb, k_keys, v_keys, bias, scale)  # (B, H, nb, b, D)
    out = unblock(out, q_len)  # (B, H, nb, b, D) -> (B, H, Nq, D)
    rows = min(global_rows, q_len)
    if rows > 0:
        row_pos = torch.arange(rows, device=q.device)
        row_bias = rows_bias(pred, row_pos, kv_len, key_padding_mask, q.dtype, cache_key)
        dense = rows_attention(q[:, :, :rows], k, v, row_bias, scale)  # (B, H, R, D)
        out = torch.cat([dense, out[:, :, rows:]], dim=2)  # (B, H, R + Nq - R, D)
    return out
