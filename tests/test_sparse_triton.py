"""`local`, `strided` and `bigbird` through the fused Triton block-sparse kernel (impl="triton",
on CUDA or under Triton's CPU interpreter: tests/kernel_device.py) equal their torch path and
their own pattern, forward and gradients."""

from __future__ import annotations

import pytest
import torch

import effattn
from tests.kernel_device import DEVICE, needs_kernels
from tests.pattern_check import assert_matches_pattern

pytestmark = needs_kernels

CASES = [
    ("local", dict(window=8), False),
    ("local", dict(window=8), True),
    ("local", dict(window=6, num_global=3), False),
    ("local", dict(window=16, blocked=True), True),
    ("strided", dict(window=5, stride=7), False),
    ("strided", dict(window=5, stride=7), True),
    ("bigbird", dict(block_size=16, num_random_blocks=2), False),
]


def _qkv(n: int, heads: int = 2):
    return tuple(torch.randn(2, heads, n, 32, device=DEVICE) for _ in range(3))


@pytest.mark.parametrize(("name", "options", "causal"), CASES)
def test_triton_equals_torch_path_and_pattern(name, options, causal):
    n = 100  # ragged: not a multiple of the tiles or blocks
    q, k, v = _qkv(n)
    keep = torch.ones(2, n, dtype=torch.bool, device=DEVICE)
    keep[1, 70:] = False
    fused = effattn.get_backend(name, impl="triton", **options)
    plain = effattn.get_backend(name, impl="torch", **options)
    assert_matches_pattern(
        fused, q, k, v, causal=causal, key_padding_mask=keep, atol=2e-5, rtol=2e-5
    )
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    out_fused = fused(qs, ks, vs, causal=causal, key_padding_mask=keep)
    out_plain = plain(qt, kt, vt, causal=causal, key_padding_mask=keep)
    torch.testing.assert_close(out_fused, out_plain, atol=2e-5, rtol=2e-5)
    grad = torch.randn_like(out_plain)
    out_fused.backward(grad)
    out_plain.backward(grad)
    for a, b in ((qs, qt), (ks, kt), (vs, vt)):
        torch.testing.assert_close(a.grad, b.grad, atol=5e-5, rtol=5e-5)


def test_auto_picks_torch_on_cpu_and_triton_refuses_float64():
    q, k, v = (t.double().cpu() for t in _qkv(40))
    out = effattn.attention(q, k, v, "local", window=4)  # auto -> torch on CPU: float64 works
    assert out.dtype == torch.float64
    with pytest.raises(ValueError, match=r"dtype=float64 with impl='triton'"):
        effattn.attention(q, k, v, "local", window=4, impl="triton")
    with pytest.raises(TypeError, match=r"option 'impl' expected"):
        effattn.get_backend("strided", impl="cuda")


def test_triton_refused_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    be = effattn.get_backend("bigbird", impl="triton")
    reasons = be.not_supported_reasons(device="cpu", dtype=torch.float32)
    assert any("TRITON_INTERPRET=1" in r for r in reasons), reasons
