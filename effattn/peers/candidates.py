"""The candidates of the peer comparisons, each a builder: sequence length N -> a call without
arguments on inputs fixed at build time (:func:`effattn.peers.inputs.qkv`, so that ours and the
peers see the same tensors), ours as :class:`Ours` (the builder with the backend and options its
row names); and the agreement checks that need inputs of their own (a peer whose timed outputs
cannot be compared with ours as they are). Building a peer's candidate imports it (ImportError
when it is not installed); importing this module imports none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import effattn
from effattn.peers import kernel_lowrank as klp
from effattn.peers import lsh as lsh_peers
from effattn.peers import sparse, xl
from effattn.peers.inputs import qkv

Call = Callable[[], Tensor]  # one forward on inputs fixed at build time
Builder = Callable[[int], Call]  # sequence length N -> the call


@dataclass(frozen=True)
class Ours:
    """One of our candidates: the effattn backend it runs, with its options, and its builder."""

    backend: str  # the registered backend its row names (xl for effattn.nn's layer)
    build: Builder  # N -> the call
    options: tuple[tuple[str, object], ...] = ()  # the backend's options, sorted pairs


@dataclass(frozen=True)
class Agreement:
    max_abs_diff: float  # max |ours - peer|
    rel_err: float  # ||ours - peer|| / ||peer|| (Frobenius)
    note: str  # on which inputs it was measured


def agreement(ours: Tensor, peer: Tensor, note: str) -> Agreement:
    """Max abs and relative (Frobenius) difference of two outputs of the same shape, in float64."""
    if ours.shape != peer.shape:
        raise ValueError(f"agreement: expected equal shapes, got {ours.shape} and {peer.shape}")
    diff = ours.double() - peer.double()
    return Agreement(
        max_abs_diff=diff.abs().max().item(),
        rel_err=(diff.norm() / peer.double().norm().clamp_min(1e-300)).item(),
        note=note,
    )


# -- the candidates ------------------------------------------------------------------------------
def ours_backend(name: str, *, causal: bool = False, **options: object) -> Ours:
    """Our backend ``name`` on the shared q, k, v: (B, H, N, D) -> (B, H, N, D)."""

    def build(n: int) -> Call:
        backend = effattn.get_backend(name, **options)
        q, k, v = qkv(n)
        return lambda: backend(q, k, v, causal=causal)

    return Ours(name, build, tuple(sorted(options.items())))


def torch_sdpa(n: int) -> Call:
    q, k, v = qkv(n)
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)


def flex_dense(n: int) -> Call:
    """torch.compile(flex_attention) with no mask (first call compiles, outside the timing)."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)
    q, k, v = qkv(n)
    return lambda: compiled(q, k, v)


def flex_sliding_window(n: int) -> Call:
    return sparse.flex(n, causal=False)


def local_attention_exact(n: int) -> Call:
    return sparse.local_attention_peer(n, causal=False, grad=False)


def hf_bigbird(n: int) -> Call:
    return sparse.hf_bigbird(n, grad=False)


def lsh_builders(bucket_size: int, n_hashes: int) -> dict[str, Builder]:
    """Ours, reformer-pytorch and HF on the shared-QK inputs (q, v) of shape (B, H, N, D),
    1/sqrt(D) for ours."""

    def on_inputs(make: Callable[..., Call]) -> Builder:
        def build(n: int) -> Call:
            q, _, v = qkv(n)
            return make(q, v, bucket_size, n_hashes)

        return build

    return {
        "ours": on_inputs(lambda q, v, b, h: lsh_peers.effattn_lsh_call(q, v, b, h, None)),
        "reformer": on_inputs(lsh_peers.reformer_pytorch_call),
        "hf": on_inputs(lsh_peers.hf_lsh_call),
    }


def xl_layer(which: str) -> Builder:
    """Ours or HF's Transformer-XL layer (same weights) on x (1, N/2, 512) + memory N/2."""

    def build(n: int) -> Call:
        if which == "hf_transformers":
            xl.hf_modeling()  # ImportError when transformers lacks Transformer-XL
        torch.manual_seed(0)  # the same weights and inputs for both builds
        return xl.layer_calls(n // 2, n - n // 2)[which]

    return build


# -- agreement where the timed calls cannot give it ----------------------------------------------
def lsh_agreement(peer: str, bucket_size: int) -> Callable[[int], Agreement]:
    """Ours vs a peer with one hash round at N = 2 * bucket_size (whatever the timed N), where
    every pair is met once whatever the rotations, ours at the peer's scale (reformer-pytorch
    1/sqrt(D), HF 1)."""

    def check(timed_n: int) -> Agreement:
        n = 2 * bucket_size
        q, _, v = qkv(n)
        scale = 1.0 if peer == "hf" else None
        make = lsh_peers.hf_lsh_call if peer == "hf" else lsh_peers.reformer_pytorch_call
        with torch.no_grad():
            theirs = make(q, v, bucket_size, 1)()
            ours = lsh_peers.effattn_lsh_call(q, v, bucket_size, 1, scale)()
        return agreement(ours, theirs, f"N={n}, 1 hash (every pair met), scale aligned")

    return check


def performer_agreement(causal: bool) -> Callable[[int], Agreement]:
    """Ours against performer-pytorch's own functions with our features, its eps set to 0."""

    def check(n: int) -> Agreement:
        with torch.no_grad():
            theirs = klp.performer_exact_peer(n, causal)
            ours = ours_backend("performer", causal=causal).build(n)()
        return agreement(ours, theirs, f"N={n}, same features, their eps offsets 0")

    return check


def linear_agreement(n: int) -> Agreement:
    """Our normalised product with linear_attn's features injected, against linear_attn."""
    from linear_attention_transformer.linear_attention_transformer import linear_attn

    q, k, v = qkv(n)
    with torch.no_grad():
        return agreement(
            klp.linear_product_with_peer_features(n),
            linear_attn(q, k, v),
            f"N={n}, our product with their features",
        )


def nystrom_agreement(n: int) -> Agreement:
    """Our layer against NystromAttention with one head (it normalises its pseudo-inverse over
    all heads and the batch; ours per head and sequence)."""
    ours, peer, x = klp.nystrom_layers(n, heads=1)
    with torch.no_grad():
        return agreement(ours(x), peer(x), f"N={n}, 1 head, same weights")
