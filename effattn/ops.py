"""Small helpers shared by the torch backends: the keep-mask of causality and key padding, pair
counts for FLOP accounting, and the cache of patterns built once per (options, shapes)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch
from torch import Tensor

from effattn.patterns import causal as causal_predicate
from effattn.patterns import dense_mask


def repeat_kv_heads(t: Tensor, heads: int) -> Tensor:
    """(B, Hkv, N, D) -> (B, heads, N, D) for grouped-query attention: query head h reads
    key/value head h // (heads / Hkv), SDPA's ``enable_gqa`` layout. A copy; ``t`` itself when
    Hkv == heads."""
    batch, kv_heads, length, dim = t.shape
    if kv_heads == heads:
        return t
    groups = heads // kv_heads
    expanded = t[:, :, None].expand(batch, kv_heads, groups, length, dim)  # (B, Hkv, G, N, D)
    return expanded.reshape(batch, heads, length, dim)  # (B, Hkv, G, N, D) -> (B, H, N, D)


def keep_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    key_padding_mask: Tensor | None,
    device: torch.device | str,
) -> Tensor | None:
    """The dense keep-mask of causality and key padding, or None when every pair is kept.

    Returns a bool tensor of shape (B or 1, 1, Nq or 1, Nk) that broadcasts against scores of
    shape (B, H, Nq, Nk); True = the pair takes part. Causal is bottom-right aligned
    (see :func:`effattn.patterns.causal`).
    """
    keep = None
    if causal:
        keep = dense_mask(causal_predicate(q_len, kv_len), q_len, kv_len, device)[None, None]
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]  # (B, Nk) -> (B, 1, 1, Nk)
        keep = padding if keep is None else keep & padding
    return keep


def pair_count(q_len: int, kv_len: int, *, causal: bool) -> int:
    """Number of (query, key) pairs a dense pattern computes; causal is bottom-right aligned."""
    if not causal:
        return q_len * kv_len
    # Query i keeps min(kv_len, max(0, i + kv_len - q_len + 1)) keys.
    kept = torch.arange(q_len, dtype=torch.int64).add_(kv_len - q_len + 1).clamp_(0, kv_len)
    return int(kept.sum())


def attention_flops(batch: int, heads: int, head_dim: int, pairs: int) -> int:
    """Forward FLOPs of exact attention over ``pairs`` (query, key) pairs per head:
    2*D for the score and 2*D for the weighted value sum, i.e. 4*B*H*pairs*D."""
    return 4 * batch * heads * pairs * head_dim


T = TypeVar("T")

_CACHE: OrderedDict[Hashable, Any] = OrderedDict()
CACHE_SIZE = 16  # patterns kept: the masks and key lists of the last few (options, shapes)


def cached(key: Hashable | None, build: Callable[[], T]) -> T:
    """``build()``, memoised under ``key`` (None: not cached). Patterns are fixed per
    (backend options, Nq, Nk, ...), so their masks, key lists, BlockMasks and XL's relative
    parameters are built once; a cached value is never modified in place."""
    if key is None:
        return build()
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = _CACHE[key] = build()
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def clear_cache() -> None:
    """Forget every cached mask and key list (for memory measurements of a first call)."""
    _CACHE.clear()
