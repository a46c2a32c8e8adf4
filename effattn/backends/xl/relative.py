"""The Transformer-XL core (Dai et al. 2019): sinusoidal relative encodings, the shift trick, and
relative attention over segments with memory.

Scores of query i (absolute position p_i) and key j, with distance d = p_i - j >= 0::

    s_ij = scale * [ (q_i + u) . k_j  +  (q_i + v) . r_d ]
                     (a) + (c)            (b) + (d)

(a) content, (b) content-position, (c) global content bias, (d) global position bias; ``r_d`` is
the per-head projection of the sinusoidal encoding of d, ``u`` and ``v`` are per-head (H, D)
vectors. The position terms (b) + (d) are computed for a block of c queries against the c + W - 1
distances the block needs and turned into a (c, W) score block by :func:`rel_shift` (the shift
trick, Dai et al., appendix B), so their cost is that of the content term, never Nq x Nk x D.

Two geometries, both bottom-right aligned (the last query is the last key):

* :func:`segment_attention`: the keys form segments of ``segment_len`` (absolute positions
  0, S, 2S, ...); a query in segment s keeps keys ``s*S - mem_len <= j <= p_i``. The segments are
  computed together, one (S, mem_len + S) block each: O(N * (S + M)) time and memory.
* :func:`prefix_attention`: every query keeps every key up to itself (one Transformer-XL segment
  over [memory; segment]); queries are processed in blocks so that memory stays O(block * Nk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from effattn.patterns import Predicate, and_
from effattn.patterns import causal as causal_predicate

# Elements of one (B, H, block, W) score block in prefix_attention: 2**23 floats = 32 MiB in fp32.
_BLOCK_ELEMENTS = 2**23


def sinusoid_encoding(distances: Tensor, dim: int) -> Tensor:
    """The sinusoidal encodings of ``distances`` (P,) -> (P, dim), as in Vaswani et al. and
    Transformer-XL: ``[sin(d * f_0), ..., sin(d * f_{dim/2-1}), cos(d * f_0), ...]`` with
    ``f_i = 10000 ** (-2i / dim)``. Computed in float64; ``dim`` must be even."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"dim: expected a positive even number, got {dim}")
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    angles = distances.to(torch.float64)[:, None] * inv_freq[None, :]  # (P, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def descending_distances(d_hi: int, count: int, device: torch.device | str | None = None) -> Tensor:
    """(count,) int64: d_hi, d_hi - 1, ..., d_hi - count + 1 (negative ones are masked later)."""
    return torch.arange(d_hi, d_hi - count, -1, dtype=torch.int64, device=device)


def rel_shift(scores: Tensor, key_len: int) -> Tensor:
    """The shift trick: position scores against distances -> position scores against keys.

    scores: (..., c, c + W - 1) where column e holds the score of query a against the distance
    ``d_top - e`` (descending). Returns (..., c, W) with ``out[..., a, t] = scores[..., a,
    c - 1 - a + t]``, i.e. the score of query a against the distance ``d_top - (c - 1) + a - t``:
    row a is row a of the input shifted left by c - 1 - a. The result is a strided view (no copy)
    of the contiguous input, the pad-and-reshape of Dai et al. (appendix B) without the pad::

        c=3, W=3     input columns e: 0 1 2 3 4      output columns t: 0 1 2
        row a=0 (shift 2)                 . . x y z         ->           x y z
        row a=1 (shift 1)                 . x y z .         ->           x y z
        row a=2 (shift 0)                 x y z . .         ->           x y z
    """
    *lead, c, width = scores.shape
    if width != c + key_len - 1:
        raise ValueError(
            f"scores: expected c + key_len - 1 = {c + key_len - 1} columns for c={c} queries and "
            f"key_len={key_len}, got {width}"
        )
    scores = scores.contiguous()
    strides = scores.stride()
    # (..., c, c + W - 1) -> (..., c, W): row stride width - 1 moves one column left per row.
    return scores.as_strided(
        (*lead, c, key_len), (*strides[:-2], width - 1, 1), scores.storage_offset() + c - 1
    )


@dataclass(frozen=True)
class RelativePosition:
    """The relative-position parameters of one call, per head.

    pos_key: (H, P, D) ``r_d`` for the descending distances ``d_hi, d_hi - 1, ..., d_hi - P + 1``.
    d_hi:    the largest distance in ``pos_key``.
    u:       (H, D) global content bias (term c), or None for 0.
    v:       (H, D) global position bias (term d).
    scale:   the factor of terms (b), (c), (d): Transformer-XL's 1/sqrt(D).
    content_position: whether term (b) ``q . r`` is computed; False keeps only term (d), a bias
             that depends on the distance alone (not on q or k).
    query_proj: None, or (H, D, F): then ``pos_key`` is (1, P, F), the unprojected encodings
             R_d shared by the heads, and ``r_d = query_proj[h] R_d``; the position terms are
             computed as ``((q + v) @ query_proj[h]) . R_d``, cheaper than projecting every
             R_d when few queries meet many distances (decoding: c * H < F).
    """

    pos_key: Tensor
    d_hi: int
    u: Tensor | None
    v: Tensor
    scale: float
    content_position: bool = True
    query_proj: Tensor | None = None

    def _to_key_space(self, x: Tensor) -> Tensor:
        """(H, ..., D) or (B, H, ..., D) -> the same with the last dim F when query_proj is set."""
        if self.query_proj is None:
            return x
        proj = self.query_proj.to(x.dtype)  # (H, D, F)
        return x @ proj.reshape(proj.shape[0], *([1] * (x.dim() - 4)), *proj.shape[1:])

    def position_scores(self, q: Tensor, dist0: int, key_len: int) -> Tensor:
        """Scaled terms (b) + (d) of a block: q (B, H, [n,] c, D) whose query a and key t are
        ``dist0 + a - t`` apart -> (B, H, [n,] c, W) with W = key_len; without term (b) the
        result is (H, c, W) (it does not depend on q)."""
        c = q.shape[-2]
        first = self.d_hi - (dist0 + c - 1)  # row of the largest distance the block needs
        count = c + key_len - 1
        if first < 0 or first + count > self.pos_key.shape[1]:
            raise ValueError(
                f"pos_key: expected distances {dist0 + c - 1} down to {dist0 - key_len + 1}, "
                f"got {self.d_hi} down to {self.d_hi - self.pos_key.shape[1] + 1}"
            )
        r = self.pos_key[:, first : first + count]  # (H or 1, c + W - 1, D or F)
        if not self.content_position:
            g = self._to_key_space(self.v[:, None, :]) @ r.transpose(-2, -1)  # (H, 1, c + W - 1)
            g = g * self.scale
            g = g.to(q.dtype).expand(-1, c, -1)  # (H, 1, c + W - 1) -> (H, c, c + W - 1)
            return rel_shift(g, key_len)  # (H, c, c + W - 1) -> (H, c, W)
        qv = q + self.v.to(q.dtype)[:, None, :].reshape(
            self.v.shape[0], *([1] * (q.dim() - 3)), self.v.shape[1]
        )  # (H, D) -> (H, [1,] 1, D), broadcast over B and the blocks
        qv = self._to_key_space(qv)  # (B, H, [n,] c, D or F)
        if q.dim() == 5:
            r = r[:, None]  # (H, P, D) -> (H, 1, P, D): the same distances for every block
        # (B, H, [n,] c, D or F) @ (H or 1, [1,] D or F, c + W - 1) -> (B, H, [n,] c, c + W - 1)
        scores = (qv * self.scale) @ r.to(q.dtype).transpose(-2, -1)
        return rel_shift(scores, key_len)

    def content_bias(self, k: Tensor) -> Tensor | None:
        """Scaled term (c) ``u . k_j``: k (B, H, [n,] W, D) -> (B, H, [n,] 1, W); None if no u."""
        if self.u is None:
            return None
        heads, dim = self.u.shape
        u = self.u.to(k.dtype).reshape(heads, *([1] * (k.dim() - 4)), dim, 1)  # (H, [1,] D, 1)
        return (k @ u).transpose(-2, -1) * self.scale  # (B, H, [n,] W, 1) -> (B, H, [n,] 1, W)

    def with_content_bias(self, q: Tensor) -> Tensor:
        """q + u (term c folded into the content query, for a call whose content scale is
        ``self.scale``): (B, H, [n,] c, D)."""
        if self.u is None:
            return q
        u = self.u.to(q.dtype).reshape(self.u.shape[0], *([1] * (q.dim() - 3)), self.u.shape[1])
        return q + u


def segment_memory(segment_len: int, mem_len: int, q_len: int, kv_len: int) -> Predicate:
    """Keys no older than ``mem_len`` positions before the query's segment start (causality is
    separate; see :func:`segment_pattern`). Query i sits at p = i + kv_len - q_len in segment
    floor(p / segment_len) and keeps key j iff ``j >= floor(p / S) * S - mem_len``."""
    offset = kv_len - q_len

    def pred(q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        pos = q_idx + offset
        start = torch.div(pos, segment_len, rounding_mode="floor") * segment_len
        return kv_idx >= start - mem_len

    pred.__name__ = pred.__qualname__ = f"segment_{segment_len}_memory_{mem_len}"
    return pred


def segment_pattern(segment_len: int, mem_len: int, q_len: int, kv_len: int) -> Predicate:
    """Transformer-XL's banded-causal pattern: each query keeps [memory; its segment so far].

    segment_len=2, mem_len=1, N=6 (segments {0,1}, {2,3}, {4,5})::

            k: 0 1 2 3 4 5
        q0     1 . . . . .
        q1     1 1 . . . .
        q2     . 1 1 . . .      memory = key 1, then the segment
        q3     . 1 1 1 . .
        q4     . . . 1 1 .
        q5     . . . 1 1 1
    """
    return and_(
        causal_predicate(q_len, kv_len), segment_memory(segment_len, mem_len, q_len, kv_len)
    )


def segment_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    segment_len: int,
    mem_len: int,
    scale: float,
    rel: RelativePosition | None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Segment recurrence with memory, all segments at once. q: (B, H, Nq, D), k, v: (B, H, Nk, D)
    -> (B, H, Nq, D); the pattern is :func:`segment_pattern`, key_padding_mask (B, Nk) bool True =
    takes part. ``rel`` must hold distances ``mem_len + segment_len - 1`` down to
    ``-(segment_len - 1)`` (see :func:`segment_distances`). ``scale`` multiplies the content term
    (a); the relative terms use ``rel.scale``. Rows that keep no key give zeros."""
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    s, m = segment_len, mem_len
    first_pos = kv_len - q_len  # absolute position of query 0 (negative: it sees no key)
    if first_pos < 0:
        seen = segment_attention(
            q[:, :, -first_pos:],
            k,
            v,
            segment_len=s,
            mem_len=m,
            scale=scale,
            rel=rel,
            key_padding_mask=key_padding_mask,
        )
        return F.pad(seen, (0, 0, -first_pos, 0))  # queries before key 0 keep nothing: zeros
    grid_start = (first_pos // s) * s  # absolute start of the first segment holding a query
    n_seg = -(-kv_len // s) - first_pos // s
    grid_end = grid_start + n_seg * s
    width = m + s

    # Segments are laid out segment-major as a batch of n_seg * B 4-D attention problems (the
    # layout of torch's fused CPU kernel), so that the first segments are the first rows.
    # Queries: (B, H, Nq, D) -> (B, H, n_seg*S, D) -> (B, H, n_seg, S, D) -> (n_seg*B, H, S, D).
    q_grid = F.pad(q, (0, 0, first_pos - grid_start, grid_end - kv_len))
    q_seg = q_grid.view(batch, heads, n_seg, s, dim).permute(2, 0, 1, 3, 4)
    q_seg = q_seg.reshape(n_seg * batch, heads, s, dim)
    # Keys from grid_start - M to grid_end, zero-padded where they do not exist.
    key_from = grid_start - m
    left = max(0, -key_from)
    pad_keys = (0, 0, left, grid_end - kv_len)

    def windows(x: Tensor) -> Tensor:
        x = F.pad(x[:, :, max(0, key_from) :], pad_keys)  # (B, H, M + n_seg*S, D)
        # overlapping windows: -> (B, H, n_seg, D, M + S) -> (n_seg, B, H, M + S, D)
        x = x.unfold(2, width, s).permute(2, 0, 1, 4, 3)
        return x.reshape(n_seg * batch, heads, width, dim)  # -> (n_seg*B, H, M + S, D)

    k_seg, v_seg = windows(k), windows(v)

    # Query a keeps window key t iff t <= M + a (causal), the key exists (absolute position
    # >= 0) and takes part (key padding).
    a = torch.arange(s, device=q.device)[:, None]
    t = torch.arange(width, device=q.device)[None, :]
    causal = (t <= m + a)[None, None]  # (1, 1, S, M + S)
    key_pos = torch.arange(key_from, grid_end, device=q.device)  # (M + n_seg*S,)
    exists = (key_pos >= 0)[None, :].expand(batch, -1)  # (B, M + n_seg*S)
    if key_padding_mask is not None:
        exists = exists & F.pad(key_padding_mask[:, max(0, key_from) :], (left, grid_end - kv_len))
        n_head = n_seg  # every segment has its own mask
    else:
        # Only the first segments reach before key 0; the others share the causal mask.
        n_head = min(n_seg, max(0, -(-(m - grid_start) // s)))
    # (B, M + n_seg*S) -> (B, n_seg, M + S) -> (n_seg, B, M + S) -> (n_head*B, 1, 1, M + S)
    exists = exists.unfold(1, width, s).transpose(0, 1)[:n_head]
    head_keep = causal & exists.reshape(n_head * batch, 1, 1, width)

    split, rows = n_head * batch, n_seg * batch
    parts = [
        _segment_blocks(q_seg[lo:hi], k_seg[lo:hi], v_seg[lo:hi], keep, rel, m, scale)
        for lo, hi, keep in ((0, split, head_keep), (split, rows, causal))
        if hi > lo
    ]
    out = torch.cat(parts) if len(parts) > 1 else parts[0]  # (n_seg*B, H, S, D)
    # (n_seg*B, H, S, D) -> (n_seg, B, H, S, D) -> (B, H, n_seg, S, D) -> (B, H, n_seg*S, D)
    out = out.view(n_seg, batch, heads, s, dim).permute(1, 2, 0, 3, 4)
    out = out.reshape(batch, heads, n_seg * s, dim)
    start = first_pos - grid_start
    return out[:, :, start : start + q_len]


def _segment_blocks(
    q_seg: Tensor,
    k_seg: Tensor,
    v_seg: Tensor,
    keep: Tensor,
    rel: RelativePosition | None,
    mem_len: int,
    scale: float,
) -> Tensor:
    """Attention of a batch of segments: q_seg (R, H, S, D) over their windows k_seg, v_seg
    (R, H, M + S, D), keep broadcastable to (R, H, S, M + S) -> (R, H, S, D). A keep of
    shape (1, 1, S, M + S) with the distance bias gives a mask shared by all R segments."""
    width = k_seg.shape[-2]
    if rel is None:
        bias = torch.zeros((), dtype=q_seg.dtype, device=q_seg.device)
    else:
        bias = rel.position_scores(q_seg, mem_len, width)  # (R, H, S, M + S) or (H, S, M + S)
        content = rel.content_bias(k_seg)  # None or (R, H, 1, M + S)
        if content is not None:
            bias = bias + content
    minus_inf = torch.tensor(float("-inf"), dtype=q_seg.dtype, device=q_seg.device)
    attn_mask = torch.where(keep, bias, minus_inf)
    return F.scaled_dot_product_attention(q_seg, k_seg, v_seg, attn_mask=attn_mask, scale=scale)


def segment_distances(segment_len: int, mem_len: int) -> tuple[int, int]:
    """(d_hi, count) of the distances :func:`segment_attention` needs."""
    return mem_len + segment_len - 1, mem_len + 2 * segment_len - 1


def prefix_block(batch: int, heads: int, q_len: int, kv_len: int) -> int:
    """The number of queries per block in :func:`prefix_attention` (about 32 MiB of fp32 scores
    per block), at least 1 and at most q_len."""
    return max(1, min(q_len, _BLOCK_ELEMENTS // max(1, batch * heads * kv_len)))


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    rel: RelativePosition,
    block: int,
    dropout_p: float = 0.0,
) -> Tensor:
    """One Transformer-XL segment: q: (B, H, L, D) are the last L of the keys k, v: (B, H, M + L, D)
    ([memory; segment]); query i keeps every key j <= M + i. All four terms use ``rel.scale``.
    ``rel`` must hold distances ``M + L - 1`` down to ``-(block - 1)``. Queries are processed
    ``block`` at a time, so the largest temporary is (B, H, block, M + L). Returns (B, H, L, D)."""
    q_len, kv_len = q.shape[2], k.shape[2]
    mem = kv_len - q_len
    # Only the last c - 1 keys of a block's window are in some of its queries' future:
    # query a of the block is masked from tail key u (0-based) iff u >= a.
    future = torch.ones(block, block, dtype=torch.bool, device=q.device).triu()  # (c, c)
    outs = []
    for i0 in range(0, q_len, block):
        i1 = min(q_len, i0 + block)
        c = i1 - i0
        width = mem + i1  # keys 0 .. M + i1 - 1: the last query of the block sees all of them
        q_blk = q[:, :, i0:i1]  # (B, H, c, D)
        dist0 = mem + i0  # distance of (query i0, key 0)
        # (B, H, c, W) or (H, c, W); a fresh contiguous tensor, masked in place (causal)
        attn_mask = rel.position_scores(q_blk, dist0, width).contiguous()
        attn_mask[..., width - (c - 1) :].masked_fill_(future[:c, : c - 1], float("-inf"))
        outs.append(
            F.scaled_dot_product_attention(
                rel.with_content_bias(q_blk),
                k[:, :, :width],
                v[:, :, :width],
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                scale=rel.scale,
            )
        )
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def dense_relative_bias(q: Tensor, k: Tensor, rel: RelativePosition, *, first_pos: int) -> Tensor:
    """The relative terms as a dense additive score (for Pattern.bias and pictures only):
    ``rel.scale * (u . k_j + (q_i + v) . r_{p_i - j})`` with p_i = first_pos + i; q: (B, H, Nq, D),
    k: (B, H, Nk, D) -> (B, H, Nq, Nk), or (1, H, Nq, Nk) without terms (b) and (c)."""
    q_len, kv_len = q.shape[2], k.shape[2]
    dist = (torch.arange(q_len)[:, None] + first_pos) - torch.arange(kv_len)[None, :]  # (Nq, Nk)
    row = (rel.d_hi - dist).clamp(0, rel.pos_key.shape[1] - 1).to(q.device)
    if rel.content_position:
        query = rel._to_key_space(q + rel.v.to(q.dtype)[:, None, :])  # (B, H, Nq, D or F)
        table = query @ rel.pos_key.to(q.dtype).transpose(-2, -1)
        # (B, H, Nq, P) -> (B, H, Nq, Nk): the entry of each pair's distance
        bias = table.gather(-1, row.expand(*q.shape[:2], q_len, kv_len))
    else:
        table = rel._to_key_space(rel.v[:, None, :]) @ rel.pos_key.transpose(-2, -1)
        table = table.to(q.dtype)  # (H, 1, P)
        bias = table[:, 0][:, row][None]  # (H, P) -> (1, H, Nq, Nk)
    if rel.u is not None:
        bias = bias + (k @ rel.u.to(k.dtype)[:, :, None]).transpose(-2, -1)  # + u . k_j
    return bias * rel.scale


def fixed_relative_position(
    heads: int,
    dim: int,
    d_hi: int,
    count: int,
    *,
    seed: int,
    content_terms: bool,
    dtype: torch.dtype,
    device: torch.device | str,
) -> RelativePosition:
    """A deterministic parameterisation for the ``xl`` backend (which has no learned weights):
    ``r_d = R_d W_h`` with R the sinusoidal encoding of size 2*ceil(D/2) and W_h ~ N(0, 1/D),
    and u, v ~ N(0, 1), all drawn in float64 on the CPU from ``seed``; the relative terms are
    scaled by 1/sqrt(D). Without ``content_terms`` u is absent and term (b) is skipped: only the
    distance bias v . r_d remains."""
    gen = torch.Generator().manual_seed(seed)
    pos_dim = 2 * math.ceil(dim / 2)
    w = torch.randn(heads, pos_dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    u = torch.randn(heads, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(heads, dim, generator=gen, dtype=torch.float64)
    table = sinusoid_encoding(descending_distances(d_hi, count), pos_dim)  # (P, pos_dim)
    pos_key = table[None] @ w  # (1, P, pos_dim) @ (H, pos_dim, D) -> (H, P, D)
    wide = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    return RelativePosition(
        pos_key=pos_key.to(device=device, dtype=wide),
        d_hi=d_hi,
        u=u.to(device=device, dtype=wide) if content_terms else None,
        v=v.to(device=device, dtype=wide),
        scale=dim**-0.5,
        content_position=content_terms,
    )
