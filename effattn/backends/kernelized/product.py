"""The normalised product the kernelized backends share, in time linear in N:

    out_i = sum_j phi(q_i) . phi(k_j) v_j / sum_j phi(q_i) . phi(k_j)

over the keys j that query i keeps (every kept key; causal: j <= i + Nk - Nq), and zero where a
query keeps none. It is computed as phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1) with a state of
(m, D) and (m, 1) per head, features made a step of positions at a time (STEP_FEATURES
feature entries per head: 1024 positions of 256 features, 4096 of 64), so no (N, m)
feature tensor and no (N, m, D) prefix tensor is ever held:

- bidirectional: the keys, a step at a time, are summed into the state; then each step of
  queries reads it;
- causal: each step is cut into G chunks of ``chunk`` positions; a chunk's queries read the
  state of the earlier steps, an exclusive prefix sum over the step's (G, m, D) chunk
  states, and their own (chunk, chunk) block of phi(q) . phi(k) masked to its lower
  triangle; then the step's keys join the state. Batched over the G chunks, so a step is a
  few large operations rather than G small ones.

Key features come either positive (0 for masked keys) or as logarithms (-inf for masked keys,
FAVOR+). Logarithms are exponentiated against a stabiliser that cancels in the ratio: the
largest kept logit of the steps summed so far, the state being rescaled when it grows (as flash
attention rescales its running sums). No exponent is positive, and in causal mode no key of a
later step can shift or underflow an earlier step's features (within a step, the keys share
one stabiliser: a constant factor, which cancels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from effattn.ops import keep_mask

# Feature entries (positions x m) per head in one step: large enough that a step is a few large
# operations (many small ones stall when the cores are shared), small enough that a step's
# features stay a few MiB.
STEP_FEATURES = 2**18

QueryMap = Callable[[Tensor], Tensor]  # (B, H, c, D) -> (B, H, c, m), positive
KeyMap = Callable[[Tensor, Tensor | None], Tensor]  # (B, H, c, D), keep (B, c) -> (B, H, c, m)


def _normalise(num: Tensor, den: Tensor) -> Tensor:
    """num / den with den (.., 1); rows whose den is 0 (no kept key) give 0, with finite grads."""
    return num / torch.where(den > 0, den, torch.ones_like(den))


def _finite(ref: Tensor) -> Tensor:
    """A stabiliser of -inf (nothing kept yet) becomes 0; exp(-inf - 0) = 0 stays exact."""
    return torch.where(torch.isfinite(ref), ref, torch.zeros_like(ref))


class KeyState:
    """The running sums over the keys passed: phi(k_j) v_j (B, H, m, D) and phi(k_j)
    (B, H, m, 1), and, for logarithmic features, the stabiliser they are expressed against
    (B, H, 1, 1). (The weight sums are kept apart rather than as a column of ones after v:
    a width of D + 1 slows the matmuls more than a separate sum costs.)"""

    def __init__(self, log_keys: bool) -> None:
        self.log_keys = log_keys
        self.sums: Tensor | None = None
        self.norm: Tensor | None = None
        self.ref: Tensor | None = None

    def features(self, keys: Tensor) -> Tensor:
        """The features of the next keys (B, H, c, m), against a stabiliser that now covers
        them too (the sums are rescaled to it)."""
        if not self.log_keys:
            return keys
        top = keys.detach().amax(dim=(-2, -1), keepdim=True)  # (B, H, 1, 1)
        ref = _finite(top if self.ref is None else torch.maximum(self.ref, top))
        if self.sums is not None:
            decay = (self.ref - ref).exp()
            self.sums, self.norm = self.sums * decay, self.norm * decay
        self.ref = ref
        return keys.sub_(ref).exp_()  # keys: a fresh tensor of the key map

    def add(self, phi: Tensor, values: Tensor) -> None:
        """Sum phi (B, H, c, m) times values (B, H, c, D), and phi, into the state."""
        sums = phi.transpose(-2, -1) @ values  # (B, H, m, c) @ (B, H, c, D) -> (B, H, m, D)
        self.add_sums(sums, phi.sum(dim=-2).unsqueeze(-1))  # (B, H, m, 1)

    def add_sums(self, sums: Tensor, norm: Tensor) -> None:
        """Add sums (B, H, m, D) and norm (B, H, m, 1), against the current stabiliser."""
        if self.sums is None:
            self.sums, self.norm = sums, norm
        else:
            self.sums, self.norm = self.sums + sums, self.norm + norm

    def read(self, fq: Tensor) -> tuple[Tensor, Tensor]:
        """fq (B, H, c, m) times the state: numerators (B, H, c, D), denominators (.., 1)."""
        return fq @ self.sums, fq @ self.norm


def kernel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    query_map: QueryMap,
    key_map: KeyMap,
    key_padding_mask: Tensor | None,
    causal: bool,
    chunk: int,
    log_keys: bool,
    width: int,
    state: KeyState | None = None,
) -> Tensor:
    """The normalised product of the module docstring. q: (B, H, Nq, D), k, v: (B, H, Nk, D),
    key_padding_mask (B, Nk) or None; returns (B, H, Nq, D). Causal is bottom-right aligned.

    query_map gives positive query features (any factor per query cancels); key_map gives key
    features for keys and their keep mask: positive with 0 for masked keys, or with
    ``log_keys`` their logarithms with -inf for masked keys; ``width`` is their number m.

    ``state``: the sums of earlier keys to go on from (decoding: causal, Nq == Nk, the queries
    and keys are the positions after those summed); it is updated in place with these keys."""
    b, h, q_len, d = q.shape
    kv_len = k.shape[2]
    state = KeyState(log_keys) if state is None else state
    stream = max(STEP_FEATURES // width, 1)  # positions per step
    out = q.new_empty(b, h, q_len, d)  # written a chunk at a time

    def causal_step(qs: Tensor, ks: Tensor, vs: Tensor, keep: Tensor | None) -> Tensor:
        """One step of aligned queries and keys (B, H, L, D) -> (B, H, L, D), in chunks."""
        length = qs.shape[2]
        qs, ks, vs, keep = _pad_to_chunks(qs, ks, vs, keep, chunk)  # (B, H, G * c, .)
        groups = qs.shape[2] // chunk
        fq = query_map(qs).unflatten(2, (groups, chunk))  # (B, H, G * c, m) -> (B, H, G, c, m)
        phi = state.features(key_map(ks, keep)).unflatten(2, (groups, chunk))  # (B,H,G,c,m)
        values = vs.unflatten(2, (groups, chunk))  # (B, H, G, c, D)
        per_chunk = phi.transpose(-2, -1) @ values  # (B, H, G, m, D)
        per_norm = phi.sum(dim=-2).unsqueeze(-1)  # (B, H, G, m, 1)
        # what the chunks before each chunk add: an exclusive prefix over G (no subtraction)
        before = F.pad(per_chunk[:, :, :-1].cumsum(dim=2), (0, 0, 0, 0, 1, 0))
        before_norm = F.pad(per_norm[:, :, :-1].cumsum(dim=2), (0, 0, 0, 0, 1, 0))
        if state.sums is not None:  # earlier steps: (B, H, 1, m, .)
            before = before + state.sums.unsqueeze(2)
            before_norm = before_norm + state.norm.unsqueeze(2)
        block = (fq @ phi.transpose(-2, -1)).tril()  # (B, H, G, c, c): key j <= query i
        num = block @ values + fq @ before  # (B, H, G, c, D)
        den = block.sum(dim=-1, keepdim=True) + fq @ before_norm  # (B, H, G, c, 1)
        state.add_sums(per_chunk.sum(dim=2), per_norm.sum(dim=2))
        out = _normalise(num, den).flatten(2, 3)  # (B, H, G, c, D) -> (B, H, G * c, D)
        return out[:, :, :length]

    if not causal:
        add_key_sums(state, k, v, key_map, key_padding_mask, width)
        for start in range(0, q_len, stream):
            fq = query_map(q[:, :, start : start + stream])  # (B, H, c, m)
            out[:, :, start : start + stream] = _normalise(*state.read(fq))
        return out

    first_query = max(q_len - kv_len, 0)  # queries before it keep no key
    shared = max(kv_len - q_len, 0)  # keys before it are kept by every query
    if shared:
        keep = None if key_padding_mask is None else key_padding_mask[:, :shared]
        add_key_sums(state, k[:, :, :shared], v[:, :, :shared], key_map, keep, width)
    out[:, :, :first_query] = 0.0
    span = max(stream // chunk, 1) * chunk  # positions per step: whole chunks
    for start in range(0, q_len - first_query, span):
        stop = min(start + span, q_len - first_query)
        rows = slice(first_query + start, first_query + stop)
        keys = slice(shared + start, shared + stop)
        keep = None if key_padding_mask is None else key_padding_mask[:, keys]
        out[:, :, rows] = causal_step(q[:, :, rows], k[:, :, keys], v[:, :, keys], keep)
    return out


@dataclass(frozen=True)
class FeatureMaps:
    """How a kernelized backend turns queries and keys into features."""

    query_map: QueryMap  # (B, H, c, D) -> (B, H, c, m), positive
    key_map: KeyMap  # (B, H, c, D), keep (B, c) -> (B, H, c, m): positive, or logarithms
    log_keys: bool  # key_map gives logarithms (FAVOR+)
    width: int  # m, features per head
    wide: torch.dtype  # the dtype of the computation (float32 for half inputs)

    def attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None,
        causal: bool,
        chunk: int,
        state: KeyState | None = None,
    ) -> Tensor:
        """:func:`kernel_attention` with these maps, computed in ``wide``; (B, H, Nq, D) in
        q's dtype."""
        out = kernel_attention(
            q.to(self.wide),
            k.to(self.wide),
            v.to(self.wide),
            query_map=self.query_map,
            key_map=self.key_map,
            key_padding_mask=key_padding_mask,
            causal=causal,
            chunk=chunk,
            log_keys=self.log_keys,
            width=self.width,
            state=state,
        )
        return out.to(q.dtype)


def add_key_sums(
    state: KeyState,
    k: Tensor,
    v: Tensor,
    key_map: KeyMap,
    key_padding_mask: Tensor | None,
    width: int,
) -> None:
    """Sum the features of keys k (B, H, N, D) times values v, and the features, into
    ``state``, a step of positions at a time (no (N, m) feature tensor)."""
    stream = max(STEP_FEATURES // width, 1)
    for start in range(0, k.shape[2], stream):
        keys = slice(start, start + stream)
        keep = None if key_padding_mask is None else key_padding_mask[:, keys]
        state.add(state.features(key_map(k[:, :, keys], keep)), v[:, :, keys])


def _pad_to_chunks(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, chunk: int
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """q, k, v (B, H, L, .) zero-padded to a multiple of ``chunk`` positions; the keep mask
    (B, L) padded with False, so the padding keys are masked (None when nothing is masked)."""
    length = q.shape[2]
    pad = -length % chunk
    if not pad:
        return q, k, v, keep
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    if keep is None:
        keep = torch.ones(q.shape[0], length, dtype=torch.bool, device=q.device)
    return q, k, v, F.pad(keep, (0, pad), value=False)


def kernel_matrix(fq: Tensor, fk: Tensor, *, causal: bool, log_keys: bool) -> Tensor:
    """The dense (B, H, Nq, Nk) matrix A of the same product, out = A @ v: the features' dot
    products, masked by causality, each row divided by its sum (0 for a row without keys).
    fq (B, H, Nq, m) and fk (B, H, Nk, m) are whole feature tensors, as the maps give them
    (fk is not modified); tests and pictures only."""
    if log_keys:
        fk = (fk - _finite(fk.detach().amax(dim=(-2, -1), keepdim=True))).exp()
    weights = fq @ fk.transpose(-2, -1)  # (B, H, Nq, m) @ (B, H, m, Nk) -> (B, H, Nq, Nk)
    q_len, kv_len = fq.shape[2], fk.shape[2]
    keep = keep_mask(1, q_len, kv_len, causal=causal, key_padding_mask=None, device=fq.device)
    if keep is not None:
        weights = weights * keep  # (1, 1, Nq, Nk)
    return _normalise(weights, weights.sum(dim=-1, keepdim=True))


def kernel_flops(
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    width: int,
    head_dim: int,
    causal: bool,
    chunk: int,
) -> int:
    """Forward FLOPs of the normalised product over features of ``width`` m, 2 per
    multiply-add of its matmuls: phi(K)^T V and phi(K)^T 1 (2 Nk m (D+1)), phi(Q) S and
    phi(Q) z (2 Nq m (D+1)); causal adds each chunk's (chunk, chunk) block, computed whole
    and masked (2 Nq chunk (m + D + 1))."""
    state = (q_len + kv_len) * width * (head_dim + 1)
    block = q_len * min(chunk, q_len) * (width + head_dim + 1) if causal else 0
    return 2 * batch * heads * (state + block)
