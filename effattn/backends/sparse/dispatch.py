"""Which implementation a sparse backend runs: its plain torch path, or effattn's fused Triton
block-sparse kernel (effattn.kernels.block_sparse) driven by the backend's own pattern predicate.

Both compute the same function: dense softmax attention restricted to the backend's
``predicate``, so ``impl="torch"`` and ``impl="triton"`` agree to rounding. ``impl="auto"`` takes
the Triton kernel on CUDA when Triton is installed, and the torch path elsewhere (on CPU the
Triton interpreter is for tests: it is correct but very slow).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from effattn.backend import predicate_pattern
from effattn.ops import cached
from effattn.patterns import Pattern, Predicate

Impl = Literal["auto", "torch", "triton"]

# Tiles of the block-sparse kernel under the CPU interpreter, where the cost grows with the work
# inside each program rather than with the number of programs.
INTERPRETER_TILE = 16


def gpu_tile(head_dim: int, dtype: torch.dtype) -> int:
    """The block-sparse kernel's square tile on GPU: 64, or 32 for float32 with a head-dim tile
    above 128, where the backward kernels' 64-row float32 tiles need more shared memory than
    an sm_90 block has (``python -m effattn.kernels.compile_check`` shows it)."""
    from effattn.kernels._runtime import padded_head_dim

    return 32 if dtype == torch.float32 and padded_head_dim(head_dim) > 128 else 64


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
    predicate: Predicate,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None,
    scale: float,
    cache_key: Any,
) -> Tensor:
    """The block-sparse kernel over ``predicate``: q (B, H, Nq, D), k, v (B, H, Nk, D) ->
    (B, H, Nq, D). The predicate gives (Nq, Nk) for a pattern shared by every head, or
    (H, Nq, Nk) for one per head (BigBird draws its random blocks per head); one launch either
    way.

    The block lists are built once per ``cache_key`` (the backend's options and shapes) and
    device: building evaluates the predicate over all (H x) Nq x Nk pairs, in chunks.
    """
    from effattn.kernels._runtime import interpreting
    from effattn.kernels.block_mask import BlockMask
    from effattn.kernels.block_sparse import block_sparse_attention

    q_len, kv_len = q.shape[2], k.shape[2]
    tile = INTERPRETER_TILE if interpreting() else gpu_tile(q.shape[-1], q.dtype)

    mask = cached(
        ("triton", cache_key, tile, str(q.device)),
        lambda: BlockMask.from_predicate(predicate, q_len, kv_len, tile, tile, q.device),
    )
    return block_sparse_attention(q, k, v, mask, scale=scale, key_padding_mask=key_padding_mask)
