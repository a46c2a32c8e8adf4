"""The functional interface: one call, every backend behind it."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from effattn._validate import validate_flag
from effattn.backend import Backend
from effattn.decoding import DecodeState
from effattn.registry import get_backend


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    backend: str | Backend = "full",
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    state: DecodeState | None = None,
    **options: Any,
) -> Tensor:
    """Attention as torch's scaled_dot_product_attention takes it, by any registered backend.

    Args:
        q: (B, H, Nq, D) queries.
        k: (B, Hkv, Nk, D) keys; Hkv = H, or a divisor of H (grouped-query attention: query
            head h reads key/value head h // (H / Hkv)).
        v: (B, Hkv, Nk, D) values.
        backend: a registered name (see ``effattn.list_backends()``) or a Backend instance.
        causal: query i attends to keys j <= i + (Nk - Nq): the last query is aligned with the
            last key, as when decoding with a cache. With Nq > Nk the first Nq - Nk queries see
            no key and their output is 0.
        key_padding_mask: (B, Nk) bool, True = the key takes part in attention (SDPA's boolean
            convention; note that ``effattn.MultiheadAttention`` follows nn.MultiheadAttention,
            where True = padding).
        scale: softmax scale; 1/sqrt(D) when None.
        state: a decoding state of this backend (effattn.decode_state): the keys and values
            are appended to it and the outputs are those of the new queries (Nq = Nk, the last
            positions) in the causal forward over the whole sequence so far. Needs causal=True.
        **options: the backend's own options (``window=256``, ...); unknown ones raise a
            ValueError that lists the valid ones.

    Returns:
        (B, H, Nq, D). A query whose keys are all masked gets zeros (not NaN).
    """
    chosen = get_backend(backend, **options)
    if state is None:
        return chosen(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if not isinstance(state, DecodeState):
        raise TypeError(f"state: expected a DecodeState (effattn.decode_state), got {state!r}")
    if not validate_flag("causal", causal):
        raise ValueError("causal: expected True with a decoding state (decoding is causal)")
    if state.backend != chosen:
        raise ValueError(
            f"state: expected a state of {chosen!r}, got one of {state.backend!r} "
            "(make it with effattn.decode_state and the same backend options)"
        )
    return state.attend(q, k, v, key_padding_mask=key_padding_mask, scale=scale)
