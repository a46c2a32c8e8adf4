"""Projections along the sequence for the low-rank backends: Linformer's seeded Gaussian
projections, and the contiguous segments whose means are Linformer's pooling projection and
Nystromformer's landmarks.

Segments: N positions cut into s contiguous segments, N = s * l + r with 0 <= r < s: the first
r segments hold l + 1 positions, the others l (s <= N). N = 10, s = 4::

    position  0 1 2 | 3 4 5 | 6 7 | 8 9
    segment      0  |   1   |  2  |  3
"""

from __future__ import annotations

import torch
from torch import Tensor

from effattn.ops import cached

BLOCK = 256  # positions per independently seeded block of a Gaussian projection


def _block_seed(seed: int, which: int, block: int) -> int:
    """A generator seed for one block of positions of projection ``which`` (0: E, 1: F)."""
    return (seed * 0x9E3779B97F4A7C15 + which * 0xC2B2AE3D27D4EB4F + block) % 2**63


def gaussian_projection(
    rows: int,
    length: int,
    seed: int,
    which: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """(rows, length) with iid N(0, 1/rows) entries (Linformer's E = F = R / sqrt(k) of its
    Johnson-Lindenstrauss argument), drawn in float64 and cached.

    Column j depends only on (seed, which, j): the positions are drawn in blocks of BLOCK, each
    from its own generator, so the projection of a length-N sequence is the first N columns of
    one unbounded projection. That is Linformer's fixed maximum length with shorter inputs
    zero-padded (the padding would meet the unused columns), without a maximum.
    """

    def build() -> Tensor:
        blocks = []
        for block in range(-(-length // BLOCK)):
            gen = torch.Generator().manual_seed(_block_seed(seed, which, block))
            blocks.append(torch.randn(rows, BLOCK, generator=gen, dtype=torch.float64))
        full = torch.cat(blocks, dim=1)[:, :length] / rows**0.5  # (rows, length)
        return full.to(device=device, dtype=dtype)

    return cached(("linformer-gaussian", rows, length, seed, which, dtype, str(device)), build)


def segment_sums(x: Tensor, segments: int) -> Tensor:
    """Sums over the contiguous segments of the module docstring along dim -2:
    x (..., N, E) -> (..., segments, E); 1 <= segments <= N."""
    n, width = x.shape[-2], x.shape[-1]
    size, longer = divmod(n, segments)
    cut = longer * (size + 1)
    lead = x.shape[:-2]
    tail = x[..., cut:, :].reshape(*lead, segments - longer, size, width).sum(dim=-2)
    if not longer:
        return tail
    head = x[..., :cut, :].reshape(*lead, longer, size + 1, width).sum(dim=-2)
    return torch.cat([head, tail], dim=-2)  # (..., segments, E)


def segment_means(x: Tensor, segments: int, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Means over the segments of x (B, H, N, E), of the positions ``keep`` (B, N) keeps.

    Returns the means (B, H, segments, E) and the number of positions each mean took,
    (B or 1, 1, segments, 1); a segment without kept positions has mean 0 and count 0."""
    if keep is None:
        size, longer = divmod(x.shape[-2], segments)
        counts = torch.full((1, 1, segments, 1), float(size), dtype=x.dtype, device=x.device)
        counts[:, :, :longer] += 1
        return segment_sums(x, segments) / counts, counts
    kept = keep[:, None, :, None].to(x.dtype)  # (B, N) -> (B, 1, N, 1)
    counts = segment_sums(kept, segments)  # (B, 1, segments, 1)
    sums = segment_sums(x * kept, segments)
    return sums / counts.clamp_min(1.0), counts


def segment_matrix(
    length: int,
    segments: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """(segments, length): row s has 1 / |segment s| on the segment's positions, so that
    ``segment_matrix(N, s) @ x`` are the segment means of x (N, E) (tests and references)."""
    eye = torch.eye(length, dtype=dtype, device=device)
    sizes = segment_sums(torch.ones(length, 1, dtype=dtype, device=device), segments)
    return segment_sums(eye, segments) / sizes  # (segments, length)
