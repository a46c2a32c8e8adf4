"""What one point measures: the callable of its mode, its FLOPs and its error.

Used inside a worker process (effattn.sweep.worker, which times the callables in rounds and
measures their memory with effattn.harness.meters). Modes:

- ``fwd``:     ``backend(q, k, v)`` with q: (B, H, N, D), k, v: (B, Hkv, Nk, D) (Hkv = H and
               Nk = N unless the point's kv_heads and kv_n say otherwise), no autograd.
- ``fwd_bwd``: the same with q, k, v requiring grad, then ``out.backward(grad_out)``.
- ``step``:    one training step (forward, backward, AdamW step) of a small Transformer encoder,
               ``settings.step_layers`` nn.TransformerEncoderLayer whose self-attention is an
               effattn.MultiheadAttention; d_model = H * D, H heads, on x: (B, N, d_model).
- ``decode``:  one token decoded at context N: the backend's decoding state (effattn.decoding)
               is filled with N - 1 positions, and each call attends one new query over it
               and rewinds, so that every call sees the same context (:class:`DecodeStep`).

FLOPs: ``backend.flops`` for the forward (only the pairs or blocks it computes); forward+backward
counts 3.5x the forward (backward = 2.5x); a step counts 3.5x the attention forward plus 3x the
forward of the linear layers (2 * weights * tokens) per layer. A decoded token counts none (its
work is the state's, which ``flops`` does not describe).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from effattn.backend import Backend
from effattn.decoding import DecodeState, decode_state
from effattn.nn import MultiheadAttention
from effattn.registry import get_backend
from effattn.sweep.spec import DTYPES, Point, Settings

FWD_BWD_FACTOR = 3.5  # forward + backward = (1 + 2.5) x forward
FILL_CHUNK = 4096  # positions a decoding state is filled with per call


def backend_of(point: Point) -> Backend:
    return get_backend(point.backend, **dict(point.options))


def point_flops(point: Point, settings: Settings) -> int | None:
    """FLOPs of one call of the point's callable (None for a decoded token)."""
    if point.mode == "decode":
        return None
    backend = backend_of(point)
    b, h, n, d = point.batch, point.heads, point.n, point.head_dim
    forward = backend.flops(b, h, n, point.keys, d, causal=point.causal)
    if point.mode == "fwd":
        return forward
    if point.mode == "fwd_bwd":
        return int(FWD_BWD_FACTOR * forward)
    d_model = h * d
    weights = 4 * d_model * d_model + 2 * d_model * settings.step_ffn_mult * d_model
    per_layer = FWD_BWD_FACTOR * forward + 3 * 2 * weights * b * n
    return int(settings.step_layers * per_layer)


def inputs(point: Point, *, requires_grad: bool = False, seed: int = 0) -> tuple:
    """q: (B, H, N, D), k, v: (B, Hkv, Nk, D) of the point's dtype and device, seeded."""
    gen = torch.Generator().manual_seed(seed)
    b, d = point.batch, point.head_dim
    shapes = [(b, point.heads, point.n, d)] + [(b, point.key_heads, point.keys, d)] * 2
    dtype = DTYPES[point.dtype]
    return tuple(
        torch.randn(shape, generator=gen)
        .to(device=point.device, dtype=dtype)
        .requires_grad_(requires_grad)
        for shape in shapes
    )


def decode_refusals(point: Point) -> list[str]:
    """Why the point's backend cannot decode (mode decode), in its own words; [] if it can."""
    try:
        decode_state(
            backend_of(point),
            batch=1,
            heads=point.heads,
            kv_heads=point.key_heads,
            head_dim=point.head_dim,
            dtype=DTYPES[point.dtype],
            device=point.device,
        )
    except ValueError as err:
        return [str(err)]
    return []


class DecodeStep:
    """One token decoded at context N (mode decode): the state holds N - 1 positions; a call
    attends one query over them and the new key, then rewinds the state to N - 1."""

    def __init__(self, point: Point, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        b, h, hkv, d = point.batch, point.heads, point.key_heads, point.head_dim
        dtype = DTYPES[point.dtype]

        def draw(heads: int, length: int) -> torch.Tensor:
            return torch.randn(b, heads, length, d, generator=gen).to(point.device, dtype)

        self.state: DecodeState = decode_state(
            backend_of(point),
            batch=b,
            heads=h,
            kv_heads=hkv,
            head_dim=d,
            dtype=dtype,
            device=point.device,
        )
        self.state.reserve(point.n)  # the context and the decoded token, nothing spare
        with torch.no_grad():
            for start in range(0, point.n - 1, FILL_CHUNK):
                length = min(FILL_CHUNK, point.n - 1 - start)
                self.state.extend(draw(hkv, length), draw(hkv, length))
        self.q, self.k, self.v = draw(h, 1), draw(hkv, 1), draw(hkv, 1)
        self.mark = self.state.mark()

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            out = self.state.attend(self.q, self.k, self.v)
        self.state.rewind(self.mark)
        return out


def _encoder(point: Point, settings: Settings) -> nn.Module:
    d_model = point.heads * point.head_dim
    layers = []
    for _ in range(settings.step_layers):
        layer = nn.TransformerEncoderLayer(
            d_model,
            point.heads,
            dim_feedforward=settings.step_ffn_mult * d_model,
            dropout=0.0,
            batch_first=True,
        )
        layer.self_attn = MultiheadAttention(
            d_model, point.heads, batch_first=True, backend=backend_of(point)
        )
        layers.append(layer)
    return nn.Sequential(*layers).to(device=point.device, dtype=DTYPES[point.dtype])


def build_callable(
    point: Point, settings: Settings, *, tensors: tuple | None = None
) -> Callable[[], object]:
    """The zero-argument function that one timed run calls (inputs built here, outside it).

    tensors: q, k, v to use instead of building them (modes fwd and fwd_bwd; for fwd_bwd they
    must require grad), so that the points of one comparison group share one set of inputs:
    ``inputs(point, requires_grad=point.mode == "fwd_bwd")``. Mode step builds its own input
    from the global seed: seed before each build for identical inputs; mode decode its own
    state (:class:`DecodeStep`)."""
    if point.mode == "decode":
        return DecodeStep(point)
    backend = backend_of(point)
    causal = point.causal
    if point.mode == "fwd":
        q, k, v = tensors if tensors is not None else inputs(point)

        def fwd() -> object:
            with torch.no_grad():
                return backend(q, k, v, causal=causal)

        return fwd
    if point.mode == "fwd_bwd":
        q, k, v = tensors if tensors is not None else inputs(point, requires_grad=True)
        grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q)

        def fwd_bwd() -> object:
            for t in (q, k, v):
                t.grad = None
            backend(q, k, v, causal=causal).backward(grad_out)

        return fwd_bwd
    model = _encoder(point, settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    x = torch.randn(point.batch, point.n, point.heads * point.head_dim, device=point.device).to(
        DTYPES[point.dtype]
    )  # (B, N, d_model)
    mask = nn.Transformer.generate_square_subsequent_mask(point.n) if causal else None

    def step() -> object:
        optimizer.zero_grad(set_to_none=True)
        out = x
        for layer in model:
            out = layer(out, src_mask=mask, is_causal=causal)
        out.float().pow(2).mean().backward()
        optimizer.step()

    return step


def reference_output(point: Point) -> torch.Tensor:
    """float64 ``full`` attention on the point's inputs, (B, H, N, D), computed one (batch, head)
    slice at a time (N x N floats each): the reference of :func:`relative_error`, the same for
    every backend of a comparison group."""
    full = get_backend("full")
    q, k, v = inputs(point)
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    with torch.no_grad():
        for b in range(point.batch):
            for h in range(point.heads):
                sl = (slice(b, b + 1), slice(h, h + 1))  # (B, H, N, D) -> (1, 1, N, D)
                g = h // (point.heads // point.key_heads)  # the key/value head query h reads
                kv = (sl[0], slice(g, g + 1))
                out[sl] = full(q[sl].double(), k[kv].double(), v[kv].double(), causal=point.causal)
    return out


def relative_error(point: Point, reference: torch.Tensor | None = None) -> float:
    """||out - ref|| / ||ref|| of the backend's forward against float64 ``full`` on the same
    inputs; ``reference``: :func:`reference_output` of the point (computed here if None)."""
    ref = reference_output(point) if reference is None else reference
    q, k, v = inputs(point)
    with torch.no_grad():
        out = backend_of(point)(q, k, v, causal=point.causal).double()
    den = float(ref.pow(2).sum())
    return (float((out - ref).pow(2).sum()) / den) ** 0.5 if den > 0 else 0.0


def wants_error(point: Point, settings: Settings) -> bool:
    """Error is measured once per shape: forward mode, approximate backends, N affordable."""
    return point.mode == "fwd" and not backend_of(point).exact and point.n <= settings.error_max_n
