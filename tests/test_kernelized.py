"""`performer` and `linear` against their papers' formulas (tests/reference.py, float64, with the
backend's own random features), their features, stabilisation, memory and approximation error."""

from __future__ import annotations

import pytest
import torch

import effattn
import effattn.backends.kernelized.product as kernel_product
from effattn.harness.meters import peak_memory_cpu
from tests.pattern_check import assert_matches
from tests.reference import linear_reference, performer_reference, reference_attention


@pytest.fixture(autouse=True)
def _small_streams(monkeypatch):
    """Steps of 16 positions for 16 features (performer tests with m = 16 / linear with D = 16),
    fewer positions for more features: several steps and chunks at small N."""
    monkeypatch.setattr(kernel_product, "STEP_FEATURES", 16 * 16)


def _inputs(b, h, nq, nk, d, dtype=torch.float64, amplitude=1.0):
    q = amplitude * torch.randn(b, h, nq, d, dtype=dtype)
    k = amplitude * torch.randn(b, h, nk, d, dtype=dtype)
    v = torch.randn(b, h, nk, d, dtype=dtype)
    return q, k, v


def _ragged_keep(b: int, nk: int) -> torch.Tensor:
    keep = torch.ones(b, nk, dtype=torch.bool)
    keep[0, nk // 2 :] = False
    keep[-1, 3:7] = False
    return keep


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("nq", "nk"), [(50, 50), (1, 1), (17, 50), (50, 17)])
@pytest.mark.parametrize("padded", [False, True])
def test_performer_is_favor_plus(causal: bool, nq: int, nk: int, padded: bool):
    backend = effattn.get_backend("performer", num_features=24, chunk_size=8, seed=3)
    q, k, v = _inputs(2, 2, nq, nk, 8)
    keep = _ragged_keep(2, nk) if padded else None
    w = backend.features(8)

    def formula(q, k, v):
        return performer_reference(q, k, v, w, causal=causal, key_padding_mask=keep, scale=0.4)

    assert_matches(backend, q, k, v, formula, causal=causal, key_padding_mask=keep, scale=0.4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("nq", "nk"), [(50, 50), (1, 1), (17, 50), (50, 17)])
@pytest.mark.parametrize("padded", [False, True])
def test_linear_is_elu_plus_one_attention(causal: bool, nq: int, nk: int, padded: bool):
    backend = effattn.get_backend("linear", chunk_size=8)
    q, k, v = _inputs(2, 2, nq, nk, 8)
    keep = _ragged_keep(2, nk) if padded else None

    def formula(q, k, v):
        return linear_reference(q, k, v, causal=causal, key_padding_mask=keep)

    assert_matches(backend, q, k, v, formula, causal=causal, key_padding_mask=keep)


def test_linear_ignores_scale():
    q, k, v = _inputs(1, 2, 20, 20, 8)
    out = effattn.attention(q, k, v, "linear")
    torch.testing.assert_close(effattn.attention(q, k, v, "linear", scale=5.0), out)


@pytest.mark.parametrize("name", ["performer", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_wide(name: str, dtype: torch.dtype):
    backend = effattn.get_backend(name, chunk_size=8)
    q, k, v = _inputs(1, 2, 40, 40, 16, dtype=dtype)
    for causal in (False, True):
        out = backend(q, k, v, causal=causal)
        assert out.dtype == dtype
        want = backend.reference(q, k, v, causal=causal)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


def test_features_are_seeded_orthogonal_gaussian_rows():
    backend = effattn.get_backend("performer", num_features=40, seed=7)
    w = backend.features(16)
    assert w.shape == (40, 16) and w.dtype == torch.float64
    torch.testing.assert_close(
        w, effattn.get_backend("performer", num_features=40, seed=7).features(16)
    )
    assert not torch.allclose(
        w, effattn.get_backend("performer", num_features=40, seed=8).features(16)
    )
    for block in (w[:16], w[16:32], w[32:]):  # rows of one block are orthogonal
        gram = block @ block.T
        off = gram - torch.diag(torch.diagonal(gram))
        assert off.abs().max() < 1e-10
    # norms are chi(16): mean about sqrt(16) = 4; iid rows are not orthogonal
    assert 3.0 < w.norm(dim=1).mean() < 5.0
    iid = effattn.get_backend("performer", num_features=16, orthogonal=False).features(16)
    assert (iid @ iid.T - torch.diag(torch.diagonal(iid @ iid.T))).abs().max() > 1.0


def test_features_follow_dtype_and_are_fixed_between_calls():
    backend = effattn.get_backend("performer", num_features=8)
    q, k, v = _inputs(1, 1, 10, 10, 4, dtype=torch.float32)
    assert backend.features(4, torch.float32).dtype == torch.float32
    torch.testing.assert_close(backend(q, k, v), backend(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_is_stable_for_large_inputs(causal: bool):
    """Scores of hundreds would overflow exp in float32 without the stabilisers."""
    backend = effattn.get_backend("performer", num_features=32, chunk_size=8)
    q, k, v = _inputs(1, 2, 40, 40, 8, dtype=torch.float32, amplitude=12.0)
    out = backend(q, k, v, causal=causal)
    assert torch.isfinite(out).all()
    want = backend.reference(q, k, v, causal=causal)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-3)


def test_a_later_key_cannot_underflow_earlier_steps():
    """Causal stabilisers are running maxima: a later key with the largest possible logit
    (k' = w_f) does not touch earlier steps, whose own logits are far lower (keys of large norm
    that a shared stabiliser would push below float32's range)."""
    backend = effattn.get_backend("performer", num_features=16, chunk_size=8)
    q, k, v = _inputs(1, 1, 32, 32, 8, dtype=torch.float32)
    k = 8.0 * k  # logits around -90 +- 40
    scale = 8**-0.5
    before = backend(q, k, v, causal=True)
    k2 = k.clone()
    k2[:, :, 30] = backend.features(8, torch.float32)[0] / scale**0.5  # logit |w_0|^2 / 2
    after = backend(q, k2, v, causal=True)
    torch.testing.assert_close(after[:, :, :16], before[:, :, :16], rtol=0, atol=0)  # a step
    want = backend.reference(q, k2, v, causal=True)
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after.double(), want, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_error_falls_as_features_grow(causal: bool):
    """FAVOR+ is unbiased with variance ~ 1/m: the error against exact softmax attention falls
    (inputs of moderate norm, where the estimator's variance is small enough to see it)."""
    errors = []
    for m in (4, 64, 1024):
        total = 0.0
        for seed in range(4):
            g = torch.Generator().manual_seed(100 + seed)
            q, k, v = (
                torch.randn(1, 4, 128, 16, generator=g, dtype=torch.float64) for _ in range(3)
            )
            q, k = 0.5 * q, 0.5 * k
            out = effattn.attention(q, k, v, "performer", causal=causal, num_features=m, seed=seed)
            exact = reference_attention(q, k, v, causal=causal)
            total += float((out - exact).norm() / exact.norm())
        errors.append(total / 4)
    assert errors[0] > 1.5 * errors[1] > 1.5 * 1.5 * errors[2], errors


@pytest.mark.parametrize("name", ["performer", "linear"])
@pytest.mark.parametrize("causal", [False, True])
def test_memory_beyond_the_output_does_not_grow_with_n(monkeypatch, name: str, causal: bool):
    """Forward peak memory above the inputs is the output plus one step's workspace, the same
    at every N: no (N, m) feature tensor, let alone an (N, m, D) prefix tensor."""
    monkeypatch.setattr(kernel_product, "STEP_FEATURES", 512 * 256)
    h, d, m = 2, 32, 256
    backend = effattn.get_backend(name, **({"num_features": m} if name == "performer" else {}))
    extra = {}
    for n in (8192, 32768):  # linear's 32 features: steps of 4096 positions
        q, k, v = _inputs(1, h, n, n, d, dtype=torch.float32)
        with torch.no_grad():
            peak = peak_memory_cpu(lambda q=q, k=k, v=v: backend(q, k, v, causal=causal))
        extra[n] = peak - h * n * d * 4  # minus the output's bytes
    assert extra[32768] <= 1.05 * extra[8192] + 65536, extra
    if name == "performer":  # less than one (N, m) feature tensor of the keys alone
        assert extra[32768] < h * 32768 * m * 4, extra


def test_flops_grow_linearly_in_n():
    for name in ("performer", "linear"):
        backend = effattn.get_backend(name)
        for causal in (False, True):
            small = backend.flops(1, 8, 1024, 1024, 64, causal=causal)
            large = backend.flops(1, 8, 4096, 4096, 64, causal=causal)
            assert large == 4 * small
    performer = effattn.get_backend("performer")
    # features 2 (Nq + Nk) D m + state and read 2 (Nq + Nk) m (D + 1)
    assert performer.flops(1, 1, 10, 10, 4) == 2 * 20 * 4 * 256 + 2 * 20 * 256 * 5


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_features": 0}, "num_features"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        effattn.get_backend("performer", **options)
