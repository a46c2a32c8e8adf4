"""Transformer-XL: the shift trick, the `xl` backend against dense attention with its bias, and the
streaming module against a one-shot dense reference written from the paper's definition."""

from __future__ import annotations

import math

import pytest
import torch

import effattn
import effattn.backends.xl.relative as xl
from effattn.nn import TransformerXLAttention
from tests.pattern_check import assert_matches_pattern
from tests.reference import reference_attention


def _qkv(b: int, h: int, nq: int, nk: int, d: int, dtype=torch.float64):
    return tuple(torch.randn(b, h, n, d, dtype=dtype) for n in (nq, nk, nk))


# -- the shift trick ---------------------------------------------------------------------------
def test_rel_shift_matches_index_formula():
    c, w = 5, 7
    scores = torch.randn(2, 3, c, c + w - 1)
    shifted = xl.rel_shift(scores, w)
    for a in range(c):
        for t in range(w):
            torch.testing.assert_close(shifted[..., a, t], scores[..., a, c - 1 - a + t])


@pytest.mark.parametrize("content_position", [True, False])
def test_position_scores_match_naive_quadratic(content_position: bool):
    """(q_a + v) . r_{dist0 + a - t} with the shift trick == one dot product per (a, t) pair."""
    heads, c, width, dim, dist0 = 3, 6, 9, 8, 4
    d_hi, count = dist0 + c - 1, c + width - 1
    rel = xl.RelativePosition(
        pos_key=torch.randn(heads, count, dim, dtype=torch.float64),
        d_hi=d_hi,
        u=None,
        v=torch.randn(heads, dim, dtype=torch.float64),
        scale=0.5,
        content_position=content_position,
    )
    q = torch.randn(2, heads, c, dim, dtype=torch.float64, requires_grad=True)
    fast = rel.position_scores(q, dist0, width)
    naive = torch.empty(2, heads, c, width, dtype=torch.float64)
    for a in range(c):
        for t in range(width):
            r = rel.pos_key[:, d_hi - (dist0 + a - t)]  # (H, D): the encoding of this distance
            query = (q[:, :, a] if content_position else 0) + rel.v  # (B, H, D)
            naive[:, :, a, t] = 0.5 * (query * r).sum(-1)
    torch.testing.assert_close(fast.expand_as(naive), naive.detach())
    if content_position:  # the strided view passes gradients back like the naive indexing
        g = torch.randn_like(naive)
        (grad_fast,) = torch.autograd.grad(fast, q, g)
        (grad_naive,) = torch.autograd.grad(naive, q, g)
        torch.testing.assert_close(grad_fast, grad_naive)


def test_sinusoid_encoding_formula():
    d = torch.tensor([0, 1, 5, -3])
    enc = xl.sinusoid_encoding(d, 6)
    for row, dist in enumerate(d.tolist()):
        for i in range(3):
            freq = 1.0 / 10000 ** (2 * i / 6)
            assert math.isclose(enc[row, i].item(), math.sin(dist * freq), abs_tol=1e-12)
            assert math.isclose(enc[row, 3 + i].item(), math.cos(dist * freq), abs_tol=1e-12)


# -- the backend -------------------------------------------------------------------------------
def _segment_keep(q_len: int, kv_len: int, s: int, m: int) -> torch.Tensor:
    """Written from the definition: query i at p = i + Nk - Nq keeps j iff start - M <= j <= p."""
    keep = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for i in range(q_len):
        p = i + kv_len - q_len
        for j in range(kv_len):
            keep[i, j] = (p // s) * s - m <= j <= p
    return keep


@pytest.mark.parametrize(("s", "m"), [(4, 3), (5, 0), (1, 2), (8, 16)])
@pytest.mark.parametrize(("nq", "nk"), [(37, 37), (1, 37), (10, 37), (40, 37)])
def test_backend_pattern_is_segments_with_memory(s: int, m: int, nq: int, nk: int):
    backend = effattn.get_backend("xl", segment_len=s, mem_len=m)
    q, k, v = _qkv(1, 2, nq, nk, 8)
    pattern = backend.pattern(q, k, v, causal=True)
    assert torch.equal(pattern.mask[0, 0], _segment_keep(nq, nk, s, m))


@pytest.mark.parametrize("relative", ["bias", "none"])
@pytest.mark.parametrize(("s", "m"), [(4, 3), (5, 0), (1, 2), (8, 16)])
@pytest.mark.parametrize(("nq", "nk"), [(37, 37), (1, 37), (10, 37), (40, 37)])
def test_backend_matches_dense_with_bias(relative: str, s: int, m: int, nq: int, nk: int):
    backend = effattn.get_backend("xl", segment_len=s, mem_len=m, relative=relative)
    q, k, v = _qkv(2, 3, nq, nk, 8)
    assert_matches_pattern(backend, q, k, v, causal=True)
    keep = torch.rand(2, nk) > 0.3
    assert_matches_pattern(backend, q, k, v, causal=True, key_padding_mask=keep, scale=0.3)


def _naive_full_xl(q, k, v, backend, scale):
    """All four terms, one pair at a time from the fixed parameters: a dense autograd reference."""
    rel = backend.relative_position(q)
    nq, nk = q.shape[2], k.shape[2]
    mask = torch.as_tensor(_segment_keep(nq, nk, backend.segment_len, backend.mem_len))
    dist = (torch.arange(nq)[:, None] + nk - nq) - torch.arange(nk)[None, :]
    r = rel.pos_key[:, (rel.d_hi - dist).clamp(0, rel.pos_key.shape[1] - 1)]  # (H, Nq, Nk, D)
    position = torch.einsum("bhid,hijd->bhij", q + rel.v[:, None, :], r)
    content_bias = torch.einsum("hd,bhjd->bhj", rel.u, k)[:, :, None, :]
    bias = rel.scale * (position + content_bias)
    return reference_attention(q, k, v, scale=scale, mask=mask, bias=bias)


@pytest.mark.parametrize(("nq", "nk"), [(23, 23), (5, 23)])
def test_backend_full_terms_forward_and_grads(nq: int, nk: int):
    backend = effattn.get_backend("xl", segment_len=4, mem_len=5, relative="full", seed=3)
    q, k, v = _qkv(2, 2, nq, nk, 8)
    keep = torch.rand(2, nk) > 0.2
    assert_matches_pattern(backend, q, k, v, causal=True, key_padding_mask=keep, check_grad=False)
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    refs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = backend(*inputs, causal=True)
    expected = _naive_full_xl(*refs, backend, 8**-0.5)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad(out, inputs, g), torch.autograd.grad(expected, refs, g), strict=True
    ):
        torch.testing.assert_close(got, want)


def test_backend_mem_len_zero_is_causal_within_segments():
    backend = effattn.get_backend("xl", segment_len=6, mem_len=0, relative="none")
    q, k, v = _qkv(2, 2, 20, 20, 8)
    out = backend(q, k, v, causal=True)
    for start in range(0, 20, 6):
        sl = slice(start, start + 6)
        want = reference_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], causal=True)
        torch.testing.assert_close(out[:, :, sl], want)


def test_backend_float32_and_empty_rows():
    backend = effattn.get_backend("xl", segment_len=4, mem_len=4, relative="full")
    q, k, v = (t.float().requires_grad_(True) for t in _qkv(2, 2, 17, 17, 16))
    keep = torch.ones(2, 17, dtype=torch.bool)
    keep[1, :9] = False  # queries 0..7 of batch 1 keep no key (segments 0 and 1 see keys 0..7)
    out = backend(q, k, v, causal=True, key_padding_mask=keep)
    assert torch.isfinite(out).all()
    assert (out[1, :, :8] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    expected = backend(
        *(t.detach().double() for t in (q, k, v)), causal=True, key_padding_mask=keep
    )
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_backend_options_and_bidirectional_errors():
    with pytest.raises(ValueError, match="segment_len"):
        effattn.get_backend("xl", segment_len=0)
    with pytest.raises(ValueError, match="mem_len"):
        effattn.get_backend("xl", mem_len=-1)
    with pytest.raises(TypeError, match="relative"):
        effattn.get_backend("xl", relative="rope")
    with pytest.raises(ValueError, match="relative"):
        effattn.backend_class("xl")(relative="rope")
    q, k, v = _qkv(1, 1, 8, 8, 4)
    with pytest.raises(ValueError, match="causal=False"):
        effattn.attention(q, k, v, backend="xl", causal=False)


def test_backend_flops_count_computed_blocks():
    backend = effattn.get_backend("xl", segment_len=64, mem_len=128)
    n, d = 1024, 64
    assert backend.flops(1, 8, n, n, d, causal=True) == 4 * 8 * d * (n // 64) * 64 * (128 + 64)
    full = effattn.get_backend("xl", segment_len=64, mem_len=128, relative="full")
    assert full.flops(1, 8, n, n, d) > backend.flops(1, 8, n, n, d)


# -- the module --------------------------------------------------------------------------------
def _layer(mem_len: int, e: int = 16, h: int = 2, **kwargs) -> TransformerXLAttention:
    layer = TransformerXLAttention(e, h, mem_len=mem_len, **kwargs).double()
    with torch.no_grad():
        layer.pos_bias_u.normal_()
        layer.pos_bias_v.normal_()
    return layer


def _dense_layer_reference(layer: TransformerXLAttention, x: torch.Tensor, keep: torch.Tensor):
    """One-shot over the whole sequence x (B, T, E): dense keep (T, T) mask, the four relative
    terms computed pair by pair from the paper's definition. Returns (B, T, E)."""
    batch, length, e = x.shape
    h, d = layer.num_heads, layer.head_dim
    q = layer.q_proj(x).view(batch, length, h, d).transpose(1, 2)  # (B, H, T, D)
    k, v = (t.view(batch, length, h, d).transpose(1, 2) for t in layer.kv_proj(x).chunk(2, -1))
    dist = torch.arange(length)[:, None] - torch.arange(length)[None, :]  # (T, T): i - j
    freq = 1.0 / 10000 ** (torch.arange(0, e, 2, dtype=torch.float64) / e)
    angle = dist[..., None].double() * freq  # (T, T, E/2)
    encoding = torch.cat([angle.sin(), angle.cos()], -1)  # (T, T, E)
    r = layer.r_proj(encoding).view(length, length, h, d)  # (T, T, H, D)
    content = torch.einsum("bhid,bhjd->bhij", q + layer.pos_bias_u[:, None], k)
    position = torch.einsum("bhid,ijhd->bhij", q + layer.pos_bias_v[:, None], r)
    scores = (content + position) / math.sqrt(d)
    scores = scores.masked_fill(~keep, float("-inf"))
    out = torch.softmax(scores, -1) @ v  # (B, H, T, D)
    return layer.out_proj(out.transpose(1, 2).reshape(batch, length, e))


def _stream(layer, x, step):
    outs, mems = [], None
    for start in range(0, x.shape[1], step):
        out, mems = layer(x[:, start : start + step], mems)
        outs.append(out)
    return torch.cat(outs, 1), mems


@pytest.mark.parametrize(("seg", "mem"), [(5, 5), (4, 7), (6, 3), (1, 4)])
def test_streaming_equals_one_shot_dense_reference(seg: int, mem: int):
    layer = _layer(mem, segment_len=seg)
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    streamed, mems = _stream(layer, x, seg)
    keep = torch.as_tensor(_segment_keep(17, 17, seg, mem))
    torch.testing.assert_close(streamed, _dense_layer_reference(layer, x, keep))
    torch.testing.assert_close(mems, x[:, -mem:])


def test_streaming_gradients_wrt_current_segment_match_reference():
    seg, mem = 4, 6
    layer = _layer(mem, segment_len=seg)
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    _, mems = _stream(layer, x[:, :8], seg)
    current = x[:, 8:].clone().requires_grad_(True)
    out, _ = layer(current, mems)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [current, *layer.parameters()], g)

    current_ref = x[:, 8:].clone().requires_grad_(True)
    full = torch.cat([x[:, :8], current_ref], 1)  # the memory part holds no gradient
    keep = torch.as_tensor(_segment_keep(12, 12, seg, mem))
    ref = _dense_layer_reference(layer, full, keep)[:, 8:]
    want = torch.autograd.grad(ref, [current_ref, *layer.parameters()], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_token_streaming_with_whole_memory_equals_one_call():
    layer = _layer(mem_len=32)
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    one_shot, mems = layer(x)
    streamed, streamed_mems = _stream(layer, x, 1)
    torch.testing.assert_close(streamed, one_shot)
    torch.testing.assert_close(streamed_mems, mems)
    causal = torch.ones(13, 13, dtype=torch.bool).tril()
    torch.testing.assert_close(one_shot, _dense_layer_reference(layer, x, causal))


def test_no_gradient_reaches_the_memory():
    layer = _layer(mem_len=4)
    mems = torch.randn(2, 4, 16, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    out, new_mems = layer(x, mems)
    out.sum().backward()
    assert mems.grad is None
    assert x.grad is not None
    assert not new_mems.requires_grad


def test_mem_len_zero_is_causal_within_each_call():
    layer = _layer(mem_len=0)
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    streamed, mems = _stream(layer, x, 5)
    assert mems.shape == (2, 0, 16)
    for start in (0, 5):
        alone, _ = layer(x[:, start : start + 5])
        torch.testing.assert_close(streamed[:, start : start + 5], alone)


def test_query_blocks_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch):
    layer = _layer(mem_len=8)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    mems = torch.randn(2, 8, 16, dtype=torch.float64)
    whole, _ = layer(x, mems)
    monkeypatch.setattr(xl, "_BLOCK_ELEMENTS", 2 * 2 * 19 * 3)  # blocks of 3 queries
    assert xl.prefix_block(2, 2, 11, 19) == 3
    blocked, _ = layer(x, mems)
    torch.testing.assert_close(blocked, whole)


def test_matches_hf_transfo_xl_layer():
    modeling = pytest.importorskip(
        "transformers.models.deprecated.transfo_xl.modeling_transfo_xl",
        reason="transformers 4.x with Transformer-XL is not installed",
    )
    e, h, length, mem = 32, 4, 7, 5
    ours = TransformerXLAttention(e, h, mem_len=mem, bias=False)
    hf = modeling.RelPartialLearnableMultiHeadAttn(h, e, e // h, 0.0).eval()
    with torch.no_grad():
        hf.r_w_bias.normal_()
        hf.r_r_bias.normal_()
        w_q, w_k, w_v = hf.qkv_net.weight.chunk(3)
        ours.q_proj.weight.copy_(w_q)
        ours.kv_proj.weight.copy_(torch.cat([w_k, w_v]))
        ours.r_proj.weight.copy_(hf.r_net.weight)
        ours.out_proj.weight.copy_(hf.o_net.weight)
        ours.pos_bias_u.copy_(hf.r_w_bias)
        ours.pos_bias_v.copy_(hf.r_r_bias)
    x, mems = torch.randn(2, length, e), torch.randn(2, mem, e)
    out, _ = ours(x, mems)
    klen = mem + length
    pos = modeling.PositionalEmbedding(e)(torch.arange(klen - 1, -1, -1.0))
    mask = torch.triu(torch.ones(length, klen, dtype=torch.bool), 1 + mem)[:, :, None]
    ref = hf(x.transpose(0, 1), pos, attn_mask=mask, mems=mems.transpose(0, 1))[0]
    # HF's layer adds the residual and a post-LayerNorm around the attention.
    torch.testing.assert_close(hf.layer_norm(x + out), ref.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_bad_input_errors():
    layer = _layer(mem_len=4, segment_len=5)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"mems: expected shape \(B, M, E\)"):
        layer(x, torch.randn(2, 4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"mems: expected shape"):
        layer(x, torch.randn(4, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="mems: expected at most mem_len=4"):
        layer(x, torch.randn(2, 5, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="segment_len=5"):
        layer(torch.randn(2, 6, 16, dtype=torch.float64))
    _, mems = layer(x)
    with pytest.raises(ValueError, match="batch size"):
        layer(torch.randn(3, 5, 16, dtype=torch.float64), mems)
    with pytest.raises(ValueError, match="x: expected shape"):
        layer(torch.randn(5, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="mems: expected dtype"):
        layer(x, mems.float())
    with pytest.raises(ValueError, match="num_heads"):
        TransformerXLAttention(16, 3, mem_len=4)
    with pytest.raises(ValueError, match="mem_len"):
        TransformerXLAttention(16, 2, mem_len=-1)


def test_query_side_position_projection_equals_projected_encodings():
    """Projecting the queries by W_r (decoding) gives the scores of projecting R by W_r."""
    layer = _layer(mem_len=8)
    q = torch.randn(2, 2, 3, 8, dtype=torch.float64)
    plain = layer.relative_position(11, 14)
    query_side = layer.relative_position(11, 14, query_side=True)
    assert query_side.query_proj is not None and plain.query_proj is None
    torch.testing.assert_close(
        query_side.position_scores(q, 9, 12), plain.position_scores(q, 9, 12)
    )


@pytest.mark.parametrize("relative", ["bias", "full"])
def test_backend_non_contiguous_inputs_with_whole_segments(relative: str):
    """N a multiple of segment_len: nothing is padded, views go straight to the reshapes."""
    backend = effattn.get_backend("xl", segment_len=16, mem_len=8, relative=relative)
    q, k, v = (t.transpose(1, 2) for t in _qkv(1, 64, 2, 2, 8))  # (B, N, H, D) -> (B, H, N, D)
    assert_matches_pattern(backend, q, k, v, causal=True, check_grad=relative == "bias")
