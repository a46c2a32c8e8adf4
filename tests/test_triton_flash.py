"""The `triton` backend's fused kernels, on CUDA or under Triton's CPU interpreter
(tests/kernel_device.py): output and gradients against the float64 reference and the `full`
backend; causal (bottom-right aligned), ragged N, Nq != Nk, padding, head dims, dtypes; every
output and gradient element written. Sizes are tiny: the interpreter runs each program in
numpy."""

from __future__ import annotations

import pytest
import torch

import effattn
from effattn.kernels import _runtime
from tests.kernel_device import DEVICE, needs_kernels
from tests.pattern_check import assert_matches_pattern
from tests.reference import reference_attention

pytestmark = needs_kernels

# (atol, rtol) against the float64 reference, per input dtype.
TOLERANCES = {
    torch.float32: (2e-5, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (5e-2, 5e-2),
}


@pytest.fixture(autouse=True)
def _poison_buffers(monkeypatch):
    """Every buffer a kernel fills starts as NaN, so an unwritten element shows up as NaN."""

    def nan_buffer(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_runtime, "new_buffer", nan_buffer)


def _inputs(b, h, nq, nk, d, dtype):
    q = torch.randn(b, h, nq, d, dtype=dtype, device=DEVICE, requires_grad=True)
    k = torch.randn(b, h, nk, d, dtype=dtype, device=DEVICE, requires_grad=True)
    v = torch.randn(b, h, nk, d, dtype=dtype, device=DEVICE, requires_grad=True)
    return q, k, v


def _check_against_reference(q, k, v, *, causal, key_padding_mask=None, **options):
    """Run the backend and the float64 reference; compare outputs and q, k, v gradients."""
    out = effattn.attention(
        q, k, v, "triton", causal=causal, key_padding_mask=key_padding_mask, **options
    )
    assert out.dtype == q.dtype and out.shape == q.shape
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*refs, causal=causal, key_padding_mask=key_padding_mask)
    expected.backward(grad_out.double())
    atol, rtol = TOLERANCES[q.dtype]
    assert not out.isnan().any(), "unwritten output elements"
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)
    for name, got, ref in zip("qkv", (q, k, v), refs, strict=True):
        assert torch.isfinite(got.grad).all(), f"d{name} has non-finite (or unwritten) elements"
        torch.testing.assert_close(
            got.grad.double(), ref.grad, atol=4 * atol, rtol=4 * rtol, msg=f"d{name}"
        )
    return out


@pytest.mark.parametrize(
    ("causal", "nq", "nk", "d"),
    [
        (False, 64, 64, 32),  # whole blocks only
        (True, 64, 64, 32),
        (False, 200, 200, 64),  # ragged N
        (True, 200, 200, 64),
        (True, 37, 100, 32),  # Nq < Nk: the last query sees every key
        (True, 100, 37, 32),  # Nq > Nk: the first 63 queries see no key
        (False, 1, 77, 16),
        (True, 50, 50, 24),  # head dim padded to 32 inside the kernel
        (True, 80, 80, 128),
    ],
)
def test_float32_matches_reference(causal, nq, nk, d):
    q, k, v = _inputs(1, 2, nq, nk, d, torch.float32)
    _check_against_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_mask_and_empty_rows(causal):
    q, k, v = _inputs(3, 2, 90, 90, 32, torch.float32)
    lengths = torch.tensor([90, 41, 0], device=DEVICE)  # the last one all padding: rows empty
    keep = torch.arange(90, device=DEVICE)[None, :] < lengths[:, None]
    out = _check_against_reference(q, k, v, causal=causal, key_padding_mask=keep)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.equal(k.grad[2], torch.zeros_like(k.grad[2]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_matches_reference(dtype, causal):
    q, k, v = _inputs(1, 2, 130, 130, 64, dtype)
    _check_against_reference(q, k, v, causal=causal)


@pytest.mark.parametrize(("block_m", "block_n"), [(16, 64), (64, 16)])
def test_block_size_options(block_m, block_n):
    q, k, v = _inputs(1, 2, 150, 110, 32, torch.float32)
    _check_against_reference(q, k, v, causal=True, block_m=block_m, block_n=block_n)


def test_matches_full_backend_and_own_pattern():
    q, k, v = _inputs(2, 2, 120, 120, 32, torch.float32)
    keep = torch.ones(2, 120, dtype=torch.bool, device=DEVICE)
    keep[1, 100:] = False
    ours = effattn.attention(q, k, v, "triton", causal=True, key_padding_mask=keep, scale=0.3)
    full = effattn.attention(q, k, v, "full", causal=True, key_padding_mask=keep, scale=0.3)
    torch.testing.assert_close(ours, full, atol=2e-5, rtol=1e-4)
    backend = effattn.get_backend("triton")
    assert_matches_pattern(
        backend, q, k, v, causal=True, key_padding_mask=keep, atol=2e-5, rtol=1e-4
    )


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="device=cpu needs CUDA or TRITON_INTERPRET=1"):
        effattn.attention(q, q, q, "triton")


def test_declarations_and_option_checks():
    backend = effattn.get_backend("triton")
    reasons = backend.not_supported_reasons(device="cpu", dtype=torch.float64, head_dim=512)
    assert any("dtype=float64" in r for r in reasons)
    assert any("head_dim=512" in r for r in reasons)
    with pytest.raises(ValueError, match="block_m: expected a power of two"):
        effattn.get_backend("triton", block_m=48)
    with pytest.raises(TypeError, match="block_n"):
        effattn.get_backend("triton", block_n="64")
