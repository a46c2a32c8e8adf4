"""The hash rounds of the `lsh` backend as fused attention calls, and their backward pass.

Each round r: gather the queries in sorted order (BH, n_chunks, q_chunk, D) and the keys and
values in the extended sorted order (:meth:`ChunkLayout.extended_key_order`), whose windows
[previous chunk, own chunk] are one strided view (BH, n_chunks, W, D); one call of the fused
attention kernel (effattn.backends.sparse.flash.flash_attention: torch's flash kernel on CPU)
with the chunks as its heads gives each slot's output and log-sum-exp, with an additive mask
only where the call needs one (causal, key padding, shared-QK's self bias, dedup's log-counts).
Unsorted, the rounds merge exactly by their log-sum-exps:

    L_i = log sum_r exp(lse_ri),   out_i = sum_r exp(lse_ri - L_i) * out_ri

i.e. one softmax over every (round, key) the query met, pairs met in several rounds counted
once per round. The backward pass runs the kernel's backward per round with the merged out and
L (FlashAttention's split-key rule: each round's share of the gradients) and adds the sorted
gradients back into place with index_add_ (the windows overlap: a key slot sits in two).
Memory: the rounds' unsorted outputs (n_hashes, BH, Nq, D) and one round's gathered rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from effattn.backends.lsh.hashing import ChunkLayout, flat_rows, windows
from effattn.backends.sparse.flash import flash_attention, flash_attention_backward

SELF_ATTENTION_BIAS = -1e5  # added to a token's score with itself under shared-QK (Reformer)


@dataclass(frozen=True)
class Rounds:
    """What every hash round of one call computes: which rows it gathers and its mask."""

    layout: ChunkLayout  # the sorted, chunked order of every round
    q_len: int  # Nq
    k_len: int  # Nk
    causal: bool  # drop keys after the query's diagonal (bottom-right aligned)
    key_ok: Tensor | None  # (BH, Nk) bool, True = the key takes part; None: every key
    shared: bool  # keys are the queries: the own chunk's diagonal gets SELF_ATTENTION_BIAS
    dedup: bool  # subtract log(rounds that met the pair): every pair counts once
    dtype: torch.dtype  # of the scores (the mask)
    key_order: Tensor  # (n_hashes, BH, L') layout.extended_key_order()

    @property
    def n_hashes(self) -> int:
        return self.key_order.shape[0]

    def query_rows(self, r: int) -> Tensor:
        """(BH*Lq,) rows of q viewed (BH*Nq, D), in round r's sorted slot order (padding
        slots read the last query; their outputs are dropped and their gradients zeroed)."""
        return flat_rows(self.layout.q_order[r], self.q_len, self.q_len)

    def key_rows(self, r: int) -> Tensor:
        """(BH*L',) rows of k viewed (BH*Nk, D), in round r's extended key order (padding
        slots read the last key and are masked)."""
        return flat_rows(self.key_order[r], self.k_len, self.k_len)

    def back_rows(self, r: int) -> Tensor:
        """(BH*Nq,) for each query in original order, its slot among round r's (BH*Lq)."""
        lay = self.layout
        slots = lay.n_chunks * lay.q_chunk
        return flat_rows(lay.q_rank[r][:, : self.q_len], slots, slots)

    def padding_slots(self, r: int) -> Tensor | None:
        """(BH, Lq) bool: query slots of round r that hold no query; None when there are none."""
        lay = self.layout
        if lay.n_chunks * lay.q_chunk == self.q_len:
            return None
        return lay.q_order[r] >= self.q_len

    def mask(self, r: int) -> tuple[Tensor | None, Tensor | None]:
        """Round r's additive mask (BH, n_chunks, q_chunk or 1, W) or None, and which rows keep
        a key (BH, n_chunks, q_chunk or 1) bool, None when every row does."""
        lay = self.layout
        bh, nc, cq, ck = lay.q_order.shape[1], lay.n_chunks, lay.q_chunk, lay.k_chunk
        k_pos = windows(self.key_order[r], lay)  # (BH, nc, W) original key positions
        keep = None  # (BH, nc, cq or 1, W) bool
        if self.key_ok is not None or nc * ck > self.k_len:
            ok = k_pos < self.k_len
            if self.key_ok is not None:
                clamped = k_pos.flatten(1).clamp(max=self.k_len - 1)
                ok = ok & self.key_ok.gather(1, clamped).view_as(k_pos)
            keep = ok[:, :, None, :]
        if self.causal:
            q_pos = self.layout.q_order[r].view(bh, nc, cq, 1)
            early = k_pos[:, :, None, :] <= q_pos + (self.k_len - self.q_len)
            keep = early if keep is None else keep & early
        bias = None
        if keep is not None:
            zero = torch.zeros((), dtype=self.dtype, device=k_pos.device)
            bias = torch.where(keep, zero, zero - float("inf"))
        if self.shared:  # own chunk = the query chunk: self is its diagonal
            own = torch.zeros(cq, lay.window, dtype=self.dtype, device=k_pos.device)
            own[:, lay.window - ck :].fill_diagonal_(SELF_ATTENTION_BIAS)
            bias = own if bias is None else bias + own  # (cq, W) broadcasts
        if self.dedup:
            q_pos = self.layout.q_order[r].view(bh, nc, cq)
            log_counts = self._round_counts(r, q_pos, k_pos).to(self.dtype).log_()
            bias = -log_counts if bias is None else bias - log_counts
        if bias is not None and bias.dim() == 2:
            bias = bias[None, None]  # (cq, W) -> (1, 1, cq, W)
        return bias, None if keep is None else keep.any(-1)

    def _round_counts(self, r: int, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """(BH, nc, cq, W): in how many rounds each pair of round r's windows is met (>= 1).
        q_pos: (BH, nc, cq) and k_pos: (BH, nc, W) original positions of round r's chunks."""
        lay = self.layout
        bh, nc = k_pos.shape[:2]
        q_chunks, k_chunks = lay.query_chunks(), lay.key_chunks()  # (n_hashes, BH, L)
        counts = torch.ones(q_pos.shape + k_pos.shape[-1:], dtype=torch.int32, device=q_pos.device)
        for other in range(self.n_hashes):
            if other == r:
                continue
            qc = q_chunks[other].gather(1, q_pos.view(bh, -1)).view(bh, nc, -1, 1)  # (.., cq, 1)
            kc = k_chunks[other].gather(1, k_pos.reshape(bh, -1)).view(bh, nc, 1, -1)  # (.., 1, W)
            met = kc == qc
            if lay.looks_back:
                met = met | (kc == (qc - 1) % nc)
            counts += met
        return counts


def lsh_attention(q: Tensor, k: Tensor, v: Tensor, rounds: Rounds, scale: float) -> Tensor:
    """Every round of ``rounds`` merged: q (BH, Nq, D), k, v (BH, Nk, D) -> (BH, Nq, D); a query
    that keeps no key in any round gives 0."""
    return _LSHAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), rounds, scale)


class _LSHAttention(torch.autograd.Function):
    """:func:`lsh_attention` (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, rounds: Rounds, scale: float) -> Tensor:
        bh, q_len, dim = q.shape
        lay = rounds.layout
        lse_dtype = torch.promote_types(q.dtype, torch.float32)
        outs = q.new_empty(rounds.n_hashes, bh * q_len, dim)  # every round, original order
        lses = q.new_empty(rounds.n_hashes, bh * q_len, dtype=lse_dtype)
        gathers = _Gathers()
        for r in range(rounds.n_hashes):
            (q_s,) = gathers.take("q", rounds.query_rows(r), q)  # (BH*Lq, D)
            k_w, v_w = gathers.take("kv", rounds.key_rows(r), k, v)  # (BH*L', D) each
            q_s = q_s.view(bh, lay.n_chunks, lay.q_chunk, dim)
            k_w, v_w = (windows(x.view(bh, -1, dim), lay, features=1) for x in (k_w, v_w))
            bias, alive = rounds.mask(r)
            out, lse = flash_attention(q_s, k_w, v_w, bias, scale)  # (BH, nc, cq, D), (.., cq)
            lse = lse.reshape(bh, lay.n_chunks, lay.q_chunk)  # slot order (a small copy)
            if alive is not None:  # rows without keys: out 0, and no weight in the merge
                lse = lse.masked_fill(~alive, float("-inf"))
            back = rounds.back_rows(r)  # (BH*Nq,)
            torch.index_select(out.reshape(-1, dim), 0, back, out=outs[r])
            torch.index_select(lse.reshape(-1), 0, back, out=lses[r])
        total = torch.logsumexp(lses, dim=0)  # (BH*Nq,)
        total = total.masked_fill(total == float("-inf"), 0.0)  # no key in any round
        weights = (lses - total).exp_().to(q.dtype)[..., None]  # (n_hashes, BH*Nq, 1)
        merged = outs[0] * weights[0]
        for r in range(1, rounds.n_hashes):
            merged.addcmul_(outs[r], weights[r])
        ctx.save_for_backward(q, k, v, merged, total)
        ctx.rounds, ctx.scale = rounds, scale
        return merged.view(bh, q_len, dim)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, merged, total = ctx.saved_tensors
        rounds, scale, lay = ctx.rounds, ctx.scale, ctx.rounds.layout
        bh, q_len, dim = q.shape
        grad = grad.reshape(bh, q_len, dim)
        dq, dk, dv = (torch.zeros_like(x) for x in (q, k, v))  # (BH, N, D), original order
        gathers = _Gathers()
        for r in range(rounds.n_hashes):
            rows = rounds.query_rows(r)  # (BH*Lq,)
            sorted_q = gathers.take("q", rows, q, merged, grad)  # (BH*Lq, D) each
            q_s, out_s, grad_s = (x.view(bh, lay.n_chunks, lay.q_chunk, dim) for x in sorted_q)
            k_w, v_w = gathers.take("kv", rounds.key_rows(r), k, v)  # (BH*L', D) each
            k_w, v_w = (windows(x.view(bh, -1, dim), lay, features=1) for x in (k_w, v_w))
            pad = rounds.padding_slots(r)
            if pad is not None:  # slots without a query pass no gradient on
                grad_s.masked_fill_(pad.view(grad_s.shape[:-1])[..., None], 0.0)
            total_s = total.index_select(0, rows).view(grad_s.shape[:-1])
            bias, _ = rounds.mask(r)
            grads = flash_attention_backward(grad_s, q_s, k_w, v_w, out_s, total_s, bias, scale)
            # Back to original order by gathers: a query's slot, and a key's two window slots
            # (its own chunk's window and, looking back, the next chunk's).
            q_slot = lay.q_rank[r][:, :q_len]  # (BH, Nq)
            k_slot = lay.k_rank[r][:, : k.shape[1]]  # (BH, Nk)
            own = lay.window - lay.k_chunk  # where a window's own chunk starts
            k_parts = [(k_slot // lay.k_chunk, k_slot % lay.k_chunk + own)]
            if lay.looks_back:
                k_parts.append(((k_slot // lay.k_chunk + 1) % lay.n_chunks, k_parts[0][1] - own))
            q_parts = [(q_slot // lay.q_chunk, q_slot % lay.q_chunk)]
            for acc, g, parts in ((dq, grads[0], q_parts), (dk, grads[1], k_parts)):
                _gather_add(acc, g, parts, gathers)
            _gather_add(dv, grads[2], k_parts, gathers)
        return dq, dk, dv, None, None


class _Gathers:
    """Rows gathered into buffers that the rounds of one call share: the first round allocates
    them, later ones reuse their memory (fresh large allocations are page-faulted and zeroed by
    the kernel on every call, a cost comparable to the attention itself)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, int], Tensor] = {}

    def take(self, name: str, rows: Tensor, *sources: Tensor) -> list[Tensor]:
        """x.view(-1, D)[rows] for each source x (same D): a list of (len(rows), D) tensors,
        slices of the buffer ``name``."""
        dim = sources[0].shape[-1]
        key = (name, rows.numel())
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = sources[0].new_empty(len(sources), rows.numel(), dim)
        return [
            torch.index_select(x.reshape(-1, dim), 0, rows, out=buf[i])
            for i, x in enumerate(sources)
        ]


def _gather_add(
    acc: Tensor, grad: Tensor, parts: list[tuple[Tensor, Tensor]], gathers: _Gathers
) -> None:
    """acc[bh, p] += sum over parts of grad[bh, chunk[bh, p], place[bh, p]]: acc (BH, N, D),
    grad (BH, nc, c, D) read in whatever dense order the kernel laid it out (no copy), parts
    (chunk, place) of (BH, N) int64 each."""
    bh, _, dim = acc.shape
    order = sorted(range(3), key=lambda i: -grad.stride(i))  # dims in storage order
    if not grad.permute(*order, 3).is_contiguous():
        grad = grad.contiguous()
    rows = grad.permute(*order, 3).reshape(-1, dim)  # a view in storage order
    row_stride = [grad.stride(i) // dim for i in range(3)]
    base = torch.arange(bh, device=acc.device)[:, None] * row_stride[0]  # (BH, 1)
    flat = acc.view(-1, dim)
    for chunk, place in parts:
        index = (base + chunk * row_stride[1] + place * row_stride[2]).flatten()  # (BH*N,)
        flat.add_(gathers.take("add", index, rows)[0])
