"""SwiGLU, ``silu(gate) * up``, as fused elementwise Triton kernels, forward and backward.

One read of gate and up and one write of y (forward); one read of dy, gate, up and one
write of dgate and dup (backward, which recomputes the sigmoid instead of saving it). The
NumPy twin is ``kernels/swiglu_ref.py`` (same names, same math). Kernels compute in fp32
and store in the input dtype.

NOTE: the sigmoid is built from exp(-|g|) <= 1, so nothing overflows for any g.
"""

import torch
import triton
import triton.language as tl

from kernels.common import INTERPRET_TILE, check_dtype, check_kernel_device
from kernels.compile_spec import CompileSpec, kernel_signature

CUDA_BLOCK = 1024  # elements per program on the GPU (8 per thread at 4 warps)
MAX_NUMEL = 2**31 - 1  # the element count is passed as i32


@triton.jit
def _sigmoid(g):
    """sigmoid of fp32 g (any shape), overflow-free."""
    e = tl.exp(-tl.abs(g))
    return tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _swiglu_fwd_kernel(
    GATE,  # (numel,) gate projection, contiguous
    UP,  # (numel,) up projection, contiguous
    Y,  # (numel,) out: silu(gate) * up, dtype of GATE
    numel,  # i32 number of elements
    BLOCK: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = offs < numel
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * _sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


# Backward, elementwise, with s = sigmoid(g):
#   dgate = dy * up * s * (1 + g * (1 - s)),   dup = dy * g * s
@triton.jit
def _swiglu_bwd_kernel(
    DY,  # (numel,) upstream gradient, contiguous
    GATE,  # (numel,) forward gate
    UP,  # (numel,) forward up
    DGATE,  # (numel,) out, dtype of GATE
    DUP,  # (numel,) out, dtype of UP
    numel,  # i32 number of elements
    BLOCK: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = offs < numel
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(g)
    tl.store(DGATE + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (dy * g * s).to(DUP.dtype.element_ty), mask=mask)


def _check(name: str, **tensors: torch.Tensor) -> int:
    """Same shapes, supported dtypes, one device; returns the element count."""
    shapes = {arg: tuple(t.shape) for arg, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{name}: inputs must share one shape, got {shapes}")
    for arg, t in tensors.items():
        check_dtype(name, arg, t)
    check_kernel_device(name, *tensors.values())
    numel = next(iter(tensors.values())).numel()
    if numel > MAX_NUMEL:
        raise ValueError(f"{name}: {numel} elements exceed the kernel limit of {MAX_NUMEL}")
    return numel


def _grid(numel: int, on_cuda: bool) -> tuple[tuple[int], int]:
    block = CUDA_BLOCK if on_cuda else INTERPRET_TILE
    return (triton.cdiv(numel, block),), block


def swiglu_forward(gate, up):
    """gate, up (...) -> silu(gate) * up (...) in gate's dtype."""
    numel = _check("swiglu_forward", gate=gate, up=up)
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    if numel > 0:
        grid, block = _grid(numel, gate.is_cuda)
        _swiglu_fwd_kernel[grid](gate, up, y, numel, BLOCK=block)
    return y


def swiglu_backward(dy, gate, up):
    """dy, gate, up (...) -> dgate (...) in gate's dtype, dup (...) in up's dtype."""
    numel = _check("swiglu_backward", dy=dy, gate=gate, up=up)
    dy, gate, up = dy.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    if numel > 0:
        grid, block = _grid(numel, gate.is_cuda)
        _swiglu_bwd_kernel[grid](dy, gate, up, dgate, dup, numel, BLOCK=block)
    return dgate, dup


def sm90_compile_specs() -> list[CompileSpec]:
    """Both kernels as the launchers pick them on a GPU, for bf16 and fp32."""
    specs = []
    for t in ("bf16", "fp32"):
        consts = {"BLOCK": CUDA_BLOCK}
        fwd = kernel_signature(_swiglu_fwd_kernel, {"GATE": f"*{t}", "UP": f"*{t}", "Y": f"*{t}"})
        bwd = kernel_signature(_swiglu_bwd_kernel, {n: f"*{t}" for n in ("DY", "GATE", "UP", "DGATE", "DUP")})
        specs.append(CompileSpec(f"swiglu_fwd[{t},BLOCK={CUDA_BLOCK}]", _swiglu_fwd_kernel, fwd, consts))
        specs.append(CompileSpec(f"swiglu_bwd[{t},BLOCK={CUDA_BLOCK}]", _swiglu_bwd_kernel, bwd, consts))
    return specs
