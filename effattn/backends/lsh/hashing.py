"""Angular LSH for the Reformer (`lsh` backend): random rotations, bucket ids, and the sorted,
chunked layout in which each chunk of queries attends to its own and the previous chunk of keys.

Kitaev et al. 2020, section 2: with a random matrix R of shape (D, n_buckets/2), a vector x goes
to bucket ``argmax([x R ; -x R])``; vectors at a small angle tend to share a bucket. Every hash
round r has its own R_r. Positions are sorted by (bucket, position), and the sorted sequence is
cut into ``n_chunks`` equal chunks. Rows are moved into and out of that order by permutations
whose backward pass is the inverse permutation (:func:`permute_rows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def default_n_buckets(length: int, bucket_size: int) -> int:
    """About ``length / bucket_size`` buckets, rounded up to an even number, at least 2."""
    n = math.ceil(length / bucket_size)
    return max(2, n + n % 2)


def chunk_count(q_len: int, k_len: int, bucket_size: int) -> int:
    """Chunks per round: ``ceil(max(Nq, Nk) / bucket_size)``, at least 1."""
    return max(1, math.ceil(max(q_len, k_len) / bucket_size))


def random_rotations(
    n_hashes: int, head_dim: int, n_buckets: int, seed: int, *, dtype: torch.dtype, device
) -> Tensor:
    """(n_hashes, D, n_buckets/2) Gaussian rotations, a pure function of (seed, shapes).

    Drawn in float64 on the CPU from a generator seeded with ``seed``, so the same seed gives the
    same buckets on every call and every device; a different seed gives different rotations.
    """
    gen = torch.Generator().manual_seed(seed)
    rot = torch.randn(n_hashes, head_dim, n_buckets // 2, generator=gen, dtype=torch.float64)
    return rot.to(dtype=dtype, device=device)


def hash_buckets(x: Tensor, rotations: Tensor, *, block_elements: int = 2**22) -> Tensor:
    """Bucket ids of x: (BH, N, D) under rotations (n_hashes, D, K) -> (n_hashes, BH, N) int64 in
    [0, 2K): ``argmax([x R ; -x R])`` without building the concatenation.

    The rotated vectors (BH, N, K) grow as N * n_buckets, i.e. as N^2 / bucket_size; they are
    made one round and one block of positions at a time, at most ``block_elements`` at once.
    """
    n_hashes, _, half = rotations.shape
    bh, length, _ = x.shape
    step = max(1, block_elements // (bh * half))
    buckets = torch.empty(n_hashes, bh, length, dtype=torch.int64, device=x.device)
    for r in range(n_hashes):
        for start in range(0, length, step):
            rotated = x[:, start : start + step] @ rotations[r]  # (BH, n, D) @ (D, K) -> (BH, n, K)
            hi, hi_idx = rotated.max(dim=-1)
            lo, lo_idx = rotated.min(dim=-1)
            buckets[r, :, start : start + step] = torch.where(hi >= -lo, hi_idx, lo_idx + half)
    return buckets


def _sort_order(buckets: Tensor, padded_len: int, n_buckets: int) -> Tensor:
    """Positions sorted by (bucket, position): buckets (n_hashes, BH, N) -> (n_hashes, BH, L).

    Positions N..L-1 are padding: they get bucket ``n_buckets`` and so sort to the end.
    """
    n_hashes, bh, length = buckets.shape
    pad = buckets.new_full((n_hashes, bh, padded_len - length), n_buckets)
    padded = torch.cat([buckets, pad], dim=-1)  # (n_hashes, BH, N) -> (n_hashes, BH, L)
    positions = torch.arange(padded_len, device=buckets.device)
    return torch.argsort(padded * padded_len + positions, dim=-1)


def _inverse(order: Tensor) -> Tensor:
    """The inverse permutation along the last dim: ``rank[..., order[..., s]] = s``."""
    slots = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, slots)


@dataclass(frozen=True)
class ChunkLayout:
    """The sorted, chunked order of one call's queries and keys, for every hash round.

    Sorted slot s of round r holds query ``q_order[r, :, s]``; query slots form ``n_chunks``
    chunks of ``q_chunk``, key slots ``n_chunks`` chunks of ``k_chunk``; query chunk a attends to
    key chunks a and a-1 (cyclically; only a itself when n_chunks == 1, so that no pair is met
    twice in a round). Positions at or beyond Nq (Nk) are padding.
    """

    n_chunks: int  # chunks per round
    q_chunk: int  # query slots per chunk
    k_chunk: int  # key slots per chunk
    q_order: Tensor  # (n_hashes, BH, n_chunks * q_chunk) int64: original position of each slot
    k_order: Tensor  # (n_hashes, BH, n_chunks * k_chunk) int64
    q_rank: Tensor  # (n_hashes, BH, n_chunks * q_chunk) int64: slot of each original position
    k_rank: Tensor  # (n_hashes, BH, n_chunks * k_chunk) int64

    @property
    def looks_back(self) -> bool:
        """Whether a chunk also attends to the previous one (not when it is itself)."""
        return self.n_chunks > 1

    def key_windows(self) -> Tensor:
        """(n_hashes, BH, n_chunks, W) original key positions each query chunk attends to in
        each round: its own chunk, then the previous one; W = 2 * k_chunk (k_chunk without
        look-back)."""
        own = self.k_order.unflatten(-1, (self.n_chunks, self.k_chunk))  # (.., Lk) -> (.., nc, ck)
        if not self.looks_back:
            return own
        return torch.cat([own, own.roll(1, dims=2)], dim=-1)  # (.., nc, ck) -> (.., nc, 2ck)

    def query_chunks(self) -> Tensor:
        """(n_hashes, BH, Lq) chunk index of every (padded) query position in every round."""
        return torch.div(self.q_rank, self.q_chunk, rounding_mode="floor")

    def key_chunks(self) -> Tensor:
        """(n_hashes, BH, Lk) chunk index of every (padded) key position in every round."""
        return torch.div(self.k_rank, self.k_chunk, rounding_mode="floor")


def chunk_layout(
    q: Tensor, k: Tensor, rotations: Tensor, *, bucket_size: int, shared: bool
) -> ChunkLayout:
    """Hash q: (BH, Nq, D) and k: (BH, Nk, D) and sort them into chunks of at most bucket_size.

    ``n_chunks = ceil(max(Nq, Nk) / bucket_size)``; queries and keys are split into that many
    chunks each (of ceil(Nq / n_chunks) and ceil(Nk / n_chunks) slots). With ``shared`` the keys
    are the (normalised) queries and share their order. Bucket ids carry no gradient: q and k
    are hashed detached.
    """
    q, k = q.detach(), k.detach()
    q_len, k_len = q.shape[1], k.shape[1]
    n_buckets = 2 * rotations.shape[-1]
    n_chunks = chunk_count(q_len, k_len, bucket_size)
    q_chunk = math.ceil(q_len / n_chunks)
    k_chunk = math.ceil(k_len / n_chunks)
    q_order = _sort_order(hash_buckets(q, rotations), n_chunks * q_chunk, n_buckets)
    q_rank = _inverse(q_order)
    if shared:
        k_order, k_rank = q_order, q_rank
    else:
        k_order = _sort_order(hash_buckets(k, rotations), n_chunks * k_chunk, n_buckets)
        k_rank = _inverse(k_order)
    return ChunkLayout(n_chunks, q_chunk, k_chunk, q_order, k_order, q_rank, k_rank)


def flat_index(index: Tensor, length: int) -> Tensor:
    """index: (n_hashes, BH, L) into rows of length ``length`` -> the same into the flat
    (BH * length) rows, for :func:`permute_rows`."""
    bh = index.shape[1]
    offset = torch.arange(bh, device=index.device).mul_(length)
    return index + offset.view(1, bh, 1)


class _PermuteRows(torch.autograd.Function):
    """``rows[perm]`` for a permutation of the rows; the backward pass gathers the gradient with
    the inverse permutation instead of scatter-adding it (index_select's backward): the same
    result, and far faster on CPU (2-thread index_add_ took ~100x longer here)."""

    @staticmethod
    def forward(ctx, rows: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return rows.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(rows: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
    """rows: (M, E); perm, inverse: (BH, L) flat permutations of the M = BH * L rows and its
    inverse -> (M, E) with row s = rows[perm[s]]."""
    return _PermuteRows.apply(rows, perm.reshape(-1), inverse.reshape(-1))
