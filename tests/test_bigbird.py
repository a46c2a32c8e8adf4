"""`bigbird` against the independent float64 reference over its block table."""

from __future__ import annotations

import pytest
import torch

import effattn
from effattn.backends.sparse import blocked as blocksparse
from effattn.backends.sparse import flash
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


@pytest.mark.parametrize(("n_q", "n_k"), [(61, 61), (50, 77), (77, 50)])
def test_bigbird_in_chunks_equals_reference(monkeypatch, n_q: int, n_k: int):
    """Gathered keys in chunks of one query block (and B > 1, padding, per-head lists):
    output and the gradients of q, k, v match the reference over the block table."""
    monkeypatch.setattr(blocksparse, "GATHER_CHUNK_BYTES", 1)  # one query block per chunk
    backend = effattn.get_backend("bigbird", block_size=5, num_random_blocks=2, seed=1)
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64) for n in (n_q, n_k, n_k))
    keep = torch.rand(2, n_k) > 0.2
    assert_matches_pattern(backend, q, k, v, key_padding_mask=keep)
    assert_matches_pattern(backend, q, k, v)
    if n_q == n_k:  # (B, N, H, D).transpose(1, 2) views, as HF models pass them
        views = torch.randn(3, 1, n_q, 3, 8, dtype=torch.float64).transpose(2, 3).unbind(0)
        assert not views[0].is_contiguous()
        assert_matches_pattern(backend, *views)


@pytest.mark.parametrize(
    "needs_grad", [(True, False, False), (False, True, False), (False, False, True)]
)
def test_bigbird_gradients_of_some_inputs(monkeypatch, needs_grad: tuple[bool, bool, bool]):
    """Only some of q, k, v require grad: the same gradients as when all do; no grad: the
    same output."""
    monkeypatch.setattr(blocksparse, "GATHER_CHUNK_BYTES", 1)
    backend = effattn.get_backend("bigbird", block_size=4)
    inputs = [torch.randn(2, 2, 48, 8, dtype=torch.float64) for _ in range(3)]
    grad_out = torch.randn(2, 2, 48, 8, dtype=torch.float64)
    every = [x.clone().requires_grad_() for x in inputs]
    out = backend(*every)
    out.backward(grad_out)
    some = [x.clone().requires_grad_(n) for x, n in zip(inputs, needs_grad, strict=True)]
    backend(*some).backward(grad_out)
    for x, y, n in zip(some, every, needs_grad, strict=True):
        assert (x.grad is not None) == n
        if n:
            torch.testing.assert_close(x.grad, y.grad, atol=1e-12, rtol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(backend(*inputs), out.detach(), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("per_head", [False, True])
def test_gathered_attention_chunks_change_nothing(monkeypatch, per_head: bool):
    """blocksparse.gathered_attention (bigbird's middle blocks; local's and strided's gathered
    keys): chunks of 1 query block give the output and gradients of a single chunk, with key
    lists per head (H, nb, m) or shared (nb, m), absent (-1) keys, and a (B, 1, nb, b, m) mask."""
    batch, heads, nb, b, m, n_k = 2, 3, 7, 4, 9, 30
    q = torch.randn(batch, heads, nb, b, 8, dtype=torch.float64)
    k, v = (torch.randn(batch, heads, n_k, 8, dtype=torch.float64) for _ in range(2))
    positions = torch.randint(-1, n_k, (heads, nb, m) if per_head else (nb, m))
    positions[..., 0] = 0  # every row keeps a key
    keep = (positions[..., None, :] >= 0) & (torch.rand(batch, 1, nb, b, m) > 0.3)
    keep[..., 0] = True
    bias = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    grad_out = torch.randn_like(q)
    results = []
    for chunk_bytes in (2**30, 1):
        monkeypatch.setattr(blocksparse, "GATHER_CHUNK_BYTES", chunk_bytes)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = blocksparse.gathered_attention(*leaves, positions, bias, scale=0.3)
        out.backward(grad_out)
        results.append([out.detach(), *(x.grad for x in leaves)])
    for one, chunked in zip(*results, strict=True):
        torch.testing.assert_close(chunked, one, atol=1e-12, rtol=1e-10)


def test_gathered_attention_key_blocks_equal_key_positions():
    """key_block > 1 (bigbird gathers whole key blocks) equals the same keys listed one by one,
    output and gradients, with per-head block lists and an out-of-range (-1) block."""
    batch, heads, nb, b, kb, n_blocks = 2, 3, 5, 4, 3, 6
    q = torch.randn(batch, heads, nb, b, 8, dtype=torch.float64)
    k, v = (torch.randn(batch, heads, n_blocks * kb, 8, dtype=torch.float64) for _ in range(2))
    blocks = torch.randint(-1, n_blocks, (heads, nb, 4))
    blocks[..., 0] = 0
    keys = blocks[..., None] * kb + torch.arange(kb)  # (H, nb, 4, kb)
    keys = torch.where(blocks[..., None] < 0, -1, keys).flatten(2)  # (H, nb, 4*kb)
    keep = (keys[:, :, None, :] >= 0) & (torch.rand(batch, 1, nb, b, keys.shape[-1]) > 0.3)
    keep[..., 0] = True
    bias = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    grad_out = torch.randn_like(q)
    results = []
    for positions, key_block in ((keys, 1), (blocks, kb)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = blocksparse.gathered_attention(*leaves, positions, bias, 0.3, key_block=key_block)
        out.backward(grad_out)
        results.append([out.detach(), *(x.grad for x in leaves)])
    for by_key, by_block in zip(*results, strict=True):
        torch.testing.assert_close(by_block, by_key, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mask_kind", ["none", "rows", "per_query"])
def test_flash_kernel_equals_plain_path(mask_kind: str):
    """flash.flash_attention (torch's CPU flash kernel) and its backward equal the plain
    torch path the sparse backends take off CPU: outputs, log-sum-exps and gradients, with
    broadcast masks and rows that keep no key (output 0, lse 0)."""
    q = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 3, 7, 8, dtype=torch.float64) for _ in range(2))
    keep = {
        "none": None,
        "rows": torch.rand(2, 1, 1, 7) > 0.4,
        "per_query": torch.rand(1, 3, 5, 7) > 0.4,
    }[mask_kind]
    mask = None
    if keep is not None:
        keep[..., 0] = True
        mask = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
        if mask_kind == "per_query":
            mask[..., 1, :] = float("-inf")  # a row without keys
    fast = flash.flash_attention(q, k, v, mask, 0.4)
    plain = flash.plain_attention(q, k, v, mask, 0.4)
    for got, want in zip(fast, plain, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    grad = torch.randn_like(q)
    fast_grads = flash.flash_attention_backward(grad, q, k, v, *fast, mask, 0.4)
    plain_grads = flash.plain_attention_backward(grad, q, k, v, *plain, mask, 0.4)
    for got, want in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("plain", [False, True])
def test_split_keys_merge_by_log_sum_exp(plain: bool):
    """The rule the lsh rounds rely on: attention over two disjoint key sets, merged by their
    log-sum-exps, equals attention over both; and each set's backward with the MERGED output
    and log-sum-exp gives that set's share of the gradients (they add up to the full ones)."""
    forward = flash.plain_attention if plain else flash.flash_attention
    backward = flash.plain_attention_backward if plain else flash.flash_attention_backward
    q = torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    full = torch.softmax(q @ k.transpose(-1, -2) * 0.3, dim=-1) @ v
    grad = torch.randn_like(full)
    full.backward(grad)
    parts = [(k[:, :, :4], v[:, :, :4]), (k[:, :, 4:], v[:, :, 4:])]
    with torch.no_grad():
        (o1, l1), (o2, l2) = (forward(q, kp, vp, None, 0.3) for kp, vp in parts)
        total = torch.logaddexp(l1, l2)
        out = o1 * (l1 - total).exp()[..., None] + o2 * (l2 - total).exp()[..., None]
        torch.testing.assert_close(out, full, atol=1e-12, rtol=1e-10)
        shares = [backward(grad, q, kp, vp, out, total, None, 0.3) for kp, vp in parts]
    torch.testing.assert_close(shares[0][0] + shares[1][0], q.grad, atol=1e-12, rtol=1e-10)
    dk = torch.cat([shares[0][1], shares[1][1]], dim=2)
    dv = torch.cat([shares[0][2], shares[1][2]], dim=2)
    torch.testing.assert_close(dk, k.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(dv, v.grad, atol=1e-12, rtol=1e-10)


def test_bigbird_plain_path_matches_pattern(monkeypatch):
    """Off CPU (impl='torch' on CUDA) the gathered blocks run flash.plain_attention: the
    same contract, here forced on CPU, with key padding and B > 1."""
    monkeypatch.setattr(blocksparse, "flash_attention", flash.plain_attention)
    monkeypatch.setattr(blocksparse, "flash_attention_backward", flash.plain_attention_backward)
    backend = effattn.get_backend("bigbird", block_size=5, num_random_blocks=2, seed=1)
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64) for n in (61, 61, 61))
    keep = torch.rand(2, 61) > 0.2
    assert_matches_pattern(backend, q, k, v, key_padding_mask=keep)
