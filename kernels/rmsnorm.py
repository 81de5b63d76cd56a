"""RMSNorm over the last dimension as Triton kernels, forward and backward.

Layers, top to bottom: the private Triton kernels, the host launchers ``rms_norm_forward``
/ ``rms_norm_backward`` that check limits and pick block sizes, and ``sm90_compile_specs``.
The NumPy twin is ``kernels/rmsnorm_ref.py`` (same names, same math). Any leading shape
works, so the same kernels normalise a (B, T, E) residual stream and Qwen3's per-head
q/k of shape (B, T, H, D) with a (D,) weight.

Kernels compute in fp32 and store in the input dtype; rstd is saved in fp32. dweight is
reduced through per-program fp32 partials and ``kernels.common.sum_partials``: no atomics.
"""

import torch
import triton
import triton.language as tl

from kernels.common import ROW_MIN_BLOCK, check_dtype, check_kernel_device, row_config, row_programs, sum_partials
from kernels.compile_spec import CompileSpec, kernel_signature

MAX_N = 16384  # one program holds whole rows: BLOCK_N = next_pow2(N) <= MAX_N


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _rms_norm_fwd_kernel(
    X,  # (M, N) input rows, contiguous
    W,  # (N,) weight
    Y,  # (M, N) output, dtype of X
    RSTD,  # (M,) fp32 out: 1 / sqrt(mean(x**2) + eps), saved for backward
    M,  # i32 number of rows
    N,  # i32 row length
    eps,  # fp32 added to the mean square
    BLOCK_N: tl.constexpr,  # power of two >= N
    ROWS: tl.constexpr,  # rows per program
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]  # (ROWS, BLOCK_N)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]  # int64: M * N may pass 2**31
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)  # (ROWS, BLOCK_N); padding is 0
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)  # (ROWS,)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
    tl.store(Y + offs, (x * rstd[:, None] * w[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


# Backward, per row, with xhat = x * rstd and g = dy * w:
#   dx = rstd * (g - xhat * mean_j(g * xhat)),   dweight = sum over rows of dy * xhat.
# Each program walks `tiles_per_program` tiles of ROWS rows, writes dx and keeps an fp32
# running dweight that it stores as its row of PARTIAL.
@triton.jit
def _rms_norm_bwd_kernel(
    DY,  # (M, N) upstream gradient, contiguous
    X,  # (M, N) forward input, contiguous
    W,  # (N,) weight
    RSTD,  # (M,) fp32 saved rstd
    DX,  # (M, N) out, dtype of X
    PARTIAL,  # (num_programs, N) fp32 out: dweight partials
    M,  # i32 number of rows
    N,  # i32 row length
    tiles_per_program,  # i32 tiles of ROWS rows handled by each program
    BLOCK_N: tl.constexpr,  # power of two >= N
    ROWS: tl.constexpr,  # rows per tile
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t in range(0, tiles_per_program):
        rows = (pid * tiles_per_program + t) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]  # (ROWS, BLOCK_N)
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)  # (ROWS,)
        xhat = x * rstd[:, None]  # (ROWS, BLOCK_N); masked entries are 0
        g = dy * w[None, :]
        mean_gx = tl.sum(g * xhat, axis=1) / N  # (ROWS,)
        dx = (g - xhat * mean_gx[:, None]) * rstd[:, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * xhat, axis=0)
    tl.store(PARTIAL + pid.to(tl.int64) * N + cols, dw_acc, mask=col_mask)


# ----------------------------------------------------------------------------- launchers


def _check(name: str, x, weight, **others) -> int:
    """Shapes, dtypes and devices of an RMSNorm call; returns N."""
    if x.ndim < 1:
        raise ValueError(f"{name}: x must have at least one dimension, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if tuple(weight.shape) != (n,):
        raise ValueError(f"{name}: weight has shape {tuple(weight.shape)}, expected ({n},) to match x {tuple(x.shape)}")
    if not 1 <= n <= MAX_N:
        raise ValueError(f"{name}: feature size N={n} must be in [1, {MAX_N}] (whole rows live in one program)")
    for arg, t in (("x", x), ("weight", weight), *others.items()):
        check_dtype(name, arg, t)
    check_kernel_device(name, x, weight, *others.values())
    return n


def rms_norm_forward(x, weight, eps=1e-6):
    """x (..., N); weight (N,) -> y (..., N) in x's dtype and rstd (...) in fp32.

    A non-contiguous x is copied to a contiguous one first.
    """
    n = _check("rms_norm_forward", x, weight)
    x2 = x.contiguous().view(-1, n)  # (M, N)
    m = x2.shape[0]
    y = torch.empty_like(x2)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    if m > 0:
        block_n, rows, num_warps = row_config(n, m, x.is_cuda)
        _rms_norm_fwd_kernel[(triton.cdiv(m, rows),)](
            x2, weight.contiguous(), y, rstd, m, n, eps, BLOCK_N=block_n, ROWS=rows, num_warps=num_warps
        )
    return y.view(x.shape), rstd.view(x.shape[:-1])


def rms_norm_backward(dy, x, weight, rstd):
    """dy, x (..., N); weight (N,); rstd (...) -> dx (..., N) in x's dtype, dweight (N,) in weight's."""
    name = "rms_norm_backward"
    n = _check(name, x, weight, dy=dy, rstd=rstd)
    if dy.shape != x.shape:
        raise ValueError(f"{name}: dy has shape {tuple(dy.shape)}, expected x's shape {tuple(x.shape)}")
    if rstd.shape != x.shape[:-1]:
        raise ValueError(f"{name}: rstd has shape {tuple(rstd.shape)}, expected {tuple(x.shape[:-1])}")
    x2 = x.contiguous().view(-1, n)  # (M, N)
    m = x2.shape[0]
    dx = torch.empty_like(x2)
    block_n, rows, num_warps = row_config(n, m, x.is_cuda)
    n_programs, tiles_per_program = row_programs(m, rows, x.device)
    partials = torch.zeros(n_programs, n, device=x.device, dtype=torch.float32)  # (P, N)
    if m > 0:
        _rms_norm_bwd_kernel[(n_programs,)](
            dy.contiguous().view(-1, n), x2, weight.contiguous(), rstd.contiguous().view(-1).float(), dx, partials,
            m, n, tiles_per_program, BLOCK_N=block_n, ROWS=rows, num_warps=num_warps,
        )
    return dx.view(x.shape), sum_partials(partials, weight.dtype)


# ----------------------------------------------------------------------------- compile check


def sm90_compile_specs() -> list[CompileSpec]:
    """Both kernels at every BLOCK_N for bf16 activations with an fp32 weight, and fp32 at the largest."""
    specs = []
    block_ns = [1 << k for k in range(ROW_MIN_BLOCK.bit_length() - 1, MAX_N.bit_length())]
    for act, block_n in [("bf16", b) for b in block_ns] + [("fp32", MAX_N)]:
        _, rows, num_warps = row_config(block_n, 1, on_cuda=True)
        consts = {"BLOCK_N": block_n, "ROWS": rows}
        tag = f"[{act},BLOCK_N={block_n},ROWS={rows},warps={num_warps}]"
        fwd = kernel_signature(_rms_norm_fwd_kernel, {"X": f"*{act}", "W": "*fp32", "Y": f"*{act}",
                                                      "RSTD": "*fp32", "eps": "fp32"})
        bwd = kernel_signature(_rms_norm_bwd_kernel, {"DY": f"*{act}", "X": f"*{act}", "W": "*fp32",
                                                      "RSTD": "*fp32", "DX": f"*{act}", "PARTIAL": "*fp32"})
        specs.append(CompileSpec(f"rms_norm_fwd{tag}", _rms_norm_fwd_kernel, fwd, consts, num_warps))
        specs.append(CompileSpec(f"rms_norm_bwd{tag}", _rms_norm_bwd_kernel, bwd, consts, num_warps))
    return specs
