"""A transformers cache that decodes with each layer's effattn decoding state.

Imported by :mod:`effattn.integrations.huggingface` on first use (it subclasses transformers'
``Cache``, so it needs transformers). ``EffattnCache(model)`` has one :class:`EffattnLayer` per
decoder self-attention layer, created on the layer's first ``update``; the backend is the one
the model's ``attn_implementation`` runs at that moment (an effattn name). Per layer:

- a backend that decodes (``full``, ``sdpa``: a K/V cache; ``local``: a window ring;
  ``linear``, ``performer``: running sums) gets an effattn decoding state. ``update(k, v)`` only
  counts the new positions and hands the new keys and values (B, Hkv, c, D) back, tagged with
  the layer; the effattn attention call then appends them to the state and computes the c new
  queries' outputs with it (effattn.attention(..., state=...)). The state is made on that first
  call, where the query heads and the scale are known. transformers' own attention
  implementations cannot read such a layer: ``update`` refuses a model that runs one, and a
  layer whose handed-over keys never reached an effattn attention call (a model that changes
  them on the way, losing the tag) refuses its next ``update`` rather than decode without them.
- a backend that cannot decode (``lsh``, ``strided``, ``xl``, ...; decode_state's reason is
  warned once) keeps its keys and values like transformers' ``DynamicLayer`` and the attention
  call recomputes the c new queries over all of them, as with transformers' ``DynamicCache``.

Mask sizes (``get_seq_length``, ``get_mask_sizes``) are those of a dynamic cache: every past
position, from position 0, so the model's (B, Nk) key padding covers the whole sequence; the
attention call gives a state the padding of the new keys only (the state keeps the rest).

Greedy search and sampling work; what needs to edit the past (beam search's reordering,
assisted decoding's crop, contrastive search) raises a ValueError on a layer with a state.
Written for transformers 4.57 (``get_mask_sizes(cache_position)``, ``get_max_cache_shape``,
``lazy_initialization(k)``) and 5.x (``get_mask_sizes(query_length)``, ``get_max_length``,
``lazy_initialization(k, v)``).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

import effattn
from effattn.backend import Backend
from effattn.decoding import DecodeState
from effattn.integrations.hf_registry import LAYER_TAG, registered_backend


class EffattnLayer(DynamicLayer):
    """One decoder layer's cache: an effattn decoding state, or (for a backend that cannot
    decode) transformers' DynamicLayer keys and values."""

    def __init__(self) -> None:
        super().__init__()
        self.backend: Backend | None = None  # set by the first update
        self.state: DecodeState | None = None  # made by the first attention call (decoding)
        self.decodes = False  # True: an effattn state; False: keys and values (fallback)
        self.seen = 0  # positions added so far
        self.pending = False  # keys handed over by update() that no attention call took yet

    def __repr__(self) -> str:
        kept = self.state if self.decodes else f"keys and values of {self.seen} positions"
        return f"EffattnLayer({kept})"

    # -- what the model calls --------------------------------------------------------------
    def update(
        self, key_states: Tensor, value_states: Tensor, backend: Backend, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Add keys and values (B, Hkv, c, D). Returns them as they are (tagged with this layer)
        when decoding with a state, else every cached key and value (B, Hkv, N, D)."""
        if self.backend is None:
            self._choose(backend, key_states)
        elif backend != self.backend:
            raise ValueError(
                f"attn_implementation: expected the backend this cache was filled with "
                f"({self.backend!r}), got {backend!r}; start generation with a new EffattnCache"
            )
        if self.decodes and self.pending:
            raise ValueError(
                "EffattnCache: the keys this layer handed over at its last update never reached "
                "an effattn attention call (the model changes them between cache.update and "
                "attention, e.g. a cast or repeat_kv), so its state would miss them; generate "
                "with transformers' own cache for this model"
            )
        self.seen += key_states.shape[2]
        if not self.decodes:
            return super().update(key_states, value_states, *args, **kwargs)
        setattr(key_states, LAYER_TAG, self)
        self.pending = True
        return key_states, value_states

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, scale: float | None
    ) -> Tensor:
        """The outputs (B, H, c, D) of the new queries q (B, H, c, D), appending k, v
        (B, Hkv, c, D) with key padding ``keep`` (B, c) to the state."""
        self.pending = False
        if self.state is None:
            batch, heads, _, dim = q.shape
            self.state = effattn.decode_state(
                self.backend, batch=batch, heads=heads, kv_heads=k.shape[1], head_dim=dim,
                dtype=q.dtype, device=q.device, scale=scale,
            )  # fmt: skip
        return effattn.attention(
            q, k, v, self.backend, causal=True, key_padding_mask=keep, scale=scale, state=self.state
        )

    def _choose(self, backend: Backend, key_states: Tensor) -> None:
        """Decode with a state if ``backend`` can (probed with an empty state), else fall back."""
        batch, kv_heads, _, dim = key_states.shape
        try:
            effattn.decode_state(
                backend, batch=batch, heads=kv_heads, head_dim=dim, dtype=key_states.dtype,
                device=key_states.device,
            )  # fmt: skip
        except ValueError as err:
            warnings.warn(
                f"EffattnCache: {err}; its layers keep every key and value (like transformers' "
                "DynamicCache) and recompute attention over them at each step",
                stacklevel=4,
            )
        else:
            self.decodes = True
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True
        self.backend = backend

    # -- what generate() asks ---------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query: Tensor | int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the next call: 4.57 passes cache_position (Nq,), 5.x Nq."""
        q_len = query if isinstance(query, int) else query.shape[0]
        return self.seen + q_len, 0

    def get_max_cache_shape(self) -> int:  # transformers 4.57
        return -1

    def get_max_length(self) -> int:  # transformers 5.x
        return -1

    def reset(self) -> None:
        self.state, self.seen = None, 0
        self.keys = self.values = None
        self.is_initialized = self.decodes = False
        self.backend = None

    # -- editing the past: only without a state ---------------------------------------------
    def _refuse(self, what: str) -> None:
        if self.decodes and self.seen:
            raise ValueError(
                f"{what}: an effattn decoding state cannot be edited (beam search, assisted "
                "decoding and contrastive search need to); use greedy search or sampling with "
                "EffattnCache, or transformers' DynamicCache for these"
            )

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._refuse("reorder_cache")
        super().reorder_cache(beam_idx)

    def crop(self, max_length: int) -> None:
        self._refuse("crop")
        super().crop(max_length)
        self.seen = super().get_seq_length()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse("batch_repeat_interleave")
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: Tensor) -> None:
        self._refuse("batch_select_indices")
        super().batch_select_indices(indices)


class EffattnCache(Cache):
    """transformers' cache for generate() with effattn's decoding states (module docstring).

    ``model``: the model (or its config) whose ``attn_implementation`` is an effattn name that
    :func:`effattn.integrations.huggingface.register` registered; it is read at each update.
    For an encoder-decoder model, use ``EncoderDecoderCache(EffattnCache(model),
    DynamicCache())`` (:func:`effattn.integrations.huggingface.decoding_cache` builds it)."""

    def __init__(self, model: Any) -> None:
        super().__init__(layers=[])
        self.config = getattr(model, "config", model)

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(EffattnLayer())
        return self.layers[layer_idx].update(
            key_states, value_states, self._backend(), *args, **kwargs
        )

    def _backend(self) -> Backend:
        name = self.config._attn_implementation
        try:
            return registered_backend(name)
        except ValueError:
            raise ValueError(
                f"attn_implementation: EffattnCache decodes with an effattn attention "
                f"implementation, got a model running {name!r}; use transformers' DynamicCache "
                "with it, or set an effattn name (model.set_attn_implementation('effattn_full'))"
            ) from None

    @property
    def states(self) -> list[DecodeState | None]:
        """Each layer's effattn decoding state (None for a layer that falls back or is empty)."""
        return [layer.state for layer in self.layers]

    @property
    def nbytes(self) -> int:
        """Bytes held by the layers: their states, or their keys and values."""
        total = 0
        for layer in self.layers:
            if layer.state is not None:
                total += layer.state.nbytes
            elif layer.keys is not None:
                total += layer.keys.nbytes + layer.values.nbytes
        return total
