"""GELU (tanh approximation, as GPT-2) and fused bias + GELU as Triton kernels.

Layers, top to bottom: the private Triton kernels (every argument commented with its
shape), the host launchers that check limits and pick block sizes, and
``sm90_compile_specs`` for the H100 compile check. The NumPy twin these answer to is
``kernels/gelu_ref.py`` (same names, same math).

    gelu(x) = 0.5 * x * (1 + tanh(u)),   u = c * (x + a * x**3),   c = sqrt(2/pi), a = 0.044715

NOTE: libdevice's tanh is unavailable in the interpreter, so tanh(u) = 2 * sigmoid(2u) - 1.
Substituted in, 0.5 * (1 + tanh(u)) is just s = sigmoid(2u), so

    gelu(x)  = x * s
    gelu'(x) = s + x * 2 * s * (1 - s) * c * (1 + 3 * a * x**2)       (0.5 * (1 - t**2) = 2s(1-s))

which never forms 1 + t or 1 - t**2 and so loses nothing to cancellation. The sigmoid
is built from exp(-|z|), which cannot overflow, and the cubic is evaluated at x clipped
to [-100, 100] (where s is already exactly 0 or 1) so it cannot overflow to inf and
make 0 * inf.

Kernels compute in fp32 and store in the input dtype. dbias is reduced through
per-program fp32 partials and ``kernels.common.sum_partials``: no atomics.
"""

import torch
import triton
import triton.language as tl

from kernels.common import INTERPRET_TILE, check_dtype, check_kernel_device, num_programs_budget, sum_partials
from kernels.compile_spec import CompileSpec, kernel_signature

CUDA_BLOCK = 1024  # elementwise: elements per program on the GPU (8 per thread at 4 warps)
INTERPRET_BLOCK = 65536  # interpreter cost grows with the number of programs, not their size
CUDA_BIAS_TILE = (16, 128)  # bias backward on the GPU: (ROWS, BLOCK_C)
MAX_NUMEL = 2**31 - 1  # the element count is passed as i32


# ----------------------------------------------------------------------------- kernels


# NOTE: the constants are literals on purpose: in the triton 3.9 interpreter a constexpr
# global on the left of `*` (`C * x`) makes a tensor tl.math rejects.
# 1.5957691216057308 = 2 * sqrt(2 / pi); 0.134145 = 3 * 0.044715.
@triton.jit
def _gelu_sigmoid(x):
    """s = sigmoid(2u) = 0.5 * (1 + tanh(u)) for fp32 x (any shape)."""
    xc = tl.minimum(tl.maximum(x, -100.0), 100.0)
    z = 1.5957691216057308 * (xc + 0.044715 * xc * xc * xc)  # 2u
    # NOTE: sigmoid from exp(-|z|) <= 1 only, so nothing overflows for any z.
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _gelu_grad(x):
    """gelu'(x) = s + x * s * (1 - s) * d(2u)/dx for fp32 x (any shape)."""
    s = _gelu_sigmoid(x)
    xc = tl.minimum(tl.maximum(x, -100.0), 100.0)
    d2u = 1.5957691216057308 * (1.0 + 0.134145 * xc * xc)
    return s + x * s * (1.0 - s) * d2u


@triton.jit
def _gelu_fwd_kernel(
    X,  # (numel,) input, contiguous; viewed as (numel // N, N) when HAS_BIAS
    BIAS,  # (N,) bias added before GELU (unused, may alias X, when not HAS_BIAS)
    Y,  # (numel,) output, dtype of X
    numel,  # i32 number of elements
    N,  # i32 last-dimension size (bias length)
    HAS_BIAS: tl.constexpr,  # fuse y = gelu(x + bias)
    BLOCK: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(BIAS + offs % N, mask=mask, other=0.0).to(tl.float32)
    y = x * _gelu_sigmoid(x)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


# Backward, elementwise: dx = dy * gelu'(x), with gelu' from the module docstring.
@triton.jit
def _gelu_bwd_kernel(
    DY,  # (numel,) upstream gradient, contiguous
    X,  # (numel,) forward input, contiguous
    DX,  # (numel,) output gradient, dtype of X
    numel,  # i32 number of elements
    BLOCK: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offs, (dy * _gelu_grad(x)).to(DX.dtype.element_ty), mask=mask)


# Backward of y = gelu(x + bias), with bias broadcast over rows:
#
#   dx    = dy * gelu'(x + bias)
#   dbias = sum over rows of dx          (taken from the fp32 dx, before the cast)
#
# Grid (column blocks, row groups): each program owns BLOCK_C columns and walks
# `tiles_per_program` tiles of ROWS rows, then stores its fp32 column sums as one
# row of PARTIAL; `sum_partials` adds the rows up.
@triton.jit
def _bias_gelu_bwd_kernel(
    DY,  # (M, N) upstream gradient, contiguous
    X,  # (M, N) forward input (before the bias), contiguous
    BIAS,  # (N,) bias
    DX,  # (M, N) output gradient, dtype of X
    PARTIAL,  # (num_row_groups, N) fp32 dbias partial sums
    M,  # i32 number of rows
    N,  # i32 row length
    tiles_per_program,  # i32 tiles of ROWS rows per program
    ROWS: tl.constexpr,  # rows per tile
    BLOCK_C: tl.constexpr,  # columns per program
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    group = tl.program_id(1)
    col_mask = cols < N
    bias = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_C,)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(0, tiles_per_program):
        rows = (group * tiles_per_program + t) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        mask = (rows < M)[:, None] & col_mask[None, :]  # (ROWS, BLOCK_C)
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        dx = dy * _gelu_grad(x)  # masked entries: dy = 0 so dx = 0
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        acc += tl.sum(dx, axis=0)
    tl.store(PARTIAL + group.to(tl.int64) * N + cols, acc, mask=col_mask)


# ----------------------------------------------------------------------------- launchers


def _check(name: str, **tensors: torch.Tensor) -> None:
    for arg, t in tensors.items():
        check_dtype(name, arg, t)
    check_kernel_device(name, *tensors.values())
    numel = next(iter(tensors.values())).numel()
    if numel > MAX_NUMEL:
        raise ValueError(f"{name}: {numel} elements exceed the kernel limit of {MAX_NUMEL}")


def _check_bias(name: str, x: torch.Tensor, bias: torch.Tensor) -> None:
    if x.ndim < 1 or bias.ndim != 1 or bias.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{name}: bias has shape {tuple(bias.shape)}, expected ({x.shape[-1] if x.ndim else '?'},) "
            f"to match the last dimension of x {tuple(x.shape)}"
        )


def _elementwise_block(on_cuda: bool) -> int:
    return CUDA_BLOCK if on_cuda else INTERPRET_BLOCK


def _launch_forward(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x1 = x.contiguous()
    y = torch.empty_like(x1)
    numel = x1.numel()
    if numel > 0:
        block = _elementwise_block(x.is_cuda)
        n = x.shape[-1] if bias is not None else 1
        b = bias.contiguous() if bias is not None else x1
        _gelu_fwd_kernel[(triton.cdiv(numel, block),)](x1, b, y, numel, n, HAS_BIAS=bias is not None, BLOCK=block)
    return y


def gelu_forward(x):
    """x (...) -> gelu(x) (...) in x's dtype."""
    _check("gelu_forward", x=x)
    return _launch_forward(x, None)


def gelu_backward(dy, x):
    """dy, x (...) -> dx (...) in x's dtype."""
    name = "gelu_backward"
    if dy.shape != x.shape:
        raise ValueError(f"{name}: dy has shape {tuple(dy.shape)}, expected x's shape {tuple(x.shape)}")
    _check(name, dy=dy, x=x)
    x1, dy1 = x.contiguous(), dy.contiguous()
    dx = torch.empty_like(x1)
    numel = x1.numel()
    if numel > 0:
        block = _elementwise_block(x.is_cuda)
        _gelu_bwd_kernel[(triton.cdiv(numel, block),)](dy1, x1, dx, numel, BLOCK=block)
    return dx


def bias_gelu_forward(x, bias):
    """x (..., N), bias (N,) -> gelu(x + bias) (..., N) in x's dtype."""
    name = "bias_gelu_forward"
    _check_bias(name, x, bias)
    _check(name, x=x, bias=bias)
    return _launch_forward(x, bias)


def _bias_bwd_config(m: int, n: int, on_cuda: bool) -> tuple[int, int]:
    """(ROWS, BLOCK_C) for `_bias_gelu_bwd_kernel`."""
    if on_cuda:
        return CUDA_BIAS_TILE
    block_c = min(triton.next_power_of_2(n), INTERPRET_TILE)
    return min(INTERPRET_TILE // block_c, triton.next_power_of_2(max(m, 1))), block_c


def bias_gelu_backward(dy, x, bias):
    """dy, x (..., N), bias (N,) -> dx (..., N) in x's dtype, dbias (N,) in bias's dtype."""
    name = "bias_gelu_backward"
    if dy.shape != x.shape:
        raise ValueError(f"{name}: dy has shape {tuple(dy.shape)}, expected x's shape {tuple(x.shape)}")
    _check_bias(name, x, bias)
    _check(name, dy=dy, x=x, bias=bias)
    n = x.shape[-1]
    x2, dy2 = x.contiguous().view(-1, n), dy.contiguous().view(-1, n)  # (M, N)
    m = x2.shape[0]
    dx = torch.empty_like(x2)
    rows, block_c = _bias_bwd_config(m, n, x.is_cuda)
    n_col_blocks = triton.cdiv(n, block_c)
    n_tiles = triton.cdiv(m, rows)
    n_groups = max(1, min(n_tiles, triton.cdiv(num_programs_budget(x.device), n_col_blocks)))
    tiles_per_program = max(1, triton.cdiv(n_tiles, n_groups))
    n_groups = max(1, triton.cdiv(n_tiles, tiles_per_program))
    partials = torch.zeros(n_groups, n, device=x.device, dtype=torch.float32)  # (G, N)
    if m > 0 and n > 0:
        _bias_gelu_bwd_kernel[(n_col_blocks, n_groups)](
            dy2,
            x2,
            bias.contiguous(),
            dx,
            partials,
            m,
            n,
            tiles_per_program,
            ROWS=rows,
            BLOCK_C=block_c,
        )
    return dx.view(x.shape), sum_partials(partials, bias.dtype)


# ----------------------------------------------------------------------------- compile check


def sm90_compile_specs() -> list[CompileSpec]:
    """Every (kernel, configuration) the launchers pick on a GPU, for bf16 and fp32 activations.

    ``sum_partials`` is listed by ``kernels/common.py``, which owns it.
    """
    specs = []
    rows, block_c = CUDA_BIAS_TILE
    for act in ("bf16", "fp32"):
        for has_bias in (False, True):
            sig = kernel_signature(
                _gelu_fwd_kernel, {"X": f"*{act}", "BIAS": "*fp32" if has_bias else f"*{act}", "Y": f"*{act}"}
            )
            consts = {"HAS_BIAS": has_bias, "BLOCK": CUDA_BLOCK}
            name = f"gelu_fwd[{act},HAS_BIAS={has_bias},BLOCK={CUDA_BLOCK}]"
            specs.append(CompileSpec(name, _gelu_fwd_kernel, sig, consts))
        sig = kernel_signature(_gelu_bwd_kernel, {"DY": f"*{act}", "X": f"*{act}", "DX": f"*{act}"})
        specs.append(CompileSpec(f"gelu_bwd[{act},BLOCK={CUDA_BLOCK}]", _gelu_bwd_kernel, sig, {"BLOCK": CUDA_BLOCK}))
        sig = kernel_signature(
            _bias_gelu_bwd_kernel,
            {"DY": f"*{act}", "X": f"*{act}", "BIAS": "*fp32", "DX": f"*{act}", "PARTIAL": "*fp32"},
        )
        consts = {"ROWS": rows, "BLOCK_C": block_c}
        name = f"bias_gelu_bwd[{act},ROWS={rows},BLOCK_C={block_c}]"
        specs.append(CompileSpec(name, _bias_gelu_bwd_kernel, sig, consts))
    return specs
