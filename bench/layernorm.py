"""Benchmark LayerNorm: ``python -m bench.layernorm [--quick]``.

On a CUDA GPU: our Triton kernels (``kernels/layernorm.py``) against torch's own
(``aten.native_layer_norm`` and its backward, what ``F.layer_norm`` runs), forward and
backward, bf16 and fp32, at (rows M, features N) shapes of GPT-2 activations. Without a
GPU: the NumPy reference against torch on the CPU (one thread each), float32, at small shapes.

Bytes, the minimum any implementation must move (s = element size; weight and bias in
the activation dtype; mean and rstd in fp32):

    forward:  read x, write y        2·M·N·s  + read weight, bias 2·N·s + write mean, rstd 2·M·4
    backward: read x, dy, write dx   3·M·N·s  + read mean, rstd 2·M·4 + read weight, write dweight, dbias 3·N·s

"% of copy" compares with a plain device copy of an M·N·s tensor measured in the same run.
"""

import argparse

import numpy as np
import torch

from bench.common import bench_main, compare, copy_bandwidth_gbs

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SHAPES = [(16384, 768), (16384, 1024), (8192, 4096)]
QUICK_SHAPES = [(16384, 768), (8192, 4096)]
CPU_SHAPES = [(1024, 768), (256, 4096)]
EPS = 1e-5


def layer_norm_bytes(m: int, n: int, s: int) -> dict[str, float]:
    return {
        "fwd": 2 * m * n * s + 2 * n * s + 2 * m * 4,
        "bwd": 3 * m * n * s + 2 * m * 4 + 3 * n * s,
    }


def module_providers(mod, x, w, b, dy) -> dict:
    """mode -> fn for kernels.layernorm or kernels.layernorm_ref (same API)."""
    _, mean, rstd = mod.layer_norm_forward(x, w, b, EPS)
    return {
        "fwd": lambda: mod.layer_norm_forward(x, w, b, EPS),
        "bwd": lambda: mod.layer_norm_backward(dy, x, w, mean, rstd),
    }


def torch_providers(x, w, b, dy) -> dict:
    n = x.shape[-1]
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, [n], w, b, EPS)
    return {
        "fwd": lambda: torch.ops.aten.native_layer_norm(x, [n], w, b, EPS),
        "bwd": lambda: torch.ops.aten.native_layer_norm_backward(dy, x, [n], mean, rstd, w, b, [True, True, True]),
    }


def bench_cuda(args) -> list[tuple]:
    from kernels import layernorm as tri

    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for m, n in QUICK_SHAPES if args.quick else SHAPES:
            x = torch.randn(m, n, device="cuda", dtype=dtype)
            dy = torch.randn_like(x)
            w = torch.randn(n, device="cuda", dtype=dtype)
            b = torch.randn(n, device="cuda", dtype=dtype)
            ours = module_providers(tri, x, w, b, dy)
            s = x.element_size()
            copy = copy_bandwidth_gbs(m * n * s, "cuda", args.quick)
            providers = {"ours": ours, "torch": torch_providers(x, w, b, dy)}
            rows += compare(f"{dtype_name} {m}x{n}", providers, layer_norm_bytes(m, n, s), copy, args.quick)
    return rows


def bench_cpu(args) -> list[tuple]:
    from kernels import layernorm_ref as ref

    torch.set_num_threads(1)  # NumPy's reductions use one core: compare like with like
    rng = np.random.default_rng(0)
    rows = []
    for m, n in CPU_SHAPES[:1] if args.quick else CPU_SHAPES:
        x, dy = rng.standard_normal((m, n), dtype=np.float32), rng.standard_normal((m, n), dtype=np.float32)
        w, b = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
        numpy_ref = module_providers(ref, x, w, b, dy)
        tx, tw, tb, tdy = (torch.from_numpy(a) for a in (x, w, b, dy))
        copy = copy_bandwidth_gbs(m * n * 4, "cpu", args.quick)
        providers = {"numpy-ref": numpy_ref, "torch": torch_providers(tx, tw, tb, tdy)}
        rows += compare(f"fp32 {m}x{n}", providers, layer_norm_bytes(m, n, 4), copy, args.quick)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="GPU dtypes")


def main(argv: list[str] | None = None) -> None:
    bench_main("layernorm", __doc__, "LayerNorm", bench_cuda, bench_cpu, add_arguments, argv)


if __name__ == "__main__":
    main()
