"""Angular LSH for the Reformer (`lsh` backend): random rotations, bucket ids, and the sorted,
chunked layout in which each chunk of queries attends to its own and the previous chunk of keys.

Kitaev et al. 2020, section 2: with a random matrix R of shape (D, n_buckets/2), a vector x goes
to bucket ``argmax([x R ; -x R])``; vectors at a small angle tend to share a bucket. Every hash
round r has its own R_r. Positions are sorted by (bucket, position), and the sorted sequence is
cut into ``n_chunks`` equal chunks. Rows are moved into that order by gathers (:func:`flat_rows`)
and each chunk's key window [previous chunk, own chunk] is a strided view (:func:`windows`).
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


def hash_buckets(x: Tensor, rotations: Tensor, *, block_elements: int = 2**20) -> Tensor:
    """Bucket ids of x: (BH, N, D) under rotations (n_hashes, D, K) -> (n_hashes, BH, N) int64 in
    [0, 2K): ``argmax([x R ; -x R])``, the first maximum on ties.

    All rounds in one matmul, one block of positions at a time: the rotated vectors (n_hashes *
    K per position) grow as N * n_buckets, i.e. as N^2 / bucket_size, so at most
    ``block_elements`` of them exist at once. They are laid out (n_hashes, K, positions) so that
    every step below runs along the contiguous positions; the argmax is taken without
    index-tracking reductions (slow): the largest |x R_r|, then the first slot holding it (as
    +x R_r, else as -x R_r).
    """
    n_hashes, dim, half = rotations.shape
    bh, length, _ = x.shape
    flat = rotations.transpose(1, 2).reshape(n_hashes * half, dim)  # (n_hashes * K, D)
    rows = x.reshape(bh * length, dim)  # (BH, N, D) -> (BH*N, D)
    step = max(1, block_elements // flat.shape[0])
    slots = torch.arange(half, dtype=x.dtype, device=x.device).view(1, half, 1)  # (1, K, 1)
    slots = slots.expand(n_hashes, half, min(step, bh * length)).contiguous()  # (nh, K, n)
    buckets = torch.empty(n_hashes, bh * length, dtype=torch.int64, device=x.device)
    for start in range(0, bh * length, step):
        block = rows[start : start + step]  # (n, D)
        rotated = (flat @ block.T).view(n_hashes, half, -1)  # (nh, K, n)
        hi = rotated.amax(1, keepdim=True)  # (nh, 1, n)
        lo = rotated.amin(1, keepdim=True)
        positive = hi >= -lo  # the maximum of [xR ; -xR] is in its first half
        target = torch.where(positive, hi, lo)
        width = block.shape[0]
        first = torch.where(rotated == target, slots[..., :width], half).amin(1)  # (nh, n)
        buckets[:, start : start + step] = first.long() + half * ~positive[:, 0]
    return buckets.view(n_hashes, bh, length)


def _sort_order(buckets: Tensor, padded_len: int, n_buckets: int) -> Tensor:
    """Positions sorted by (bucket, position): buckets (n_hashes, BH, N) -> (n_hashes, BH, L).

    Positions N..L-1 are padding: they get bucket ``n_buckets`` and so sort to the end. A stable
    sort of the bucket ids (int32: cheaper than sorting bucket * L + position) keeps positions in
    order within a bucket.
    """
    n_hashes, bh, length = buckets.shape
    keys = buckets.new_full((n_hashes, bh, padded_len), n_buckets, dtype=torch.int32)
    keys[..., :length] = buckets
    return torch.sort(keys, dim=-1, stable=True).indices


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

    @property
    def window(self) -> int:
        """Key slots each query chunk attends to: 2 * k_chunk (k_chunk without look-back)."""
        return self.k_chunk * (2 if self.looks_back else 1)

    def extended_key_order(self) -> Tensor:
        """(n_hashes, BH, k_chunk + Lk) the sorted keys with the last chunk put in front too
        (Lk without look-back): query chunk a's window is slots a*k_chunk .. a*k_chunk + W - 1
        of it, the previous chunk (cyclically), then its own; one strided view gives them all
        (:func:`windows`)."""
        if not self.looks_back:
            return self.k_order
        return torch.cat([self.k_order[..., -self.k_chunk :], self.k_order], dim=-1)

    def key_windows(self) -> Tensor:
        """(n_hashes, BH, n_chunks, W) original key positions each query chunk attends to in
        each round: the previous chunk, then its own (W = 2 * k_chunk; k_chunk without
        look-back)."""
        return windows(self.extended_key_order(), self)

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


def windows(extended: Tensor, layout: ChunkLayout, features: int = 0) -> Tensor:
    """The key windows of every query chunk, a strided view (no copy): ``extended`` (.., L', *E)
    laid out as :meth:`ChunkLayout.extended_key_order` (L' = k_chunk + Lk, or Lk without
    look-back), with ``features`` trailing dims E -> (.., n_chunks, W, *E),
    W = :attr:`ChunkLayout.window`."""
    dim = extended.dim() - 1 - features  # the slot dim
    view = extended.unfold(dim, layout.window, layout.k_chunk)  # (.., n_chunks, *E, W)
    return view.movedim(-1, dim + 1)  # -> (.., n_chunks, W, *E)


def flat_rows(index: Tensor, length: int, limit: int) -> Tensor:
    """index: (BH, L) positions into rows of ``length`` per BH -> (BH*L,) rows of the flat
    (BH * length) array, positions clamped to ``limit - 1`` (padding slots read a real row, to be
    masked or dropped)."""
    offset = torch.arange(index.shape[0], device=index.device).mul_(length)
    return (index.clamp(max=limit - 1) + offset[:, None]).flatten()
