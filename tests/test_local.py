"""`local` against the independent float64 reference, and the checks shared by the three
sparse backends (local, strided, bigbird): the fast float32/half path, rows that keep no key,
causality of gradients, options checked by value."""

from __future__ import annotations

import pytest
import torch

import effattn
from tests.pattern_check import assert_matches_pattern
from tests.reference import reference_attention

SPARSE = {
    "local": {"window": 5, "num_global": 2},
    "strided": {"window": 3, "stride": 6},
    "bigbird": {"block_size": 8},
}


def _qkv(b: int, h: int, n_q: int, n_k: int, d: int = 8, dtype=torch.float64):
    return (
        torch.randn(b, h, n_q, d, dtype=dtype),
        torch.randn(b, h, n_k, d, dtype=dtype),
        torch.randn(b, h, n_k, d, dtype=dtype),
    )


def _band(n_q: int, n_k: int, w: int, causal: bool, g: int = 0) -> torch.Tensor:
    i = torch.arange(n_q)[:, None] + (n_k - n_q)  # the aligned diagonal key of query i
    j = torch.arange(n_k)[None, :]
    keep = ((j - i).abs() <= w) | (torch.arange(n_q)[:, None] < g) | (j < g)
    return keep & (j <= i) if causal else keep


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("n_q", "n_k"), [(45, 45), (30, 41), (41, 30)])
@pytest.mark.parametrize(
    "options", [{"window": 4}, {"window": 6, "num_global": 3}, {"window": 3, "block_size": 8}]
)
def test_local_equals_reference_band(causal: bool, n_q: int, n_k: int, options: dict):
    backend = effattn.get_backend("local", **options)
    q, k, v = _qkv(2, 2, n_q, n_k)
    keep = torch.rand(2, n_k) > 0.2
    band = _band(n_q, n_k, options["window"], causal, options.get("num_global", 0))
    out = backend(q, k, v, causal=causal, key_padding_mask=keep)
    want = reference_attention(q, k, v, key_padding_mask=keep, mask=band)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-8)
    assert_matches_pattern(backend, q, k, v, causal=causal, key_padding_mask=keep)


@pytest.mark.parametrize("causal", [False, True])
def test_local_blocked_is_lra_blocks(causal: bool):
    backend = effattn.get_backend("local", window=8, blocked=True)
    q, k, v = _qkv(1, 2, 37, 37)
    i, j = torch.arange(37)[:, None], torch.arange(37)[None, :]
    blocks = (i // 8 == j // 8) & ((j <= i) if causal else True)
    torch.testing.assert_close(
        backend(q, k, v, causal=causal), reference_attention(q, k, v, mask=blocks)
    )
    assert_matches_pattern(backend, q, k, v, causal=causal)
    assert_matches_pattern(backend, q[:, :, :30], k, v, causal=causal)  # misaligned blocks


def test_local_window_wider_than_n_is_dense():
    q, k, v = _qkv(1, 1, 20, 20)
    out = effattn.attention(q, k, v, "local", window=256, causal=True)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=True))


# -- checks shared by the three sparse backends ---------------------------------------------
@pytest.mark.parametrize("name", sorted(SPARSE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse_fast_path_dtypes(name: str, dtype: torch.dtype):
    backend = effattn.get_backend(name, **SPARSE[name])
    q, k, v = _qkv(2, 2, 70, 70, d=16)
    keep = torch.rand(2, 70) > 0.3
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    assert_matches_pattern(
        backend,
        *(t.to(dtype) for t in (q, k, v)),
        key_padding_mask=keep,
        check_grad=dtype == torch.float32,
        atol=tol,
        rtol=tol,
    )


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_sparse_rows_without_keys_are_zero_with_finite_grads(name: str):
    backend = effattn.get_backend(name, **SPARSE[name])
    q, k, v = (t.float().requires_grad_() for t in _qkv(2, 2, 50, 50))
    keep = torch.ones(2, 50, dtype=torch.bool)
    keep[1] = False  # the second sequence is all padding
    out = backend(q, k, v, key_padding_mask=keep)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("name", ["local", "strided"])
def test_sparse_causal_gradients_flow_only_backwards(name: str):
    backend = effattn.get_backend(name, **SPARSE[name])
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 40, 40))
    i = 17
    backend(q, k, v, causal=True)[:, :, i].sum().backward()
    for t in (q, k, v):
        assert torch.count_nonzero(t.grad[:, :, i + 1 :]) == 0
    assert torch.count_nonzero(k.grad[:, :, : i + 1]) > 0


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("local", {"window": -1}, "window: expected"),
        ("local", {"num_global": -2}, "num_global: expected"),
        ("local", {"block_size": 0}, "block_size: expected"),
        ("strided", {"stride": 0}, "stride: expected"),
        ("bigbird", {"num_window_blocks": 2}, "num_window_blocks: expected an odd"),
        ("bigbird", {"num_random_blocks": -1}, "num_random_blocks: expected"),
    ],
)
def test_sparse_options_are_checked(name: str, options: dict, message: str):
    with pytest.raises(ValueError, match=message):
        effattn.get_backend(name, **options)


def test_sparse_predicates_match_patterns():
    q, k, v = _qkv(1, 2, 33, 33)
    for name, options in SPARSE.items():
        backend = effattn.get_backend(name, **options)
        grid = backend.predicate(33, 33, causal=False)(
            torch.arange(33)[:, None], torch.arange(33)[None, :]
        )
        head0 = backend.pattern(q, k, v).mask[0, 0]  # (Nq, Nk) of head 0
        assert torch.equal(grid.reshape(-1, 33, 33)[0], head0), name
