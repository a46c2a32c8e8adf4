"""The public implementations of the sparse patterns, called on q, k, v (B, H, N, D) from
:func:`effattn.peers.inputs.qkv`, each returning a call without arguments:

- ``torch.compile(flex_attention)`` with a ``create_block_mask`` of the same sliding window as
  our ``local`` (``window=WINDOW``: |i - j| <= w, causal 0 <= i - j <= w); forward only, as
  flex has no CPU backward; the first call compiles;
- local-attention 1.11.2 ``LocalAttention(window_size=w, exact_windowsize=True,
  use_rotary_pos_emb=False)``: with look_backward = look_forward = 1 it keeps exactly our
  window;
- HF transformers ``BigBirdBlockSparseAttention`` (block 64, 3 random blocks, train mode so
  that random blocks are drawn, dropout 0) with its query/key/value projections replaced by the
  identity, so that only the attention core runs, as ours.

With ``grad`` the call is forward + backward of the output's sum (q, k, v require grad); without,
a forward under ``torch.no_grad()``. Each peer is imported when its call is built (ImportError
when it is not installed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from effattn.peers.inputs import B, D, H, qkv

WINDOW = 256  # the window of the local comparisons (inclusive offset)


def forward_or_backward(fn: Callable[[], Tensor], grad: bool) -> Callable[[], object]:
    """``fn`` under ``torch.no_grad()``, or (``grad``) a call of ``fn().sum().backward()``."""
    if not grad:
        return torch.no_grad()(fn)

    def run() -> None:
        fn().sum().backward()

    return run


def flex(n: int, causal: bool) -> Callable[[], object]:
    """Compiled flex_attention with a BlockMask of the window |q - kv| <= WINDOW (causal: and
    kv <= q), forward under no_grad: (B, H, N, D) -> (B, H, N, D)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def window(b, h, q_idx, kv_idx):
        keep = (q_idx - kv_idx <= WINDOW) & (kv_idx - q_idx <= WINDOW)
        return keep & (kv_idx <= q_idx) if causal else keep

    mask = create_block_mask(window, None, None, n, n, device="cpu")
    compiled = torch.compile(flex_attention)
    q, k, v = qkv(n)
    return torch.no_grad()(lambda: compiled(q, k, v, block_mask=mask))


def local_attention_peer(n: int, causal: bool, grad: bool) -> Callable[[], object]:
    """local-attention's LocalAttention with the exact window WINDOW: (B, H, N, D) ->
    (B, H, N, D)."""
    from local_attention import LocalAttention

    layer = LocalAttention(
        window_size=WINDOW, causal=causal, exact_windowsize=True, use_rotary_pos_emb=False
    )
    q, k, v = qkv(n, grad=grad)
    return forward_or_backward(lambda: layer(q, k, v), grad)


def hf_bigbird(n: int, grad: bool) -> Callable[[], object]:
    """HF's BigBirdBlockSparseAttention core on q (as its hidden states, projections the
    identity): (B, N, H*D) -> (B, N, H*D)."""
    from torch import nn
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import (
        BigBirdBlockSparseAttention,
        BigBirdModel,
    )

    config = BigBirdConfig(
        hidden_size=H * D,
        num_attention_heads=H,
        attention_type="block_sparse",
        block_size=64,
        num_random_blocks=3,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=n,
    )
    layer = BigBirdBlockSparseAttention(config, seed=0).train()
    layer.query = layer.key = layer.value = nn.Identity()  # the attention core only
    hidden = qkv(n, grad=grad)[0].transpose(1, 2).reshape(B, n, H * D).detach()
    hidden.requires_grad_(grad)  # (B, H, N, D) -> (B, N, H*D)
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
        torch.ones(B, n), 64
    )
    return forward_or_backward(
        lambda: layer(hidden, band, from_mask, to_mask, blocked, blocked)[0], grad
    )
