"""An independent float64 reference for attention, written from the definition (not from effattn).

Every helper here computes in float64 with explicit index comparisons, so that a mistake shared
by the library's own masks and softmax cannot hide in the tests.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_keep(q_len: int, kv_len: int) -> Tensor:
    """(Nq, Nk) bool: query i keeps key j iff j - i <= Nk - Nq (last query sees the last key)."""
    i = torch.arange(q_len, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(kv_len, dtype=torch.float64).unsqueeze(0)
    return (j - i) <= (kv_len - q_len)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    mask: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """float64 attention. q: (B, H, Nq, D), k, v: (B, H, Nk, D) -> (B, H, Nq, D).

    key_padding_mask: (B, Nk), True = takes part. mask / weight / bias: broadcastable to
    (B, H, Nq, Nk); kept pairs contribute weight * exp(score + bias). Rows with nothing kept -> 0.
    """
    q64, k64, v64 = q.double(), k.double(), v.double()
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    scores = torch.einsum("bhid,bhjd->bhij", q64, k64) * scale
    if bias is not None:
        scores = scores + bias.double()
    keep = torch.ones(scores.shape, dtype=torch.bool)
    if causal:
        keep = keep & causal_keep(q.shape[2], k.shape[2])
    if key_padding_mask is not None:
        keep = keep & key_padding_mask.cpu()[:, None, None, :]
    if mask is not None:
        keep = keep & mask.cpu()
    w = torch.ones_like(scores) if weight is None else weight.double().cpu().expand_as(scores)
    keep = keep & (w > 0)
    # Subtract the largest kept score of each row for stability; empty rows stay all-zero.
    masked = torch.where(keep, scores, torch.full_like(scores, -torch.inf))
    row_max = masked.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    unnorm = torch.where(keep, w * torch.exp(masked - row_max), torch.zeros_like(scores))
    denom = unnorm.sum(dim=-1, keepdim=True)
    probs = unnorm / torch.where(denom == 0, torch.ones_like(denom), denom)
    return torch.einsum("bhij,bhjd->bhid", probs, v64)


# -- low-rank and kernel backends: their formulas from the papers, in float64 -----------------
def _keep_pairs(q_len: int, kv_len: int, causal: bool, key_padding_mask: Tensor | None) -> Tensor:
    """(B or 1, 1, Nq, Nk) bool: the pairs that causality and key padding allow."""
    keep = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool)
    if causal:
        keep = keep & causal_keep(q_len, kv_len)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask.cpu()[:, None, None, :]
    return keep


def _normalised_kernel(weights: Tensor, keep: Tensor, v: Tensor) -> Tensor:
    """sum_j w_ij v_j / sum_j w_ij over the kept pairs; rows keeping nothing -> 0."""
    weights = torch.where(keep, weights, torch.zeros_like(weights))
    total = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(total == 0, torch.ones_like(total), total)
    return torch.einsum("bhij,bhjd->bhid", probs, v.double())


def performer_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """FAVOR+ (Choromanski et al. 2021, eq. for positive random features), unstabilised:
    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m) with x' = sqrt(scale) x, W: (m, D);
    out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j) over the kept j."""
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    w = w.double()

    def phi(x: Tensor) -> Tensor:
        x = x.double() * scale**0.5
        proj = torch.einsum("bhnd,fd->bhnf", x, w)
        return torch.exp(proj - (x * x).sum(-1, keepdim=True) / 2) / w.shape[0] ** 0.5

    weights = torch.einsum("bhif,bhjf->bhij", phi(q), phi(k))
    keep = _keep_pairs(q.shape[2], k.shape[2], causal, key_padding_mask)
    return _normalised_kernel(weights, keep, v)


def linear_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Linear attention (Katharopoulos et al. 2020, eq. 6): phi(x) = elu(x) + 1, i.e. x + 1 for
    x > 0 and exp(x) otherwise; out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)."""

    def phi(x: Tensor) -> Tensor:
        x = x.double()
        return torch.where(x > 0, x + 1, torch.exp(torch.clamp(x, max=0)))

    weights = torch.einsum("bhid,bhjd->bhij", phi(q), phi(k))
    keep = _keep_pairs(q.shape[2], k.shape[2], causal, key_padding_mask)
    return _normalised_kernel(weights, keep, v)


def segments(n: int, count: int) -> list[range]:
    """``count`` contiguous segments of range(n): the first n % count hold n // count + 1
    positions, the others n // count (effattn's documented landmark / pooling rule)."""
    size, longer = divmod(n, count)
    bounds, start = [], 0
    for s in range(count):
        stop = start + size + (1 if s < longer else 0)
        bounds.append(range(start, stop))
        start = stop
    return bounds


def _softmax_rows(scores: Tensor, keep: Tensor | None) -> Tensor:
    """Row softmax over the kept entries (keep broadcastable to scores); empty rows -> 0."""
    if keep is None:
        keep = torch.ones_like(scores, dtype=torch.bool)
    keep = keep.expand_as(scores)
    masked = torch.where(keep, scores, torch.full_like(scores, -torch.inf))
    top = masked.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    e = torch.where(keep, torch.exp(masked - top), torch.zeros_like(scores))
    total = e.sum(dim=-1, keepdim=True)
    return e / torch.where(total == 0, torch.ones_like(total), total)


def _pooled(x: Tensor, count: int, keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """Means of x (B, H, N, D) over ``segments(N, count)`` of the kept positions, by a loop;
    and (B, count) bool: which segments kept a position."""
    b, h, n, d = x.shape
    keep = torch.ones(b, n, dtype=torch.bool) if keep is None else keep.cpu()
    means = torch.zeros(b, h, count, d, dtype=torch.float64)
    nonempty = torch.zeros(b, count, dtype=torch.bool)
    for s, positions in enumerate(segments(n, count)):
        for bi in range(b):
            idx = [j for j in positions if keep[bi, j]]
            if idx:
                means[bi, :, s] = x.double()[bi][:, idx].mean(dim=1)
                nonempty[bi, s] = True
    return means, nonempty


def linformer_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    e: Tensor | None,
    f: Tensor | None,
    *,
    rows: int | None = None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Linformer (Wang et al. 2020, eq. 7): softmax(scale Q (E K)^T) (F V), masked keys zeroed
    before projecting. With e = f = None, E = F = mean pooling over ``segments(Nk, rows)`` of
    the kept keys (the paper's pooling projection), empty segments left out of the softmax."""
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    if e is None:
        keys, nonempty = _pooled(k, rows, key_padding_mask)
        values, _ = _pooled(v, rows, key_padding_mask)
        keep = nonempty[:, None, None, :]
    else:
        zero = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool)
        zero = zero if key_padding_mask is None else key_padding_mask.cpu()
        k0 = k.double() * zero[:, None, :, None]
        v0 = v.double() * zero[:, None, :, None]
        keys = torch.einsum("rn,bhnd->bhrd", e.double(), k0)
        values = torch.einsum("rn,bhnd->bhrd", f.double(), v0)
        keep = None
    scores = torch.einsum("bhid,bhrd->bhir", q.double(), keys) * scale
    return torch.einsum("bhir,bhrd->bhid", _softmax_rows(scores, keep), values)


def newton_pinv(a: Tensor, iterations: int) -> Tensor:
    """Nystromformer's iterative pseudo-inverse (Xiong et al. 2021, eq. 16) of one (m, m)
    matrix: Z0 = A^T / (||A||_1 ||A||_inf), Z <- Z (13 I - AZ (15 I - AZ (7 I - AZ))) / 4."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    z = a.T / (a.abs().sum(dim=0).max() * a.abs().sum(dim=1).max())
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def nystrom_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    landmarks: int,
    iterations: int | None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Nystromformer (Xiong et al. 2021, eq. 15): softmax(s Q K~^T) Z softmax(s Q~ K^T) V with
    landmarks the means over ``segments(N, m)``, m = min(landmarks, Nq, Nk), of Q and of the
    kept keys; Z the pseudo-inverse of softmax(s Q~ K~^T) over the landmarks whose segment
    keeps a key (iterations None: exact), per sequence and head."""
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    b, h = q.shape[:2]
    m = min(landmarks, q.shape[2], k.shape[2])
    q_marks, _ = _pooled(q, m, None)
    k_marks, nonempty = _pooled(k, m, key_padding_mask)
    keys_kept = None if key_padding_mask is None else key_padding_mask.cpu()[:, None, None, :]
    first = _softmax_rows(
        torch.einsum("bhid,bhrd->bhir", q.double(), k_marks) * scale, nonempty[:, None, None, :]
    )
    last = _softmax_rows(torch.einsum("bhrd,bhjd->bhrj", q_marks, k.double()) * scale, keys_kept)
    middle = torch.zeros(b, h, m, m, dtype=torch.float64)
    for bi in range(b):
        idx = torch.nonzero(nonempty[bi]).flatten()
        for hi in range(h):
            if len(idx):
                kernel = _softmax_rows(q_marks[bi, hi, idx] @ k_marks[bi, hi, idx].T * scale, None)
                inv = (
                    torch.linalg.pinv(kernel)
                    if iterations is None
                    else newton_pinv(kernel, iterations)
                )
                middle[bi, hi, idx[:, None], idx[None, :]] = inv
    return first @ middle @ last @ v.double()
