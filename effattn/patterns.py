"""Attention patterns as pure predicates.

A predicate maps broadcastable index tensors ``(q_idx, kv_idx)`` to a bool tensor: True where the
query at ``q_idx`` attends to the key at ``kv_idx``. Predicates are built by small factories whose
``__name__`` carries their parameters (``causal``, ``sliding_window_256``) and compose with
:func:`and_` and :func:`or_`. The dense masks used by references and pictures derive from them with
:func:`dense_mask`; a predicate itself never allocates anything of size Nq x Nk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Predicate = Callable[[Tensor, Tensor], Tensor]


def _named(pred: Predicate, name: str) -> Predicate:
    pred.__name__ = pred.__qualname__ = name
    return pred


def causal(q_len: int, kv_len: int) -> Predicate:
    """Causal with the last query aligned to the last key (decoding with a cache).

    Query i keeps key j iff ``j <= i + (kv_len - q_len)``; with Nq == Nk that is ``j <= i``::

        q_len=2, kv_len=4        q_len=4, kv_len=2
            k: 0 1 2 3               k: 0 1
        q0     1 1 1 0           q0     0 0      (sees no key: its output is 0)
        q1     1 1 1 1           q1     0 0
                                 q2     1 0
                                 q3     1 1
    """
    offset = kv_len - q_len

    def pred(q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= q_idx + offset

    return _named(pred, "causal" if offset == 0 else f"causal_offset_{offset}")


def and_(*preds: Predicate) -> Predicate:
    """Keep a pair only where every predicate keeps it."""

    def pred(q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        out = preds[0](q_idx, kv_idx)
        for p in preds[1:]:
            out = out & p(q_idx, kv_idx)
        return out

    return _named(pred, "_and_".join(p.__name__ for p in preds))


def or_(*preds: Predicate) -> Predicate:
    """Keep a pair where any predicate keeps it."""

    def pred(q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        out = preds[0](q_idx, kv_idx)
        for p in preds[1:]:
            out = out | p(q_idx, kv_idx)
        return out

    return _named(pred, "_or_".join(p.__name__ for p in preds))


def dense_mask(
    pred: Predicate, q_len: int, kv_len: int, device: torch.device | str | None = None
) -> Tensor:
    """The (q_len, kv_len) bool matrix of ``pred``, (H, q_len, kv_len) for a predicate with a
    head dim (:func:`block_table` of a per-head table): for references and pictures only."""
    q_idx = torch.arange(q_len, device=device)[:, None]  # (Nq, 1)
    kv_idx = torch.arange(kv_len, device=device)[None, :]  # (1, Nk)
    mask = pred(q_idx, kv_idx)  # (Nq or 1, Nk or 1), or (H, Nq, Nk)
    return mask.expand(*mask.shape[:-2], q_len, kv_len)


def _span(window: int | tuple[int, int]) -> tuple[int, int]:
    """(left, right) of a window given as w (symmetric) or (left, right); both must be >= 0."""
    left, right = (window, window) if isinstance(window, int) else window
    if left < 0 or right < 0:
        raise ValueError(f"window: expected offsets >= 0, got {window!r}")
    return left, right


def sliding_window(window: int | tuple[int, int], offset: int = 0) -> Predicate:
    """Keys within an inclusive offset of the query's diagonal key ``i + offset``.

    ``window=w`` keeps ``|j - (i + offset)| <= w``; ``(left, right)`` keeps
    ``-left <= j - (i + offset) <= right``. ``offset = kv_len - q_len`` aligns the diagonal as
    :func:`causal` does (0 when Nq == Nk). ``sliding_window(1)`` with Nq = Nk = 5::

            k: 0 1 2 3 4
        q0     1 1 0 0 0
        q1     1 1 1 0 0
        q2     0 1 1 1 0
        q3     0 0 1 1 1
        q4     0 0 0 1 1

    Causal sliding window = ``and_(causal(q_len, kv_len), sliding_window(w, offset))``:
    ``0 <= i + offset - j <= w``.
    """
    left, right = _span(window)

    def pred(q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        rel = kv_idx - q_idx - offset
        return (rel >= -left) & (rel <= right)

    name = f"sliding_window_{left}" if left == right else f"sliding_window_{left}_{right}"
    return _named(pred, name if offset == 0 else f"{name}_offset_{offset}")


def blocked(block_size: int, offset: int = 0) -> Predicate:
    """Non-overlapping blocks (LRA's local attention): query i and key j share a block,
    ``(i + offset) // block_size == j // block_size``. ``blocked(2)`` with Nq = Nk = 4::

            k: 0 1 2 3
        q0     1 1 0 0
        q1     1 1 0 0
        q2     0 0 1 1
        q3     0 0 1 1
    """
    if block_size < 1:
        raise ValueError(f"block_size: expected an int >= 1, got {block_size}")

    def pred(q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return torch.div(q_idx + offset, block_size, rounding_mode="floor") == torch.div(
            kv_idx, block_size, rounding_mode="floor"
        )

    name = f"blocked_{block_size}"
    return _named(pred, name if offset == 0 else f"{name}_offset_{offset}")


def global_tokens(num_global: int) -> Predicate:
    """Longformer's global tokens: the first ``num_global`` queries attend to every key and the
    first ``num_global`` keys are attended by every query. ``global_tokens(1)``, Nq = Nk = 3::

            k: 0 1 2
        q0     1 1 1
        q1     1 0 0
        q2     1 0 0
    """
    if num_global < 0:
        raise ValueError(f"num_global: expected an int >= 0, got {num_global}")

    def pred(q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx < num_global) | (kv_idx < num_global)

    return _named(pred, f"global_tokens_{num_global}")


def strided(stride: int) -> Predicate:
    """Every ``stride``-th key, the last of each stride-long block (Child et al.'s "fixed"
    summary positions, c = 1): keeps keys j with ``j % stride == stride - 1`` for every query.
    ``strided(2)`` with Nq = Nk = 4::

            k: 0 1 2 3
        q0     0 1 0 1
        q1     0 1 0 1      (and_ it with causal to keep only earlier ones)
        ...
    """
    if stride < 1:
        raise ValueError(f"stride: expected an int >= 1, got {stride}")

    def pred(q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx % stride == stride - 1) & (q_idx >= 0)

    return _named(pred, f"strided_{stride}")


def block_table(table: Tensor, block_size: int, kv_block_size: int | None = None) -> Predicate:
    """A block-level pattern: query i keeps key j iff ``table[..., i // b, j // b_kv]``.

    table: (..., Nq/b, Nk/b_kv) bool (leading dims, e.g. heads, broadcast against the index
    tensors' leading dims). Used by BigBird, whose random blocks are drawn into such a table.
    """
    kv_block = block_size if kv_block_size is None else kv_block_size

    def pred(q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qb = torch.div(q_idx, block_size, rounding_mode="floor")
        kb = torch.div(kv_idx, kv_block, rounding_mode="floor")
        return table[..., qb, kb]

    return _named(pred, f"block_table_{block_size}")


@dataclass(frozen=True)
class Pattern:
    """What a backend attended over for given inputs, as dense tensors (tests and pictures only).

    mask:   (B or 1, H or 1, Nq, Nk) bool; True = the pair was computed. Includes causality and
            key padding.
    weight: None, or float of the mask's shape: how many times a pair counts (LSH meets a pair in
            several hash rounds); absent = 1.
    bias:   None, or float of the mask's shape: an additive score term (Transformer-XL's
            relative positions); absent = 0.
    key:    None, or (B, H, Nk, D): the keys actually scored when the backend replaces ``k``
            (shared-QK LSH scores against unit-normalised queries); absent = ``k``.

    The contract: with ``s = scale * q @ key^T``, the backend's output row i is
    ``sum_j m_ij w_ij exp(s_ij + b_ij) v_j / sum_j m_ij w_ij exp(s_ij + b_ij)``,
    and zero where row i keeps no key.
    """

    mask: Tensor
    weight: Tensor | None = None
    bias: Tensor | None = None
    key: Tensor | None = None
