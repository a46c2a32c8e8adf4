"""Transformer-XL's relative multi-head attention layer with segment-level memory (Dai et al. 2019).

>>> layer = TransformerXLAttention(embed_dim=512, num_heads=8, mem_len=512)
>>> out, mems = layer(segment_1)            # (B, L, E), mems: (B, min(L, 512), E)
>>> out, mems = layer(segment_2, mems)      # segment_2 attends over [mems; segment_2]

The memory is the cache of the layer's *inputs* (hidden states) of the last ``mem_len``
positions, detached: no gradient flows into it. Keys and values are projected from
[mems; x], queries from x, and scores use relative positions (all four terms, shift trick)::

    s_ij = ((q_i + u) . k_j + (q_i + v) . r_{i-j}) / sqrt(D),   r_d = W_r R_d (sinusoidal R)

Streaming: feeding a sequence one segment (or one token) per call, each call seeing the memory
returned by the previous one, gives query i the keys [mems; segment up to i]; with a memory that
covers the whole past (mem_len >= sequence length) that is plain causal attention over the whole
sequence, so streaming equals one call over the whole sequence. With a shorter memory each query
sees the memory of its segment: the pattern of the ``xl`` backend.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from effattn.backends.xl.relative import (
    RelativePosition,
    descending_distances,
    prefix_attention,
    prefix_block,
    sinusoid_encoding,
)


class TransformerXLAttention(nn.Module):
    """Relative multi-head self-attention over [memory; segment], batch-first.

    Args:
        embed_dim: E, the model width (even: the sinusoidal encoding has E/2 frequencies).
        num_heads: H; E must be divisible by H (head dim D = E / H).
        mem_len: how many past positions (layer inputs) the returned memory keeps; 0 = none.
            Evaluation may use a longer memory than training (it is only a cache length).
        segment_len: the longest segment one call accepts (the training segment length), or
            None for any length.
        dropout: dropout on the attention probabilities in training mode.
        bias: whether the q, k, v and output projections have biases.
        device, dtype: of the parameters.

    Parameters: ``q_proj`` (E -> E), ``kv_proj`` (E -> 2E), ``r_proj`` (E -> E, no bias: W_r),
    ``pos_bias_u`` and ``pos_bias_v`` (H, D), ``out_proj`` (E -> E).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        mem_len: int,
        segment_len: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_int("embed_dim", embed_dim, minimum=2)
        _check_int("num_heads", num_heads, minimum=1)
        _check_int("mem_len", mem_len, minimum=0)
        if segment_len is not None:
            _check_int("segment_len", segment_len, minimum=1)
        if embed_dim % 2:
            raise ValueError(f"embed_dim: expected an even number, got {embed_dim}")
        if embed_dim % num_heads:
            raise ValueError(
                f"num_heads: expected a divisor of embed_dim={embed_dim}, got {num_heads}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.mem_len = mem_len
        self.segment_len = segment_len
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.kv_proj = nn.Linear(embed_dim, 2 * embed_dim, bias=bias, **factory)
        self.r_proj = nn.Linear(embed_dim, embed_dim, bias=False, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.pos_bias_u = nn.Parameter(torch.empty(num_heads, self.head_dim, **factory))
        self.pos_bias_v = nn.Parameter(torch.empty(num_heads, self.head_dim, **factory))
        nn.init.normal_(self.pos_bias_u, std=0.02)
        nn.init.normal_(self.pos_bias_v, std=0.02)
        # Sinusoidal encodings of distances _encoding_hi, _encoding_hi - 1, ... (P, E), reused
        # across calls (a cache, not state: it depends on nothing learned).
        self._encoding: Tensor | None = None
        self._encoding_hi = 0

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, mem_len={self.mem_len}, "
            f"segment_len={self.segment_len}, dropout={self.dropout}"
        )

    def forward(self, x: Tensor, mems: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: (B, L, E) the segment; mems: None or (B, M, E) with M <= mem_len, the memory that
        the previous call returned. Returns (out (B, L, E), new_mems (B, min(M + L, mem_len), E)):
        the last mem_len positions of [mems; x], detached."""
        self._check_input(x, mems)
        batch, seg_len, _ = x.shape
        context = x if mems is None else torch.cat([mems.detach(), x], dim=1)  # (B, M + L, E)
        kv_len = context.shape[1]

        def split_heads(t: Tensor) -> Tensor:
            # (B, N, E) -> (B, N, H, D) -> (B, H, N, D)
            return t.view(batch, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        q = split_heads(self.q_proj(x))  # (B, H, L, D)
        k, v = (split_heads(t) for t in self.kv_proj(context).chunk(2, dim=-1))  # (B, H, M+L, D)
        block = prefix_block(batch, self.num_heads, seg_len, kv_len)
        if block < seg_len:  # several query blocks read prefixes of k, v: lay them out once
            k, v = k.contiguous(), v.contiguous()
        # Few queries against many distances (decoding): project the queries instead of R.
        query_side = seg_len * self.num_heads < self.embed_dim
        rel = self.relative_position(kv_len - 1, kv_len + block - 1, query_side=query_side)
        out = prefix_attention(
            q, k, v, rel=rel, block=block, dropout_p=self.dropout if self.training else 0.0
        )
        # (B, H, L, D) -> (B, L, H, D) -> (B, L, E)
        out = out.transpose(1, 2).reshape(batch, seg_len, self.embed_dim)
        new_mems = context[:, max(0, kv_len - self.mem_len) :].detach()
        return self.out_proj(out), new_mems

    def relative_position(
        self, d_hi: int, count: int, *, query_side: bool = False
    ) -> RelativePosition:
        """The relative-position terms for the distances d_hi, d_hi - 1, ..., d_hi - count + 1,
        with this layer's u and v (1/sqrt(D) scale). By default the projected encodings
        ``r_d = W_r R_d`` (H, count, D); with ``query_side`` the encodings R_d (1, count, E) and
        W_r as the query projection (the same scores, for few queries)."""
        encoding = self._encodings(d_hi, count)  # (P, E)
        if query_side:
            weight = self.r_proj.weight.view(self.num_heads, self.head_dim, self.embed_dim)
            pos_key, query_proj = encoding[None], weight  # (1, P, E), (H, D, E)
        else:
            projected = self.r_proj(encoding).view(count, self.num_heads, self.head_dim)
            pos_key, query_proj = projected.transpose(0, 1), None  # (P, H, D) -> (H, P, D)
        return RelativePosition(
            pos_key=pos_key,
            d_hi=d_hi,
            u=self.pos_bias_u,
            v=self.pos_bias_v,
            scale=self.head_dim**-0.5,
            query_proj=query_proj,
        )

    def _encodings(self, d_hi: int, count: int) -> Tensor:
        """Rows of the cached sinusoidal table for d_hi down to d_hi - count + 1: (count, E)."""
        weight = self.r_proj.weight
        lo = d_hi - count + 1
        cache = self._encoding
        stale = (
            cache is None
            or cache.device != weight.device
            or cache.dtype != weight.dtype
            or d_hi > self._encoding_hi
            or lo < self._encoding_hi - cache.shape[0] + 1
        )
        if stale:
            old_lo = lo if cache is None else min(lo, self._encoding_hi - cache.shape[0] + 1)
            hi = d_hi + max(256, d_hi // 4)  # headroom: streaming asks for one more each call
            lo = min(lo, old_lo)
            distances = descending_distances(hi, hi - lo + 1)
            cache = sinusoid_encoding(distances, self.embed_dim).to(weight.device, weight.dtype)
            self._encoding, self._encoding_hi = cache, hi
        first = self._encoding_hi - d_hi
        return cache[first : first + count]

    def _check_input(self, x: Tensor, mems: Tensor | None) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor (B, L, E), got {type(x).__name__}")
        if x.dim() != 3 or x.shape[2] != self.embed_dim or x.shape[1] == 0:
            raise ValueError(
                f"x: expected shape (B, L, E) with E={self.embed_dim} and L >= 1, "
                f"got {tuple(x.shape)}"
            )
        if self.segment_len is not None and x.shape[1] > self.segment_len:
            raise ValueError(
                f"x: expected a segment of at most segment_len={self.segment_len} positions, got "
                f"{x.shape[1]}; split the sequence and pass each call the mems of the previous one"
            )
        if mems is None:
            return
        if not isinstance(mems, Tensor):
            raise TypeError(f"mems: expected a torch.Tensor or None, got {type(mems).__name__}")
        if mems.dim() != 3 or mems.shape[2] != self.embed_dim:
            raise ValueError(
                f"mems: expected shape (B, M, E) with E={self.embed_dim}, got {tuple(mems.shape)}"
            )
        if mems.shape[0] != x.shape[0]:
            raise ValueError(
                f"mems: expected the batch size of x ({x.shape[0]}), got {mems.shape[0]}; the "
                "batch size cannot change between calls (start again with mems=None)"
            )
        if mems.shape[1] > self.mem_len:
            raise ValueError(
                f"mems: expected at most mem_len={self.mem_len} positions, got {mems.shape[1]}"
            )
        if mems.dtype != x.dtype or mems.device != x.device:
            raise ValueError(
                f"mems: expected dtype {x.dtype} on {x.device} like x, "
                f"got {mems.dtype} on {mems.device}"
            )


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
