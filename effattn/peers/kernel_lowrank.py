"""The public implementations of the kernel and low-rank algorithms, on the same inputs as ours
(:mod:`effattn.peers.inputs`), with the same features, projections or weights:

- performer-pytorch 1.1.4 ``FastAttention`` (attention only, on q, k, v), with our random
  features copied into its ``projection_matrix``;
- linear-attention-transformer 0.19.1 ``linear_attn`` / ``causal_linear_attn`` (attention
  only);
- linformer 0.2.3 ``LinformerSelfAttention`` and nystrom-attention 0.0.14 ``NystromAttention``:
  layers with their own q/k/v/out projections (dim = H * D = 512). Ours is timed twice beside
  them: the backend alone on q, k, v, and as a layer with the peer's own projection modules
  around it (``layer``), which is the like-for-like comparison; linformer's ``proj_k`` and
  ``proj_v`` get our E and F.

Conventions aligned for agreement: performer-pytorch adds eps = 1e-4 to every feature (and 1e-6
to the causal normaliser): the agreement check calls its own feature and product functions with
both set to 0. nystrom-attention normalises its pseudo-inverse's starting point over the whole
batch and all heads (ours per sequence and head): agreement is checked with one head. Peers
are imported inside the builders (ImportError when one is not installed).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable

import torch
from torch import Tensor

import effattn
from effattn.backends.kernelized.product import kernel_attention
from effattn.peers.inputs import D, H, layer_input, qkv

Call = Callable[[], Tensor]
FEATURES = 256  # performer's m
RANK = 256  # linformer's k
LANDMARKS = 256  # nystrom's m


# -- performer -------------------------------------------------------------------------------
def fast_attention(causal: bool):
    """performer-pytorch's FastAttention with our features (its causal CPU path announces
    itself on stdout: silenced)."""
    from performer_pytorch import FastAttention

    with contextlib.redirect_stdout(io.StringIO()):
        peer = FastAttention(D, nb_features=FEATURES, causal=causal)
    ours = effattn.get_backend("performer", num_features=FEATURES)
    with torch.no_grad():
        peer.projection_matrix.copy_(ours.features(D, torch.float32))
    return peer


def performer_peer(causal: bool) -> Callable[[int], Call]:
    def build(n: int) -> Call:
        peer = fast_attention(causal)
        q, k, v = qkv(n)
        return lambda: peer(q, k, v)

    return build


def performer_exact_peer(n: int, causal: bool) -> Tensor:
    """performer-pytorch's own feature and product functions, its eps offsets set to 0."""
    from performer_pytorch import performer_pytorch as pp

    w = effattn.get_backend("performer", num_features=FEATURES).features(D, torch.float32)
    q, k, v = qkv(n)
    fq = pp.softmax_kernel(q, projection_matrix=w, is_query=True, eps=0.0)
    fk = pp.softmax_kernel(k, projection_matrix=w, is_query=False, eps=0.0)
    if causal:
        return pp.causal_linear_attention_noncuda(fq, fk, v, eps=0.0)
    return pp.linear_attention(fq, fk, v)


# -- linear attention -----------------------------------------------------------------------
def linear_peer(causal: bool) -> Callable[[int], Call]:
    def build(n: int) -> Call:
        from linear_attention_transformer import linear_attention_transformer as lat

        q, k, v = qkv(n)
        if causal:
            return lambda: lat.causal_linear_attn(q, k, v)
        return lambda: lat.linear_attn(q, k, v)

    return build


def linear_product_with_peer_features(n: int) -> Tensor:
    """Our normalised product (the fast path of `linear` and `performer`) with linear_attn's
    features injected: softmax over D for q, over N for k. Their normaliser is 1 by
    construction, ours computes it; linear_attn also scales by D^-1/2."""
    q, k, v = qkv(n)
    fq, fk = q.softmax(dim=-1), k.softmax(dim=-2)
    same = lambda x, *rest: x  # noqa: E731  (the features are given)
    out = kernel_attention(
        fq,
        fk,
        v,
        query_map=same,
        key_map=same,
        key_padding_mask=None,
        causal=False,
        chunk=64,
        log_keys=False,
        width=D,
    )
    return out * D**-0.5


# -- linformer and nystrom layers --------------------------------------------------------------
def _heads(x: Tensor, heads: int) -> Tensor:
    return x.unflatten(-1, (heads, D)).transpose(1, 2)  # (B, N, H*D) -> (B, H, N, D)


def _merge(x: Tensor) -> Tensor:
    return x.transpose(1, 2).flatten(2)  # (B, H, N, D) -> (B, N, H*D)


def linformer_layers(n: int, heads: int = H) -> tuple[Callable, Callable, Tensor]:
    """(ours, peer, x): LinformerSelfAttention(k=RANK) with our E, F in proj_k, proj_v, and our
    backend between the same to_q / to_k / to_v / to_out modules."""
    from linformer import LinformerSelfAttention

    torch.manual_seed(0)
    peer = LinformerSelfAttention(dim=heads * D, seq_len=n, k=RANK, heads=heads, dim_head=D)
    peer.eval()
    backend = effattn.get_backend("linformer", rank=RANK)
    e, f = backend.projections(n, torch.float32)
    with torch.no_grad():
        peer.proj_k.copy_(e.T)  # (N, k): the peer projects with einsum('bnd,nk->bkd')
        peer.proj_v.copy_(f.T)

    def ours(x: Tensor) -> Tensor:
        q, k, v = (_heads(proj(x), heads) for proj in (peer.to_q, peer.to_k, peer.to_v))
        return peer.to_out(_merge(backend(q, k, v)))

    return ours, peer, layer_input(n, heads)


def nystrom_layers(n: int, heads: int = H) -> tuple[Callable, Callable, Tensor]:
    """(ours, peer, x): NystromAttention(num_landmarks=LANDMARKS, 6 iterations, residual conv
    off: ours has none) and our backend between its to_qkv / to_out modules."""
    from nystrom_attention import NystromAttention

    torch.manual_seed(0)
    peer = NystromAttention(
        dim=heads * D, dim_head=D, heads=heads, num_landmarks=LANDMARKS, residual=False
    ).eval()
    backend = effattn.get_backend("nystrom", landmarks=LANDMARKS)

    def ours(x: Tensor) -> Tensor:
        q, k, v = (_heads(t, heads) for t in peer.to_qkv(x).chunk(3, dim=-1))
        return peer.to_out(_merge(backend(q, k, v)))

    return ours, peer, layer_input(n, heads)


def layer_builder(which: str, make: Callable) -> Callable[[int], Call]:
    """Ours ('ours') or the peer's ('peer') layer of ``make`` on its input x."""

    def build(n: int) -> Call:
        ours, peer, x = make(n)
        fn = ours if which == "ours" else peer
        return lambda: fn(x)

    return build
