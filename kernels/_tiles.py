"""The Triton building blocks shared by the dense (flash.py) and block-sparse (block_sparse.py)
kernels: one (query block, key block) step of the forward, of dQ and of dK/dV, the end of the
forward's online softmax, and the backward's preprocess kernel delta = rowsum(dO * O).

Conventions of every kernel here:
- q, k, v, o and their gradients are contiguous (B, H, N, D); a program handles one block of
  rows of one (batch, head) pair ``bh``; its base pointer is ``X + bh * N * D``.
- D is padded to BLOCK_D (a power of two >= 16) with load masks; other=0 keeps padded
  columns out of every dot product.
- Scores are kept in log2 units: ``s2 = (q . k) * scale * log2(e)``, so exp2 replaces exp; the
  saved LSE is ``log2(sum_j exp2(s2_j))``, +inf for a row that keeps no key (then exp2(s2 - lse)
  is 0 everywhere: zero output and zero, finite gradients).
- ``keep`` tiles are bool (True = the pair takes part) and are applied only when APPLY_KEEP;
  the key padding mask (uint8, (B, Nk)) only when HAS_KPM.
- UPCAST converts loaded tiles to float32 (bf16 under the interpreter, see _runtime.py);
  DOT_PRECISION is tl.dot's input_precision.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_rows(base, offs_rows, n_rows, offs_d, head_dim, UPCAST: tl.constexpr):
    """A (len(offs_rows), BLOCK_D) tile of rows of a contiguous (N, D) matrix; zeros outside."""
    mask = (offs_rows[:, None] < n_rows) & (offs_d[None, :] < head_dim)
    tile = tl.load(base + offs_rows[:, None] * head_dim + offs_d[None, :], mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def store_rows(base, tile, offs_rows, n_rows, offs_d, head_dim):
    """Store a float32 tile into rows of a contiguous (N, D) matrix, in the matrix's dtype."""
    mask = (offs_rows[:, None] < n_rows) & (offs_d[None, :] < head_dim)
    ptrs = base + offs_rows[:, None] * head_dim + offs_d[None, :]
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def query_block_start(
    Q, K, V, KPM, bh, offs_m, offs_d, q_len, kv_len, heads, head_dim, UPCAST: tl.constexpr
):  # fmt: skip
    """The prologue of a per-query-block kernel: the q tile (BLOCK_M, BLOCK_D) of pair ``bh``
    and the base pointers of its keys, values and key padding row (k_base, v_base, kpm_base)."""
    q = load_rows(Q + bh * q_len * head_dim, offs_m, q_len, offs_d, head_dim, UPCAST)
    k_base = K + bh * kv_len * head_dim
    v_base = V + bh * kv_len * head_dim
    kpm_base = KPM + (bh // heads) * kv_len
    return q, k_base, v_base, kpm_base


@triton.jit
def query_grad_rows(DO, LSE, DELTA, bh, offs_m, offs_d, q_len, head_dim, UPCAST: tl.constexpr):
    """The dQ kernels' per-row inputs: the dO tile (BLOCK_M, BLOCK_D), LSE (+inf past q_len, so
    those rows add nothing) and delta (BLOCK_M,)."""
    do = load_rows(DO + bh * q_len * head_dim, offs_m, q_len, offs_d, head_dim, UPCAST)
    lse = tl.load(LSE + bh * q_len + offs_m, mask=offs_m < q_len, other=float("inf"))
    delta = tl.load(DELTA + bh * q_len + offs_m, mask=offs_m < q_len, other=0.0)
    return do, lse, delta


@triton.jit
def key_block_start(
    Q, K, V, KPM, DO, LSE, DELTA, bh, offs_n, offs_d, q_len, kv_len, heads, head_dim,
    HAS_KPM: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The prologue of a dK/dV kernel (one key block of pair ``bh``): the k and v tiles
    (BLOCK_N, BLOCK_D), ``key_in`` (BLOCK_N,) and the base pointers of the pair's queries, dO,
    LSE and delta (q_base, do_base, lse_base, delta_base), the arguments of dkdv_block."""
    k = load_rows(K + bh * kv_len * head_dim, offs_n, kv_len, offs_d, head_dim, UPCAST)
    v = load_rows(V + bh * kv_len * head_dim, offs_n, kv_len, offs_d, head_dim, UPCAST)
    key_in = offs_n < kv_len
    if HAS_KPM:
        kpm = KPM + (bh // heads) * kv_len + offs_n
        key_in = tl.load(kpm, mask=offs_n < kv_len, other=0) != 0
    q_base = Q + bh * q_len * head_dim
    do_base = DO + bh * q_len * head_dim
    return k, v, key_in, q_base, do_base, LSE + bh * q_len, DELTA + bh * q_len


@triton.jit
def causal_keep(offs_m, offs_n, kv_len, offset, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) keep tile of a dense call: key in range and, if CAUSAL, bottom-right
    aligned causality ``j <= i + offset`` with offset = Nk - Nq."""
    keep = (offs_n[None, :] < kv_len) & (offs_m[:, None] >= 0)
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + offset)
    return keep


@triton.jit
def attend_block(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    kpm_base,
    start_n,
    offs_d,
    kv_len,
    head_dim,
    qk_scale,
    keep,
    BLOCK_N: tl.constexpr,
    HAS_KPM: tl.constexpr,
    APPLY_KEEP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step of the forward over keys [start_n, start_n + BLOCK_N).

    acc: (BLOCK_M, BLOCK_D) float32 running sum of p @ v; m_i, l_i: (BLOCK_M,) running max (log2
    units) and running denominator. Returns the updated (acc, m_i, l_i).
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_rows(k_base, offs_n, kv_len, offs_d, head_dim, UPCAST)
    v = load_rows(v_base, offs_n, kv_len, offs_d, head_dim, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
    if APPLY_KEEP:
        s = tl.where(keep, s, float("-inf"))
    if HAS_KPM:
        key_in = tl.load(kpm_base + offs_n, mask=offs_n < kv_len, other=0) != 0
        s = tl.where(key_in[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no key kept so far has m_new = -inf; shift by 0 so that exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def finish_forward(acc, m_i, l_i, o_base, lse_base, offs_m, q_len, offs_d, head_dim):
    """Normalise and store the output rows and their LSE (log2 units, +inf for empty rows)."""
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = tl.where(has_key[:, None], acc / l_safe[:, None], 0.0)
    store_rows(o_base, out, offs_m, q_len, offs_d, head_dim)
    lse = tl.where(has_key, m_i + tl.log2(l_safe), float("inf"))
    tl.store(lse_base + offs_m, lse, mask=offs_m < q_len)


@triton.jit
def dq_block(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    kpm_base,
    start_n,
    offs_d,
    kv_len,
    head_dim,
    qk_scale,
    keep,
    BLOCK_N: tl.constexpr,
    HAS_KPM: tl.constexpr,
    APPLY_KEEP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Add the keys [start_n, start_n + BLOCK_N) to dq (BLOCK_M, BLOCK_D) float32, unscaled:
    dq += (p * (dO v^T - delta)) @ k; the caller multiplies by the softmax scale at the end."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_rows(k_base, offs_n, kv_len, offs_d, head_dim, UPCAST)
    v = load_rows(v_base, offs_n, kv_len, offs_d, head_dim, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
    p = tl.exp2(s - lse[:, None])
    if APPLY_KEEP:
        p = tl.where(keep, p, 0.0)
    if HAS_KPM:
        key_in = tl.load(kpm_base + offs_n, mask=offs_n < kv_len, other=0) != 0
        p = tl.where(key_in[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def dkdv_block(
    dk,
    dv,
    k,
    v,
    key_in,
    q_base,
    do_base,
    lse_base,
    delta_base,
    start_m,
    offs_d,
    q_len,
    head_dim,
    qk_scale,
    keep_t,
    BLOCK_M: tl.constexpr,
    HAS_KPM: tl.constexpr,
    APPLY_KEEP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Add the queries [start_m, start_m + BLOCK_M) to dk, dv (BLOCK_N, BLOCK_D) float32.

    Works on transposed scores p^T (BLOCK_N, BLOCK_M); ``keep_t`` is the transposed keep tile and
    ``key_in`` (BLOCK_N,) the key padding of this key block. Query rows past q_len load LSE=+inf,
    so they add nothing. dk is unscaled (the caller multiplies by the softmax scale).
    """
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = load_rows(q_base, offs_m, q_len, offs_d, head_dim, UPCAST)
    do = load_rows(do_base, offs_m, q_len, offs_d, head_dim, UPCAST)
    lse = tl.load(lse_base + offs_m, mask=offs_m < q_len, other=float("inf"))
    delta = tl.load(delta_base + offs_m, mask=offs_m < q_len, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
    p_t = tl.exp2(s_t - lse[None, :])
    if APPLY_KEEP:
        p_t = tl.where(keep_t, p_t, 0.0)
    if HAS_KPM:
        p_t = tl.where(key_in[:, None], p_t, 0.0)
    dv = dv + tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = dk + tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def delta_kernel(OUT, DO, DELTA, q_len, head_dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Backward preprocess: DELTA[bh, i] = sum_d dO[bh, i, d] * OUT[bh, i, d] in float32.
    Grid: (cdiv(Nq, BLOCK_M), B*H)."""
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_rows(OUT + bh * q_len * head_dim, offs_m, q_len, offs_d, head_dim, True)
    do = load_rows(DO + bh * q_len * head_dim, offs_m, q_len, offs_d, head_dim, True)
    tl.store(DELTA + bh * q_len + offs_m, tl.sum(o * do, 1), mask=offs_m < q_len)
