"""The functional interface: one call, every backend behind it."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from effattn.backend import Backend
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
    **options: Any,
) -> Tensor:
    """Attention as torch's scaled_dot_product_attention takes it, by any registered backend.

    Args:
        q: (B, H, Nq, D) queries.
        k: (B, H, Nk, D) keys.
        v: (B, H, Nk, D) values.
        backend: a registered name (see ``effattn.list_backends()``) or a Backend instance.
        causal: query i attends to keys j <= i + (Nk - Nq): the last query is aligned with the
            last key, as when decoding with a cache. With Nq > Nk the first Nq - Nk queries see
            no key and their output is 0.
        key_padding_mask: (B, Nk) bool, True = the key takes part in attention (SDPA's boolean
            convention; note that ``effattn.MultiheadAttention`` follows nn.MultiheadAttention,
            where True = padding).
        scale: softmax scale; 1/sqrt(D) when None.
        **options: the backend's own options (``window=256``, ...); unknown ones raise a
            ValueError that lists the valid ones.

    Returns:
        (B, H, Nq, D). A query whose keys are all masked gets zeros (not NaN).
    """
    return get_backend(backend, **options)(
        q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale
    )
