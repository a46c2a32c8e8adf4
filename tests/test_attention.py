"""The exact baselines (`full`, `sdpa`) against the independent float64 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import effattn
from tests.reference import reference_attention

EXACT = ["full", "sdpa"]

# Tolerances per dtype against the float64 reference, for unit-variance inputs and D <= 64.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def _qkv(b, h, nq, nk, d, dtype=torch.float64):
    return (
        torch.randn(b, h, nq, d, dtype=dtype),
        torch.randn(b, h, nk, d, dtype=dtype),
        torch.randn(b, h, nk, d, dtype=dtype),
    )


@pytest.mark.parametrize("backend", EXACT)
@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    nq=st.integers(1, 70),
    nk=st.integers(1, 70),
    d=st.sampled_from([1, 3, 8, 16]),
    causal=st.booleans(),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_on_any_shape(backend, b, h, nq, nk, d, causal, padded, seed):
    torch.manual_seed(seed)
    q, k, v = _qkv(b, h, nq, nk, d)
    keep = torch.rand(b, nk) < 0.7 if padded else None
    out = effattn.attention(q, k, v, backend, causal=causal, key_padding_mask=keep)
    expected = reference_attention(q, k, v, causal=causal, key_padding_mask=keep)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_within_stated_tolerance(backend, dtype, causal):
    q, k, v = _qkv(2, 4, 77, 77, 64, dtype)
    out = effattn.attention(q, k, v, backend, causal=causal)
    assert out.dtype == dtype
    expected = reference_attention(q, k, v, causal=causal)
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("backend", EXACT)
def test_scale_is_used(backend):
    q, k, v = _qkv(1, 2, 9, 11, 8)
    out = effattn.attention(q, k, v, backend, scale=0.3)
    torch.testing.assert_close(out, reference_attention(q, k, v, scale=0.3))


@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(backend, causal):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 5, 7, 4))
    keep = torch.tensor([[True, True, False, True, True, True, False]])

    def fn(q, k, v):
        return effattn.attention(q, k, v, backend, causal=causal, key_padding_mask=keep)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("backend", EXACT)
def test_causal_output_ignores_the_future(backend):
    """No gradient flows from a later key or value to an earlier query's output."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 16, 16, 8))
    out = effattn.attention(q, k, v, backend, causal=True)
    out[:, :, 5].sum().backward()
    assert k.grad[:, :, 6:].abs().max() == 0
    assert v.grad[:, :, 6:].abs().max() == 0
    assert q.grad[:, :, 6:].abs().max() == 0
    assert v.grad[:, :, :6].abs().max() > 0


@pytest.mark.parametrize("backend", EXACT)
def test_causal_is_bottom_right_aligned(backend):
    """Nq < Nk: the last query sees every key; Nq > Nk: the first Nq - Nk queries see none."""
    q, k, v = _qkv(1, 1, 2, 4, 4)
    out = effattn.attention(q, k, v, backend, causal=True)
    torch.testing.assert_close(out[:, :, -1], effattn.attention(q, k, v, backend)[:, :, -1])
    q, k, v = _qkv(1, 1, 4, 2, 4)
    out = effattn.attention(q, k, v, backend, causal=True)
    assert out[:, :, :2].abs().max() == 0
    torch.testing.assert_close(out[:, :, 3], reference_attention(q, k, v)[:, :, 3])


@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fully_masked_rows_are_zero_with_finite_gradients(backend, dtype):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, 6, 6, 8, dtype))
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1] = False  # batch item 1 has no key at all
    out = effattn.attention(q, k, v, backend, key_padding_mask=keep)
    assert out[1].abs().max() == 0
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_full_and_sdpa_agree_in_float32():
    q, k, v = _qkv(2, 4, 300, 257, 64, torch.float32)
    keep = torch.rand(2, 257) < 0.9
    for causal in (False, True):
        a = effattn.attention(q, k, v, "full", causal=causal, key_padding_mask=keep)
        b = effattn.attention(q, k, v, "sdpa", causal=causal, key_padding_mask=keep)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", EXACT)
def test_flops_convention(backend):
    be = effattn.get_backend(backend)
    assert be.flops(2, 3, 5, 7, 8) == 4 * 2 * 3 * 5 * 7 * 8
    # Causal, Nq == Nk: N(N+1)/2 pairs; Nq < Nk: bottom-right aligned.
    assert be.flops(1, 1, 4, 4, 1, causal=True) == 4 * (1 + 2 + 3 + 4)
    assert be.flops(1, 1, 2, 4, 1, causal=True) == 4 * (3 + 4)
    assert be.flops(1, 1, 4, 2, 1, causal=True) == 4 * (0 + 0 + 1 + 2)


def test_full_pattern_is_the_keep_mask():
    q, k, v = _qkv(2, 1, 3, 5, 4)
    keep = torch.tensor([[True] * 5, [True, False, True, True, False]])
    pattern = effattn.get_backend("full").pattern(q, k, v, causal=True, key_padding_mask=keep)
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(pattern.mask[0, 0], expected)
    assert torch.equal(pattern.mask[1, 0], expected & keep[1])
