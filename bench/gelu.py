"""Benchmark GELU and fused bias + GELU: ``python -m bench.gelu [--quick]``.

On a CUDA GPU: our Triton kernels (``kernels/gelu.py``) against torch's
``F.gelu(approximate="tanh")`` (and ``aten.gelu_backward``; for bias + GELU torch adds
the bias in a separate kernel and sums dbias with ``.sum(0)``), forward and backward,
bf16 and fp32, on (rows M, features N) activations. Without a GPU: the NumPy reference
against torch on the CPU (one thread each), float32, at small shapes.

Bytes, the minimum any implementation must move (s = element size):

    gelu      forward: read x, write y          2·M·N·s
              backward: read x, dy, write dx    3·M·N·s
    bias_gelu forward: 2·M·N·s + read bias N·s
              backward: 3·M·N·s + read bias, write dbias 2·N·s

"% of copy" compares with a plain device copy of an M·N·s tensor measured in the same run.
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import bench_main, compare, copy_bandwidth_gbs

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SHAPES = [(16384, 768), (16384, 1024), (8192, 4096)]
QUICK_SHAPES = [(16384, 768), (8192, 4096)]
CPU_SHAPES = [(1024, 768), (256, 4096)]


def gelu_bytes(m: int, n: int, s: int, bias: bool) -> dict[str, float]:
    return {"fwd": 2 * m * n * s + (n * s if bias else 0), "bwd": 3 * m * n * s + (2 * n * s if bias else 0)}


def torch_providers(x, b, dy) -> tuple[dict, dict]:
    """(gelu, bias_gelu) providers: mode -> fn, timing torch's kernels without autograd bookkeeping."""
    h = x + b  # what autograd saves for gelu(x + b)

    def bias_bwd():
        dx = torch.ops.aten.gelu_backward(dy, h, approximate="tanh")
        return dx, dx.sum(0)

    gelu = {
        "fwd": lambda: F.gelu(x, approximate="tanh"),
        "bwd": lambda: torch.ops.aten.gelu_backward(dy, x, approximate="tanh"),
    }
    bias_gelu = {"fwd": lambda: F.gelu(x + b, approximate="tanh"), "bwd": bias_bwd}
    return gelu, bias_gelu


def module_providers(mod, x, b, dy) -> tuple[dict, dict]:
    """(gelu, bias_gelu) providers from kernels.gelu or kernels.gelu_ref (same API)."""
    gelu = {"fwd": lambda: mod.gelu_forward(x), "bwd": lambda: mod.gelu_backward(dy, x)}
    bias_gelu = {"fwd": lambda: mod.bias_gelu_forward(x, b), "bwd": lambda: mod.bias_gelu_backward(dy, x, b)}
    return gelu, bias_gelu


def _rows(label: str, ours_name: str, ours, theirs, m: int, n: int, s: int, copy: float, quick: bool) -> list[tuple]:
    """Rows for gelu and bias_gelu; ours and theirs are (gelu, bias_gelu) provider pairs."""
    rows = []
    for i, op in enumerate(("gelu", "bias_gelu")):
        providers = {ours_name: ours[i], "torch": theirs[i]}
        rows += compare(f"{op} {label}", providers, gelu_bytes(m, n, s, bias=i == 1), copy, quick)
    return rows


def bench_cuda(args) -> list[tuple]:
    from kernels import gelu as tri

    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for m, n in QUICK_SHAPES if args.quick else SHAPES:
            x = torch.randn(m, n, device="cuda", dtype=dtype)
            dy = torch.randn_like(x)
            b = torch.randn(n, device="cuda", dtype=dtype)
            ours = module_providers(tri, x, b, dy)
            s = x.element_size()
            copy = copy_bandwidth_gbs(m * n * s, "cuda", args.quick)
            rows += _rows(f"{dtype_name} {m}x{n}", "ours", ours, torch_providers(x, b, dy), m, n, s, copy, args.quick)
    return rows


def bench_cpu(args) -> list[tuple]:
    from kernels import gelu_ref as ref

    torch.set_num_threads(1)  # NumPy's elementwise ops use one core: compare like with like
    rng = np.random.default_rng(0)
    rows = []
    for m, n in CPU_SHAPES[:1] if args.quick else CPU_SHAPES:
        x, dy = rng.standard_normal((m, n), dtype=np.float32), rng.standard_normal((m, n), dtype=np.float32)
        b = rng.standard_normal(n, dtype=np.float32)
        ours = module_providers(ref, x, b, dy)
        copy = copy_bandwidth_gbs(m * n * 4, "cpu", args.quick)
        theirs = torch_providers(*(torch.from_numpy(a) for a in (x, b, dy)))
        rows += _rows(f"fp32 {m}x{n}", "numpy-ref", ours, theirs, m, n, 4, copy, args.quick)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="GPU dtypes")


def main(argv: list[str] | None = None) -> None:
    bench_main("gelu", __doc__, "GELU (tanh)", bench_cuda, bench_cpu, add_arguments, argv)


if __name__ == "__main__":
    main()
