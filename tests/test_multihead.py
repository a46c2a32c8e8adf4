"""effattn.MultiheadAttention as a drop-in for torch.nn.MultiheadAttention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import effattn
from effattn.nn import replace_attention

E, H = 32, 4


def _pair(batch_first: bool, **kwargs):
    ref = nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=torch.float64, **kwargs)
    ours = effattn.MultiheadAttention(E, H, batch_first=batch_first, dtype=torch.float64, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _inputs(batch_first: bool, b=3, length=7, source=9, kdim=E):
    q = torch.randn(b, length, E, dtype=torch.float64)
    kv = torch.randn(b, source, kdim, dtype=torch.float64)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    return q, kv


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("backend", ["full", "sdpa"])
def test_matches_torch_with_and_without_padding(batch_first, backend):
    ref, ours = _pair(batch_first)
    ours = effattn.MultiheadAttention.from_torch(ref, backend)
    q, kv = _inputs(batch_first)
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[1, 5:] = True  # True = padding, as in nn.MultiheadAttention
    for mask in (None, padding, padding.double().masked_fill(padding, float("-inf"))):
        out, weights = ours(q, kv, kv, key_padding_mask=mask)
        ref_out, ref_weights = ref(q, kv, kv, key_padding_mask=mask)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(weights, ref_weights)


@pytest.mark.parametrize("batch_first", [False, True])
def test_causal_mask_and_per_head_weights(batch_first):
    ref, ours = _pair(batch_first)
    q, _ = _inputs(batch_first, source=7)
    causal = nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
    for mask in (causal, torch.isinf(causal)):
        out, w = ours(q, q, q, attn_mask=mask, average_attn_weights=False)
        ref_out, ref_w = ref(q, q, q, attn_mask=mask, average_attn_weights=False)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(w, ref_w)
    out, _ = ours(q, q, q, is_causal=True, need_weights=False)
    torch.testing.assert_close(out, ref(q, q, q, attn_mask=causal, need_weights=False)[0])


def test_kdim_vdim_bias_kv_and_zero_attn():
    ref = nn.MultiheadAttention(
        E, H, kdim=12, vdim=12, add_bias_kv=True, add_zero_attn=True, dtype=torch.float64
    )
    ours = effattn.MultiheadAttention.from_torch(ref)
    q, kv = _inputs(False, kdim=12)
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[0, 3:] = True
    out, w = ours(q, kv, kv, key_padding_mask=padding)
    ref_out, ref_w = ref(q, kv, kv, key_padding_mask=padding)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)


def test_unbatched_input():
    ref, ours = _pair(False)
    x = torch.randn(5, E, dtype=torch.float64)
    out, w = ours(x, x, x)
    ref_out, ref_w = ref(x, x, x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)


def test_state_dict_round_trip():
    ours = effattn.MultiheadAttention(E, H, backend="sdpa")
    plain = nn.MultiheadAttention(E, H)
    plain.load_state_dict(ours.state_dict())
    back = effattn.MultiheadAttention(E, H)
    back.load_state_dict(plain.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(value, back.state_dict()[key])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_replaces_self_attn_in_encoder_layer(training, batch_first):
    """In eval mode nn.TransformerEncoderLayer has a fused path that computes attention itself;
    the drop-in must keep it off so that the backend really runs."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=batch_first)
    reference = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=batch_first)
    reference.load_state_dict(layer.state_dict())
    layer.self_attn = effattn.MultiheadAttention.from_torch(layer.self_attn, "full")
    calls = []
    original = layer.self_attn.backend.forward
    object.__setattr__(
        layer.self_attn.backend, "forward", lambda *a, **kw: calls.append(1) or original(*a, **kw)
    )
    layer.train(training)
    reference.train(training)
    x = torch.randn(2, 6, E) if batch_first else torch.randn(6, 2, E)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    with torch.no_grad():
        out = layer(x, src_key_padding_mask=padding)
        ref_out = reference(x, src_key_padding_mask=padding)
    assert calls, "the backend was not called (fused fast path taken)"
    keep = ~padding if batch_first else ~padding.T
    keep = keep.unsqueeze(-1)
    torch.testing.assert_close(out * keep, ref_out * keep, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # the reference model
def test_replace_attention_in_encoder_and_decoder():
    torch.manual_seed(0)
    model = nn.Transformer(E, H, 1, 1, 64, dropout=0.0, batch_first=True).eval()
    reference = nn.Transformer(E, H, 1, 1, 64, dropout=0.0, batch_first=True).eval()
    reference.load_state_dict(model.state_dict())
    replace_attention(model, "sdpa")
    swapped = [m for m in model.modules() if isinstance(m, effattn.MultiheadAttention)]
    assert len(swapped) == 3  # encoder self, decoder self, decoder cross
    src, tgt = torch.randn(2, 8, E), torch.randn(2, 5, E)
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[0, 6:] = True
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        out = model(
            src,
            tgt,
            tgt_mask=tgt_mask,
            src_key_padding_mask=padding,
            memory_key_padding_mask=padding,
        )
        ref = reference(
            src,
            tgt,
            tgt_mask=tgt_mask,
            src_key_padding_mask=padding,
            memory_key_padding_mask=padding,
        )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_backward_through_the_module():
    ours = effattn.MultiheadAttention(E, H, batch_first=True, backend="sdpa")
    x = torch.randn(2, 10, E, requires_grad=True)
    out, _ = ours(x, x, x, need_weights=False, is_causal=True)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert ours.in_proj_weight.grad is not None


def test_clear_errors():
    ours = effattn.MultiheadAttention(E, H)
    x = torch.randn(5, 2, E)
    with pytest.raises(ValueError, match=r"attn_mask: effattn backends take a causal mask"):
        ours(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.bool).fill_diagonal_(True))
    with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \(B, S\)"):
        ours(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"float mask must hold only 0"):
        ours(x, x, x, key_padding_mask=torch.full((2, 5), 0.5))
    with pytest.raises(ValueError, match=r"unknown option 'window'"):
        effattn.MultiheadAttention(E, H, backend="full", window=4)


def test_dropout_warns_once_in_training():
    ours = effattn.MultiheadAttention(E, H, dropout=0.1)
    x = torch.randn(5, 2, E)
    with pytest.warns(UserWarning, match=r"dropout=0.1 is not applied"):
        ours(x, x, x)
    ours.eval()
    ours(x, x, x)  # no warning in eval mode
