"""HF transformers 4.x's Transformer-XL attention layer (``RelPartialLearnableMultiHeadAttn``)
beside :class:`effattn.nn.TransformerXLAttention`, with the same weights.

HF's layer adds the residual and a post-LayerNorm: ours is called with the same two ops around
it. Its weights are copied into ours (q, kv, r and out projections, both position biases, the
LayerNorm), its inputs are (len, batch, E) and its positional embedding is precomputed; ours
takes batch-first (1, L, E) and computes its own inside the call. transformers 5.x removed
Transformer-XL: :func:`hf_modeling` raises ImportError there, as without transformers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from effattn.nn import TransformerXLAttention

OURS = "effattn"  # the key of our layer in layer_calls (HF's: "hf_transformers")
E, H = 512, 8  # d_model and heads of the layer


def hf_modeling():
    """HF transformers' Transformer-XL module (4.x only; 5.x removed it); raises ImportError."""
    from transformers.models.deprecated.transfo_xl import modeling_transfo_xl

    return modeling_transfo_xl


def paired_layers(mem_len: int):
    """(ours, norm, hf, pos_emb): our layer and LayerNorm with the weights of HF's layer, HF's
    layer and its positional embedding (both None when transformers lacks Transformer-XL)."""
    ours = TransformerXLAttention(E, H, mem_len=mem_len, bias=False).eval()
    norm = nn.LayerNorm(E).eval()
    try:
        modeling = hf_modeling()
    except ImportError:
        return ours, norm, None, None
    hf = modeling.RelPartialLearnableMultiHeadAttn(H, E, E // H, 0.0).eval()
    with torch.no_grad():
        hf.r_w_bias.normal_(std=0.02)
        hf.r_r_bias.normal_(std=0.02)
        w_q, w_k, w_v = hf.qkv_net.weight.chunk(3)
        ours.q_proj.weight.copy_(w_q)
        ours.kv_proj.weight.copy_(torch.cat([w_k, w_v]))
        ours.r_proj.weight.copy_(hf.r_net.weight)
        ours.out_proj.weight.copy_(hf.o_net.weight)
        ours.pos_bias_u.copy_(hf.r_w_bias)
        ours.pos_bias_v.copy_(hf.r_r_bias)
        norm.load_state_dict(hf.layer_norm.state_dict())
    return ours, norm, hf, modeling.PositionalEmbedding(E)


def hf_call(hf, pos_emb, x: torch.Tensor, mems: torch.Tensor) -> Callable[[], torch.Tensor]:
    """HF's layer on batch-first x (1, L, E) with mems (1, M, E), in its (len, batch, E) layout;
    the call returns (L, 1, E)."""
    q_len, m_len = x.shape[1], mems.shape[1]
    k_len = q_len + m_len
    pos = pos_emb(torch.arange(k_len - 1, -1, -1.0))  # (k_len, 1, E), precomputed
    mask = torch.triu(torch.ones(q_len, k_len, dtype=torch.bool), 1 + m_len)[:, :, None]
    w, m = x.transpose(0, 1).contiguous(), mems.transpose(0, 1).contiguous()  # -> (len, 1, E)
    return lambda: hf(w, pos, attn_mask=mask, mems=m)[0]


def layer_calls(q_len: int, mem_len: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Ours (with HF's residual and post-LayerNorm around it) and HF's layer, same weights, on
    the same x (1, q_len, E) and memory (1, mem_len, E); both return (1, q_len, E) batch-first.
    HF's entry is absent when transformers lacks Transformer-XL."""
    ours, norm, hf, pos_emb = paired_layers(mem_len)
    x, mems = torch.randn(1, q_len, E), torch.randn(1, mem_len, E)
    fns: dict[str, Callable[[], torch.Tensor]] = {OURS: lambda: norm(x + ours(x, mems)[0])}
    if hf is not None:
        hf_fn = hf_call(hf, pos_emb, x, mems)  # (q_len, 1, E)
        fns["hf_transformers"] = lambda: hf_fn().transpose(0, 1)  # -> (1, q_len, E)
    return fns
