"""Attention patterns as pure predicates.

A predicate maps broadcastable index tensors ``(q_idx, kv_idx)`` to a bool tensor: True where the
query at ``q_idx`` attends to the key at ``kv_idx``. Predicates are built by small factories whose
``__name__`` carries their parameters (``causal``, ``sliding_window_256``) and compose with
:func:`and_` and :func:`or_`. The dense masks used by references and pictures derive from them with
:func:`dense_mask`; a predicate itself never allocates anything of size Nq x Nk.
"""

from __future__ import annotations

from collections.abc import Callable

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
    """The (q_len, kv_len) bool matrix of ``pred``: for references and pictures only."""
    q_idx = torch.arange(q_len, device=device)[:, None]
    kv_idx = torch.arange(kv_len, device=device)[None, :]
    return pred(q_idx, kv_idx).expand(q_len, kv_len)
