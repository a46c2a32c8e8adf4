"""`xl`: Transformer-XL's segment recurrence with memory and relative positions (Dai et al. 2019).

The N keys form segments of ``segment_len``; a query in segment s attends causally over the
``mem_len`` positions before its segment (the memory) and its segment so far, so the cost is
O(N * (segment_len + mem_len)) (see :func:`effattn.backends.xl.relative.segment_pattern` for the
picture).

What "memory" means here: the previous positions' k and v, taken from the inputs and *not*
detached, so gradients reach them like any other input (the layer-level detach of the paper lives
in :class:`effattn.nn.TransformerXLAttention`, whose memory is the cached hidden states).

The relative-position term has no learned weights in a backend; it uses a fixed parameterisation
drawn from ``seed`` (:func:`effattn.backends.xl.relative.fixed_relative_position`), and
``relative`` picks the terms:

* ``"bias"`` (default): terms (a) + (d), ``scale * (q_i . k_j + v . r_{i-j})``: a distance bias
  that depends on neither q nor k, so ``pattern().bias`` reproduces output *and* gradients.
* ``"full"``: all four terms ``scale * ((q_i + u) . k_j + (q_i + v) . r_{i-j})`` with the shift
  trick, what a Transformer-XL layer costs. ``pattern().bias`` holds terms (b) + (c) + (d) for the
  given q and k, so the output matches it; the gradients of q and k also flow through the bias
  (tests compare them with a naive dense computation instead).
* ``"none"``: term (a) only: the plain segment pattern.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from effattn.backend import Backend, predicate_pattern
from effattn.backends.xl.relative import (
    RelativePosition,
    dense_relative_bias,
    fixed_relative_position,
    segment_attention,
    segment_distances,
    segment_pattern,
)
from effattn.ops import attention_flops, cached
from effattn.patterns import Pattern, Predicate
from effattn.registry import register_backend


@register_backend("xl")
@dataclass(frozen=True)
class TransformerXLAttention(Backend):
    """Segments of ``segment_len`` queries, each over [``mem_len`` memory; its segment]."""

    segment_len: int = 128  # queries per segment, >= 1
    mem_len: int = 128  # earlier positions each segment also attends to (the memory), >= 0
    relative: Literal["bias", "full", "none"] = "bias"  # which relative-position terms (above)
    seed: int = 0  # seed of the fixed relative-position parameters (r projection, u, v)

    exact = False  # attends to segments with memory, not every earlier key
    supports_bidirectional = False
    complexity = "O(N*(S+M))"
    memory_complexity = "O(N*(S+M))"
    tay_class = "RC"
    decode_refusal = "not implemented yet (its state would be the memory and the current segment)"
    description = "Transformer-XL: segments with memory, relative positions (shift trick)"

    def __post_init__(self) -> None:
        if self.segment_len < 1:
            raise ValueError(f"segment_len: expected an integer >= 1, got {self.segment_len}")
        if self.mem_len < 0:
            raise ValueError(f"mem_len: expected an integer >= 0, got {self.mem_len}")
        if self.relative not in ("bias", "full", "none"):
            raise ValueError(f"relative: expected 'bias', 'full' or 'none', got {self.relative!r}")

    def _relative(self, q: Tensor) -> RelativePosition | None:
        """The fixed parameters for inputs like q (B, H, N, D): drawn once per (options, H, D,
        dtype, device) and cached (see :func:`effattn.ops.cached`), not on every call."""
        if self.relative == "none":
            return None
        heads, dim = q.shape[1], q.shape[3]
        d_hi, count = segment_distances(self.segment_len, self.mem_len)
        return cached(
            (self, "xl_relative", heads, dim, q.dtype, str(q.device)),
            lambda: fixed_relative_position(
                heads,
                dim,
                d_hi,
                count,
                seed=self.seed,
                content_terms=self.relative == "full",
                dtype=q.dtype,
                device=q.device,
            ),
        )

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
        return segment_attention(
            q,
            k,
            v,
            segment_len=self.segment_len,
            mem_len=self.mem_len,
            scale=scale,
            rel=self._relative(q),
            key_padding_mask=key_padding_mask,
        )

    def pattern(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = True,
        key_padding_mask: Tensor | None = None,
    ) -> Pattern:
        """The banded-causal segment mask (B or 1, 1, Nq, Nk) with key padding, and the dense
        relative-position bias (1 or B, H, Nq, Nk), scaled by 1/sqrt(D) whatever the call's
        ``scale`` (which multiplies the content term q . k only)."""
        pattern = predicate_pattern(self.predicate, q, k, causal, key_padding_mask)
        rel = self._relative(q)
        if rel is None:
            return pattern
        bias = dense_relative_bias(q, k, rel, first_pos=k.shape[2] - q.shape[2])
        return dataclasses.replace(pattern, bias=bias)

    def predicate(self, q_len: int, kv_len: int, *, causal: bool = True) -> Predicate:
        """The pattern as a predicate (:func:`~effattn.backends.xl.relative.segment_pattern`;
        always causal)."""
        return segment_pattern(self.segment_len, self.mem_len, q_len, kv_len)

    def flops(
        self,
        batch: int,
        heads: int,
        q_len: int,
        kv_len: int,
        head_dim: int,
        *,
        causal: bool = True,
    ) -> int:
        """Forward FLOPs of the computed blocks: every segment holding a query scores S x (M + S)
        pairs (masked ones included), 4*D each; ``relative="full"`` adds 2*D per entry of the
        S x (M + 2S - 1) content-position block before the shift."""
        s, m = self.segment_len, self.mem_len
        first_pos = max(0, kv_len - q_len)
        n_seg = -(-kv_len // s) - first_pos // s
        flops = attention_flops(batch, heads, head_dim, n_seg * s * (m + s))
        if self.relative == "full":
            flops += 2 * batch * heads * head_dim * n_seg * s * (m + 2 * s - 1)
        return flops

    def relative_position(self, q: Tensor) -> RelativePosition | None:
        """The fixed relative-position parameters used for inputs like ``q`` (B, H, N, D)."""
        return self._relative(q)
