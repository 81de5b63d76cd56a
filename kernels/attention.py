"""Fused scaled-dot-product attention in Triton, FlashAttention-2 style.

Forward: one program per (query block, batch·head) streams over key blocks with an online
softmax, so only O (B, H, T, D) and the row log-sum-exp (B, H, T) reach memory — never
the (T, S) score matrix. Backward recomputes the probabilities from the saved lse in two
kernels without atomics: one program per key block accumulates dK and dV over query
blocks, one program per query block accumulates dQ over key blocks; a small kernel
first computes Delta = rowsum(dO ∘ O).

Conventions shared with the NumPy reference (``kernels/attention_ref.py``):
  q (B, H, T, D); k, v (B, H, S, D); o (B, H, T, D); lse (B, H, T), natural log.
  Causal masks are aligned bottom-right: query row i sees key j iff j <= i + (S - T).
  Dropout drops softmax probabilities; kept ones are scaled by 1 / (1 - p).

Every tensor is contiguous, so row r of one head's (rows, D) matrix starts at r * D
from that head's base. The launchers zero-pad head dims to a multiple of 8; the
kernels pad them further to BLOCK_D, the next power of two >= 16
(tl.arange needs a power of two, tl.dot a dimension >= 16), with a mask on D.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.common import TL_TYPE, check_kernel_device
from kernels.compile_spec import CompileSpec, kernel_signature

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln(2): ln(x) = log2(x) * LN2

# ---------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------


@triton.jit
def _load_rows(
    base,  # pointer to row 0 of one head's (n_rows, HEAD_DIM) row-major matrix
    rows,  # (BLOCK,) int32 row indices
    n_rows,  # i32: valid rows; rows >= n_rows read as 0
    offs_d,  # (BLOCK_D,) int32: arange(BLOCK_D)
    HEAD_DIM: tl.constexpr,  # real head dim = row stride
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two; padded columns read as 0
):
    ptrs = base + rows[:, None] * HEAD_DIM + offs_d[None, :]  # (BLOCK, BLOCK_D)
    if HEAD_DIM == BLOCK_D:
        mask = rows[:, None] < n_rows
    else:
        mask = (rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    # NOTE: other=0 is required: on a GPU a masked load without it returns garbage, and
    # the zero padding is what makes padded rows/columns contribute nothing to tl.dot.
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_rows(
    base,  # pointer to row 0 of one head's (n_rows, HEAD_DIM) row-major matrix
    tile,  # (BLOCK, BLOCK_D) values, already in the destination dtype
    rows,  # (BLOCK,) int32 row indices; rows >= n_rows are not written
    n_rows,  # i32
    offs_d,  # (BLOCK_D,) int32: arange(BLOCK_D)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    ptrs = base + rows[:, None] * HEAD_DIM + offs_d[None, :]
    if HEAD_DIM == BLOCK_D:
        mask = rows[:, None] < n_rows
    else:
        mask = (rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptrs, tile, mask=mask)


@triton.jit
def _dropout_keep(
    seed,  # i32 dropout seed
    bh,  # i32 batch·head index
    rows,  # int32 query indices, broadcastable against cols (e.g. (BM, 1))
    cols,  # int32 key indices, broadcastable against rows (e.g. (1, BN))
    T,  # i32 queries per head
    S,  # i32 keys per head
    dropout_p,  # fp32 drop probability
):
    """Keep-mask (True = keep) for the (rows, cols) entries of head bh's (T, S) matrix.

    NOTE: the Philox counter is the flat int64 index of the entry in (B·H, T, S), a pure
    function of (b, h, row, col), so the forward, both backward kernels and
    attention_dropout_mask draw the same number for the same entry whatever their tiling.
    """
    offset = (bh.to(tl.int64) * T + rows) * S + cols
    return tl.rand(seed, offset) >= dropout_p


@triton.jit
def _dropout_mask_kernel(
    MASK,  # (B·H, T, S) int8 out: 1 = keep
    T,  # i32
    S,  # i32
    seed,  # i32
    dropout_p,  # fp32
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key columns per program
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], T, S, dropout_p)  # (BM, BN)
    ptrs = MASK + bh.to(tl.int64) * T * S + rows[:, None].to(tl.int64) * S + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < T) & (cols[None, :] < S))


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


@triton.jit
def _fwd_stage(
    acc,  # (BM, BLOCK_D) fp32 running un-normalised output
    l_i,  # (BM,) fp32 running softmax denominator (relative to m_i)
    m_i,  # (BM,) fp32 running row max of the scores, in log2 units
    q,  # (BM, BLOCK_D) query tile, input dtype
    k_base,  # pointer to this head's K (S, HEAD_DIM)
    v_base,  # pointer to this head's V (S, HEAD_DIM)
    offs_m,  # (BM,) int32 query rows of this program
    offs_d,  # (BLOCK_D,) int32
    lo,  # i32 first key of the stage (a multiple of BLOCK_N)
    hi,  # i32 end of the stage (exclusive)
    qk_scale,  # fp32 scale * log2(e)
    T,  # i32
    S,  # i32
    bh,  # i32 batch·head
    seed,  # i32
    dropout_p,  # fp32
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,  # apply the causal (or key-tail) mask in this stage
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BN,)
        k = _load_rows(k_base, offs_n, S, offs_d, HEAD_DIM, BLOCK_D)  # (BN, BLOCK_D)
        v = _load_rows(v_base, offs_n, S, offs_d, HEAD_DIM, BLOCK_D)  # (BN, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BM, BN), log2 units
        if MASKED:
            if CAUSAL:
                visible = offs_n[None, :] <= offs_m[:, None] + (S - T)
            else:
                visible = offs_n[None, :] < S
            s = tl.where(visible, s, float("-inf"))
        # NOTE: every real row sees a key in its first visited tile (key 0 when it is
        # tile 0), so m_new is finite and exp2(-inf - m_new) = 0 never meets -inf - -inf.
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BM,)
        p = tl.math.exp2(s - m_new[:, None])  # (BM, BN)
        alpha = tl.math.exp2(m_i - m_new)  # (BM,) rescales what was accumulated so far
        l_i = l_i * alpha + tl.sum(p, 1)  # the denominator counts dropped entries too
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], T, S, dropout_p)
            p = tl.where(keep, p, 0.0)  # the 1 / (1 - p) factor is applied once at the end
        acc = tl.dot(p.to(v.dtype), v, acc=acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,  # (B·H, T, HEAD_DIM) queries
    K,  # (B·Hkv, S, HEAD_DIM) keys, Q's dtype; query head bh reads K/V head bh // GROUP
    V,  # (B·Hkv, S, HEAD_DIM) values, Q's dtype
    O,  # (B·H, T, HEAD_DIM) out, Q's dtype
    LSE,  # (B·H, T) fp32 out: natural-log log-sum-exp of each row's scaled, masked scores
    sm_scale,  # fp32 softmax scale (1/sqrt(D) by default)
    T,  # i32 queries per head
    S,  # i32 keys per head (S >= T when CAUSAL)
    GROUP,  # i32 query heads per K/V head, H / Hkv (1 without grouped-query attention)
    seed,  # i32 dropout seed
    dropout_p,  # fp32 drop probability (ignored unless DROPOUT)
    HEAD_DIM: tl.constexpr,  # real head dim
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision: "tf32x3" for fp32 inputs
):
    # NOTE: causal programs with high query blocks do the most work; launching them first
    # (reversed block order) evens out the tail of the grid.
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BM,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    q_base = Q + bh.to(tl.int64) * T * HEAD_DIM
    # NOTE: b·H + h over GROUP is b·Hkv + h // GROUP, the K/V head of query head h.
    k_base = K + (bh // GROUP).to(tl.int64) * S * HEAD_DIM
    v_base = V + (bh // GROUP).to(tl.int64) * S * HEAD_DIM
    qk_scale = sm_scale * LOG2E

    q = _load_rows(q_base, offs_m, T, offs_d, HEAD_DIM, BLOCK_D)  # (BM, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys [0, mask_lo) need no mask; [mask_lo, hi) cross the diagonal (or the key tail).
    # Causal: a key tile [n, n + BN) is fully visible to every row of the block when
    # n + BN - 1 <= start_m + (S - T); tiles starting at or after start_m + BM + (S - T)
    # are invisible to every row and are never loaded.
    if CAUSAL:
        mask_lo = (start_m + (S - T) + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M + (S - T), S)
    else:
        mask_lo = S // BLOCK_N * BLOCK_N
        hi = S
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, k_base, v_base, offs_m, offs_d, 0, mask_lo, qk_scale,
                               T, S, bh, seed, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N,
                               False, CAUSAL, DROPOUT, DOT_PRECISION)
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, k_base, v_base, offs_m, offs_d, mask_lo, hi, qk_scale,
                               T, S, bh, seed, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N,
                               True, CAUSAL, DROPOUT, DOT_PRECISION)

    o = acc / l_i[:, None]  # (BM, BLOCK_D)
    if DROPOUT:
        o = o * (1.0 / (1.0 - dropout_p))
    _store_rows(O + bh.to(tl.int64) * T * HEAD_DIM, o.to(O.dtype.element_ty), offs_m, T, offs_d, HEAD_DIM, BLOCK_D)
    lse = (m_i + tl.math.log2(l_i)) * LN2  # (BM,) back to natural log
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


# ---------------------------------------------------------------------------------------
# Backward
#
# Per head, with scores X = scale · Q Kᵀ (masked), P = exp(X − lse) recomputed from the
# saved lse, M the dropout keep-mask and P_drop = P ∘ M / (1 − p):
#
#   dV = P_dropᵀ dO                       dP = (dO Vᵀ) ∘ M / (1 − p)
#   Δ  = rowsum(dO ∘ O)  (= rowsum(P ∘ dP), since O = P_drop V)
#   dS = P ∘ (dP − Δ)                     dQ = scale · dS K        dK = scale · dSᵀ Q
#
# The kernels work in log2 units: P = exp2(X·log2e − lse·log2e).
# ---------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta_kernel(
    O,  # (B·H, T, HEAD_DIM) forward output
    DO,  # (B·H, T, HEAD_DIM) upstream gradient, O's dtype
    DELTA,  # (B·H, T) fp32 out: rowsum(dO ∘ O)
    T,  # i32
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    base = bh.to(tl.int64) * T * HEAD_DIM
    o = _load_rows(O + base, offs_m, T, offs_d, HEAD_DIM, BLOCK_D).to(tl.float32)  # (BM, BLOCK_D)
    do = _load_rows(DO + base, offs_m, T, offs_d, HEAD_DIM, BLOCK_D).to(tl.float32)  # (BM, BLOCK_D)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _dkdv_stage(
    dk,  # (BN, BLOCK_D) fp32 running dK (without the final scale)
    dv,  # (BN, BLOCK_D) fp32 running dV
    k,  # (BN, BLOCK_D) this program's keys, input dtype
    v,  # (BN, BLOCK_D) this program's values, input dtype
    q_base,  # pointer to this head's Q (T, HEAD_DIM)
    do_base,  # pointer to this head's dO (T, HEAD_DIM)
    lse_base,  # pointer to this head's lse (T,) fp32
    delta_base,  # pointer to this head's Delta (T,) fp32
    offs_n,  # (BN,) int32 key indices of this program
    offs_d,  # (BLOCK_D,) int32
    lo,  # i32 first query row of the stage (a multiple of BLOCK_M)
    hi,  # i32 end of the stage (exclusive; the last tile may run past T)
    qk_scale,  # fp32 scale * log2(e)
    T,  # i32
    S,  # i32
    bh,  # i32
    seed,  # i32
    dropout_p,  # fp32
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,  # apply the causal mask in this stage
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Tiles are computed transposed, (keys, queries), so dV += P_dropᵀ dO and dK += dSᵀ Q
    # need no transpose of the big operands.
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)  # (BM,)
        q = _load_rows(q_base, offs_m, T, offs_d, HEAD_DIM, BLOCK_D)  # (BM, BLOCK_D)
        do = _load_rows(do_base, offs_m, T, offs_d, HEAD_DIM, BLOCK_D)  # (BM, BLOCK_D)
        # NOTE: rows past T load q = dO = lse = Delta = 0, so P = 1 there but dS = 0 and
        # dO = 0: they add nothing to dK or dV and need no mask.
        lse2 = tl.load(lse_base + offs_m, mask=offs_m < T, other=0.0) * LOG2E  # (BM,)
        delta = tl.load(delta_base + offs_m, mask=offs_m < T, other=0.0)  # (BM,)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BN, BM)
        if MASKED:
            s_t = tl.where(offs_n[:, None] <= offs_m[None, :] + (S - T), s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse2[None, :])  # (BN, BM) = Pᵀ
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BN, BM) = (dO Vᵀ)ᵀ
        if DROPOUT:
            keep_t = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], T, S, dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            p_drop_t = tl.where(keep_t, p_t * inv_keep, 0.0)
            dp_t = tl.where(keep_t, dp_t * inv_keep, 0.0)
        else:
            p_drop_t = p_t
        dv = tl.dot(p_drop_t.to(do.dtype), do, acc=dv, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])  # (BN, BM)
        dk = tl.dot(ds_t.to(q.dtype), q, acc=dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,  # (B·H, T, HEAD_DIM)
    K,  # (B·Hkv, S, HEAD_DIM)
    V,  # (B·Hkv, S, HEAD_DIM)
    DO,  # (B·H, T, HEAD_DIM) upstream gradient
    LSE,  # (B·H, T) fp32 from the forward
    DELTA,  # (B·H, T) fp32 from _attn_bwd_delta_kernel
    DK,  # (B·Hkv, S, HEAD_DIM) out, K's dtype: summed over the GROUP query heads of each K/V head
    DV,  # (B·Hkv, S, HEAD_DIM) out, V's dtype
    sm_scale,  # fp32
    T,  # i32
    S,  # i32
    GROUP,  # i32 query heads per K/V head
    seed,  # i32
    dropout_p,  # fp32
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per loop step
    BLOCK_N: tl.constexpr,  # keys per program
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    kv_bh = tl.program_id(1)  # batch·K/V head
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)  # (BN,)
    offs_d = tl.arange(0, BLOCK_D)
    kv_off = kv_bh.to(tl.int64) * S * HEAD_DIM
    qk_scale = sm_scale * LOG2E

    # NOTE: keys past S load as 0; their dK/dV rows are never stored, so they need no mask.
    k = _load_rows(K + kv_off, offs_n, S, offs_d, HEAD_DIM, BLOCK_D)  # (BN, BLOCK_D)
    v = _load_rows(V + kv_off, offs_n, S, offs_d, HEAD_DIM, BLOCK_D)  # (BN, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        # Rows that see key j satisfy i >= j - (S - T). Query tiles before `lo` see none of
        # this block's keys (skipped); tiles in [lo, mid) cross the diagonal (masked);
        # from `mid` on, every row of the tile sees every key of the block (unmasked).
        # Both bounds are kept >= 0 before dividing (Triton's // truncates like C).
        lo = tl.maximum(start_n - (S - T), 0) // BLOCK_M * BLOCK_M
        mid = (tl.maximum(start_n + BLOCK_N - 1 - (S - T), 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        mid = tl.minimum(mid, (T + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
    else:
        lo = 0
        mid = 0
    # Grouped-query attention: the GROUP query heads that read this K/V head add their
    # dK, dV into the same accumulators, so the sum over the group costs no atomics.
    for g in range(0, GROUP):
        bh = kv_bh * GROUP + g  # batch·query head
        q_base = Q + bh.to(tl.int64) * T * HEAD_DIM
        do_base = DO + bh.to(tl.int64) * T * HEAD_DIM
        lse_base = LSE + bh.to(tl.int64) * T
        delta_base = DELTA + bh.to(tl.int64) * T
        if CAUSAL:
            dk, dv = _dkdv_stage(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, offs_d, lo, mid,
                                 qk_scale, T, S, bh, seed, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M,
                                 True, DROPOUT, DOT_PRECISION)
        dk, dv = _dkdv_stage(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, offs_d, mid, T,
                             qk_scale, T, S, bh, seed, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M,
                             False, DROPOUT, DOT_PRECISION)

    _store_rows(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), offs_n, S, offs_d, HEAD_DIM, BLOCK_D)
    _store_rows(DV + kv_off, dv.to(DV.dtype.element_ty), offs_n, S, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_stage(
    dq,  # (BM, BLOCK_D) fp32 running dQ (without the final scale)
    q,  # (BM, BLOCK_D) this program's queries, input dtype
    do,  # (BM, BLOCK_D) this program's upstream gradient rows
    lse2,  # (BM,) fp32 lse * log2(e)
    delta,  # (BM,) fp32 rowsum(dO ∘ O)
    k_base,  # pointer to this head's K (S, HEAD_DIM)
    v_base,  # pointer to this head's V (S, HEAD_DIM)
    offs_m,  # (BM,) int32 query rows of this program
    offs_d,  # (BLOCK_D,) int32
    lo,  # i32 first key of the stage (a multiple of BLOCK_N)
    hi,  # i32 end of the stage (exclusive)
    qk_scale,  # fp32
    T,  # i32
    S,  # i32
    bh,  # i32
    seed,  # i32
    dropout_p,  # fp32
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,  # apply the causal (or key-tail) mask in this stage
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BN,)
        k = _load_rows(k_base, offs_n, S, offs_d, HEAD_DIM, BLOCK_D)  # (BN, BLOCK_D)
        v = _load_rows(v_base, offs_n, S, offs_d, HEAD_DIM, BLOCK_D)  # (BN, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BM, BN)
        if MASKED:
            # NOTE: keys past S must be masked here (unlike in the dK/dV kernel): their
            # score 0 could give exp2(0 - lse2) = inf, and inf * (k = 0) is NaN.
            if CAUSAL:
                visible = offs_n[None, :] <= offs_m[:, None] + (S - T)
            else:
                visible = offs_n[None, :] < S
            s = tl.where(visible, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])  # (BM, BN)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BM, BN)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], T, S, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])  # (BM, BN)
        dq = tl.dot(ds.to(k.dtype), k, acc=dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q,  # (B·H, T, HEAD_DIM)
    K,  # (B·Hkv, S, HEAD_DIM)
    V,  # (B·Hkv, S, HEAD_DIM)
    DO,  # (B·H, T, HEAD_DIM) upstream gradient
    LSE,  # (B·H, T) fp32 from the forward
    DELTA,  # (B·H, T) fp32 from _attn_bwd_delta_kernel
    DQ,  # (B·H, T, HEAD_DIM) out, Q's dtype
    sm_scale,  # fp32
    T,  # i32
    S,  # i32
    GROUP,  # i32 query heads per K/V head
    seed,  # i32
    dropout_p,  # fp32
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BM,)
    offs_d = tl.arange(0, BLOCK_D)
    row_off = bh.to(tl.int64) * T * HEAD_DIM
    k_base = K + (bh // GROUP).to(tl.int64) * S * HEAD_DIM
    v_base = V + (bh // GROUP).to(tl.int64) * S * HEAD_DIM
    qk_scale = sm_scale * LOG2E

    q = _load_rows(Q + row_off, offs_m, T, offs_d, HEAD_DIM, BLOCK_D)  # (BM, BLOCK_D)
    do = _load_rows(DO + row_off, offs_m, T, offs_d, HEAD_DIM, BLOCK_D)  # (BM, BLOCK_D)
    lse2 = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0) * LOG2E  # (BM,)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)  # (BM,)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Same key-loop split as the forward kernel.
    if CAUSAL:
        mask_lo = (start_m + (S - T) + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M + (S - T), S)
    else:
        mask_lo = S // BLOCK_N * BLOCK_N
        hi = S
    dq = _dq_stage(dq, q, do, lse2, delta, k_base, v_base, offs_m, offs_d, 0, mask_lo,
                   qk_scale, T, S, bh, seed, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N,
                   False, CAUSAL, DROPOUT, DOT_PRECISION)
    dq = _dq_stage(dq, q, do, lse2, delta, k_base, v_base, offs_m, offs_d, mask_lo, hi,
                   qk_scale, T, S, bh, seed, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N,
                   True, CAUSAL, DROPOUT, DOT_PRECISION)
    _store_rows(DQ + row_off, (dq * sm_scale).to(DQ.dtype.element_ty), offs_m, T, offs_d, HEAD_DIM, BLOCK_D)


# ---------------------------------------------------------------------------------------
# Block configurations
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blocks:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


_HALF = (torch.float16, torch.bfloat16)
# NOTE: sizes chosen for the H100 (sm_90, 227 KB shared memory per block) from sm_90
# compiles with triton 3.6 and 3.9 (sm90_compile_specs): every one needs at most 96 KB of
# shared memory, and the 16-bit ones fit 255 registers per thread without spilling
# (at most 24 bytes with dropout). Keys: "half" (fp16/bf16) or "fp32", then the padded head dim.
# fp32 takes tf32x3 dots (see _dot_precision), which split every operand in two and spill
# registers at BLOCK_D >= 64 whatever the tile; fp32 is the accuracy path, 16-bit the fast one.
_BLOCKS = {
    "fwd": {  # one program: BLOCK_M queries; loop: BLOCK_N keys
        "half": {16: _Blocks(128, 64, 8, 3), 32: _Blocks(128, 64, 8, 3), 64: _Blocks(128, 64, 8, 3),
                 128: _Blocks(128, 64, 8, 3)},
        "fp32": {16: _Blocks(64, 32, 4, 3), 32: _Blocks(64, 32, 4, 3), 64: _Blocks(32, 32, 4, 2),
                 128: _Blocks(32, 32, 4, 2)},
    },
    "dkdv": {  # one program: BLOCK_N keys; loop: BLOCK_M queries
        "half": {16: _Blocks(64, 64, 4, 3), 32: _Blocks(64, 64, 4, 3), 64: _Blocks(64, 64, 8, 3),
                 128: _Blocks(64, 32, 8, 3)},
        "fp32": {16: _Blocks(32, 64, 4, 3), 32: _Blocks(32, 64, 4, 3), 64: _Blocks(32, 32, 4, 2),
                 128: _Blocks(32, 32, 4, 2)},
    },
    "dq": {  # one program: BLOCK_M queries; loop: BLOCK_N keys
        "half": {16: _Blocks(64, 64, 4, 3), 32: _Blocks(64, 64, 4, 3), 64: _Blocks(64, 64, 8, 3),
                 128: _Blocks(32, 64, 8, 3)},
        "fp32": {16: _Blocks(64, 32, 4, 3), 32: _Blocks(64, 32, 4, 3), 64: _Blocks(32, 32, 4, 2),
                 128: _Blocks(32, 32, 4, 2)},
    },
}
# NOTE: the Philox draw for a whole tile costs many registers: with dropout every kernel
# runs 8 warps (halving each thread's share), and the widest forward tile shrinks too.
_DROPOUT_BLOCKS = {("fwd", "half", 128): _Blocks(64, 64, 8, 3)}
_DELTA_BLOCK_M = 64
_MASK_BLOCKS = (64, 64)
_MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1, which carries batch·head


def _pad_head_dim(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Zero-pad the head dim to a multiple of 8, the kernels' granularity (contiguous copies).

    Zeros change no dot product, and padded value columns only produce output columns
    that the launchers slice off."""
    pad = -tensors[0].shape[-1] % 8
    return [torch.nn.functional.pad(t, (0, pad)) if pad else t.contiguous() for t in tensors]


def _padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    # NOTE: fp32 tl.dot would run as tf32 (~1e-3 relative error) on an H100; tf32x3 keeps
    # fp32 accuracy on the tensor cores. 16-bit inputs ignore the setting.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _blocks(kernel: str, block_d: int, dtype: torch.dtype, dropout: bool) -> _Blocks:
    """The tile configuration of kernel "fwd", "dkdv" or "dq" for this problem."""
    kind = "half" if dtype in _HALF else "fp32"
    cfg = _BLOCKS[kernel][kind][block_d]
    if dropout:
        cfg = _DROPOUT_BLOCKS.get((kernel, kind, block_d), cfg)
        cfg = _Blocks(cfg.block_m, cfg.block_n, max(cfg.num_warps, 8), cfg.num_stages)
    return cfg


# ---------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------


def _check_qkv(q, k, v, causal: bool, dropout_p: float, seed: int) -> tuple[int, int, int, int, int, int]:
    """Validate an attention problem; return (B, H, Hkv, T, S, D)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"attention: {name} must have rank 4 (B, H, T, D), got shape {tuple(x.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention: q must be float16, bfloat16 or float32, got {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    check_kernel_device("attention", q)
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if tuple(k.shape) != (B, Hkv, S, D) or v.shape != k.shape or Hkv < 1 or H % Hkv:
        raise ValueError(f"attention: expected k and v of shape (B, Hkv, S, D) = ({B}, Hkv, S, {D}) with Hkv "
                         f"dividing H={H}, to match q {tuple(q.shape)}; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not 1 <= D <= 128:
        raise ValueError(f"attention: head dim must be between 1 and 128, got D={D}")
    if min(B, H, T, S) < 1:
        raise ValueError(f"attention: empty dimension in q {tuple(q.shape)} / k {tuple(k.shape)}")
    if B * H > _MAX_GRID_Y:
        raise ValueError(f"attention: B*H = {B * H} exceeds the grid limit {_MAX_GRID_Y}")
    if causal and S < T:
        raise ValueError(f"attention: causal attention needs at least as many keys as queries, got S={S} < T={T}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"attention: seed must be an int in [0, 2**31), got {seed!r}")
    return B, H, Hkv, T, S, D


def attention_forward(q, k, v, scale=None, causal=True, dropout_p=0.0, seed=0):
    """Fused attention forward: o = dropout(softmax(scale · q kᵀ + mask)) v.

    q (B, H, T, D); k, v (B, Hkv, S, D), float16/bfloat16/float32 on CUDA (or CPU under
    TRITON_INTERPRET=1); D up to 128 (zero-padded to a multiple of 8 inside). scale
    defaults to 1/sqrt(D). Hkv < H is grouped-query attention: query head h reads K/V
    head h // (H / Hkv), never a repeated copy.
    causal masks bottom-right (query i sees key j iff j <= i + S - T; needs S >= T).
    Returns o (B, H, T, D) in q's dtype and lse (B, H, T) float32, the natural-log
    log-sum-exp of each row's scaled, masked scores, which attention_backward needs.
    """
    B, H, Hkv, T, S, D = _check_qkv(q, k, v, causal, dropout_p, seed)
    scale = 1.0 / D**0.5 if scale is None else float(scale)
    q, k, v = _pad_head_dim(q, k, v)
    head_dim = D
    D = q.shape[-1]
    o = torch.empty_like(q)  # (B, H, T, D padded)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    block_d = _padded_head_dim(D)
    cfg = _blocks("fwd", block_d, q.dtype, dropout_p > 0.0)
    grid = (triton.cdiv(T, cfg.block_m), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, scale, T, S, H // Hkv, seed, float(dropout_p),
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=bool(causal), DROPOUT=dropout_p > 0.0, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o[..., :head_dim], lse


def attention_backward(do, q, k, v, o, lse, scale=None, causal=True, dropout_p=0.0, seed=0):
    """Gradients (dq, dk, dv) of attention_forward, in the inputs' dtype; with grouped-query
    attention dk, dv (B, Hkv, S, D) are summed over the query heads of each group.

    do, o (B, H, T, D) and lse (B, H, T) are the upstream gradient and what
    attention_forward returned; scale, causal, dropout_p and seed must be the forward's
    (the dropout mask is regenerated from the seed).
    """
    B, H, Hkv, T, S, D = _check_qkv(q, k, v, causal, dropout_p, seed)
    for name, x in (("do", do), ("o", o)):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (B, H, T, D):
            raise ValueError(f"attention_backward: {name} must be a tensor of shape {(B, H, T, D)}, got "
                             f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"attention_backward: {name} must match q's dtype and device ({q.dtype}, {q.device}), "
                             f"got {x.dtype}, {x.device}")
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (B, H, T) or lse.device != q.device:
        raise ValueError(f"attention_backward: lse must be a tensor of shape {(B, H, T)} on {q.device}, got "
                         f"{tuple(getattr(lse, 'shape', ())) or type(lse).__name__}")
    scale = 1.0 / D**0.5 if scale is None else float(scale)
    q, k, v, do, o = _pad_head_dim(q, k, v, do, o)
    head_dim = D
    D = q.shape[-1]
    lse = lse.to(torch.float32).contiguous()
    block_d = _padded_head_dim(D)
    dropout = dropout_p > 0.0
    precision = _dot_precision(q.dtype)

    delta = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    _attn_bwd_delta_kernel[(triton.cdiv(T, _DELTA_BLOCK_M), B * H)](
        o, do, delta, T, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=_DELTA_BLOCK_M, num_warps=4, num_stages=1,
    )

    dk, dv = torch.empty_like(k), torch.empty_like(v)
    cfg = _blocks("dkdv", block_d, q.dtype, dropout)
    _attn_bwd_dkdv_kernel[(triton.cdiv(S, cfg.block_n), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, scale, T, S, H // Hkv, seed, float(dropout_p),
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=bool(causal), DROPOUT=dropout, DOT_PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    dq = torch.empty_like(q)
    cfg = _blocks("dq", block_d, q.dtype, dropout)
    _attn_bwd_dq_kernel[(triton.cdiv(T, cfg.block_m), B * H)](
        q, k, v, do, lse, delta, dq, scale, T, S, H // Hkv, seed, float(dropout_p),
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=bool(causal), DROPOUT=dropout, DOT_PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq[..., :head_dim], dk[..., :head_dim], dv[..., :head_dim]


def attention_dropout_mask(B, H, T, S, dropout_p, seed, device) -> torch.Tensor:
    """The keep-mask (B, H, T, S) bool the kernels draw for this (dropout_p, seed).

    Generated by the same RNG helper as the kernels, so feeding it to the NumPy reference
    reproduces attention_forward / attention_backward with dropout exactly.
    """
    if min(B, H, T, S) < 1 or B * H > _MAX_GRID_Y:
        raise ValueError(f"attention_dropout_mask: sizes must be >= 1 with B*H <= {_MAX_GRID_Y}, got {(B, H, T, S)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention_dropout_mask: dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"attention_dropout_mask: seed must be an int in [0, 2**31), got {seed!r}")
    mask = torch.empty((B, H, T, S), device=device, dtype=torch.int8)
    check_kernel_device("attention_dropout_mask", mask)
    bm, bn = _MASK_BLOCKS
    _dropout_mask_kernel[(triton.cdiv(T, bm), triton.cdiv(S, bn), B * H)](
        mask, T, S, seed, float(dropout_p), BLOCK_M=bm, BLOCK_N=bn,
    )
    return mask.view(torch.bool)


# ---------------------------------------------------------------------------------------
# Compile check
# ---------------------------------------------------------------------------------------

# NOTE: the compile check must stay within CI's time, so it compiles each block table once:
# fp16 shares bf16's table (only the mma operand type differs) and is left out.
_SPEC_DTYPES = (torch.bfloat16, torch.float32)
# One representative head dim per padded width: 16 and 64 exercise the unmasked-D path,
# 24 and 80 the masked one; 128 adds the widest unmasked case.
_SPEC_HEAD_DIMS = (16, 24, 64, 80, 128)
# Causal code, non-causal code, and the dropout code (whose blocks and warps differ);
# dropout adds the same code to the causal and non-causal loops, so one of them suffices.
_SPEC_FLAGS = ((True, False), (False, False), (True, True))


def sm90_compile_specs() -> list[CompileSpec]:
    """Every block configuration the launchers can pick, per kernel (see _SPEC_* for what is sampled)."""
    specs = []
    for dtype in _SPEC_DTYPES:
        t = TL_TYPE[dtype]
        for head_dim in _SPEC_HEAD_DIMS:
            block_d = _padded_head_dim(head_dim)
            dims = {"HEAD_DIM": head_dim, "BLOCK_D": block_d}
            specs.append(CompileSpec(
                name=f"attention_bwd_delta[{t},D={head_dim},BM={_DELTA_BLOCK_M}]",
                fn=_attn_bwd_delta_kernel,
                signature=kernel_signature(_attn_bwd_delta_kernel, {"O": f"*{t}", "DO": f"*{t}", "DELTA": "*fp32"}),
                constexprs={**dims, "BLOCK_M": _DELTA_BLOCK_M}, num_warps=4, num_stages=1,
            ))
            for causal, dropout in _SPEC_FLAGS:
                flags = {"CAUSAL": causal, "DROPOUT": dropout, "DOT_PRECISION": _dot_precision(dtype)}
                tag = f"{t},D={head_dim},causal={int(causal)},dropout={int(dropout)}"
                scalars = {"sm_scale": "fp32", "dropout_p": "fp32"}
                for kname, fn, kernel, tensors in (
                    ("attention_fwd", _attn_fwd_kernel, "fwd",
                     {"Q": t, "K": t, "V": t, "O": t, "LSE": "fp32"}),
                    ("attention_bwd_dkdv", _attn_bwd_dkdv_kernel, "dkdv",
                     {"Q": t, "K": t, "V": t, "DO": t, "LSE": "fp32", "DELTA": "fp32", "DK": t, "DV": t}),
                    ("attention_bwd_dq", _attn_bwd_dq_kernel, "dq",
                     {"Q": t, "K": t, "V": t, "DO": t, "LSE": "fp32", "DELTA": "fp32", "DQ": t}),
                ):
                    cfg = _blocks(kernel, block_d, dtype, dropout)
                    specs.append(CompileSpec(
                        name=f"{kname}[{tag},BM={cfg.block_m},BN={cfg.block_n}]",
                        fn=fn,
                        signature=kernel_signature(fn, {**{n: f"*{ty}" for n, ty in tensors.items()}, **scalars}),
                        constexprs={**dims, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, **flags},
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                    ))
    specs.append(CompileSpec(
        name=f"attention_dropout_mask[BM={_MASK_BLOCKS[0]},BN={_MASK_BLOCKS[1]}]",
        fn=_dropout_mask_kernel,
        signature=kernel_signature(_dropout_mask_kernel, {"MASK": "*i8", "dropout_p": "fp32"}),
        constexprs={"BLOCK_M": _MASK_BLOCKS[0], "BLOCK_N": _MASK_BLOCKS[1]}, num_warps=4, num_stages=1,
    ))
    return specs
