"""Softmax cross-entropy over vocabulary rows as Triton kernels, forward and backward.

Layers, top to bottom: the private Triton kernels (every argument commented with its
shape), the host launchers ``cross_entropy_forward`` / ``cross_entropy_backward`` that
check limits and pick block sizes (and ``cross_entropy_loss_and_grad``, the two in a
row), and ``sm90_compile_specs`` for the H100 compile check.
The NumPy twin these answer to is ``kernels/cross_entropy_ref.py`` (same names, same
math, the formulas are in its docstring).

The forward streams each row in blocks of BLOCK_V with an online log-sum-exp (a running
max and a running sum rescaled whenever the max grows), so any vocabulary size works
and a row is read once; it keeps (row_max, log_sum) for the backward instead of the
logits' softmax. The backward reads the row once more and writes the gradient, over the
logits themselves when the caller allows it (``inplace=True``): every element is read and
written by the same program, in the same block step, so the aliasing is safe.

Logits may be fp32, fp16 or bf16; the math is fp32 and nll, row_max, log_sum are fp32.
Tensors live on a CUDA device, or on the CPU when ``TRITON_INTERPRET=1`` (tests).
"""

import torch
import triton
import triton.language as tl

from kernels.common import INTERPRET_TILE, TL_TYPE, check_dtype, check_kernel_device
from kernels.compile_spec import CompileSpec, kernel_signature

CUDA_CONFIG = (1, 4096, 8)  # (ROWS, BLOCK_V, num_warps) on the GPU: one row per program, 16 lanes a thread
MAX_ROWS = 2**31 - 1  # rows and vocabulary are i32 kernel arguments


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _cross_entropy_fwd_kernel(
    LOGITS,  # (N, V) logits, contiguous
    TARGETS,  # (N,) int64 target class of each row, or ignore_index
    NLL,  # (N,) fp32 out: negative log-likelihood of each row, 0 on ignored rows
    ROW_MAX,  # (N,) fp32 out: max logit of each row
    LOG_SUM,  # (N,) fp32 out: log sum_j exp(x_j - row_max) of each row
    N,  # i32 number of rows
    V,  # i32 row length (vocabulary size)
    ignore_index,  # i32 target value of the rows to skip
    ROWS: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # columns per loop step
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    row_mask = rows < N
    row_base = rows.to(tl.int64) * V  # (ROWS,) int64: N * V may pass 2**31
    m = tl.zeros([ROWS], dtype=tl.float32) - float("inf")  # running max
    s = tl.zeros([ROWS], dtype=tl.float32)  # running sum of exp(x - m)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
        col_mask = cols < V
        mask = row_mask[:, None] & col_mask[None, :]  # (ROWS, BLOCK_V)
        x = tl.load(LOGITS + row_base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # NOTE: padded columns are -inf (they add exp(-inf) = 0) but padded rows read 0, so
        # every row's max is finite after the first block and m - m_new is never -inf - -inf.
        x = tl.where(col_mask[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))  # (ROWS,)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    log_sum = tl.log(s)  # (ROWS,)
    t = tl.load(TARGETS + rows, mask=row_mask, other=0)  # (ROWS,)
    valid = row_mask & (t != ignore_index)
    x_t = tl.load(LOGITS + row_base + t, mask=valid, other=0.0).to(tl.float32)  # (ROWS,) target logits
    # NOTE: (m - x_t) + log_sum, not lse - x_t: both terms of lse - x_t can be ~1e4 in size.
    nll = tl.where(valid, (m - x_t) + log_sum, 0.0)
    tl.store(NLL + rows, nll, mask=row_mask)
    tl.store(ROW_MAX + rows, m, mask=row_mask)
    tl.store(LOG_SUM + rows, log_sum, mask=row_mask)


# Backward, per row i with target t and upstream gradient dnll_i (0 on ignored rows):
#
#   p_ij       = exp((x_ij - row_max_i) - log_sum_i)           softmax, from the saved stats
#   dlogits_ij = dnll_i * (p_ij - [j == t])
#
# DLOGITS may be LOGITS: each element is loaded, then stored, by the same program.
@triton.jit
def _cross_entropy_bwd_kernel(
    LOGITS,  # (N, V) logits, contiguous
    TARGETS,  # (N,) int64 target class of each row, or ignore_index
    ROW_MAX,  # (N,) fp32 saved max logit of each row
    LOG_SUM,  # (N,) fp32 saved log sum_j exp(x_j - row_max) of each row
    DNLL,  # (N,) fp32 upstream gradient of each row's nll
    DLOGITS,  # (N, V) out, dtype of LOGITS; may alias LOGITS
    N,  # i32 number of rows
    V,  # i32 row length (vocabulary size)
    ignore_index,  # i32 target value of the rows to skip
    ROWS: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # columns per loop step
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    row_mask = rows < N
    row_base = rows.to(tl.int64) * V  # (ROWS,)
    t = tl.load(TARGETS + rows, mask=row_mask, other=0)  # (ROWS,)
    valid = row_mask & (t != ignore_index)
    m = tl.load(ROW_MAX + rows, mask=row_mask, other=0.0)  # (ROWS,)
    log_sum = tl.load(LOG_SUM + rows, mask=row_mask, other=0.0)  # (ROWS,)
    scale = tl.where(valid, tl.load(DNLL + rows, mask=row_mask, other=0.0), 0.0)  # (ROWS,)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
        mask = row_mask[:, None] & (cols < V)[None, :]  # (ROWS, BLOCK_V)
        offs = row_base[:, None] + cols[None, :]
        # NOTE: masked entries read -inf so p = 0 there (0 would overflow exp for rows of very negative logits).
        x = tl.load(LOGITS + offs, mask=mask, other=float("-inf")).to(tl.float32)
        p = tl.exp((x - m[:, None]) - log_sum[:, None])  # (ROWS, BLOCK_V)
        g = tl.where(cols[None, :] == t[:, None], p - 1.0, p) * scale[:, None]
        tl.store(DLOGITS + offs, g.to(DLOGITS.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _config(n: int, v: int, on_cuda: bool) -> tuple[int, int, int]:
    """(ROWS, BLOCK_V, num_warps) for rows of length v."""
    if on_cuda:
        return CUDA_CONFIG
    block_v = min(triton.next_power_of_2(v), INTERPRET_TILE)
    return min(INTERPRET_TILE // block_v, triton.next_power_of_2(max(n, 1))), block_v, 4


def _check(name: str, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> None:
    if logits.ndim != 2:
        raise ValueError(f"{name}: logits must be (N, C), got shape {tuple(logits.shape)}")
    n, v = logits.shape
    if tuple(targets.shape) != (n,):
        raise ValueError(f"{name}: targets must be (N,) = ({n},) to match logits {tuple(logits.shape)}, "
                         f"got shape {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"{name}: targets must be integers, got {targets.dtype}")
    check_dtype(name, "logits", logits)
    check_kernel_device(name, logits, targets)
    if n > MAX_ROWS or v > MAX_ROWS or v < 1:
        raise ValueError(f"{name}: logits {tuple(logits.shape)} need 1 <= C and N, C <= {MAX_ROWS}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
    if bool(bad.any()):
        raise ValueError(f"cross_entropy: target {int(targets[bad][0])} out of range for {v} classes "
                         f"(use ignore_index={ignore_index} for positions to skip)")


def cross_entropy_forward(logits, targets, ignore_index=-100):
    """logits (N, C), targets (N,) int -> nll (N,), row_max (N,), log_sum (N,), all fp32.

    nll is 0 on rows whose target is ``ignore_index``; the mean is the caller's."""
    name = "cross_entropy_forward"
    _check(name, logits, targets, ignore_index)
    n, v = logits.shape
    x = logits.contiguous()
    t = targets.to(torch.int64).contiguous()
    nll, row_max, log_sum = (torch.empty(n, device=x.device, dtype=torch.float32) for _ in range(3))
    if n > 0:
        rows, block_v, num_warps = _config(n, v, x.is_cuda)
        _cross_entropy_fwd_kernel[(triton.cdiv(n, rows),)](
            x, t, nll, row_max, log_sum, n, v, ignore_index, ROWS=rows, BLOCK_V=block_v, num_warps=num_warps
        )
    return nll, row_max, log_sum


def cross_entropy_backward(dnll, logits, targets, row_max, log_sum, ignore_index=-100, inplace=False):
    """dnll (N,) upstream gradient of each row's nll -> dlogits (N, C) in logits' dtype.

    row_max, log_sum are what cross_entropy_forward returned. ``inplace=True`` writes the
    gradient over a contiguous ``logits`` (and returns it) for callers that are done with them."""
    name = "cross_entropy_backward"
    _check(name, logits, targets, ignore_index)
    n, v = logits.shape
    for arg, t in (("dnll", dnll), ("row_max", row_max), ("log_sum", log_sum)):
        if tuple(t.shape) != (n,):
            raise ValueError(f"{name}: {arg} has shape {tuple(t.shape)}, expected ({n},) "
                             f"for logits {tuple(logits.shape)}")
    check_kernel_device(name, logits, dnll, row_max, log_sum)
    x = logits.contiguous()
    dlogits = x if inplace else torch.empty_like(x)
    if n > 0:
        rows, block_v, num_warps = _config(n, v, x.is_cuda)
        stats = (s.to(torch.float32).contiguous() for s in (row_max, log_sum, dnll))
        _cross_entropy_bwd_kernel[(triton.cdiv(n, rows),)](
            x, targets.to(torch.int64).contiguous(), *stats, dlogits, n, v, ignore_index,
            ROWS=rows, BLOCK_V=block_v, num_warps=num_warps,
        )
    return dlogits


def cross_entropy_loss_and_grad(logits, targets, dnll, ignore_index=-100):
    """nll (N,) fp32, with dlogits = dnll · (softmax − onehot) written over the contiguous
    ``logits``: the two kernels above, for a caller that knows dnll before the loss."""
    if not logits.is_contiguous():
        raise ValueError("cross_entropy_loss_and_grad: logits must be contiguous (their gradient is written there)")
    nll, row_max, log_sum = cross_entropy_forward(logits, targets, ignore_index)
    cross_entropy_backward(dnll, logits, targets, row_max, log_sum, ignore_index, inplace=True)
    return nll


# ----------------------------------------------------------------------------- compile check


def sm90_compile_specs() -> list[CompileSpec]:
    """Both kernels at the GPU configuration, for each logits dtype."""
    rows, block_v, num_warps = CUDA_CONFIG
    consts = {"ROWS": rows, "BLOCK_V": block_v}
    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = TL_TYPE[dtype]
        tag = f"[{t},ROWS={rows},BLOCK_V={block_v}]"
        fwd = {"LOGITS": f"*{t}", "TARGETS": "*i64", "NLL": "*fp32", "ROW_MAX": "*fp32", "LOG_SUM": "*fp32"}
        bwd = {"LOGITS": f"*{t}", "TARGETS": "*i64", "ROW_MAX": "*fp32", "LOG_SUM": "*fp32", "DNLL": "*fp32",
               "DLOGITS": f"*{t}"}
        for kname, fn, types in (("cross_entropy_fwd", _cross_entropy_fwd_kernel, fwd),
                                 ("cross_entropy_bwd", _cross_entropy_bwd_kernel, bwd)):
            specs.append(CompileSpec(f"{kname}{tag}", fn, kernel_signature(fn, types), consts, num_warps))
    return specs
