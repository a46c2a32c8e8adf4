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
Rounds run one after another, so the forward pass holds one round's (B*H, N, 2*chunk) scores at
a time; with autograd each round's scores are saved: memory O(n_hashes * N * chunk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from effattn._validate import validate_key_padding_mask, validate_qkv
from effattn.backend import Backend, Pattern
from effattn.backends.lsh.hashing import (
    ChunkLayout,
    chunk_count,
    chunk_layout,
    default_n_buckets,
    flat_index,
    permute_rows,
    random_rotations,
)
from effattn.ops import attention_flops, keep_mask
from effattn.registry import register_backend

SELF_ATTENTION_BIAS = -1e5  # added to a token's score with itself under shared-QK (Reformer)


def _pad_rows(x: Tensor, length: int) -> Tensor:
    """(BH, N, E) -> (BH, length, E) with zero rows appended."""
    return F.pad(x, (0, 0, 0, length - x.shape[1]))


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
    description = "Reformer LSH attention: hash, sort, attend within chunks, n_hashes rounds"

    def __post_init__(self) -> None:
        for name in ("bucket_size", "n_hashes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"lsh: option {name!r} expected an int >= 1, got {value!r}")
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
        k_len, bh = k.shape[2], b * h
        qf, kf, lay, shared = self._prepare(q, k)
        nc, cq = lay.n_chunks, lay.q_chunk
        q_pad_len, k_pad_len = nc * cq, nc * lay.k_chunk
        qf = _pad_rows(qf * scale, q_pad_len)  # the scale folded into q: (BH, Lq, D)
        kf = _pad_rows(kf, k_pad_len)  # (BH, Lk, D)
        # v with a column of ones: the same matmul gives sum_j p_ij v_j and sum_j p_ij.
        vf = v.to(qf.dtype).reshape(bh, k_len, d)  # (B, H, Nk, D) -> (BH, Nk, D)
        vf = _pad_rows(F.pad(vf, (0, 1), value=1.0), k_pad_len)  # -> (BH, Lk, D + 1)

        key_dropped = None  # (BH, Lk, 1) bool: padding (ours or the caller's); None when none
        if key_padding_mask is not None or k_pad_len > k_len:
            key_ok = torch.zeros(b, k_pad_len, dtype=torch.bool, device=q.device)
            key_ok[:, :k_len] = True if key_padding_mask is None else key_padding_mask
            key_dropped = (~key_ok).repeat_interleave(h, dim=0)[..., None]  # (B, Lk) -> (BH, Lk, 1)
        q_chunks = k_chunks = None
        if self.dedup:
            q_chunks, k_chunks = lay.query_chunks(), lay.key_chunks()

        # Flat row permutations of every round, made once: sort queries, sort keys, unsort.
        q_perm, q_inv = flat_index(lay.q_order, q_pad_len), flat_index(lay.q_rank, q_pad_len)
        k_perm, k_inv = q_perm, q_inv  # (n_hashes, BH, L) each
        if not shared:
            k_perm, k_inv = flat_index(lay.k_order, k_pad_len), flat_index(lay.k_rank, k_pad_len)
        k_windows = lay.key_windows() if causal or self.dedup else None  # (nh, BH, nc, W)
        q_rows, k_rows = qf.reshape(-1, d), kf.reshape(-1, d)  # (BH, L, D) -> (BH * L, D)
        v_rows = vf.reshape(-1, d + 1)  # (BH, Lk, D + 1) -> (BH * Lk, D + 1)
        if key_dropped is not None:
            key_dropped = key_dropped.view(-1, 1)  # (BH, Lk, 1) -> (BH * Lk, 1)

        def window(sorted_rows: Tensor) -> Tensor:
            """Sorted key rows (BH * Lk, E) -> (BH, nc, W, E): each chunk, then the previous."""
            own = sorted_rows.view(bh, nc, lay.k_chunk, -1)  # -> (BH, nc, ck, E)
            return torch.cat([own, own.roll(1, dims=1)], dim=2) if lay.looks_back else own

        acc_max = acc = None  # running row max (BH, Nq, 1) and sums (BH, Nq, D + 1)
        for r in range(self.n_hashes):
            qs = permute_rows(q_rows, q_perm[r], q_inv[r]).view(bh, nc, cq, d)
            ks = window(permute_rows(k_rows, k_perm[r], k_inv[r]))  # (BH, nc, W, D)
            scores = qs @ ks.transpose(-2, -1)  # (BH, nc, cq, W)
            if shared:  # the own chunk's keys are its queries: self is the diagonal
                scores[..., :cq].diagonal(dim1=-2, dim2=-1).add_(SELF_ATTENTION_BIAS)
            dropped = None
            if key_dropped is not None:
                sorted_dropped = key_dropped.index_select(0, k_perm[r].view(-1))  # (BH*Lk, 1)
                dropped = window(sorted_dropped).transpose(-2, -1)  # (BH, nc, 1, W)
            if causal:  # (BH, nc, cq, 1) vs (BH, nc, 1, W) by original position
                q_pos = lay.q_order[r].view(bh, nc, cq, 1)  # (BH, Lq) -> (BH, nc, cq, 1)
                late = k_windows[r].unsqueeze(2) > q_pos + (k_len - q_len)
                dropped = late if dropped is None else dropped | late
            if dropped is not None:
                scores.masked_fill_(dropped, float("-inf"))
            if self.dedup:
                q_pos = lay.q_order[r].view(bh, nc, cq)
                counts = self._round_counts(r, q_pos, k_windows[r], q_chunks, k_chunks)
                scores.sub_(counts.to(scores.dtype).log_())
            row_max = scores.detach().amax(dim=-1, keepdim=True)  # (BH, nc, cq, 1)
            if dropped is not None:
                row_max.masked_fill_(row_max == float("-inf"), 0.0)  # rows with no key
            probs = scores.sub_(row_max).exp_()  # unnormalised, (BH, nc, cq, W)
            vs = window(permute_rows(v_rows, k_perm[r], k_inv[r]))  # (BH, nc, W, D + 1)
            sums = probs @ vs  # (BH, nc, cq, W) @ (BH, nc, W, D+1) -> (BH, nc, cq, D+1)
            # Back to the original order (the slot of each query position; padding dropped).
            sums = permute_rows(sums.view(-1, d + 1), q_inv[r], q_perm[r])  # (BH*Lq, D+1)
            sums = sums.view(bh, q_pad_len, d + 1)[:, :q_len]  # -> (BH, Nq, D + 1)
            max_r = row_max.view(-1, 1).index_select(0, q_inv[r].view(-1))  # (BH*Lq, 1)
            max_r = max_r.view(bh, q_pad_len, 1)[:, :q_len]  # -> (BH, Nq, 1)
            if acc is None:
                acc_max, acc = max_r, sums
                continue
            new_max = torch.maximum(acc_max, max_r)
            acc = acc * (acc_max - new_max).exp_() + sums * (max_r - new_max).exp_()
            acc_max = new_max
        total = acc[..., d:]  # (BH, Nq, 1): sum of the unnormalised probabilities
        out = acc[..., :d] / torch.where(total > 0, total, torch.ones_like(total))  # empty -> 0
        return out.view(b, h, q_len, d).to(q.dtype)  # (BH, Nq, D) -> (B, H, Nq, D)

    def _round_counts(
        self, r: int, q_pos: Tensor, k_win: Tensor, q_chunks: Tensor, k_chunks: Tensor
    ) -> Tensor:
        """(BH, nc, cq, W): in how many rounds each pair of round r's windows is met (>= 1).
        q_pos: (BH, nc, cq) and k_win: (BH, nc, W) original positions of round r's chunks."""
        bh, nc = k_win.shape[:2]
        counts = torch.ones(q_pos.shape + k_win.shape[-1:], dtype=torch.int32, device=q_pos.device)
        for other in range(self.n_hashes):
            if other == r:
                continue
            qc = q_chunks[other].gather(1, q_pos.view(bh, -1)).view(bh, nc, -1, 1)  # (.., cq, 1)
            kc = k_chunks[other].gather(1, k_win.view(bh, -1)).view(bh, nc, 1, -1)  # (.., 1, W)
            met = kc == qc
            if nc > 1:
                met = met | (kc == (qc - 1) % nc)
            counts += met
        return counts

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
