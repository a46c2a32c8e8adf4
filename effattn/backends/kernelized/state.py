"""The decoding state of the kernelized backends (`linear`, `performer`): the running sums of
linear attention, of a size fixed in N (Katharopoulos et al. 2020, "Transformers are RNNs").

    sums = sum_j phi(k_j) v_j^T  (B, H, m, D)        norm = sum_j phi(k_j)  (B, H, m, 1)

(and, for FAVOR+'s logarithmic key features, the stabiliser they are expressed against,
(B, H, 1, 1): effattn.backends.kernelized.product.KeyState). A call runs the backend's causal
normalised product of the new queries over the sums and the new keys, chunk by chunk, and adds
the new keys to the sums: the same computation as the causal forward over the whole sequence,
which passes through the same sums. The sums are kept per query head: with grouped key/value
heads the new keys are repeated to the query heads first (c positions, not the cache), so the
state is B * H * m * (D + 1) values whatever Hkv is. Computed in float32 for half inputs.
"""

from __future__ import annotations

from torch import Tensor

from effattn.backend import Backend
from effattn.backends.kernelized.product import FeatureMaps, KeyState, add_key_sums
from effattn.decoding import DecodeState, StateShape
from effattn.ops import repeat_kv_heads


class KernelState(DecodeState):
    """The running sums of linear attention over the keys seen so far."""

    def __init__(self, backend: Backend, shape: StateShape, maps: FeatureMaps, chunk: int) -> None:
        super().__init__(backend, shape)
        self.maps = maps
        self.chunk = chunk
        self.sums = KeyState(maps.log_keys)

    def tensors(self) -> list[Tensor]:
        parts = (self.sums.sums, self.sums.norm, self.sums.ref)
        return [t for t in parts if t is not None]

    def _snapshot(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        s = self.sums  # KeyState replaces its tensors, never writes into them
        return s.sums, s.norm, s.ref

    def _restore(self, snapshot: tuple[Tensor | None, Tensor | None, Tensor | None]) -> None:
        self.sums.sums, self.sums.norm, self.sums.ref = snapshot

    def _widen(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (B, Hkv, c, D) -> (B, H, c, D) in the computation's dtype."""
        heads, wide = self.shape.heads, self.maps.wide
        return repeat_kv_heads(k, heads).to(wide), repeat_kv_heads(v, heads).to(wide)

    def _append(self, k: Tensor, v: Tensor, keep: Tensor | None) -> None:
        k, v = self._widen(k, v)
        add_key_sums(self.sums, k, v, self.maps.key_map, keep, self.maps.width)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
        k, v = self._widen(k, v)
        chunk = min(self.chunk, k.shape[2])  # a token is a chunk of 1, not one padded to 64
        return self.maps.attention(
            q, k, v, key_padding_mask=keep, causal=True, chunk=chunk, state=self.sums
        )
