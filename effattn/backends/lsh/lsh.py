"""`lsh`: the Reformer's locality-sensitive-hashing attention (Kitaev et al. 2020), plain PyTorch.

Per hash round: hash queries and keys with angular LSH (effattn.backends.lsh.hashing), sort by
(bucket, position), cut into chunks of at most ``bucket_size``; each query chunk attends to its
own key chunk and the previous one (sorted order), with causality and key padding applied by
original position. Rounds are combined with their log-sum-exp weights, i.e. one softmax over
everything the query met::

    out_i = sum_r sum_{j in W_r(i)} exp(s_ij - log c_ij) v_j / sum_r sum_{j in W_r(i)} exp(...)

where W_r(i) is the key window of query i in round r and c_ij the number of rounds that met the
pair (i, j). With ``dedup=False`` (default, as reformer-pytorch's ``allow_duplicate_attention``
and HF's Reformer) the correction is not applied: pairs count as a multiset and a pair met in c
rounds has weight c; ``pattern().weight`` holds c. With ``dedup=True`` (the paper's duplicate
correction) every pair counts once: the pattern is the union of the windows, weight None.

Shared-QK (``shared_qk=True``, or None with ``k is q``): the keys are the unit-normalised
queries (``k`` is not used) and a token's score with itself gets ``SELF_ATTENTION_BIAS`` = -1e5
added (the Reformer's value), so it attends to itself only when it has no other target;
``pattern().bias`` holds that diagonal and ``pattern().key`` the normalised queries.

Rotations are drawn from ``seed`` on every call (effattn.backends.lsh.hashing.random_rotations):
a call is reproducible and the buckets do not change between calls; pass another seed to redraw.
Each round is one call of a fused attention kernel over the sorted chunks
(effattn.backends.lsh.rounds: the key windows are strided views, masks only where needed), so
no round's scores are ever held whole; the rounds are merged by their log-sum-exps. Memory:
O(n_hashes * N * D) for the rounds' outputs, with autograd too (the backward pass recomputes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from effattn._validate import check_int_option, validate_key_padding_mask, validate_qkv
from effattn.backend import Backend
from effattn.backends.lsh.hashing import (
    ChunkLayout,
    chunk_count,
    chunk_layout,
    default_n_buckets,
    random_rotations,
)
from effattn.backends.lsh.rounds import SELF_ATTENTION_BIAS, Rounds, lsh_attention
from effattn.ops import attention_flops, keep_mask
from effattn.patterns import Pattern
from effattn.registry import register_backend

__all__ = ["SELF_ATTENTION_BIAS", "LSHAttention"]


@register_backend("lsh")
@dataclass(frozen=True)
class LSHAttention(Backend):
    """Reformer LSH attention: n_hashes rounds of sorted, chunked attention, combined exactly."""

    bucket_size: int = 64  # chunk length (sorted slots per chunk) and the default bucket size
    n_hashes: int = 4  # hash rounds; more rounds miss fewer neighbours and cost more
    n_buckets: int | None = None  # even >= 2; None: about max(Nq, Nk) / bucket_size
    shared_qk: bool | None = None  # keys = normalised queries; None: True when k is q
    dedup: bool = False  # True: count a pair met in several rounds once (paper's correction)
    seed: int = 0  # seed of the random rotations (reproducible; not redrawn per call)

    exact = False
    complexity = "O(N log N)"
    memory_complexity = "O(n_hashes*N*bucket_size)"
    tay_class = "LP"
    decode_refusal = (
        "not implemented yet (a new query would attend within its buckets over cached keys "
        "kept with their bucket ids)"
    )
    description = "Reformer LSH attention: hash, sort, attend within chunks, n_hashes rounds"

    def __post_init__(self) -> None:
        check_int_option("lsh", "bucket_size", self.bucket_size)
        check_int_option("lsh", "n_hashes", self.n_hashes)
        nb = self.n_buckets
        if nb is not None and (not isinstance(nb, int) or nb < 2 or nb % 2):
            raise ValueError(
                f"lsh: option 'n_buckets' expected None or an even int >= 2, got {nb!r}"
            )
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"lsh: option 'seed' expected an int in [0, 2**63), got {self.seed!r}")

    # -- shared by forward and pattern ------------------------------------------------------
    def _is_shared(self, q: Tensor, k: Tensor) -> bool:
        shared = (k is q) if self.shared_qk is None else self.shared_qk
        if shared and q.shape[2] != k.shape[2]:
            raise ValueError(
                "lsh: shared_qk expects as many key positions as queries (the keys are the "
                f"normalised queries), got Nq={q.shape[2]} and Nk={k.shape[2]}"
            )
        return shared

    def _prepare(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, ChunkLayout, bool]:
        """Flattened (BH, Nq, D) queries and (BH, Nk, D) scored keys, in float32 or wider, and
        the chunk layout of every round."""
        shared = self._is_shared(q, k)
        wide = q.dtype if q.element_size() >= 4 else torch.float32
        b, h, q_len, d = q.shape
        qf = q.to(wide).reshape(b * h, q_len, d)  # (B, H, Nq, D) -> (BH, Nq, D)
        kf = F.normalize(qf, dim=-1) if shared else k.to(wide).reshape(b * h, k.shape[2], d)
        n_buckets = self.n_buckets or default_n_buckets(max(q_len, k.shape[2]), self.bucket_size)
        rot = random_rotations(self.n_hashes, d, n_buckets, self.seed, dtype=wide, device=q.device)
        layout = chunk_layout(qf, kf, rot, bucket_size=self.bucket_size, shared=shared)
        return qf, kf, layout, shared

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
        b, h, q_len, d = q.shape
        k_len = k.shape[2]
        qf, kf, lay, shared = self._prepare(q, k)
        vf = v.to(qf.dtype).reshape(b * h, k_len, d)  # (B, H, Nk, D) -> (BH, Nk, D)
        key_ok = None
        if key_padding_mask is not None:
            key_ok = key_padding_mask.repeat_interleave(h, dim=0)  # (B, Nk) -> (BH, Nk)
        rounds = Rounds(
            layout=lay,
            q_len=q_len,
            k_len=k_len,
            causal=causal,
            key_ok=key_ok,
            shared=shared,
            dedup=self.dedup,
            dtype=qf.dtype,
            key_order=lay.extended_key_order(),
        )
        out = lsh_attention(qf, kf, vf, rounds, scale)  # (BH, Nq, D)
        return out.view(b, h, q_len, d).to(q.dtype)  # (BH, Nq, D) -> (B, H, Nq, D)

    # -- declarations -----------------------------------------------------------------------
    def pattern(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
    ) -> Pattern:
        """The realised pairs (B, H, Nq, Nk): mask = met in some round & causal & padding;
        weight = rounds that met the pair (None with dedup); bias and key under shared-QK."""
        validate_qkv(q, k, v)
        validate_key_padding_mask(key_padding_mask, q, k)
        b, h, q_len, _ = q.shape
        k_len = k.shape[2]
        qf, kf, lay, shared = self._prepare(q, k)
        qc = lay.query_chunks()[:, :, :q_len, None]  # (n_hashes, BH, Nq, 1)
        kc = lay.key_chunks()[:, :, None, :k_len]  # (n_hashes, BH, 1, Nk)
        met = kc == qc
        if lay.looks_back:
            met = met | (kc == (qc - 1) % lay.n_chunks)
        counts = met.sum(dim=0).view(b, h, q_len, k_len)  # (n_hashes, BH, ..) -> (B, H, Nq, Nk)
        mask = counts > 0
        keep = keep_mask(
            b, q_len, k_len, causal=causal, key_padding_mask=key_padding_mask, device=q.device
        )
        if keep is not None:
            mask = mask & keep
        weight = None if self.dedup else counts.to(qf.dtype) * mask
        bias = key = None
        if shared:
            diag = torch.eye(q_len, dtype=torch.bool, device=q.device)
            bias = (diag * SELF_ATTENTION_BIAS).to(qf.dtype).expand_as(mask)
            key = kf.reshape(b, h, k_len, -1)  # (BH, Nk, D) -> (B, H, Nk, D)
        return Pattern(mask=mask, weight=weight, bias=bias, key=key)

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
        """Forward FLOPs of the computed blocks: every round scores each (padded) query slot
        against its whole key window, masked or not (hashing and sorting not counted)."""
        n_chunks = chunk_count(q_len, kv_len, self.bucket_size)
        q_slots = n_chunks * math.ceil(q_len / n_chunks)
        window = math.ceil(kv_len / n_chunks) * (2 if n_chunks > 1 else 1)
        pairs = self.n_hashes * q_slots * window
        return attention_flops(batch, heads, head_dim, pairs)
