"""The iterative Moore-Penrose pseudo-inverse of Nystromformer (Xiong et al. 2021, eq. 16; the
iteration of Razavi et al. 2014), used on its small (m, m) landmark kernel."""

from __future__ import annotations

import torch
from torch import Tensor


def iterative_pinv(x: Tensor, iterations: int | None) -> Tensor:
    """Pseudo-inverse of every (m, m) matrix of x (..., m, m)::

        Z_0 = x^T / (||x||_1 ||x||_inf)
        Z_{j+1} = 1/4 Z_j (13 I - x Z_j (15 I - x Z_j (7 I - x Z_j)))

    ||x||_1 is the largest column sum of |x| and ||x||_inf the largest row sum, of each matrix
    on its own (nystrom-attention takes both over the whole batch, which makes one sequence's
    output depend on the others). A zero matrix gives zeros. ``iterations=None``: the exact
    pseudo-inverse (torch.linalg.pinv). Returns (..., m, m), differentiable.
    """
    if iterations is None:
        return torch.linalg.pinv(x)
    m = x.shape[-1]
    lead = x.shape[:-2]
    x = x.reshape(-1, m, m)  # (..., m, m) -> (L, m, m)
    magnitude = x.abs()
    norm = magnitude.sum(dim=-2).amax(dim=-1) * magnitude.sum(dim=-1).amax(dim=-1)  # (L,)
    z = x.transpose(-2, -1) / norm.clamp_min(torch.finfo(x.dtype).tiny)[:, None, None]
    eye = torch.eye(m, dtype=x.dtype, device=x.device)
    eye7, eye15, eye13 = 7 * eye, 15 * eye, 3.25 * eye  # 3.25 I = 13 I / 4
    for _ in range(iterations):
        xz = torch.bmm(x, z)
        inner = torch.sub(eye7, xz)  # 7 I - x Z
        inner = torch.baddbmm(eye15, xz, inner, alpha=-1)  # 15 I - x Z (...)
        inner = torch.baddbmm(eye13, xz, inner, alpha=-0.25)  # (13 I - x Z (...)) / 4
        z = torch.bmm(z, inner)
    return z.reshape(*lead, m, m)
