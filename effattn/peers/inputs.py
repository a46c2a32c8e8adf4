"""The inputs every candidate of a peer comparison sees: q, k, v of shape (B, H, N, D) =
(1, 8, N, 64), fp32, drawn from seed 0, so that our backends and each peer's wrapper get the
same tensors; and the input x of the layer comparisons."""

from __future__ import annotations

import torch
from torch import Tensor

B, H, D = 1, 8, 64


def qkv(n: int, heads: int = H, grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v: (B, heads, N, D) fp32 from seed 0 (the same tensors for the same N and heads),
    requiring grad when ``grad``."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, heads, n, D, generator=g).requires_grad_(grad) for _ in range(3))
    return q, k, v


def layer_input(n: int, heads: int = H) -> Tensor:
    """x: (B, N, heads * D) fp32 from seed 1, the input of the layer comparisons."""
    return torch.randn(B, n, heads * D, generator=torch.Generator().manual_seed(1))
