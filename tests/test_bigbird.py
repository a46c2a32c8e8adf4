"""`bigbird` against the independent float64 reference over its block table."""

from __future__ import annotations

import pytest
import torch

import effattn
from tests.pattern_check import assert_matches_pattern
from tests.reference import reference_attention


def _dense_from_table(table: torch.Tensor, b: int, n_q: int, n_k: int) -> torch.Tensor:
    """(H, nbq, nbk) block table -> (1, H, Nq, Nk) mask, written with repeat_interleave."""
    full = table.repeat_interleave(b, dim=1).repeat_interleave(b, dim=2)
    return full[None, :, :n_q, :n_k]


@pytest.mark.parametrize(("n_q", "n_k"), [(72, 72), (61, 61), (50, 77), (77, 50)])
@pytest.mark.parametrize(
    "options",
    [
        {"block_size": 6},
        {"block_size": 5, "num_global_blocks": 1, "num_random_blocks": 2, "seed": 3},
        {"block_size": 4, "num_window_blocks": 5, "num_global_blocks": 0},
    ],
)
def test_bigbird_equals_reference(n_q: int, n_k: int, options: dict):
    backend = effattn.get_backend("bigbird", **options)
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64) for n in (n_q, n_k, n_k))
    keep = torch.rand(2, n_k) > 0.2
    table = backend.block_table(n_q, n_k, 3, torch.device("cpu"))
    mask = _dense_from_table(table, options["block_size"], n_q, n_k)
    out = backend(q, k, v, key_padding_mask=keep)
    want = reference_attention(q, k, v, key_padding_mask=keep, mask=mask)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-8)
    assert_matches_pattern(backend, q, k, v, key_padding_mask=keep)


def test_bigbird_is_bidirectional_only():
    backend = effattn.get_backend("bigbird")
    assert not backend.supports_causal
    x = torch.randn(1, 1, 128, 8)
    with pytest.raises(ValueError, match="causal=True"):
        backend(x, x, x, causal=True)


def test_bigbird_short_sequence_is_dense_and_exact():
    backend = effattn.get_backend("bigbird", block_size=8)
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(backend(q, k, v), reference_attention(q, k, v))


def test_bigbird_flops_are_linear():
    backend = effattn.get_backend("bigbird")
    small, large = (backend.flops(1, 1, n, n, 64) for n in (4096, 16384))
    assert large <= 4.1 * small
