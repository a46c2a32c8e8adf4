"""The `lsh` backend (Reformer LSH attention): output and gradients equal dense attention over its
own realised pattern, shared and separate QK, causal, padding, ragged N, both ways of counting
pairs met in several rounds; reproducibility; causality; error falls as n_hashes grows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import effattn
from effattn.backends.lsh import hashing
from effattn.backends.lsh import rounds as rounds_module
from effattn.backends.lsh.lsh import SELF_ATTENTION_BIAS
from effattn.backends.sparse import flash
from tests.pattern_check import assert_matches_pattern
from tests.reference import reference_attention


def _qkv(b: int, h: int, nq: int, nk: int, d: int = 8):
    q = torch.randn(b, h, nq, d, dtype=torch.float64)
    k = torch.randn(b, h, nk, d, dtype=torch.float64)
    v = torch.randn(b, h, nk, d, dtype=torch.float64)
    return q, k, v


def _lengths_mask(lengths: list[int], n: int) -> torch.Tensor:
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # (B, N) True = real


def _shared_reference(backend, q, v, *, causal=False, key_padding_mask=None, scale=None):
    """float64 reference for shared-QK with the key normalisation inside the graph, so that q's
    gradient through the keys is checked too; mask/weight/bias from the backend's pattern.

    The self bias is also put on the pairs the mask drops (no effect on the value): the reference
    takes exp(score - row max) of dropped pairs too, which overflows (NaN gradient) when a row
    keeps only its biased self pair and a dropped pair scores 1e5 higher."""
    with torch.no_grad():
        pat = backend.pattern(q, q, v, causal=causal, key_padding_mask=key_padding_mask)
    bias = torch.where(pat.mask, pat.bias, SELF_ATTENTION_BIAS)
    return reference_attention(
        q,
        F.normalize(q, dim=-1),
        v,
        scale=scale,
        mask=pat.mask,
        weight=pat.weight,
        bias=bias,
    )


# -- the contract: separate q and k ------------------------------------------------------------
@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("nq", "nk"), [(1, 1), (5, 5), (37, 37), (70, 70), (20, 45), (45, 20)])
def test_separate_qk_matches_pattern(dedup: bool, causal: bool, nq: int, nk: int):
    backend = effattn.get_backend("lsh", bucket_size=8, n_hashes=3, dedup=dedup)
    q, k, v = _qkv(2, 2, nq, nk)
    assert_matches_pattern(backend, q, k, v, causal=causal)


@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_separate_qk_padding_mask(dedup: bool, causal: bool):
    backend = effattn.get_backend("lsh", bucket_size=8, n_hashes=2, dedup=dedup)
    q, k, v = _qkv(3, 2, 50, 50)
    keep = _lengths_mask([50, 23, 1], 50)
    assert_matches_pattern(backend, q, k, v, causal=causal, key_padding_mask=keep, scale=0.7)


# -- shared QK --------------------------------------------------------------------------------
@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 2, 9, 37, 64])
def test_shared_qk_output_and_grads(dedup: bool, causal: bool, n: int):
    backend = effattn.get_backend("lsh", bucket_size=8, n_hashes=3, dedup=dedup)
    q = torch.randn(2, 2, n, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, n, 8, dtype=torch.float64, requires_grad=True)
    keep = _lengths_mask([n, max(1, n // 3)], n)
    out = backend(q, q, v, causal=causal, key_padding_mask=keep)  # k is q: shared-QK
    q_ref, v_ref = (t.detach().clone().requires_grad_() for t in (q, v))
    want = _shared_reference(backend, q_ref, v_ref, causal=causal, key_padding_mask=keep)
    torch.testing.assert_close(out, want, atol=1e-9, rtol=1e-7)
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(q.grad, q_ref.grad, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(v.grad, v_ref.grad, atol=1e-8, rtol=1e-6)


def test_shared_qk_pattern_through_the_helper():
    """With shared_qk=True the passed k is not used; the helper checks output, q (query side) and
    v gradients against the pattern's keys."""
    backend = effattn.get_backend("lsh", bucket_size=8, n_hashes=2, shared_qk=True)
    q, k, v = _qkv(1, 2, 40, 40)
    assert_matches_pattern(backend, q, k, v, check_grad=False)
    pat = backend.pattern(q, k, v)
    torch.testing.assert_close(pat.key, F.normalize(q, dim=-1))
    q, k = q.requires_grad_(), k.requires_grad_()
    backend(q, k, v).sum().backward()
    assert k.grad is None  # keys are the normalised queries


def test_shared_qk_self_only_when_no_other_target():
    backend = effattn.get_backend("lsh", bucket_size=4, n_hashes=2)
    q, _, v = _qkv(1, 1, 16, 16)
    pat = backend.pattern(q, q, v, causal=True)
    diag = torch.eye(16, dtype=torch.bool)
    assert (pat.bias[0, 0][diag] == SELF_ATTENTION_BIAS).all()
    assert (pat.bias[0, 0][~diag] == 0).all()
    out = backend(q, q, v, causal=True)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])  # the first token sees only itself


def test_shared_qk_needs_as_many_keys_as_queries():
    backend = effattn.get_backend("lsh", shared_qk=True)
    q, k, v = _qkv(1, 1, 10, 12)
    with pytest.raises(ValueError, match="shared_qk"):
        backend(q, k, v)


# -- pair weights -----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [5, 16, 32])
def test_tiny_n_meets_every_pair_once_per_round(n: int):
    """One or two chunks: every pair is met in every round, never twice in one round."""
    backend = effattn.get_backend("lsh", bucket_size=16, n_hashes=3)
    q, k, v = _qkv(1, 2, n, n)
    pat = backend.pattern(q, k, v)
    assert pat.mask.all()
    assert (pat.weight == 3).all()


def test_weights_count_rounds_and_dedup_is_the_union():
    q, k, v = _qkv(1, 2, 96, 96)
    multiset = effattn.get_backend("lsh", bucket_size=8, n_hashes=4).pattern(q, k, v)
    union = effattn.get_backend("lsh", bucket_size=8, n_hashes=4, dedup=True).pattern(q, k, v)
    assert union.weight is None
    assert torch.equal(union.mask, multiset.mask)
    assert multiset.weight.max() <= 4 and multiset.weight[multiset.mask].min() >= 1
    assert (multiset.weight > 1).any()  # some pairs are met in several rounds
    assert multiset.mask.sum(-1).max() <= 4 * 2 * 8  # at most 2 chunks per round per query


# -- empty rows, dtypes, options --------------------------------------------------------------
def test_rows_without_keys_are_zero_with_finite_grads():
    backend = effattn.get_backend("lsh", bucket_size=4)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 1, 12, 12))
    keep = _lengths_mask([12, 0], 12)
    out = backend(q, k, v, key_padding_mask=keep)
    assert (out[1] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_close_to_float64(dtype: torch.dtype):
    backend = effattn.get_backend("lsh", bucket_size=8, n_hashes=2)
    q, k, v = (t.to(dtype) for t in _qkv(1, 2, 40, 40))  # the same rounded inputs: same buckets
    want = backend(q.double(), k.double(), v.double(), causal=True)
    got = backend(q, k, v, causal=True)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "options",
    [{"bucket_size": 0}, {"n_hashes": 0}, {"n_buckets": 3}, {"n_buckets": 0}, {"seed": -1}],
)
def test_bad_options_name_the_option(options: dict):
    with pytest.raises(ValueError, match=next(iter(options))):
        effattn.get_backend("lsh", **options)


def test_flops_count_computed_blocks():
    backend = effattn.get_backend("lsh", bucket_size=64, n_hashes=4)
    assert backend.flops(1, 8, 4096, 4096, 64) == 4 * 8 * 64 * (4 * 4096 * 128)


# -- reproducibility and causality -----------------------------------------------------------
def test_fixed_seed_reproducible_other_seed_different():
    q, k, v = _qkv(1, 2, 128, 128)
    first = effattn.get_backend("lsh", bucket_size=8, seed=3)
    again = effattn.get_backend("lsh", bucket_size=8, seed=3)
    other = effattn.get_backend("lsh", bucket_size=8, seed=4)
    assert torch.equal(first(q, k, v), again(q, k, v))
    assert torch.equal(first.pattern(q, k, v).weight, again.pattern(q, k, v).weight)
    assert not torch.equal(first.pattern(q, k, v).weight, other.pattern(q, k, v).weight)
    assert not torch.allclose(first(q, k, v), other(q, k, v))


@pytest.mark.parametrize("shared", [False, True])
def test_no_gradient_from_later_positions(shared: bool):
    backend = effattn.get_backend("lsh", bucket_size=4, n_hashes=2)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 24, 24))
    out = backend(q, q if shared else k, v, causal=True)
    i = 10
    out[:, :, i].sum().backward()
    for t in (q, v) if shared else (q, k, v):
        assert (t.grad[:, :, i + 1 :] == 0).all()
        assert t.grad[:, :, : i + 1].abs().sum() > 0


# -- approximation quality --------------------------------------------------------------------
def test_error_falls_as_n_hashes_grows():
    """Clustered queries (shared-QK): attention concentrates within a cluster, which LSH finds
    more often with more rounds; mean error against exact attention falls 1 -> 2 -> 4 -> 8."""
    gen = torch.Generator().manual_seed(0)
    b, h, n, d, clusters = 2, 2, 256, 16, 16
    centres = F.normalize(
        torch.randn(b, h, clusters, d, generator=gen, dtype=torch.float64), dim=-1
    )
    members = torch.randint(clusters, (b, h, n), generator=gen)
    q = F.normalize(centres, dim=-1).gather(2, members[..., None].expand(-1, -1, -1, d))
    q = 8.0 * F.normalize(q + 0.2 * torch.randn(q.shape, generator=gen, dtype=q.dtype), dim=-1)
    v = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    self_bias = torch.eye(n, dtype=torch.float64) * SELF_ATTENTION_BIAS
    exact = reference_attention(q, F.normalize(q, dim=-1), v, scale=1.0, bias=self_bias)
    errors = []
    for n_hashes in (1, 2, 4, 8):
        err = 0.0
        for seed in range(3):
            backend = effattn.get_backend("lsh", bucket_size=16, n_hashes=n_hashes, seed=seed)
            err += (backend(q, q, v, scale=1.0) - exact).norm().item()
        errors.append(err / 3)
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.5 * errors[0], errors


# -- the pieces of the computation ------------------------------------------------------------
def test_hash_buckets_are_the_argmax_of_both_signs():
    """hashing.hash_buckets (all rounds in one matmul, in blocks) equals the definition,
    argmax([x R_r ; -x R_r]) per round (the first maximum on ties: zero vectors), in any
    block size."""
    x = torch.randn(3, 50, 8, dtype=torch.float64)
    x[0, :3] = 0.0
    rot = hashing.random_rotations(4, 8, 6, seed=1, dtype=torch.float64, device="cpu")
    rotated = torch.einsum("bnd,rdk->rbnk", x, rot)  # (n_hashes, BH, N, K)
    want = torch.cat([rotated, -rotated], dim=-1).argmax(-1)
    for block in (1, 7, 2**20):
        torch.testing.assert_close(hashing.hash_buckets(x, rot, block_elements=block), want)


def test_key_windows_are_previous_then_own_chunk():
    q, k, _ = _qkv(1, 2, 37, 45)
    backend = effattn.get_backend("lsh", bucket_size=8, n_hashes=2)
    _, _, lay, _ = backend._prepare(q, k)
    own = lay.k_order.unflatten(-1, (lay.n_chunks, lay.k_chunk))  # (n_hashes, BH, nc, ck)
    want = torch.cat([own.roll(1, dims=2), own], dim=-1)
    assert torch.equal(lay.key_windows(), want)


@pytest.mark.parametrize("causal", [False, True])
def test_plain_path_matches_pattern(monkeypatch, causal: bool):
    """Off CPU the rounds run the plain-torch attention (flash.plain_attention): the same
    contract, here forced on CPU, with padding slots, key padding and dedup."""
    monkeypatch.setattr(rounds_module, "flash_attention", flash.plain_attention)
    monkeypatch.setattr(rounds_module, "flash_attention_backward", flash.plain_attention_backward)
    backend = effattn.get_backend("lsh", bucket_size=8, n_hashes=3, dedup=causal)
    q, k, v = _qkv(2, 2, 37, 37)
    keep = _lengths_mask([37, 20], 37)
    assert_matches_pattern(backend, q, k, v, causal=causal, key_padding_mask=keep)
