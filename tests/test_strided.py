"""`strided` (Sparse Transformer) against the independent float64 reference."""

from __future__ import annotations

import pytest
import torch

import effattn
from tests.pattern_check import assert_matches_pattern
from tests.reference import reference_attention


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("n_q", "n_k"), [(50, 50), (33, 47), (47, 33)])
@pytest.mark.parametrize(
    ("window", "stride", "block_size"), [(3, 5, None), (2, 7, 9), (None, None, None)]
)
def test_strided_equals_reference(causal, n_q, n_k, window, stride, block_size):
    backend = effattn.get_backend("strided", window=window, stride=stride, block_size=block_size)
    w, s = backend.resolved(n_k)
    q, k, v = (torch.randn(2, 2, n, 8, dtype=torch.float64) for n in (n_q, n_k, n_k))
    keep = torch.rand(2, n_k) > 0.2
    i = torch.arange(n_q)[:, None] + (n_k - n_q)  # the aligned diagonal key of query i
    j = torch.arange(n_k)[None, :]
    mask = ((j - i).abs() <= w) | (j % s == s - 1)
    mask = mask & (j <= i) if causal else mask
    out = backend(q, k, v, causal=causal, key_padding_mask=keep)
    want = reference_attention(q, k, v, key_padding_mask=keep, mask=mask)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-8)
    assert_matches_pattern(backend, q, k, v, causal=causal, key_padding_mask=keep)


def test_strided_defaults_are_sqrt_n():
    backend = effattn.get_backend("strided")
    assert backend.resolved(100) == (10, 10)
    assert backend.resolved(101) == (11, 11)
    n = 1024
    dense = effattn.get_backend("full").flops(1, 1, n, n, 64)
    assert backend.flops(1, 1, n, n, 64) < dense / 2


def test_strided_stride_longer_than_n_is_the_band():
    q, k, v = (torch.randn(1, 1, 12, 4, dtype=torch.float64) for _ in range(3))
    out = effattn.attention(q, k, v, "strided", window=2, stride=50)
    band = (torch.arange(12)[:, None] - torch.arange(12)[None, :]).abs() <= 2
    torch.testing.assert_close(out, reference_attention(q, k, v, mask=band))
