"""Which implementation a sparse backend runs: its plain torch path, or effattn's fused Triton
block-sparse kernel (effattn.kernels.block_sparse) driven by the backend's own pattern predicate.

Both compute the same function: dense softmax attention restricted to the backend's
``predicate``, so ``impl="torch"`` and ``impl="triton"`` agree to rounding. ``impl="auto"`` takes
the Triton kernel on CUDA when Triton is installed, and the torch path elsewhere (on CPU the
Triton interpreter is for tests: it is correct but very slow).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from effattn.backend import Pattern
from effattn.blocksparse import cached, predicate_pattern
from effattn.patterns import Predicate

Impl = Literal["auto", "torch", "triton"]

# Tiles of the block-sparse kernel: 64 x 64 on GPU; 16 x 16 under the CPU interpreter, where the
# cost grows with the work inside each program rather than with the number of programs.
GPU_TILE = 64
INTERPRETER_TILE = 16


def triton_unavailable(device: str, dtype: torch.dtype) -> list[str]:
    """Why the Triton kernel cannot run on ``device`` with ``dtype``; [] if it can."""
    from effattn.kernels import _runtime  # never imports triton itself

    reasons = list(_runtime.unavailable_reasons(device))
    if dtype == torch.float64:
        reasons.append(
            "dtype=float64 with impl='triton' (the kernels take float16, bfloat16, "
            "float32; use impl='torch')"
        )
    return reasons


def uses_triton(impl: Impl, q: Tensor) -> bool:
    """Resolve ``impl`` for inputs like ``q``."""
    if impl == "auto":
        return q.device.type == "cuda" and not triton_unavailable("cuda", q.dtype)
    return impl == "triton"


class SparseImplMixin:
    """Adds the ``impl`` option's reasons to a backend's ``not_supported_reasons``, and its
    ``pattern()`` derived from the backend's ``predicate(Nq, Nk, causal=...)``. The backend
    declares the dataclass field ``impl: Impl = "auto"`` itself (its options stay its own)."""

    impl: Impl
    predicate: Callable[..., Predicate]

    def pattern(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
    ) -> Pattern:
        return predicate_pattern(self.predicate, q, k, causal, key_padding_mask)

    def not_supported_reasons(self, *, device: str, dtype: torch.dtype, **rest: Any) -> list[str]:
        reasons = super().not_supported_reasons(device=device, dtype=dtype, **rest)  # type: ignore[misc]
        if self.impl not in ("auto", "torch", "triton"):
            reasons.append(f"impl={self.impl!r} (expected 'auto', 'torch' or 'triton')")
        elif self.impl == "triton":
            reasons += triton_unavailable(device, dtype)
        return reasons


def triton_sparse_attention(
    predicates: Predicate | Sequence[Predicate],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None,
    scale: float,
    cache_key: Any,
) -> Tensor:
    """The block-sparse kernel over ``predicates``: one for every head, or one per head (BigBird
    draws its random blocks per head). q: (B, H, Nq, D), k, v: (B, H, Nk, D) -> (B, H, Nq, D).

    The block lists are built once per ``cache_key`` (the backend's options and shapes) and
    device: building evaluates the predicate over all Nq x Nk pairs, in chunks.
    """
    from effattn.kernels._runtime import interpreting
    from effattn.kernels.block_mask import BlockMask
    from effattn.kernels.block_sparse import block_sparse_attention

    q_len, kv_len = q.shape[2], k.shape[2]
    tile = INTERPRETER_TILE if interpreting() else GPU_TILE

    def mask_for(pred: Predicate, head: int | None) -> BlockMask:
        def in_range(q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            # The lists are built over whole tiles; pairs past Nq or Nk are dropped afterwards,
            # so clamping them keeps table-based predicates (BigBird) inside their table.
            return pred(q_idx.clamp(max=q_len - 1), kv_idx.clamp(max=kv_len - 1))

        return cached(
            ("triton", cache_key, head, tile, str(q.device)),
            lambda: BlockMask.from_predicate(in_range, q_len, kv_len, tile, tile, q.device),
        )

    if callable(predicates):
        mask = mask_for(predicates, None)
        return block_sparse_attention(q, k, v, mask, scale=scale, key_padding_mask=key_padding_mask)
    outs = [
        block_sparse_attention(
            q[:, h : h + 1],  # (B, H, Nq, D) -> (B, 1, Nq, D)
            k[:, h : h + 1],
            v[:, h : h + 1],
            mask_for(pred, h),
            scale=scale,
            key_padding_mask=key_padding_mask,
        )
        for h, pred in enumerate(predicates)
    ]
    return torch.cat(outs, dim=1)  # H x (B, 1, Nq, D) -> (B, H, Nq, D)
