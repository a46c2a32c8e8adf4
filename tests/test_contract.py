"""The backend contract, checked the same way for every registered backend:

- its fast path (output and gradients) equals its own dense float64 reference,
  ``backend.reference(...)``, causal and not, ragged N, Nq != Nk, key padding;
- pattern backends also equal dense attention over their own ``pattern()`` computed by the
  independent reference of tests/reference.py (the low-rank and kernel backends are held to
  their papers' formulas in tests/test_kernelized.py and tests/test_lowrank.py);
- causality: no output depends on a later key or value (zero gradient, unchanged outputs);
- padding: a masked key or value changes nothing (zero gradient, unchanged outputs);
- refusals: what the backend declares unsupported raises, with the declared reason, in the
  fast path and the reference alike.
"""

from __future__ import annotations

import pytest
import torch

import effattn
import effattn.backends.kernelized.product as kernel_product
from tests.pattern_check import assert_matches_pattern, assert_matches_reference

# Backends whose CPU path is tested elsewhere under the Triton interpreter.
CPU_BACKENDS = [
    name
    for name in effattn.list_backends()
    if "cpu" in effattn.backend_class(name).devices
    and torch.float64 in effattn.backend_class(name).dtypes
]
PATTERN_BACKENDS = [name for name in CPU_BACKENDS if effattn.backend_class(name).has_pattern]
# Small options so that the tests' short sequences cross several chunks, segments or landmarks.
SMALL = {"performer": {"chunk_size": 16}, "linear": {"chunk_size": 16}}
# Backends whose choice of pairs depends on the keys themselves: a masked or later key may move
# which pairs are met (never attended itself). Their keys are checked by gradient only.
KEY_DEPENDENT = {"lsh": "hash buckets of every key decide which pairs are met"}


@pytest.fixture(autouse=True)
def _small_streams(monkeypatch):
    """The kernel backends work in steps of STEP_FEATURES / m positions: make several steps
    (performer's 256 features: 24 positions; linear's 16: 384)."""
    monkeypatch.setattr(kernel_product, "STEP_FEATURES", 24 * 256)


def _inputs(b: int, h: int, nq: int, nk: int, d: int):
    q = torch.randn(b, h, nq, d, dtype=torch.float64)
    k = torch.randn(b, h, nk, d, dtype=torch.float64)
    v = torch.randn(b, h, nk, d, dtype=torch.float64)
    return q, k, v


def _backend(name: str) -> effattn.Backend:
    return effattn.get_backend(name, **SMALL.get(name, {}))


def _modes(backend: effattn.Backend) -> list[bool]:
    """The causal flags the backend supports."""
    return [
        c
        for c in (False, True)
        if (backend.supports_causal if c else backend.supports_bidirectional)
    ]


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("nq", "nk"), [(1, 1), (37, 37), (200, 200), (23, 61), (61, 23)])
def test_output_and_grads_match_own_reference(name: str, causal: bool, nq: int, nk: int):
    backend = _backend(name)
    if causal not in _modes(backend):
        pytest.skip(f"{name} does not support causal={causal}")
    q, k, v = _inputs(2, 2, nq, nk, 16)
    assert_matches_reference(backend, q, k, v, causal=causal, scale=0.3)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_padding_mask_matches_own_reference(name: str):
    backend = _backend(name)
    if not backend.supports_padding_mask:
        pytest.skip(f"{name} takes no padding mask")
    q, k, v = _inputs(3, 2, 150, 150, 16)
    lengths = torch.tensor([150, 97, 1])
    keep = torch.arange(150)[None, :] < lengths[:, None]
    keep[0, 40:50] = False  # a hole in the middle too
    for causal in _modes(backend):
        assert_matches_reference(backend, q, k, v, key_padding_mask=keep, causal=causal)


@pytest.mark.parametrize("name", PATTERN_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 37, 200])
def test_pattern_backends_match_independent_reference(name: str, causal: bool, n: int):
    backend = _backend(name)
    if causal not in _modes(backend):
        pytest.skip(f"{name} does not support causal={causal}")
    q, k, v = _inputs(2, 2, n, n, 16)
    assert_matches_pattern(backend, q, k, v, causal=causal)


@pytest.mark.parametrize("name", PATTERN_BACKENDS)
def test_pattern_backends_padding_matches_independent_reference(name: str):
    backend = _backend(name)
    if not backend.supports_padding_mask:
        pytest.skip(f"{name} takes no padding mask")
    q, k, v = _inputs(3, 2, 150, 150, 16)
    lengths = torch.tensor([150, 97, 1])
    keep = torch.arange(150)[None, :] < lengths[:, None]
    for causal in _modes(backend):
        assert_matches_pattern(backend, q, k, v, key_padding_mask=keep, causal=causal)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_non_contiguous_inputs(name: str):
    """Callers hand over views: HF models pass (B, N, H, D).transpose(1, 2)."""
    backend = _backend(name)
    causal = not backend.supports_bidirectional
    q, k, v = (t.transpose(1, 2) for t in _inputs(1, 70, 3, 3, 8))  # (B, N, H, D) -> (B, H, N, D)
    assert not q.is_contiguous()
    assert_matches_reference(backend, q, k, v, causal=causal)


def _grads(backend, q, k, v, rows: slice, **call):
    """Gradients of the output rows ``rows`` (queries) with respect to q, k and v."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = backend(q, k, v, **call)
    out[:, :, rows].sum().backward()
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize(("nq", "nk"), [(96, 96), (40, 96)])
def test_no_output_depends_on_a_later_key(name: str, nq: int, nk: int):
    backend = _backend(name)
    if not backend.supports_causal:
        pytest.skip(f"{name} is bidirectional only")
    q, k, v = _inputs(2, 2, nq, nk, 16)
    cut = nq // 2  # queries [0, cut) keep keys [0, cut + nk - nq]
    later = slice(cut + nk - nq, nk)
    _, k_grad, v_grad = _grads(backend, q, k, v, slice(0, cut), causal=True)
    assert torch.all(k_grad[:, :, later] == 0), "gradient from a later key"
    assert torch.all(v_grad[:, :, later] == 0), "gradient from a later value"

    before = backend(q, k, v, causal=True)[:, :, :cut]
    v2 = v.clone()
    v2[:, :, later] = 1e3 * torch.randn_like(v2[:, :, later])
    torch.testing.assert_close(
        backend(q, k, v2, causal=True)[:, :, :cut], before, rtol=1e-12, atol=1e-12
    )
    if name not in KEY_DEPENDENT:
        k2 = k.clone()
        k2[:, :, later] = 30 * torch.randn_like(k2[:, :, later])
        after = backend(q, k2, v, causal=True)[:, :, :cut]
        torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_a_masked_key_changes_nothing(name: str):
    backend = _backend(name)
    if not backend.supports_padding_mask:
        pytest.skip(f"{name} takes no padding mask")
    q, k, v = _inputs(2, 2, 80, 80, 16)
    keep = torch.ones(2, 80, dtype=torch.bool)
    keep[0, 60:] = False
    keep[1, 10:20] = False
    for causal in _modes(backend):
        _, k_grad, v_grad = _grads(
            backend, q, k, v, slice(None), causal=causal, key_padding_mask=keep
        )
        dropped = ~keep[:, None, :, None]  # (B, 1, Nk, 1)
        assert torch.all(k_grad.masked_select(dropped) == 0), "gradient from a masked key"
        assert torch.all(v_grad.masked_select(dropped) == 0), "gradient from a masked value"
        before = backend(q, k, v, causal=causal, key_padding_mask=keep)
        v2 = torch.where(dropped, 1e3 * torch.randn_like(v), v)
        after = backend(q, k, v2, causal=causal, key_padding_mask=keep)
        torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)
        if name not in KEY_DEPENDENT:
            k2 = torch.where(dropped, 30 * torch.randn_like(k), k)
            after = backend(q, k2, v, causal=causal, key_padding_mask=keep)
            torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_refusals_name_the_reason_in_both_paths(name: str):
    backend = _backend(name)
    q, k, v = _inputs(1, 1, 8, 8, 4)
    refused = []
    if not backend.supports_causal:
        refused.append({"causal": True})
    if not backend.supports_bidirectional:
        refused.append({"causal": False})
    if not backend.supports_padding_mask:
        refused.append({"key_padding_mask": torch.ones(1, 8, dtype=torch.bool)})
    for call in refused:
        for run in (backend, backend.reference, backend.attention_matrix):
            with pytest.raises(ValueError, match=f"backend '{name}' cannot run this call"):
                run(q, k, v, **call)
    for key, why in backend.why_unsupported.items():
        assert why, f"{name}: empty reason for {key}"
        reasons = backend.not_supported_reasons(
            device="cpu",
            dtype=torch.float64,
            causal=key == "causal",
            padding_mask=key == "padding_mask",
            backward=key == "backward",
        )
        assert any(why in r for r in reasons), reasons


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_attention_matrix_is_the_reference_without_v(name: str):
    """reference(q, k, v) = attention_matrix(q, k, v) @ v; pattern and kernel backends' matrix
    holds probabilities (rows sum to 1), the low-rank ones' may have any sign."""
    backend = _backend(name)
    causal = not backend.supports_bidirectional
    q, k, v = _inputs(2, 2, 30, 30, 8)
    weights = backend.attention_matrix(q, k, v, causal=causal)
    assert weights.shape == (2, 2, 30, 30) and weights.dtype == torch.float64
    torch.testing.assert_close(weights @ v, backend.reference(q, k, v, causal=causal))
    if backend.has_pattern or backend.tay_class == "KR":  # probabilities: positive features too
        assert torch.all(weights >= 0)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 30, dtype=torch.float64))
    if not backend.has_pattern:
        with pytest.raises(NotImplementedError, match="attention_matrix"):
            backend.pattern(q, k, v)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_reference_of_float32_inputs_is_float64_and_close(name: str):
    backend = _backend(name)
    causal = not backend.supports_bidirectional
    q, k, v = (t.float() for t in _inputs(1, 2, 64, 64, 16))
    want = backend.reference(q, k, v, causal=causal)
    assert want.dtype == torch.float64
    torch.testing.assert_close(backend(q, k, v, causal=causal).double(), want, atol=1e-5, rtol=1e-4)


def test_low_rank_and_kernel_backends_are_declared_and_pictured():
    """The survey's LR and KR classes are listed with their declarations, and the patterns
    figure shows them as their effective attention matrix, labelled so."""
    pytest.importorskip("matplotlib")
    from effattn.sweep.plots import plot_patterns

    classes = {"linformer": "LR", "nystrom": "LR", "performer": "KR", "linear": "KR"}
    for name, tay_class in classes.items():
        row = effattn.backend_class(name).declaration()
        assert row["class"] == tay_class and row["exact"] is False and row["complexity"]
        assert not effattn.backend_class(name).has_pattern
    fig = plot_patterns(["local:window=8", *classes, "full"], n=64, dense_n=32)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 5, titles  # full attends to every pair: nothing to picture
    assert titles[0].startswith("local:window=8") and "of pairs" in titles[0]
    for name, title in zip(classes, titles[1:], strict=True):
        assert title.startswith(name) and "effective A (out = A V), N=32" in title
