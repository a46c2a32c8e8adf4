"""The backend contract, checked the same way for every registered backend: output and gradients
equal dense attention over the backend's own pattern(), causal and not, ragged N, padding."""

from __future__ import annotations

import pytest
import torch

import effattn
from tests.pattern_check import assert_matches_pattern

# Backends whose CPU path is tested elsewhere under the Triton interpreter.
CPU_BACKENDS = [
    name
    for name in effattn.list_backends()
    if "cpu" in effattn.backend_class(name).devices
    and torch.float64 in effattn.backend_class(name).dtypes
]


def _inputs(b: int, h: int, nq: int, nk: int, d: int):
    q = torch.randn(b, h, nq, d, dtype=torch.float64)
    k = torch.randn(b, h, nk, d, dtype=torch.float64)
    v = torch.randn(b, h, nk, d, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 37, 200])
def test_output_and_grads_match_own_pattern(name: str, causal: bool, n: int):
    backend = effattn.get_backend(name)
    if causal and not backend.supports_causal:
        pytest.skip(f"{name} is bidirectional only")
    if not causal and not backend.supports_bidirectional:
        pytest.skip(f"{name} is causal only")
    q, k, v = _inputs(2, 2, n, n, 16)
    assert_matches_pattern(backend, q, k, v, causal=causal)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_padding_mask_matches_own_pattern(name: str):
    backend = effattn.get_backend(name)
    if not backend.supports_padding_mask:
        pytest.skip(f"{name} takes no padding mask")
    q, k, v = _inputs(3, 2, 150, 150, 16)
    lengths = torch.tensor([150, 97, 1])
    keep = torch.arange(150)[None, :] < lengths[:, None]
    if backend.supports_bidirectional:
        assert_matches_pattern(backend, q, k, v, key_padding_mask=keep)
    if backend.supports_causal:
        assert_matches_pattern(backend, q, k, v, key_padding_mask=keep, causal=True)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_non_contiguous_inputs(name: str):
    """Callers hand over views: HF models pass (B, N, H, D).transpose(1, 2)."""
    backend = effattn.get_backend(name)
    causal = not backend.supports_bidirectional
    q, k, v = (t.transpose(1, 2) for t in _inputs(1, 70, 3, 3, 8))  # (B, N, H, D) -> (B, H, N, D)
    assert not q.is_contiguous()
    assert_matches_pattern(backend, q, k, v, causal=causal)
