"""`performer`: FAVOR+ attention (Choromanski et al. 2021, "Rethinking Attention with
Performers"), Tay class KR.

softmax(scale * q . k) is replaced by a dot product of positive random features (see
effattn.backends.kernelized.features), which are unbiased for exp(scale * q . k), and the
attention is computed as the normalised product phi(Q) (phi(K)^T V) in time and memory linear
in N (effattn.backends.kernelized.product)::

    out_i = sum_j phi(q_i) . phi(k_j) v_j / sum_j phi(q_i) . phi(k_j)

- Features: ``num_features`` rows w_f, orthogonal in blocks of D (``orthogonal=True``, FAVOR+)
  or iid, drawn from ``seed`` once per (options, D) and cached: calls are reproducible and the
  features never change between calls (:meth:`PerformerAttention.features` returns them).
- Numerically stabilised: every query's features are divided by their largest, every key's
  exponent is taken against the largest kept one (bidirectional: of the head; causal: the
  running largest of the steps seen so far). These factors cancel in the normalisation, so the
  output is that of the unstabilised formula; no exponent is positive, nothing overflows.
- Causal: chunks of ``chunk_size`` positions, a lower-triangular (chunk, chunk) block inside a
  chunk and running (m, D) and (m, 1) sums of the chunks before it (a prefix over the chunks
  of one step, a few of them batched together): never an (N, m, D) prefix tensor.
- Key padding: a masked key's features are exactly zero (and it sets no stabiliser), so it adds
  to no sum. A query that keeps no key gets zeros.
- ``scale`` enters as q' = sqrt(scale) q and k' = sqrt(scale) k, so q' . k' = scale * q . k.

The dense reference (:meth:`attention_matrix`) builds the same features in float64 and
normalises phi(Q) phi(K)^T row by row: the fast path must equal it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from effattn._validate import check_int_option, check_seed_option
from effattn.backend import Backend
from effattn.backends.kernelized.features import (
    favor_key_logits,
    favor_query_features,
    random_features,
)
from effattn.backends.kernelized.product import FeatureMaps, kernel_flops, kernel_matrix
from effattn.backends.kernelized.state import KernelState
from effattn.decoding import StateShape
from effattn.registry import register_backend


@register_backend("performer")
@dataclass(frozen=True)
class PerformerAttention(Backend):
    """FAVOR+: positive orthogonal random features approximating softmax attention."""

    num_features: int = 256  # m, the random features per head (more: closer to softmax)
    orthogonal: bool = True  # FAVOR+'s orthogonal blocks of D rows; False: iid Gaussian rows
    seed: int = 0  # seed of the random features (fixed: not redrawn between calls)
    chunk_size: int = 64  # causal: positions per chunk of the prefix sums

    exact = False
    complexity = "O(N)"
    memory_complexity = "O(N*m)"
    tay_class = "KR"
    state_complexity = "O(1)"
    has_pattern = False
    description = "Performer FAVOR+: positive orthogonal random features, phi(Q)(phi(K)^T V)"

    def __post_init__(self) -> None:
        check_int_option("performer", "num_features", self.num_features)
        check_int_option("performer", "chunk_size", self.chunk_size)
        check_seed_option("performer", self.seed)

    def features(
        self, head_dim: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> Tensor:
        """The random feature rows w (num_features, head_dim) this backend uses."""
        return random_features(
            self.num_features,
            head_dim,
            self.seed,
            orthogonal=self.orthogonal,
            dtype=dtype,
            device=device,
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
        maps = self.feature_maps(q.shape[-1], q.dtype, q.device, scale)
        return maps.attention(
            q, k, v, key_padding_mask=key_padding_mask, causal=causal, chunk=self.chunk_size
        )

    def feature_maps(
        self, head_dim: int, dtype: torch.dtype, device: torch.device, scale: float
    ) -> FeatureMaps:
        """FAVOR+'s query features and key logarithms with this backend's random features,
        computed in float32 for half dtypes."""
        wide = dtype if torch.finfo(dtype).bits >= 32 else torch.float32
        w = self.features(head_dim, wide, device)  # (m, D)
        return FeatureMaps(
            query_map=lambda x: favor_query_features(x, w, scale),
            key_map=lambda x, keep: favor_key_logits(x, w, scale, keep),
            log_keys=True,
            width=self.num_features,
            wide=wide,
        )

    def decode_state(self, shape: StateShape) -> KernelState:
        """The running sums of the causal product (effattn.backends.kernelized.state)."""
        maps = self.feature_maps(shape.head_dim, shape.dtype, shape.device, shape.scale)
        return KernelState(self, shape, maps, self.chunk_size)

    def attention_matrix(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor:
        """(B, H, Nq, Nk) float64: phi(Q) phi(K)^T with the same features, masked by causality
        and key padding, rows normalised (see Backend.attention_matrix)."""
        scale = self._checked(q, k, v, causal, key_padding_mask, scale, dense=True)
        w = self.features(q.shape[-1], torch.float64, q.device)
        fq = favor_query_features(q.double(), w, scale)
        fk = favor_key_logits(k.double(), w, scale, key_padding_mask)
        return kernel_matrix(fq, fk, causal=causal, log_keys=True)

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
        """Forward FLOPs, 2 per multiply-add of a matmul: the features (2 (Nq + Nk) D m) and the
        normalised product (:func:`kernel_flops`); exponentials and sums not counted."""
        m = self.num_features
        features = 2 * batch * heads * (q_len + kv_len) * head_dim * m
        return features + kernel_flops(
            batch, heads, q_len, kv_len, m, head_dim, causal, self.chunk_size
        )
