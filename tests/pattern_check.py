"""The shared check of the backend contract: a backend's output (and gradients) equal dense
softmax attention restricted to its own ``pattern()``, computed by the independent reference.

Every backend is tested through :func:`assert_matches_pattern`; see tests/test_contract.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effattn import Backend
from tests.reference import reference_attention


def assert_matches_pattern(
    backend: Backend,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    check_grad: bool = True,
    atol: float = 1e-9,
    rtol: float = 1e-7,
) -> None:
    """Run ``backend`` on (q, k, v) and compare output and input gradients with the float64
    reference over ``backend.pattern(...)`` of the same inputs (its mask, weights, bias, keys).

    Inputs are used in their own dtype; pass float64 tensors for the tight default tolerances.
    """
    q, k, v = (t.detach().clone().requires_grad_(check_grad) for t in (q, k, v))
    out = backend(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    assert out.shape == q.shape, f"output shape {tuple(out.shape)} != q's {tuple(q.shape)}"
    assert torch.isfinite(out).all(), "output has non-finite values"

    with torch.no_grad():
        pattern = backend.pattern(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    assert pattern.mask.dtype == torch.bool, "pattern.mask must be bool"
    assert pattern.mask.shape[-2:] == (q.shape[2], k.shape[2]), "pattern.mask must be (.., Nq, Nk)"

    q_ref, k_ref, v_ref = (t.detach().double().requires_grad_(check_grad) for t in (q, k, v))
    key_ref = k_ref if pattern.key is None else pattern.key.detach().double()
    expected = reference_attention(
        q_ref,
        key_ref,
        v_ref,
        scale=scale,
        mask=pattern.mask,
        weight=pattern.weight,
        bias=pattern.bias,
    )
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)

    if not check_grad:
        return
    grad_out = torch.randn_like(expected)
    out.backward(grad_out.to(out.dtype))
    expected.backward(grad_out)
    for name, got, want in (("q", q.grad, q_ref.grad), ("v", v.grad, v_ref.grad)):
        torch.testing.assert_close(got.double(), want, atol=atol * 10, rtol=rtol * 10, msg=name)
    if pattern.key is None:
        # A backend that scores against keys it derives itself (pattern.key, e.g. shared-QK LSH)
        # has its k gradient checked by its own tests.
        torch.testing.assert_close(k.grad.double(), k_ref.grad, atol=atol * 10, rtol=rtol * 10)
