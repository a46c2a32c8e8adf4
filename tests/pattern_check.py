"""The shared checks of the backend contract (see tests/test_contract.py):

- :func:`assert_matches_reference`: a backend's output and gradients equal its own dense
  float64 reference, ``backend.reference(...)`` (every backend);
- :func:`assert_matches_pattern`: a pattern backend's output and gradients equal dense softmax
  attention restricted to its own ``pattern()``, computed by the independent reference of
  tests/reference.py (so a mistake in effattn's own reference cannot hide);
- :func:`assert_matches`: the output and gradients equal any float64 formula (the low-rank and
  kernel backends' papers, written out in tests/reference.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from effattn import Backend
from tests.reference import reference_attention

Formula = Callable[[Tensor, Tensor, Tensor], Tensor]  # float64 q, k, v -> (B, H, Nq, D)


def assert_matches(
    backend: Backend,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    formula: Formula,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    check_grad: bool = True,
    grad_of: str = "qkv",
    atol: float = 1e-9,
    rtol: float = 1e-7,
) -> Tensor:
    """Run ``backend`` on (q, k, v) and compare its output, and the gradients of the inputs
    named in ``grad_of``, with ``formula`` applied to float64 copies. Inputs are used in their
    own dtype; pass float64 tensors for the tight default tolerances. Returns the output."""
    q, k, v = (t.detach().clone().requires_grad_(check_grad) for t in (q, k, v))
    out = backend(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    assert out.shape == q.shape, f"output shape {tuple(out.shape)} != q's {tuple(q.shape)}"
    assert torch.isfinite(out).all(), "output has non-finite values"
    refs = [t.detach().double().requires_grad_(check_grad) for t in (q, k, v)]
    expected = formula(*refs)
    torch.testing.assert_close(out.double(), expected.detach(), atol=atol, rtol=rtol)
    if not check_grad:
        return out
    grad_out = torch.randn_like(expected)
    out.backward(grad_out.to(out.dtype))
    expected.backward(grad_out)
    for name, got, want in zip("qkv", (q, k, v), refs, strict=True):
        if name in grad_of:
            assert torch.isfinite(got.grad).all(), f"{name}: non-finite gradient"
            torch.testing.assert_close(
                got.grad.double(), want.grad, atol=atol * 10, rtol=rtol * 10, msg=name
            )
    return out


def assert_matches_reference(
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
    """Output and q, k, v gradients equal ``backend.reference(...)`` (effattn's own dense
    float64 formula of the backend). The reference must be float64 and of q's shape."""
    want = backend.reference(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    assert want.dtype == torch.float64, f"reference dtype {want.dtype}, expected float64"
    assert want.shape == q.shape, f"reference shape {tuple(want.shape)} != {tuple(q.shape)}"
    pattern_keys = backend.has_pattern and _derives_keys(backend, q, k, v, causal)

    def formula(q64: Tensor, k64: Tensor, v64: Tensor) -> Tensor:
        return backend.reference(
            q64, k64, v64, causal=causal, key_padding_mask=key_padding_mask, scale=scale
        )

    assert_matches(
        backend,
        q,
        k,
        v,
        formula,
        causal=causal,
        key_padding_mask=key_padding_mask,
        scale=scale,
        check_grad=check_grad,
        grad_of="qv" if pattern_keys else "qkv",
        atol=atol,
        rtol=rtol,
    )


def _derives_keys(backend: Backend, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> bool:
    """Whether the backend scores against keys it derives itself (shared-QK LSH: pattern.key);
    their gradient is checked by the backend's own tests."""
    with torch.no_grad():
        return backend.pattern(q, k, v, causal=causal).key is not None


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
    with torch.no_grad():
        pattern = backend.pattern(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    assert pattern.mask.dtype == torch.bool, "pattern.mask must be bool"
    assert pattern.mask.shape[-2:] == (q.shape[2], k.shape[2]), "pattern.mask must be (.., Nq, Nk)"

    def formula(q64: Tensor, k64: Tensor, v64: Tensor) -> Tensor:
        key = k64 if pattern.key is None else pattern.key.detach().double()
        return reference_attention(
            q64,
            key,
            v64,
            scale=scale,
            mask=pattern.mask,
            weight=pattern.weight,
            bias=pattern.bias,
        )

    # A backend that scores against keys it derives itself (pattern.key, e.g. shared-QK LSH)
    # has its k gradient checked by its own tests.
    assert_matches(
        backend,
        q,
        k,
        v,
        formula,
        causal=causal,
        key_padding_mask=key_padding_mask,
        scale=scale,
        check_grad=check_grad,
        grad_of="qkv" if pattern.key is None else "qv",
        atol=atol,
        rtol=rtol,
    )
