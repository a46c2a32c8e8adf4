"""Decoding: what a backend keeps between calls when tokens come one (or a chunk) at a time.

    state = effattn.decode_state("local", batch=1, heads=32, kv_heads=8, head_dim=128, window=256)
    state.extend(k_prompt, v_prompt)                      # fill it without computing outputs
    out = effattn.attention(q, k, v, "local", window=256, causal=True, state=state)

A call with a state appends the new keys and values (B, Hkv, c, D) to it and returns the
outputs (B, H, c, D) of the c new queries: equal to the backend's causal forward over the whole
sequence so far, restricted to those queries (the new queries are the last c positions). Each
backend keeps what its algorithm needs and nothing more (``Backend.state_complexity``): a K/V
cache growing with N (full, sdpa), a ring of the last ``window`` keys (local), the running sums
of linear attention (linear, performer). A backend that cannot decode refuses in
:func:`decode_state` with the reason.

Decoding is inference: a state call refuses inputs that require grad while grad is enabled.
``state.mark()`` and ``state.rewind(mark)`` go back to an earlier length in O(1) (a benchmark
decodes a token at the same context again and again; speculative decoding drops a guess).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from effattn._validate import (
    FLOAT_DTYPES,
    check_int_option,
    resolve_scale,
    validate_key_padding_mask,
    validate_qkv,
)

if TYPE_CHECKING:
    from effattn.backend import Backend


@dataclass(frozen=True)
class StateShape:
    """The sequences a state decodes: every call's tensors must have these sizes."""

    batch: int  # B
    heads: int  # H, query heads
    kv_heads: int  # Hkv, key/value heads; H % Hkv == 0 (grouped-query attention)
    head_dim: int  # D
    dtype: torch.dtype
    device: torch.device
    scale: float  # the softmax scale of every call (1/sqrt(D) unless given)


class DecodeState:
    """Base class of the backends' decoding states. ``length``: positions seen so far;
    ``nbytes``: the bytes the state holds (its tensors, spare capacity included)."""

    def __init__(self, backend: Backend, shape: StateShape) -> None:
        self.backend = backend
        self.shape = shape
        self.length = 0

    # -- what a subclass provides -----------------------------------------------------------
    def tensors(self) -> list[Tensor]:
        """Every tensor the state holds (their bytes are :attr:`nbytes`)."""
        raise NotImplementedError

    def _append(self, k: Tensor, v: Tensor, keep: Tensor | None) -> None:
        """Add keys and values (B, Hkv, c, D) of positions length..length+c-1 (keep: (B, c))."""
        raise NotImplementedError

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
        """Append k, v and return the outputs (B, H, c, D) of the new queries q."""
        raise NotImplementedError

    def _snapshot(self) -> Any:
        """What :meth:`rewind` needs to restore the state as it is now, in O(1): references to
        tensors that later calls replace rather than modify."""
        raise NotImplementedError

    def _restore(self, snapshot: Any) -> None:
        raise NotImplementedError

    # -- the calls --------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def reserve(self, positions: int) -> None:
        """Make room for ``positions`` in all, so that appending up to them copies no cache (a
        K/V cache; the states of a fixed size need no room)."""

    def extend(self, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> None:
        """Add a prompt's keys and values (B, Hkv, c, D) without computing outputs;
        key_padding_mask: (B, c) bool, True = the key takes part."""
        q_like = k.new_empty(k.shape[0], self.shape.heads, k.shape[2], k.shape[3])
        self._check(q_like, k, v, key_padding_mask)
        self._append(k, v, key_padding_mask)
        self.length += k.shape[2]

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor:
        """The outputs (B, H, c, D) of the new queries q (B, H, c, D), their keys and values
        k, v (B, Hkv, c, D) appended first (see the module docstring)."""
        self._check(q, k, v, key_padding_mask)
        if scale is not None and resolve_scale(scale, q.shape[-1]) != self.shape.scale:
            raise ValueError(
                f"scale: expected the state's scale {self.shape.scale:g} (decode_state's), "
                f"got {scale:g}"
            )
        out = self._attend(q, k, v, key_padding_mask)
        self.length += k.shape[2]
        return out

    def mark(self) -> tuple[int, Any]:
        """A mark of the state as it is now, for :meth:`rewind`."""
        return self.length, self._snapshot()

    def rewind(self, mark: tuple[int, Any]) -> None:
        """Go back to the state of ``mark`` (made by :meth:`mark` of this state, at a length not
        above the current one): the positions appended since are forgotten."""
        length, snapshot = mark
        if not 0 <= length <= self.length:
            raise ValueError(
                f"mark: expected one made at a length <= {self.length} (the current), got {length}"
            )
        self._restore(snapshot)
        self.length = length

    def _check(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> None:
        validate_qkv(q, k, v, grouped=True)
        validate_key_padding_mask(keep, q, k)
        s = self.shape
        got = (q.shape[0], q.shape[1], k.shape[1], q.shape[3])
        if got != (s.batch, s.heads, s.kv_heads, s.head_dim):
            raise ValueError(
                f"q, k: expected (B, H, Hkv, D) = {(s.batch, s.heads, s.kv_heads, s.head_dim)} "
                f"of the state, got {got}"
            )
        if q.shape[2] != k.shape[2]:
            raise ValueError(
                f"q: expected one query per new key (Nq = Nk = {k.shape[2]}) when decoding, "
                f"got Nq={q.shape[2]}"
            )
        if q.dtype != s.dtype or q.device != s.device:
            raise ValueError(
                f"q: expected dtype {s.dtype} on {s.device} like the state, got {q.dtype} on "
                f"{q.device}"
            )
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError(
                "q, k, v: decoding with a state is inference; expected tensors that do not "
                "require grad (or torch.no_grad()), got one that does"
            )

    def __repr__(self) -> str:
        s = self.shape
        return (
            f"{type(self).__name__}({self.backend.name!r}, B={s.batch}, H={s.heads}, "
            f"Hkv={s.kv_heads}, D={s.head_dim}, length={self.length}, nbytes={self.nbytes})"
        )


def decode_state(
    backend: str | Backend,
    *,
    batch: int,
    heads: int,
    kv_heads: int | None = None,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    scale: float | None = None,
    **options: Any,
) -> DecodeState:
    """An empty decoding state of ``backend`` (a name with its ``options``, or an instance) for
    ``batch`` sequences of ``heads`` query heads and ``kv_heads`` key/value heads (None: as many
    as the query heads) of dim ``head_dim``. Raises ValueError naming the reason when the
    backend cannot decode (bidirectional only, or no state of its own)."""
    from effattn.registry import get_backend

    chosen = get_backend(backend, **options)
    kv_heads = heads if kv_heads is None else kv_heads
    for name, value in (("batch", batch), ("heads", heads), ("kv_heads", kv_heads),
                        ("head_dim", head_dim)):  # fmt: skip
        check_int_option("decode_state", name, value)
    if heads % kv_heads:
        raise ValueError(
            f"kv_heads: expected a divisor of heads={heads} (grouped-query attention), "
            f"got {kv_heads}"
        )
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
    device = torch.device(device)
    reasons = chosen.not_supported_reasons(device=device.type, dtype=dtype, causal=True)
    if reasons:
        raise ValueError(f"backend {chosen.name!r} cannot decode: " + "; ".join(reasons))
    shape = StateShape(
        batch, heads, kv_heads, head_dim, dtype, device, resolve_scale(scale, head_dim)
    )
    return chosen.decode_state(shape)
