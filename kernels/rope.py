"""Rotary position embedding (RoPE, "rotate half" layout) as a Triton kernel.

The NumPy twin is ``kernels/rope_ref.py`` (same names, same math; see it for the
formula). One kernel serves both directions: the backward is the inverse rotation.

NOTE: fused with the head split: x may be any strided (B, H, T, D) view with unit stride
on D, such as ``q.reshape(B, T, H, D).transpose(1, 2)``; the kernel reads it in place
and writes a contiguous (B, H, T, D), so the transpose costs no separate copy.

Kernels compute in fp32 and store in x's dtype; cos/sin may be any supported dtype.
"""

import torch
import triton
import triton.language as tl

from kernels.common import INTERPRET_TILE, TL_TYPE, check_dtype, check_kernel_device
from kernels.compile_spec import CompileSpec, kernel_signature

CUDA_TILE = 2048  # elements of one half per program on the GPU: BLOCK_T = CUDA_TILE // BLOCK_H
MAX_HALF = 256  # head dims up to 512


@triton.jit
def _rope_kernel(
    X,  # (B, H, T, D) strided view, unit stride on D
    COS,  # (P, D/2) contiguous, cos(position * inv_freq)
    SIN,  # (P, D/2) contiguous, sin(position * inv_freq)
    Y,  # (B, H, T, D) out, contiguous, dtype of X
    H,  # i32 heads
    T,  # i32 positions
    HALF,  # i32 D / 2
    stride_b,  # i32 X's element strides on B, H, T
    stride_h,
    stride_t,
    offset,  # i32 position of row t = 0
    INVERSE: tl.constexpr,  # rotate by -angle (the backward)
    BLOCK_T: tl.constexpr,  # positions per program
    BLOCK_H: tl.constexpr,  # power of two >= HALF
):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    i = tl.arange(0, BLOCK_H)  # (BLOCK_H,)
    mask = (t < T)[:, None] & (i < HALF)[None, :]  # (BLOCK_T, BLOCK_H)
    x_ptr = X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + t.to(tl.int64)[:, None] * stride_t + i[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_H)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    table = (offset + t).to(tl.int64)[:, None] * HALF + i[None, :]
    c = tl.load(COS + table, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + table, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        s = -s
    y_ptr = Y + (bh.to(tl.int64) * T + t)[:, None] * (2 * HALF) + i[None, :]
    tl.store(y_ptr, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + HALF, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


def _config(half: int, t: int, on_cuda: bool) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_H) for head dim 2 * half over t positions."""
    block_h = triton.next_power_of_2(half)
    if on_cuda:
        return max(1, CUDA_TILE // block_h), block_h
    return min(triton.next_power_of_2(t), max(1, INTERPRET_TILE // block_h)), block_h


def _rotate(name: str, x, cos, sin, offset: int, inverse: bool):
    if x.ndim != 4:
        raise ValueError(f"{name}: x must be (B, H, T, D), got shape {tuple(x.shape)}")
    B, H, T, D = x.shape
    if D % 2 or not 2 <= D <= 2 * MAX_HALF:
        raise ValueError(f"{name}: head dim D={D} must be even and in [2, {2 * MAX_HALF}]")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"{name}: offset must be an int >= 0, got {offset!r}")
    for arg, table in (("cos", cos), ("sin", sin)):
        if table.ndim != 2 or table.shape[1] != D // 2 or table.shape[0] < offset + T:
            raise ValueError(f"{name}: {arg} has shape {tuple(table.shape)}, expected (P >= {offset + T}, {D // 2}) "
                             f"for positions {offset}..{offset + T - 1} of x {tuple(x.shape)}")
    for arg, t in (("x", x), ("cos", cos), ("sin", sin)):
        check_dtype(name, arg, t)
    check_kernel_device(name, x, cos, sin)
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((B, H, T, D), device=x.device, dtype=x.dtype)
    if y.numel() > 0:
        block_t, block_h = _config(D // 2, T, x.is_cuda)
        _rope_kernel[(triton.cdiv(T, block_t), B * H)](
            x, cos.contiguous(), sin.contiguous(), y, H, T, D // 2, x.stride(0), x.stride(1), x.stride(2), offset,
            INVERSE=inverse, BLOCK_T=block_t, BLOCK_H=block_h,
        )
    return y


def rope_forward(x, cos, sin, offset=0):
    """x (B, H, T, D), any strides with unit stride on D; cos, sin (P, D/2), P >= offset + T
    -> x rotated, a contiguous (B, H, T, D) in x's dtype."""
    return _rotate("rope_forward", x, cos, sin, offset, inverse=False)


def rope_backward(dy, cos, sin, offset=0):
    """dy (B, H, T, D) -> dx (B, H, T, D): the inverse rotation, in dy's dtype."""
    return _rotate("rope_backward", dy, cos, sin, offset, inverse=True)


def sm90_compile_specs() -> list[CompileSpec]:
    """Head dims 16 … 512 (BLOCK_H 8 … 256), both directions, bf16 and fp32 activations (fp32 tables)."""
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        t = TL_TYPE[dtype]
        for block_h in (8, 16, 32, 64, 128, 256):
            block_t, _ = _config(block_h, 1, on_cuda=True)
            for inverse in (False, True):
                sig = kernel_signature(_rope_kernel, {"X": f"*{t}", "COS": "*fp32", "SIN": "*fp32", "Y": f"*{t}"})
                consts = {"INVERSE": inverse, "BLOCK_T": block_t, "BLOCK_H": block_h}
                specs.append(CompileSpec(f"rope[{t},BLOCK_H={block_h},BLOCK_T={block_t},inverse={int(inverse)}]",
                                         _rope_kernel, sig, consts))
    return specs
