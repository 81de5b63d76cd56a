"""LayerNorm over the last dimension as Triton kernels, forward and backward.

Layers, top to bottom: the private Triton kernels (every argument commented with its
shape), the host launchers ``layer_norm_forward`` / ``layer_norm_backward`` that check
limits and pick block sizes, and ``sm90_compile_specs`` for the H100 compile check.
The NumPy twin these answer to is ``kernels/layernorm_ref.py`` (same names, same math).

Kernels compute in fp32 and store in the input dtype; mean and rstd are saved in fp32.
The backward writes dweight/dbias as per-program partial sums and reduces them with a
second small kernel (``kernels.common.sum_partials``): no atomics,
so the result is deterministic.

Tensors live on a CUDA device, or on the CPU when ``TRITON_INTERPRET=1`` (tests).
"""

import torch
import triton
import triton.language as tl

from kernels.common import ROW_MIN_BLOCK, check_dtype, check_kernel_device, row_config, row_programs, sum_partials
from kernels.compile_spec import CompileSpec, kernel_signature

MAX_N = 16384  # one program holds whole rows: BLOCK_N = next_pow2(N) <= MAX_N


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N) input rows, contiguous
    W,  # (N,) weight (gamma)
    B,  # (N,) bias (beta)
    Y,  # (M, N) output, dtype of X
    MEAN,  # (M,) fp32 row means, saved for backward
    RSTD,  # (M,) fp32 row 1/sqrt(var + eps), saved for backward
    M,  # i32 number of rows
    N,  # i32 row length (feature size)
    eps,  # fp32 added to the variance
    BLOCK_N: tl.constexpr,  # power of two >= N
    ROWS: tl.constexpr,  # rows per program
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]  # (ROWS, BLOCK_N)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]  # int64: M * N may pass 2**31

    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)  # (ROWS, BLOCK_N)
    mean = tl.sum(x, axis=1) / N  # (ROWS,)
    # NOTE: the padded tail must not count in the variance: zero it after centering.
    xc = tl.where(mask, x - mean[:, None], 0.0)  # (ROWS, BLOCK_N)
    var = tl.sum(xc * xc, axis=1) / N  # (ROWS,) biased, as torch
    rstd = 1.0 / tl.sqrt(var + eps)  # (ROWS,)

    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]  # (ROWS, BLOCK_N)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


# Backward, per row, with xhat = (x - mean) * rstd and y = xhat * w + b:
#
#   g       = dy * w
#   dx      = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat))
#   dweight = sum over rows of dy * xhat
#   dbias   = sum over rows of dy
#
# (dxhat = g; xhat depends on x directly and through mean and rstd, which gives the two
# subtracted means.) Each program walks a contiguous group of `tiles_per_program` tiles
# of ROWS rows, writes dx, and keeps fp32 running sums of dweight and dbias that it
# stores as one row of PARTIAL; `_sum_partials_kernel` then adds the rows up.
@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (M, N) upstream gradient, contiguous
    X,  # (M, N) forward input, contiguous
    W,  # (N,) weight
    MEAN,  # (M,) fp32 saved row means
    RSTD,  # (M,) fp32 saved row rstd
    DX,  # (M, N) output gradient, dtype of X
    PARTIAL,  # (num_programs, 2 * N) fp32: [:, :N] dweight partials, [:, N:] dbias partials
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
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t in range(0, tiles_per_program):
        rows = (pid * tiles_per_program + t) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]  # (ROWS, BLOCK_N)
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)  # (ROWS,)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)  # (ROWS,)
        # NOTE: masked entries get xhat = 0 and dy = 0, so they add nothing to the sums.
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)  # (ROWS, BLOCK_N)
        g = dy * w[None, :]  # (ROWS, BLOCK_N)
        mean_gx = tl.sum(g * xhat, axis=1) / N  # (ROWS,)
        mean_g = tl.sum(g, axis=1) / N  # (ROWS,)
        dx = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * xhat, axis=0)
        db_acc += tl.sum(dy, axis=0)
    out = PARTIAL + pid.to(tl.int64) * 2 * N + cols
    tl.store(out, dw_acc, mask=col_mask)
    tl.store(out + N, db_acc, mask=col_mask)


# ----------------------------------------------------------------------------- launchers


def _check_feature_size(name: str, n: int) -> None:
    if n < 1 or n > MAX_N:
        raise ValueError(f"{name}: feature size N={n} must be in [1, {MAX_N}] (whole rows live in one program)")


def layer_norm_forward(x, weight, bias, eps=1e-5):
    """x (..., N); weight, bias (N,) -> y (..., N) in x's dtype, mean (...) and rstd (...) in fp32.

    A non-contiguous x is copied to a contiguous one first.
    """
    name = "layer_norm_forward"
    if x.ndim < 1:
        raise ValueError(f"{name}: x must have at least one dimension, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    for arg, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (n,):
            raise ValueError(f"{name}: {arg} has shape {tuple(t.shape)}, expected ({n},) to match x {tuple(x.shape)}")
    for arg, t in (("x", x), ("weight", weight), ("bias", bias)):
        check_dtype(name, arg, t)
    check_kernel_device(name, x, weight, bias)
    _check_feature_size(name, n)

    x2 = x.contiguous().view(-1, n)  # (M, N)
    m = x2.shape[0]
    y = torch.empty_like(x2)
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    if m > 0:
        block_n, rows, num_warps = row_config(n, m, x.is_cuda)
        _layer_norm_fwd_kernel[(triton.cdiv(m, rows),)](
            x2,
            weight.contiguous(),
            bias.contiguous(),
            y,
            mean,
            rstd,
            m,
            n,
            eps,
            BLOCK_N=block_n,
            ROWS=rows,
            num_warps=num_warps,
        )
    lead = x.shape[:-1]
    return y.view(x.shape), mean.view(lead), rstd.view(lead)


def layer_norm_backward(dy, x, weight, mean, rstd):
    """dy, x (..., N); weight (N,); mean, rstd (...) -> dx (..., N), dweight (N,), dbias (N,).

    dx comes in x's dtype, dweight and dbias in weight's dtype.
    """
    name = "layer_norm_backward"
    if x.ndim < 1:
        raise ValueError(f"{name}: x must have at least one dimension, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if dy.shape != x.shape:
        raise ValueError(f"{name}: dy has shape {tuple(dy.shape)}, expected x's shape {tuple(x.shape)}")
    if tuple(weight.shape) != (n,):
        raise ValueError(f"{name}: weight has shape {tuple(weight.shape)}, expected ({n},) to match x {tuple(x.shape)}")
    for arg, t in (("mean", mean), ("rstd", rstd)):
        if t.shape != x.shape[:-1]:
            raise ValueError(
                f"{name}: {arg} has shape {tuple(t.shape)}, expected {tuple(x.shape[:-1])} for x {tuple(x.shape)}"
            )
    for arg, t in (("dy", dy), ("x", x), ("weight", weight), ("mean", mean), ("rstd", rstd)):
        check_dtype(name, arg, t)
    check_kernel_device(name, dy, x, weight, mean, rstd)
    _check_feature_size(name, n)

    x2 = x.contiguous().view(-1, n)  # (M, N)
    dy2 = dy.contiguous().view(-1, n)  # (M, N)
    m = x2.shape[0]
    dx = torch.empty_like(x2)
    block_n, rows, num_warps = row_config(n, m, x.is_cuda)
    n_programs, tiles_per_program = row_programs(m, rows, x.device)
    partials = torch.zeros(n_programs, 2 * n, device=x.device, dtype=torch.float32)  # (P, 2N)
    if m > 0:
        _layer_norm_bwd_kernel[(n_programs,)](
            dy2,
            x2,
            weight.contiguous(),
            mean.contiguous().view(-1).float(),
            rstd.contiguous().view(-1).float(),
            dx,
            partials,
            m,
            n,
            tiles_per_program,
            BLOCK_N=block_n,
            ROWS=rows,
            num_warps=num_warps,
        )
    dwdb = sum_partials(partials, weight.dtype)  # (2N,)
    return dx.view(x.shape), dwdb[:n], dwdb[n:]


# ----------------------------------------------------------------------------- compile check


def sm90_compile_specs() -> list[CompileSpec]:
    """Every (kernel, configuration) the launchers pick on a GPU, for the sm_90 compile check.

    Row kernels are listed for bf16 activations with fp32 parameters at every BLOCK_N,
    and for fp32 at the largest BLOCK_N (the most registers).
    """
    specs = []
    block_ns = [1 << k for k in range(ROW_MIN_BLOCK.bit_length() - 1, MAX_N.bit_length())]
    variants = [("bf16", b) for b in block_ns] + [("fp32", MAX_N)]
    for act, block_n in variants:
        _, rows, num_warps = row_config(block_n, 1, on_cuda=True)
        consts = {"BLOCK_N": block_n, "ROWS": rows}
        tag = f"[{act},BLOCK_N={block_n},ROWS={rows},warps={num_warps}]"
        fwd_sig = kernel_signature(
            _layer_norm_fwd_kernel, {"X": f"*{act}", "W": "*fp32", "B": "*fp32", "Y": f"*{act}",
                                     "MEAN": "*fp32", "RSTD": "*fp32", "eps": "fp32"}
        )
        bwd_sig = kernel_signature(
            _layer_norm_bwd_kernel, {"DY": f"*{act}", "X": f"*{act}", "W": "*fp32", "MEAN": "*fp32",
                                     "RSTD": "*fp32", "DX": f"*{act}", "PARTIAL": "*fp32"}
        )
        specs.append(CompileSpec(f"layer_norm_fwd{tag}", _layer_norm_fwd_kernel, fwd_sig, consts, num_warps))
        specs.append(CompileSpec(f"layer_norm_bwd{tag}", _layer_norm_bwd_kernel, bwd_sig, consts, num_warps))
    return specs
