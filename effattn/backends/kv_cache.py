"""The decoding state of exact attention (`full`, `sdpa`): a K/V cache that grows with N.

Keys and values (B, Hkv, capacity, D) are written in place; when a call needs more room the
capacity doubles (one copy of the cache per doubling: an amortised O(1) append, never a copy of
the whole cache per token). Each call runs the backend's own causal forward of the new queries
over the cache so far, with grouped key/value heads as they are (both backends take them
natively) and the key padding of every cached position, kept in a (B, capacity) bool buffer from
the first call that passes a mask on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effattn.backend import Backend
from effattn.decoding import DecodeState, StateShape

MIN_CAPACITY = 16  # positions of the first allocation


class KVCache(DecodeState):
    """A K/V cache with amortised O(1) append (see the module docstring)."""

    def __init__(self, backend: Backend, shape: StateShape) -> None:
        super().__init__(backend, shape)
        self.k = self._buffer(0)  # (B, Hkv, capacity, D)
        self.v = self._buffer(0)
        self.keep: Tensor | None = None  # (B, capacity) bool, once a mask was passed

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v] + ([] if self.keep is None else [self.keep])

    def _buffer(self, capacity: int) -> Tensor:
        s = self.shape
        size = (s.batch, s.kv_heads, capacity, s.head_dim)
        return torch.empty(size, dtype=s.dtype, device=s.device)

    def reserve(self, positions: int) -> None:
        if positions > self.capacity:
            self._grow(positions, exact=True)

    def _grow(self, needed: int, exact: bool = False) -> None:
        """Room for ``needed`` positions: doubled (amortised O(1) append), or just that many."""
        capacity = needed if exact else max(needed, 2 * self.capacity, MIN_CAPACITY)
        used = self.length
        k, v = self._buffer(capacity), self._buffer(capacity)
        k[:, :, :used], v[:, :, :used] = self.k[:, :, :used], self.v[:, :, :used]
        self.k, self.v = k, v
        if self.keep is not None:
            keep = self.keep.new_ones(self.shape.batch, capacity)
            keep[:, :used] = self.keep[:, :used]
            self.keep = keep

    def _append(self, k: Tensor, v: Tensor, keep: Tensor | None) -> None:
        start, stop = self.length, self.length + k.shape[2]
        if stop > self.capacity:
            self._grow(stop)
        self.k[:, :, start:stop], self.v[:, :, start:stop] = k, v
        if keep is not None and self.keep is None:  # every earlier position took part
            self.keep = torch.ones(
                self.shape.batch, self.capacity, dtype=torch.bool, device=self.shape.device
            )
        if self.keep is not None:
            self.keep[:, start:stop] = True if keep is None else keep

    def _snapshot(self) -> None:
        return None  # positions past the rewound length are simply written over

    def _restore(self, snapshot: None) -> None:
        pass

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
        self._append(k, v, keep)
        stop = self.length + k.shape[2]
        mask = None if self.keep is None else self.keep[:, :stop]
        return self.backend.grouped_forward(
            q,
            self.k[:, :, :stop],
            self.v[:, :, :stop],
            causal=True,
            key_padding_mask=mask,
            scale=self.shape.scale,
        )
