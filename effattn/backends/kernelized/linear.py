"""`linear`: linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"), Tay class KR.

The similarity exp(q . k) is replaced by phi(q) . phi(k) with the feature map
phi(x) = elu(x) + 1 (positive, D features), so attention is the normalised product
phi(Q) (phi(K)^T V) in time and memory linear in N (effattn.backends.kernelized.product)::

    out_i = sum_j phi(q_i) . phi(k_j) v_j / sum_j phi(q_i) . phi(k_j)

- Causal: chunks of ``chunk_size`` positions with running (D, D) and (D, 1) sums, the paper's
  RNN form computed a chunk at a time, batched over the chunks of a step (never an (N, D, D)
  prefix tensor).
- Key padding: a masked key's features are zero, so it adds to no sum; a query that keeps no
  key gets zeros.
- ``scale`` does not enter: the paper's similarity has no temperature, phi is applied to q and
  k as given (a caller who wants one scales q before the call).

The dense reference (:meth:`attention_matrix`) normalises phi(Q) phi(K)^T row by row with the
causal mask applied densely; the fast path must equal it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from effattn._validate import check_int_option
from effattn.backend import Backend
from effattn.backends.kernelized.features import elu_features
from effattn.backends.kernelized.product import FeatureMaps, kernel_flops, kernel_matrix
from effattn.backends.kernelized.state import KernelState
from effattn.decoding import StateShape
from effattn.registry import register_backend


@register_backend("linear")
@dataclass(frozen=True)
class LinearAttention(Backend):
    """Linear attention with phi(x) = elu(x) + 1: phi(Q) (phi(K)^T V), normalised."""

    chunk_size: int = 64  # causal: positions per chunk of the prefix sums

    exact = False
    complexity = "O(N)"
    memory_complexity = "O(N)"
    tay_class = "KR"
    state_complexity = "O(1)"
    has_pattern = False
    description = "linear attention, phi(x) = elu(x) + 1: phi(Q)(phi(K)^T V); scale unused"

    def __post_init__(self) -> None:
        check_int_option("linear", "chunk_size", self.chunk_size)

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
        maps = self.feature_maps(q.shape[-1], q.dtype)
        return maps.attention(
            q, k, v, key_padding_mask=key_padding_mask, causal=causal, chunk=self.chunk_size
        )

    def feature_maps(self, head_dim: int, dtype: torch.dtype) -> FeatureMaps:
        """elu(x) + 1 for queries and keys (D features), in float32 for half dtypes."""
        wide = dtype if torch.finfo(dtype).bits >= 32 else torch.float32
        return FeatureMaps(elu_features, elu_features, log_keys=False, width=head_dim, wide=wide)

    def decode_state(self, shape: StateShape) -> KernelState:
        """The running sums of the causal product (effattn.backends.kernelized.state)."""
        return KernelState(
            self, shape, self.feature_maps(shape.head_dim, shape.dtype), self.chunk_size
        )

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
        """(B, H, Nq, Nk) float64: phi(Q) phi(K)^T masked by causality and key padding, rows
        normalised (see Backend.attention_matrix)."""
        self._checked(q, k, v, causal, key_padding_mask, scale, dense=True)
        fq = elu_features(q.double())
        fk = elu_features(k.double(), key_padding_mask)
        return kernel_matrix(fq, fk, causal=causal, log_keys=False)

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
        """Forward FLOPs, 2 per multiply-add of a matmul: the normalised product with D
        features (:func:`effattn.backends.kernelized.product.kernel_flops`); the feature map
        and sums not counted."""
        return kernel_flops(
            batch, heads, q_len, kv_len, head_dim, head_dim, causal, self.chunk_size
        )
