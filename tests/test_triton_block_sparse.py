"""The block-sparse Triton kernel and its BlockMask, on CUDA or under Triton's CPU interpreter
(tests/kernel_device.py).

BlockMask lists are checked against the dense predicate; the kernel's output and gradients
against the float64 reference and the torch computation over the same dense pattern
(effattn.reference.pattern_attention), for causal, sliding-window and strided predicates,
ragged N, Nq != Nk, key padding and 16-bit inputs; every output and gradient element written.
"""

from __future__ import annotations

import pytest
import torch

from effattn.kernels import _runtime
from effattn.kernels.block_mask import BlockMask
from effattn.patterns import Pattern, and_, causal, dense_mask
from effattn.reference import pattern_attention
from tests.kernel_device import DEVICE, needs_kernels
from tests.reference import reference_attention


# Small predicates written here, so that these tests depend only on the kernel's contract.
def window(w: int):
    """|i - j| <= w."""

    def pred(q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= w

    pred.__name__ = f"window_{w}"
    return pred


def stride(s: int):
    """(i - j) divisible by s: non-monotone, most tiles are partial."""

    def pred(q_idx, kv_idx):
        return (q_idx - kv_idx) % s == 0

    pred.__name__ = f"stride_{s}"
    return pred


def global_and_window(g: int, w: int):
    """BigBird-like: the first g tokens see and are seen by all, plus a window."""

    def pred(q_idx, kv_idx):
        return (q_idx < g) | (kv_idx < g) | ((q_idx - kv_idx).abs() <= w)

    pred.__name__ = f"global_{g}_window_{w}"
    return pred


PREDICATES = {
    "causal": lambda nq, nk: causal(nq, nk),
    "window": lambda nq, nk: window(20),
    "stride": lambda nq, nk: stride(7),
    "bigbird_like": lambda nq, nk: global_and_window(16, 10),
    "causal_window": lambda nq, nk: and_(causal(nq, nk), window(33)),
}


def _triples(full_num, full_idx, part_num, part_idx, part_tile) -> set[tuple[int, ...]]:
    """{(head, row, column block, tile id or -1 for a full block)} of one set of lists."""
    out = set()
    for h, row in zip(*torch.nonzero(torch.ones_like(full_num)).T.tolist(), strict=True):
        out |= {(h, row, j, -1) for j in full_idx[h, row, : int(full_num[h, row])].tolist()}
        count = int(part_num[h, row])
        columns, tiles = part_idx[h, row, :count].tolist(), part_tile[h, row, :count].tolist()
        out |= {(h, row, j, t) for j, t in zip(columns, tiles, strict=True)}
    return out


def _consistent_tiles(mask: BlockMask) -> set[tuple[int, ...]]:
    """The forward lists' (head, query block, key block, tile) set, checked to equal the
    transposed lists' set (with the block indices swapped back)."""
    forward = _triples(
        mask.full_kv_num_blocks, mask.full_kv_indices, mask.kv_num_blocks, mask.kv_indices,
        mask.kv_tile_ids,
    )  # fmt: skip
    transposed = _triples(
        mask.full_q_num_blocks, mask.full_q_indices, mask.q_num_blocks, mask.q_indices,
        mask.q_tile_ids,
    )  # fmt: skip
    assert forward == {(h, i, j, t) for h, j, i, t in transposed}  # (key, query) -> swapped
    return forward


def per_head_blocks(heads: int, block: int, n: int):
    """A different random block table per head (BigBird's random blocks): (H, Nq, Nk)."""
    blocks = -(-n // block)
    table = torch.rand(heads, blocks, blocks, generator=torch.Generator().manual_seed(3)) < 0.3
    table |= torch.eye(blocks, dtype=torch.bool)  # every row keeps a block

    def pred(q_idx, kv_idx):
        return table[:, q_idx // block, kv_idx // block]

    pred.__name__ = f"per_head_blocks_{block}"
    return pred


@pytest.mark.parametrize("name", sorted(PREDICATES))
@pytest.mark.parametrize(("nq", "nk", "bm", "bn"), [(100, 100, 16, 32), (70, 130, 32, 16)])
def test_block_mask_encodes_the_predicate(name, nq, nk, bm, bn):
    pred = PREDICATES[name](nq, nk)
    mask = BlockMask.from_predicate(pred, nq, nk, bm, bn, "cpu")
    assert mask.heads == 1
    assert torch.equal(mask.to_dense(), dense_mask(pred, nq, nk)[None])
    forward = _consistent_tiles(mask)
    assert mask.num_computed_blocks == len(forward)


def test_block_mask_per_head():
    """A predicate with a head dim gives one set of lists per head, with distinct tiles."""
    pred = and_(per_head_blocks(3, 16, 100), window(40))  # random blocks, partial at the edge
    mask = BlockMask.from_predicate(pred, 100, 100, 32, 16, "cpu")
    assert mask.heads == 3
    assert mask.kv_indices.shape[:2] == (3, 4) and mask.q_indices.shape[:2] == (3, 7)
    dense = dense_mask(pred, 100, 100)  # (3, 100, 100)
    assert not torch.equal(dense[0], dense[1])
    assert torch.equal(mask.to_dense(), dense)
    _consistent_tiles(mask)
    one_head = BlockMask.from_predicate(window(40), 100, 100, 32, 16, "cpu")
    assert mask.flops(2, 6, 64) == 4 * 2 * 2 * 64 * mask.num_computed_blocks * 32 * 16
    assert one_head.flops(2, 6, 64) == 4 * 2 * 6 * 64 * one_head.num_computed_blocks * 32 * 16
    with pytest.raises(ValueError, match="heads: expected a multiple of the mask's 3, got 4"):
        mask.flops(1, 4, 64)


def test_block_mask_of_causal_example():
    """The docstring's example: causal, N = 6... here N = 64 with 16 x 16 tiles."""
    mask = BlockMask.from_predicate(causal(64, 64), 64, 64, 16, 16, "cpu")
    assert mask.kv_num_blocks.tolist() == [[1, 1, 1, 1]]  # the diagonal tile
    assert mask.kv_indices[0, :, 0].tolist() == [0, 1, 2, 3]
    assert mask.full_kv_num_blocks.tolist() == [[0, 1, 2, 3]]
    assert mask.full_q_indices[0, 0].tolist() == [1, 2, 3]
    assert mask.flops(2, 3, 64) == 4 * 2 * 3 * 64 * 10 * 16 * 16


def test_block_mask_rejects_bad_sizes():
    with pytest.raises(ValueError, match="block_m: expected a power of two"):
        BlockMask.from_predicate(causal(8, 8), 8, 8, 24, 16)
    with pytest.raises(ValueError, match="q_len: expected a positive int"):
        BlockMask.from_predicate(causal(8, 8), 0, 8, 16, 16)
    with pytest.raises(ValueError, match=r"pred: expected a \(Nq, Nk\) or \(heads, Nq, Nk\)"):
        BlockMask.from_predicate(lambda q, k: (q < k)[None, None], 8, 8, 16, 16)


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer a kernel fills starts as NaN, so an unwritten element shows up as NaN."""

    def nan_buffer(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_runtime, "new_buffer", nan_buffer)


TOLERANCES = {
    torch.float32: (2e-5, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (5e-2, 5e-2),
}


@needs_kernels
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize(
    ("name", "nq", "nk", "bm", "bn", "padded", "dtype"),
    [
        ("causal", 100, 100, 32, 32, False, torch.float32),
        ("causal", 70, 130, 16, 32, True, torch.float32),
        ("window", 200, 200, 32, 32, True, torch.float32),
        ("stride", 100, 90, 32, 16, False, torch.float32),
        ("bigbird_like", 150, 150, 32, 32, False, torch.float16),
        ("causal_window", 150, 150, 32, 32, False, torch.bfloat16),
    ],
)
def test_kernel_matches_reference(name, nq, nk, bm, bn, padded, dtype):
    from effattn.kernels.block_sparse import block_sparse_attention

    pred = PREDICATES[name](nq, nk)
    mask = BlockMask.from_predicate(pred, nq, nk, bm, bn, DEVICE)
    dense = dense_mask(pred, nq, nk, DEVICE)
    b, h, d = 2, 2, 32
    q, k, v = (
        torch.randn(b, h, n, d, dtype=dtype, device=DEVICE, requires_grad=True)
        for n in (nq, nk, nk)
    )
    keep = None
    if padded:
        lengths = torch.tensor([nk, nk // 3], device=DEVICE)
        keep = torch.arange(nk, device=DEVICE)[None, :] < lengths[:, None]
    out = block_sparse_attention(q, k, v, mask, scale=0.2, key_padding_mask=keep)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*refs, scale=0.2, key_padding_mask=keep, mask=dense)
    expected.backward(grad_out.double())
    atol, rtol = TOLERANCES[dtype]
    assert not out.isnan().any(), "unwritten output elements"
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)
    for label, got, ref in zip("qkv", (q, k, v), refs, strict=True):
        assert torch.isfinite(got.grad).all(), f"d{label} has non-finite (or unwritten) elements"
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=4 * atol, rtol=4 * rtol)

    # The torch computation of the same pattern (what the torch backends implement).
    full_mask = dense[None, None] if keep is None else dense[None, None] & keep[:, None, None, :]
    torch_out = pattern_attention(q.detach(), k.detach(), v.detach(), Pattern(full_mask), 0.2)
    torch.testing.assert_close(out.detach(), torch_out, atol=atol, rtol=rtol)


@needs_kernels
@pytest.mark.usefixtures("poisoned")
def test_kernel_with_a_pattern_per_head():
    """Each head attends over its own lists: output and gradients equal the reference over
    the (H, Nq, Nk) pattern, in one launch."""
    from effattn.kernels.block_sparse import block_sparse_attention

    b, h, n, d = 2, 3, 90, 16
    pred = per_head_blocks(h, 16, n)
    mask = BlockMask.from_predicate(pred, n, n, 16, 16, "cpu").to(DEVICE)
    dense = dense_mask(pred, n, n).to(DEVICE)  # (H, N, N)
    q, k, v = (torch.randn(b, h, n, d, device=DEVICE, requires_grad=True) for _ in range(3))
    out = block_sparse_attention(q, k, v, mask, scale=0.3)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*refs, scale=0.3, mask=dense[None])
    expected.backward(grad_out.double())
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
    for got, ref in zip((q, k, v), refs, strict=True):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-4, rtol=4e-4)


@needs_kernels
@pytest.mark.usefixtures("poisoned")
def test_rows_without_keys_give_zeros_and_finite_grads():
    from effattn.kernels.block_sparse import block_sparse_attention

    def pred(q_idx, kv_idx):  # queries 0..39 keep nothing
        return (q_idx >= 40) & (kv_idx <= q_idx)

    mask = BlockMask.from_predicate(pred, 64, 64, 16, 16, DEVICE)
    q, k, v = (torch.randn(1, 2, 64, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    out = block_sparse_attention(q, k, v, mask)
    out.sum().backward()
    assert torch.equal(out[:, :, :40], torch.zeros_like(out[:, :, :40]))
    assert torch.equal(q.grad[:, :, :40], torch.zeros_like(q.grad[:, :, :40]))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@needs_kernels
def test_dense_block_mask_equals_dense_kernel():
    """Both kernels share their tile steps: an all-True block mask gives the dense result."""
    from effattn.kernels.block_sparse import block_sparse_attention
    from effattn.kernels.flash import flash_attention

    def everything(q_idx, kv_idx):
        return (q_idx >= 0) & (kv_idx >= 0)

    mask = BlockMask.from_predicate(everything, 80, 80, 32, 32, DEVICE)
    q, k, v = (torch.randn(1, 2, 80, 32, device=DEVICE) for _ in range(3))
    sparse = block_sparse_attention(q, k, v, mask)
    dense = flash_attention(q, k, v, block_m=32, block_n=32)
    torch.testing.assert_close(sparse, dense, atol=1e-6, rtol=1e-6)


@needs_kernels
def test_wrong_block_mask_is_refused():
    from effattn.kernels.block_sparse import block_sparse_attention

    mask = BlockMask.from_predicate(causal(32, 32), 32, 32, 16, 16, DEVICE)
    q = torch.randn(1, 1, 48, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"block_mask: expected one built for \(Nq, Nk\)"):
        block_sparse_attention(q, q, q, mask)
    with pytest.raises(TypeError, match="block_mask: expected a BlockMask"):
        block_sparse_attention(q, q, q, "causal")
    per_head = BlockMask.from_predicate(per_head_blocks(3, 16, 32), 32, 32, 16, 16).to(DEVICE)
    q = torch.randn(1, 2, 32, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"one per head \(2\), got 3 pattern heads"):
        block_sparse_attention(q, q, q, per_head)
