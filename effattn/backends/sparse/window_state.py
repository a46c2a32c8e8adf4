"""The decoding state of sliding-window attention: the last ``window`` keys and values (a ring in
effect: each call copies the at most w keys it keeps, O(w) per token, constant in N).

Causal query i keeps keys i - w .. i (inclusive offset w), so new queries at positions
L..L+c-1 need the last w keys before L and the new ones. Each call runs the backend's own causal
forward of the new queries over [the ring; the new keys] (bottom-right aligned, its band lands
on the same absolute positions; a single new query keeps all of them, so it runs dense SDPA over
them), then keeps the last w keys. The state is constant in N:
2 * B * Hkv * min(N, w) * D values (and a (B, min(N, w)) bool mask once a call passes one).
"""

from __future__ import annotations

import torch
from torch import Tensor

from effattn.backend import Backend
from effattn.backends.sdpa import SDPAAttention
from effattn.decoding import DecodeState, StateShape

SDPA = SDPAAttention()


class WindowState(DecodeState):
    """The last ``window`` keys and values (B, Hkv, <= window, D), and their key padding."""

    def __init__(self, backend: Backend, shape: StateShape, window: int) -> None:
        super().__init__(backend, shape)
        self.window = window
        size = (shape.batch, shape.kv_heads, 0, shape.head_dim)
        self.k = torch.empty(size, dtype=shape.dtype, device=shape.device)
        self.v = torch.empty(size, dtype=shape.dtype, device=shape.device)
        self.keep: Tensor | None = None  # (B, ring length) bool, once a mask was passed

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v] + ([] if self.keep is None else [self.keep])

    def _joined(
        self, k: Tensor, v: Tensor, keep: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """[ring; new] keys and values (B, Hkv, r + c, D), and their mask (or None)."""
        keys = torch.cat([self.k, k], dim=2)
        values = torch.cat([self.v, v], dim=2)
        mask = None
        if keep is not None or self.keep is not None:
            ring = self.keep
            if ring is None:  # every ring position took part
                ring = keep.new_ones(k.shape[0], self.k.shape[2])
            new = keep if keep is not None else ring.new_ones(k.shape[0], k.shape[2])
            mask = torch.cat([ring, new], dim=1)  # (B, r + c)
        return keys, values, mask

    def _keep_last(self, keys: Tensor, values: Tensor, mask: Tensor | None) -> None:
        start = max(keys.shape[2] - self.window, 0)
        self.k = keys[:, :, start:].clone()  # a copy: the joined tensors are dropped
        self.v = values[:, :, start:].clone()
        self.keep = None if mask is None else mask[:, start:].clone()

    def _snapshot(self) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.k, self.v, self.keep  # every call replaces them with new tensors

    def _restore(self, snapshot: tuple[Tensor, Tensor, Tensor | None]) -> None:
        self.k, self.v, self.keep = snapshot

    def _append(self, k: Tensor, v: Tensor, keep: Tensor | None) -> None:
        self._keep_last(*self._joined(k, v, keep))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
        keys, values, mask = self._joined(k, v, keep)
        # One new query keeps every key of [ring; itself]: dense attention over them is the
        # band exactly, without the blocked path's tiling.
        attend = SDPA if q.shape[2] == 1 else self.backend
        out = attend.grouped_forward(
            q, keys, values, causal=True, key_padding_mask=mask, scale=self.shape.scale
        )
        self._keep_last(keys, values, mask)
        return out
