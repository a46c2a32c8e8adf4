"""`linformer` and `nystrom` against their papers' formulas (tests/reference.py, float64, with the
backend's own projections), their segments, projections, pseudo-inverse and approximation error."""

from __future__ import annotations

import pytest
import torch

import effattn
from effattn.backends.lowrank.pinv import iterative_pinv
from effattn.backends.lowrank.projections import segment_matrix, segment_means, segment_sums
from tests.pattern_check import assert_matches
from tests.reference import (
    linformer_reference,
    newton_pinv,
    nystrom_reference,
    reference_attention,
    segments,
)


def _inputs(b, h, nq, nk, d, dtype=torch.float64):
    return (
        torch.randn(b, h, nq, d, dtype=dtype),
        torch.randn(b, h, nk, d, dtype=dtype),
        torch.randn(b, h, nk, d, dtype=dtype),
    )


def _ragged_keep(b: int, nk: int) -> torch.Tensor:
    keep = torch.ones(b, nk, dtype=torch.bool)
    keep[0, nk // 2 :] = False  # a whole tail of segments empty
    keep[-1, 3:7] = False
    return keep


# -- segments ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "count"), [(10, 4), (12, 4), (7, 7), (100, 3), (5, 1)])
def test_segments_follow_the_documented_rule(n: int, count: int):
    x = torch.randn(2, 3, n, 5, dtype=torch.float64)
    want = torch.stack([x[:, :, list(r)].sum(dim=2) for r in segments(n, count)], dim=2)
    torch.testing.assert_close(segment_sums(x, count), want)
    means, counts = segment_means(x, count)
    torch.testing.assert_close(means, want / counts)
    torch.testing.assert_close(segment_matrix(n, count) @ x, means)
    keep = torch.rand(2, n) > 0.4
    kept_means, kept_counts = segment_means(x, count, keep)
    for s, r in enumerate(segments(n, count)):
        for b in range(2):
            idx = [j for j in r if keep[b, j]]
            assert kept_counts[b, 0, s, 0] == len(idx)
            if idx:
                torch.testing.assert_close(kept_means[b, :, s], x[b][:, idx].mean(dim=1))


# -- linformer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", ["gaussian", "mean"])
@pytest.mark.parametrize(("nq", "nk"), [(40, 40), (1, 1), (13, 40), (40, 13), (40, 300)])
@pytest.mark.parametrize("padded", [False, True])
def test_linformer_is_the_paper_formula(projection: str, nq: int, nk: int, padded: bool):
    backend = effattn.get_backend("linformer", rank=9, projection=projection, seed=5)
    q, k, v = _inputs(2, 2, nq, nk, 8)
    keep = _ragged_keep(2, nk) if padded else None
    e, f = backend.projections(nk) if projection == "gaussian" else (None, None)

    def formula(q, k, v):
        return linformer_reference(q, k, v, e, f, rows=min(9, nk), key_padding_mask=keep, scale=0.3)

    assert_matches(backend, q, k, v, formula, key_padding_mask=keep, scale=0.3)


def test_linformer_projection_of_any_length_is_a_prefix_of_one_projection():
    """Column j depends on (seed, j) only: N keys use the first N columns (the paper's fixed
    maximum length with zero padding, without a maximum)."""
    backend = effattn.get_backend("linformer", rank=16, seed=1)
    e_long, f_long = backend.projections(700)
    e_short, f_short = backend.projections(300)
    assert e_long.shape == (16, 700)
    torch.testing.assert_close(e_short, e_long[:, :300], rtol=0, atol=0)
    torch.testing.assert_close(f_short, f_long[:, :300], rtol=0, atol=0)
    assert not torch.allclose(e_long, f_long)
    assert 0.8 < float(e_long.var() * 16) < 1.2  # N(0, 1/k) entries
    other = effattn.get_backend("linformer", rank=16, seed=2).projections(300)[0]
    assert not torch.allclose(other, e_short)
    # zero-padded keys beyond N change nothing: the same as a longer input with zero keys
    q, k, v = _inputs(1, 2, 20, 300, 8)
    pad = torch.zeros(1, 2, 400, 8, dtype=torch.float64)
    longer = backend(q, torch.cat([k, pad], 2), torch.cat([v, pad], 2))
    torch.testing.assert_close(backend(q, k, v), longer)


def test_linformer_mean_with_k_at_least_n_is_exact_attention():
    q, k, v = _inputs(2, 2, 30, 50, 8)
    out = effattn.attention(q, k, v, "linformer", rank=64, projection="mean")
    torch.testing.assert_close(out, reference_attention(q, k, v))


def test_linformer_mean_error_falls_as_k_grows():
    """Pooling to k segments converges to softmax attention as k grows (exact at k = N);
    untrained Gaussian projections do not approximate it (the paper learns E and F)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 16, generator=g, dtype=torch.float64) for _ in range(3))
    exact = reference_attention(q, k, v)
    errors = [
        float((effattn.attention(q, k, v, "linformer", rank=r, projection="mean") - exact).norm())
        / float(exact.norm())
        for r in (8, 64, 128, 256)
    ]
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 1e-12, errors


def test_linformer_refuses_causal_with_the_reason():
    q, k, v = _inputs(1, 1, 8, 8, 4)
    with pytest.raises(ValueError, match="projects keys and values along the whole sequence"):
        effattn.attention(q, k, v, "linformer", causal=True)


def test_linformer_flops():
    gaussian = effattn.get_backend("linformer", rank=256)
    # attention over k rows (4 D per pair) + two (k, N) x (N, D) projections
    assert gaussian.flops(1, 1, 1024, 1024, 64) == 4 * 1024 * 256 * 64 + 2 * 2 * 256 * 1024 * 64
    mean = effattn.get_backend("linformer", rank=256, projection="mean")
    assert mean.flops(1, 1, 1024, 1024, 64) == 4 * 1024 * 256 * 64 + 2 * 1024 * 64


# -- nystrom -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("nq", "nk"), [(40, 40), (1, 1), (13, 40), (40, 13), (37, 37)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("iterations", [6, 0, None])
def test_nystrom_is_the_paper_formula(nq: int, nk: int, padded: bool, iterations: int | None):
    backend = effattn.get_backend("nystrom", landmarks=6, pinv_iterations=iterations)
    q, k, v = _inputs(2, 2, nq, nk, 8)
    keep = _ragged_keep(2, nk) if padded else None

    def formula(q, k, v):
        return nystrom_reference(
            q, k, v, landmarks=6, iterations=iterations, key_padding_mask=keep, scale=0.3
        )

    # the exact pseudo-inverse of an ill-conditioned kernel amplifies rounding
    tol = {"atol": 1e-7, "rtol": 1e-6} if iterations is None else {}
    assert_matches(backend, q, k, v, formula, key_padding_mask=keep, scale=0.3, **tol)


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    x = torch.softmax(torch.randn(3, 2, 12, 12, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(iterative_pinv(x, 40), torch.linalg.pinv(x))
    for b in range(3):
        for h in range(2):
            torch.testing.assert_close(iterative_pinv(x, 6)[b, h], newton_pinv(x[b, h], 6))


def test_nystrom_sequences_are_independent():
    """The pseudo-inverse is normalised per sequence and head (nystrom-attention normalises over
    the whole batch, so one sequence changes another's output)."""
    q, k, v = _inputs(2, 2, 64, 64, 8)
    backend = effattn.get_backend("nystrom", landmarks=8)
    alone = backend(q[:1], k[:1], v[:1])
    k2 = k.clone()
    k2[1] *= 5.0
    torch.testing.assert_close(backend(q, k2, v)[:1], alone, rtol=1e-12, atol=1e-12)


def test_nystrom_with_n_landmarks_and_exact_pinv_is_exact_attention():
    q, k, v = _inputs(1, 2, 24, 24, 8)
    out = effattn.attention(q, k, v, "nystrom", landmarks=64, pinv_iterations=None)
    torch.testing.assert_close(out, reference_attention(q, k, v), atol=1e-8, rtol=1e-6)


def test_nystrom_error_falls_as_landmarks_grow():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 16, generator=g, dtype=torch.float64) for _ in range(3))
    exact = reference_attention(q, k, v)
    errors = [
        float((effattn.attention(q, k, v, "nystrom", landmarks=m) - exact).norm())
        / float(exact.norm())
        for m in (8, 32, 128, 256)
    ]
    assert errors[0] > errors[1] > errors[2] > errors[3], errors


def test_nystrom_refuses_causal_with_the_reason():
    q, k, v = _inputs(1, 1, 8, 8, 4)
    with pytest.raises(ValueError, match="landmarks are means over segments"):
        effattn.attention(q, k, v, "nystrom", causal=True)


@pytest.mark.parametrize("name", ["linformer", "nystrom"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_compute_wide(name: str, dtype: torch.dtype):
    backend = effattn.get_backend(
        name, **({"rank": 16} if name == "linformer" else {"landmarks": 8})
    )
    q, k, v = _inputs(1, 2, 40, 40, 16, dtype=dtype)
    out = backend(q, k, v)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), backend.reference(q, k, v), atol=tol, rtol=tol)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("linformer", {"rank": 0}, "rank"),
        ("linformer", {"projection": "max"}, "projection"),
        ("linformer", {"seed": -1}, "seed"),
        ("nystrom", {"landmarks": 0}, "landmarks"),
        ("nystrom", {"pinv_iterations": -1}, "pinv_iterations"),
    ],
)
def test_bad_options(name, options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        effattn.get_backend(name, **options)
