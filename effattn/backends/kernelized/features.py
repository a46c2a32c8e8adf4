"""Feature maps of the kernelized backends: FAVOR+'s positive random features (Performer) and
elu(x) + 1 (linear attention), each turning softmax's exp(q . k) into a dot product of features.

FAVOR+ (Choromanski et al. 2021): with x' = sqrt(scale) * x and rows w_1..w_m drawn from
N(0, I_D) (orthogonal in blocks of D),

    exp(scale * q . k) = E_w[ exp(w . q' - |q'|^2 / 2) * exp(w . k' - |k'|^2 / 2) ],

so phi(x)_f = exp(w_f . x' - |x'|^2 / 2) / sqrt(m) gives an unbiased, positive estimate. Factors
that are constant over a query's row (1 / sqrt(m), exp(-|q'|^2 / 2), the row's largest
exponent) cancel in the normalised product and are dropped; the key side is returned as
logarithms, stabilised by the product that uses them (effattn.backends.kernelized.product).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from effattn.ops import cached


def random_features(
    num_features: int,
    head_dim: int,
    seed: int,
    *,
    orthogonal: bool = True,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The (m, D) projection rows w_1..w_m, drawn in float64 from ``seed`` (cached).

    orthogonal=True (FAVOR+): blocks of D rows from the QR decomposition of a Gaussian (D, D)
    matrix (signs fixed so each block is Haar-distributed), every row rescaled to the norm of an
    independent Gaussian D-vector, so each row is N(0, I_D) and rows within a block are
    orthogonal; the last block is cut to m rows. orthogonal=False: iid N(0, I_D) rows.
    """

    def build() -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        if not orthogonal:
            rows = torch.randn(num_features, head_dim, generator=gen, dtype=torch.float64)
        else:
            blocks = []
            for _ in range(math.ceil(num_features / head_dim)):
                gauss = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)
                basis, upper = torch.linalg.qr(gauss)
                basis = basis * torch.sign(torch.diagonal(upper))  # (D, D), Haar
                blocks.append(basis.T)  # rows orthonormal
            rows = torch.cat(blocks)[:num_features]  # (ceil(m/D) * D, D) -> (m, D)
            norms = torch.randn(num_features, head_dim, generator=gen, dtype=torch.float64)
            rows = rows * norms.norm(dim=1, keepdim=True)
        return rows.to(device=device, dtype=dtype)

    key = ("favor", num_features, head_dim, seed, orthogonal, dtype, str(device))
    return cached(key, build)


def favor_query_features(q: Tensor, w: Tensor, scale: float) -> Tensor:
    """Positive query features (B, H, Nq, m) of q: (B, H, Nq, D), w: (m, D), up to a factor per
    row: exp(w_f . q' - max_f w_f . q') with q' = sqrt(scale) * q (every entry <= 1)."""
    logits = q @ (w * math.sqrt(scale)).T  # (B, H, Nq, D) @ (D, m) -> (B, H, Nq, m)
    return logits.sub_(logits.detach().amax(dim=-1, keepdim=True)).exp_()


def favor_key_logits(k: Tensor, w: Tensor, scale: float, keep: Tensor | None) -> Tensor:
    """Logarithms (B, H, Nk, m) of the key features, w_f . k' - |k'|^2 / 2 with
    k' = sqrt(scale) * k; -inf for keys that ``keep`` (B, Nk) masks, so that they add nothing to
    any sum and set no stabiliser. k: (B, H, Nk, D), w: (m, D)."""
    logits = k @ (w * math.sqrt(scale)).T  # (B, H, Nk, D) @ (D, m) -> (B, H, Nk, m)
    logits = logits.sub_(k.square().sum(dim=-1, keepdim=True).mul_(scale / 2))
    if keep is not None:
        logits = logits.masked_fill_(~keep[:, None, :, None], float("-inf"))  # (B, 1, Nk, 1)
    return logits


def elu_features(x: Tensor, keep: Tensor | None = None) -> Tensor:
    """elu(x) + 1 (Katharopoulos et al. 2020), elementwise on x: (B, H, N, D) -> (B, H, N, D);
    zero rows for the keys that ``keep`` (B, N) masks."""
    features = F.elu(x).add_(1.0)
    if keep is not None:
        features = features.masked_fill_(~keep[:, None, :, None], 0.0)  # (B, 1, N, 1)
    return features
