"""What every Triton kernel file shares: the device check, the supported dtypes, the
program budget of row reductions, and the partial-sum reduction that turns per-program
fp32 partials into one deterministic result (no atomics).

A kernel file imports its helpers from here, never from another kernel file.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from kernels.compile_spec import CompileSpec, kernel_signature

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRET_TILE = 65536  # interpreter cost grows with the number of programs, not their size
TL_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def check_kernel_device(name: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error unless all tensors share one device a Triton kernel can use."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{name}: tensors must be on one device, got {sorted(str(d) for d in devices)}")
    device = tensors[0].device
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{name}: CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
    if device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"{name}: unsupported device {device}; use CUDA (or CPU under TRITON_INTERPRET=1)")


def check_dtype(name: str, arg: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: {arg} has dtype {t.dtype}; supported: float32, float16, bfloat16")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs_budget(device: torch.device) -> int:
    """How many programs a row reduction with per-program partial sums should use on this device."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2  # interpreter: programs run one after another, fewer partials is cheaper


@triton.jit
def _sum_partials_kernel(
    P,  # (n_partials, n_cols) fp32 partial sums, contiguous
    OUT,  # (n_cols,) column sums, in OUT's dtype
    n_partials,  # i32 rows of P
    n_cols,  # i32 columns of P
    BLOCK_P: tl.constexpr,  # partial rows added per loop step
    BLOCK_C: tl.constexpr,  # columns per program
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    col_mask = cols < n_cols
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, n_partials, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
        mask = (rows < n_partials)[:, None] & col_mask[None, :]
        acc += tl.load(P + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=col_mask)


def _partials_config(n_partials: int, n_cols: int, on_cuda: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) for `_sum_partials_kernel`."""
    if on_cuda:
        return 32, 128, 4
    return triton.next_power_of_2(n_partials), min(triton.next_power_of_2(n_cols), INTERPRET_TILE), 4


def sum_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Column sums of a contiguous fp32 (n_partials, n_cols) tensor, returned as (n_cols,) in dtype."""
    n_partials, n_cols = partials.shape
    out = torch.empty(n_cols, device=partials.device, dtype=dtype)
    block_p, block_c, num_warps = _partials_config(n_partials, n_cols, partials.is_cuda)
    grid = (triton.cdiv(n_cols, block_c),)
    _sum_partials_kernel[grid](partials, out, n_partials, n_cols, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)
    return out


ROW_MIN_BLOCK = 16  # row kernels pad shorter rows to 16: fewer configurations to compile
ROW_CUDA_TILE = 2048  # row kernels on the GPU: elements per program, ROWS = ROW_CUDA_TILE // BLOCK_N


def row_config(n: int, m: int, on_cuda: bool) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) for a kernel that holds whole rows of length n, over m rows."""
    block_n = max(ROW_MIN_BLOCK, triton.next_power_of_2(n))
    rows = max(1, (ROW_CUDA_TILE if on_cuda else INTERPRET_TILE) // block_n)
    if not on_cuda:
        rows = min(rows, triton.next_power_of_2(max(m, 1)))
    num_warps = min(16, max(4, block_n * rows // 256))
    return block_n, rows, num_warps


def row_programs(m: int, rows: int, device: torch.device) -> tuple[int, int]:
    """(programs, tiles per program) for a row reduction that walks m rows in tiles of ``rows``
    and writes one row of partial sums per program (see ``sum_partials``)."""
    n_tiles = triton.cdiv(m, rows)
    tiles_per_program = max(1, triton.cdiv(n_tiles, max(1, min(n_tiles, num_programs_budget(device)))))
    return max(1, triton.cdiv(n_tiles, tiles_per_program)), tiles_per_program


def sm90_compile_specs() -> list[CompileSpec]:
    """The partial-sum reduction as the launchers pick it on a GPU, into fp32 and bf16 outputs."""
    block_p, block_c, num_warps = _partials_config(1, 1, on_cuda=True)
    consts = {"BLOCK_P": block_p, "BLOCK_C": block_c}
    return [
        CompileSpec(
            f"sum_partials[{out},BLOCK_P={block_p},BLOCK_C={block_c}]",
            _sum_partials_kernel,
            kernel_signature(_sum_partials_kernel, {"P": "*fp32", "OUT": f"*{out}"}),
            consts,
            num_warps,
        )
        for out in ("fp32", "bf16")
    ]
