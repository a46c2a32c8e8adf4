"""Dense fused attention (FlashAttention-2 style) in Triton: forward, backward, autograd Function.

Forward: one program per (query block, batch*head); an online softmax over key blocks in
float32, keeping the row max and denominator, never the (Nq, Nk) scores. It saves the output
and the per-row LSE. Backward: the preprocess kernel delta = rowsum(dO * O); a dK/dV kernel
(one program per key block, looping over query blocks) and a dQ kernel (one program per query
block, looping over key blocks), both recomputing p = exp2(s - lse).

Each loop is split into blocks that need no element mask (entirely visible under causality and
inside Nk) and the boundary blocks that do, so only the diagonal and the ragged edge pay for
masking. Causal is bottom-right aligned: query i keeps key j iff j <= i + Nk - Nq::

    Nq=3, Nk=5      k: 0 1 2 3 4
                q0     1 1 1 0 0
                q1     1 1 1 1 0
                q2     1 1 1 1 1

Block sizes are autotuned on GPU; under the interpreter (and when given) one config is used.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from effattn.kernels import _runtime
from effattn.kernels._runtime import (
    check_block_size,
    dot_precision,
    interpreting,
    padded_head_dim,
    upcast_in_kernel,
)
from effattn.kernels._tiles import (
    attend_block,
    causal_keep,
    delta_kernel,
    dkdv_block,
    dq_block,
    finish_forward,
    key_block_start,
    query_block_start,
    query_grad_rows,
    store_rows,
)

LOG2E = 1.4426950408889634
# The single tile size under the interpreter (the autotuner cannot time there).
INTERPRETER_BLOCK = 32
# Rows per program of the backward preprocess (delta) on GPU.
DELTA_BLOCK = 64


@triton.jit
def _flash_fwd(
    Q, K, V, KPM, OUT, LSE,
    q_len, kv_len, heads, head_dim, qk_scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Nq, BLOCK_M), B*H). Q: (B, H, Nq, D), K, V: (B, H, Nk, D), O like Q,
    LSE: (B*H, Nq) float32, KPM: (B, Nk) uint8."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q, k_base, v_base, kpm_base = query_block_start(
        Q, K, V, KPM, bh, offs_m, offs_d, q_len, kv_len, heads, head_dim, UPCAST
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offset = kv_len - q_len
    if CAUSAL:
        hi = tl.minimum(kv_len, start_m + BLOCK_M + offset)  # past the last key of the last row
        full_hi = tl.minimum(kv_len, start_m + offset + 1)  # keys every row of the block sees
    else:
        hi = kv_len
        full_hi = kv_len
    full_hi = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
    for start_n in range(0, full_hi, BLOCK_N):
        acc, m_i, l_i = attend_block(
            acc, m_i, l_i, q, k_base, v_base, kpm_base, start_n, offs_d, kv_len, head_dim,
            qk_scale, 0, BLOCK_N, HAS_KPM, False, UPCAST, DOT_PRECISION,
        )  # fmt: skip
    for start_n in range(full_hi, hi, BLOCK_N):
        keep = causal_keep(offs_m, start_n + tl.arange(0, BLOCK_N), kv_len, offset, CAUSAL)
        acc, m_i, l_i = attend_block(
            acc, m_i, l_i, q, k_base, v_base, kpm_base, start_n, offs_d, kv_len, head_dim,
            qk_scale, keep, BLOCK_N, HAS_KPM, True, UPCAST, DOT_PRECISION,
        )  # fmt: skip
    finish_forward(
        acc, m_i, l_i, OUT + bh * q_len * head_dim, LSE + bh * q_len, offs_m, q_len, offs_d,
        head_dim,
    )  # fmt: skip


@triton.jit
def _flash_bwd_dq(
    Q, K, V, KPM, DO, LSE, DELTA, DQ,
    q_len, kv_len, heads, head_dim, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Nq, BLOCK_M), B*H): dQ of one query block, looping over key blocks."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q, k_base, v_base, kpm_base = query_block_start(
        Q, K, V, KPM, bh, offs_m, offs_d, q_len, kv_len, heads, head_dim, UPCAST
    )
    do, lse, delta = query_grad_rows(DO, LSE, DELTA, bh, offs_m, offs_d, q_len, head_dim, UPCAST)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offset = kv_len - q_len
    if CAUSAL:
        hi = tl.minimum(kv_len, start_m + BLOCK_M + offset)
        full_hi = tl.minimum(kv_len, start_m + offset + 1)
    else:
        hi = kv_len
        full_hi = kv_len
    full_hi = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
    for start_n in range(0, full_hi, BLOCK_N):
        dq = dq_block(
            dq, q, do, lse, delta, k_base, v_base, kpm_base, start_n, offs_d, kv_len, head_dim,
            qk_scale, 0, BLOCK_N, HAS_KPM, False, UPCAST, DOT_PRECISION,
        )  # fmt: skip
    for start_n in range(full_hi, hi, BLOCK_N):
        keep = causal_keep(offs_m, start_n + tl.arange(0, BLOCK_N), kv_len, offset, CAUSAL)
        dq = dq_block(
            dq, q, do, lse, delta, k_base, v_base, kpm_base, start_n, offs_d, kv_len, head_dim,
            qk_scale, keep, BLOCK_N, HAS_KPM, True, UPCAST, DOT_PRECISION,
        )  # fmt: skip
    store_rows(DQ + bh * q_len * head_dim, dq * sm_scale, offs_m, q_len, offs_d, head_dim)


@triton.jit
def _flash_bwd_dkdv(
    Q, K, V, KPM, DO, LSE, DELTA, DK, DV,
    q_len, kv_len, heads, head_dim, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Nk, BLOCK_N), B*H): dK, dV of one key block, looping over query blocks."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k, v, key_in, q_base, do_base, lse_base, delta_base = key_block_start(
        Q, K, V, KPM, DO, LSE, DELTA, bh, offs_n, offs_d, q_len, kv_len, heads, head_dim,
        HAS_KPM, UPCAST,
    )  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    offset = kv_len - q_len
    if CAUSAL:
        # Query i sees key j iff i >= j - offset: the first query block that sees any key of
        # this block, and the first from which every query sees all of them.
        lo = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M
        first_full = tl.maximum(start_n + BLOCK_N - 1 - offset, 0)
        full_lo = (first_full + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        full_lo = tl.minimum(tl.maximum(full_lo, lo), (q_len + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
    else:
        lo = 0
        full_lo = 0
    for start_m in range(lo, full_lo, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        keep_t = offs_n[:, None] <= offs_m[None, :] + offset  # (BLOCK_N, BLOCK_M)
        dk, dv = dkdv_block(
            dk, dv, k, v, key_in, q_base, do_base, lse_base, delta_base, start_m, offs_d, q_len,
            head_dim, qk_scale, keep_t, BLOCK_M, HAS_KPM, True, UPCAST, DOT_PRECISION,
        )  # fmt: skip
    # Query rows past q_len need no mask: they load LSE=+inf, so p = 0 there.
    for start_m in range(full_lo, q_len, BLOCK_M):
        dk, dv = dkdv_block(
            dk, dv, k, v, key_in, q_base, do_base, lse_base, delta_base, start_m, offs_d, q_len,
            head_dim, qk_scale, 0, BLOCK_M, HAS_KPM, False, UPCAST, DOT_PRECISION,
        )  # fmt: skip
    store_rows(DK + bh * kv_len * head_dim, dk * sm_scale, offs_n, kv_len, offs_d, head_dim)
    store_rows(DV + bh * kv_len * head_dim, dv, offs_n, kv_len, offs_d, head_dim)


def _gpu_configs(block_pairs: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in block_pairs
    ]


# (BLOCK_M, BLOCK_N, num_warps, num_stages); configs too big for a head dim fail to compile
# and are skipped by the autotuner (OutOfResources). The 8-warp twins of the 4-warp tiles spill
# no registers at D=128 on sm_90, where the 4-warp ones do (effattn.kernels.compile_check).
_FWD_CONFIGS = [
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3),
    (64, 32, 4, 2),
]  # fmt: skip
_BWD_CONFIGS = [
    (64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 32, 4, 2),
    (16, 32, 4, 1),
]  # fmt: skip
_TUNE_KEY = ["q_len", "kv_len", "BLOCK_D", "CAUSAL", "HAS_KPM"]
_tuned: dict[str, triton.runtime.Autotuner] = {}


def _kernel(name: str, kernel: triton.JITFunction, configs: list) -> triton.runtime.Autotuner:
    """The autotuned version of ``kernel`` (GPU only), created once."""
    if name not in _tuned:
        _tuned[name] = triton.autotune(configs=_gpu_configs(configs), key=_TUNE_KEY)(kernel)
    return _tuned[name]


def launch_options(block_m: int | None, block_n: int | None) -> tuple[int, int] | None:
    """Fixed tile sizes (BLOCK_M, BLOCK_N), or None to autotune.

    Under the interpreter one small config; on GPU the given sizes, or None (autotune)."""
    if block_m is None and block_n is None and not interpreting():
        return None
    bm = check_block_size("block_m", block_m) if block_m is not None else INTERPRETER_BLOCK
    bn = check_block_size("block_n", block_n) if block_n is not None else INTERPRETER_BLOCK
    return bm, bn


def fixed_launch(kernel: str, block_m: int, block_n: int, head_dim_tile: int) -> dict[str, int]:
    """Launch options of ``kernel`` ("fwd", "dq" or "dkdv") for fixed tile sizes.

    Warps follow the float32 accumulators a program holds: block_m x D for the forward and dQ,
    2 x block_n x D for dK/dV (dK and dV). Up to 64 x 128 elements take 4 warps, more take 8;
    with 4 warps, larger accumulators spill registers on sm_90 (see compile_check).
    """
    rows = {"fwd": block_m, "dq": block_m, "dkdv": 2 * block_n}[kernel]
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "num_warps": 4 if rows * head_dim_tile <= 64 * 128 else 8,
        "num_stages": 1 if interpreting() else 2,
    }


def kernel_flags(q: Tensor) -> dict[str, object]:
    """The constexpr flags that depend on the input dtype and head dim."""
    return {
        "UPCAST": upcast_in_kernel(q.dtype),
        "DOT_PRECISION": dot_precision(q.dtype),
        "BLOCK_D": padded_head_dim(q.shape[-1]),
    }


def new_like(t: Tensor) -> Tensor:
    """An uninitialised buffer of t's shape, dtype and device (see _runtime.new_buffer)."""
    return _runtime.new_buffer(tuple(t.shape), t.dtype, t.device)


def padding_as_uint8(key_padding_mask: Tensor | None, like: Tensor) -> Tensor:
    """The (B, Nk) bool padding mask as uint8 for the kernels, or a 1-element stand-in."""
    if key_padding_mask is None:
        return torch.ones(1, dtype=torch.uint8, device=like.device)
    return key_padding_mask.to(torch.uint8).contiguous()


def row_delta(o: Tensor, do: Tensor) -> Tensor:
    """delta = rowsum(dO * O): (B, H, Nq, D) x 2 -> (B*H, Nq) float32 (the backward preprocess)."""
    batch, heads, q_len, head_dim = o.shape
    delta = _runtime.new_buffer((batch * heads, q_len), torch.float32, o.device)
    block = INTERPRETER_BLOCK if interpreting() else DELTA_BLOCK
    grid = (triton.cdiv(q_len, block), batch * heads)
    delta_kernel[grid](
        o, do, delta, q_len, head_dim, BLOCK_M=block, BLOCK_D=padded_head_dim(head_dim)
    )
    return delta


def _flash_forward(
    q: Tensor, k: Tensor, v: Tensor, kpm: Tensor, causal: bool, has_kpm: bool, scale: float,
    tiles: tuple[int, int] | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    o = new_like(q)
    lse = _runtime.new_buffer((batch * heads, q_len), torch.float32, q.device)
    args = (q, k, v, kpm, o, lse, q_len, kv_len, heads, head_dim, scale * LOG2E)
    flags = {"CAUSAL": causal, "HAS_KPM": has_kpm, **kernel_flags(q)}
    if tiles is None:
        grid = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _kernel("fwd", _flash_fwd, _FWD_CONFIGS)[grid](*args, **flags)
    else:
        grid = (triton.cdiv(q_len, tiles[0]), batch * heads)
        _flash_fwd[grid](*args, **flags, **fixed_launch("fwd", *tiles, flags["BLOCK_D"]))
    return o, lse


def _flash_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, kpm: Tensor,
    causal: bool, has_kpm: bool, scale: float, tiles: tuple[int, int] | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    delta = row_delta(o, do)
    dq, dk, dv = new_like(q), new_like(k), new_like(v)
    common = (q, k, v, kpm, do, lse, delta)
    sizes = (q_len, kv_len, heads, head_dim, scale * LOG2E, scale)
    flags = {"CAUSAL": causal, "HAS_KPM": has_kpm, **kernel_flags(q)}
    if tiles is None:
        q_grid = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        k_grid = lambda meta: (triton.cdiv(kv_len, meta["BLOCK_N"]), batch * heads)  # noqa: E731
        _kernel("dq", _flash_bwd_dq, _BWD_CONFIGS)[q_grid](*common, dq, *sizes, **flags)
        _kernel("dkdv", _flash_bwd_dkdv, _BWD_CONFIGS)[k_grid](*common, dk, dv, *sizes, **flags)
    else:
        d = flags["BLOCK_D"]
        q_grid = (triton.cdiv(q_len, tiles[0]), batch * heads)
        k_grid = (triton.cdiv(kv_len, tiles[1]), batch * heads)
        _flash_bwd_dq[q_grid](*common, dq, *sizes, **flags, **fixed_launch("dq", *tiles, d))
        _flash_bwd_dkdv[k_grid](*common, dk, dv, *sizes, **flags, **fixed_launch("dkdv", *tiles, d))
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the dense kernels; inputs are contiguous (B, H, N, D)."""

    @staticmethod
    def forward(ctx, q, k, v, kpm, causal, has_kpm, scale, tiles):
        o, lse = _flash_forward(q, k, v, kpm, causal, has_kpm, scale, tiles)
        ctx.save_for_backward(q, k, v, o, lse, kpm)
        ctx.flags = (causal, has_kpm, scale, tiles)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kpm = ctx.saved_tensors
        causal, has_kpm, scale, tiles = ctx.flags
        dq, dk, dv = _flash_backward(do.contiguous(), q, k, v, o, lse, kpm, causal, has_kpm,
                                     scale, tiles)  # fmt: skip
        return dq, dk, dv, None, None, None, None, None


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """Fused exact attention: q (B, H, Nq, D), k, v (B, H, Nk, D) -> (B, H, Nq, D).

    float16, bfloat16 or float32 inputs, float32 accumulation; D from 1 to 256; any Nq, Nk.
    causal: bottom-right aligned (query i keeps key j iff j <= i + Nk - Nq).
    key_padding_mask: (B, Nk) bool, True = the key takes part. Rows that keep no key give 0.
    scale: 1/sqrt(D) when None. block_m, block_n: fixed tile sizes (powers of two, 16..256);
    None = autotuned on GPU, 32 under the interpreter. Inputs are not validated here (the
    ``triton`` backend does that).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    tiles = launch_options(block_m, block_n)
    q, k, v = (t.contiguous() for t in (q, k, v))
    kpm = padding_as_uint8(key_padding_mask, q)
    has_kpm = key_padding_mask is not None
    return FlashAttentionFunction.apply(q, k, v, kpm, causal, has_kpm, scale, tiles)
