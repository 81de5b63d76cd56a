"""Benchmark the Llama / Qwen3 kernels: ``python -m bench.decoder_kernels [--quick] [--ops ...]``.

RMSNorm (``kernels/rmsnorm.py``), SwiGLU (``kernels/swiglu.py``) and RoPE (``kernels/rope.py``)
against the torch code a PyTorch Llama runs: ``F.rms_norm``, ``F.silu(gate) * up``, and
Hugging Face's ``x * cos + rotate_half(x) * sin`` on the (B, T, H, D) projection viewed as
heads. "fwd+bwd" is one forward and one backward (torch through autograd). On a CUDA GPU
bf16 and fp32; without one, the NumPy references against torch CPU (one thread each).

Bytes, the minimum any implementation must move (s = element size, M·N = x's elements):

    rms_norm  fwd: read x, write y  2·M·N·s      fwd+bwd: + read x, dy, write dx  5·M·N·s
    swiglu    fwd: read gate, up, write y 3·M·N·s    fwd+bwd: + read dy, gate, up, write 2  8·M·N·s
    rope      fwd: read x, write y  2·M·N·s      fwd+bwd: + read dy, write dx  4·M·N·s
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import bench_main, compare, copy_bandwidth_gbs

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
OPS = ("rms_norm", "swiglu", "rope")
# op -> shapes: (M, N) rows for rms_norm (the last is Qwen3's per-head q/k norm) and swiglu
# (tokens, hidden); (B, T, H, D) for rope.
GPU_SHAPES = {
    "rms_norm": [(16384, 2048), (16384, 4096), (16384 * 16, 128)],
    "swiglu": [(16384, 8192)],
    "rope": [(8, 2048, 32, 64), (8, 2048, 16, 128)],
}
CPU_SHAPES = {"rms_norm": [(1024, 2048), (1024 * 8, 128)], "swiglu": [(512, 4096)], "rope": [(1, 256, 16, 64)]}
BYTES_PER_ELEMENT_MOVED = {"rms_norm": (2, 5), "swiglu": (3, 8), "rope": (2, 4)}  # (fwd, fwd+bwd) × M·N·s


def _rope_tables(T: int, D: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.arange(T, dtype=torch.float64)[:, None] * 500000.0 ** -(torch.arange(0, D, 2) / D)[None]
    return angles.cos().to(like.device, torch.float32), angles.sin().to(like.device, torch.float32)


def _torch_rope(x, cos, sin):
    """Hugging Face's formula with (T, D) tables duplicated from the (T, D/2) halves."""
    c, s = torch.cat([cos, cos], -1).to(x.dtype), torch.cat([sin, sin], -1).to(x.dtype)
    half = x.shape[-1] // 2
    return x * c + torch.cat([-x[..., half:], x[..., :half]], -1) * s


def _inputs(op: str, shape: tuple, make) -> list:
    """The op's inputs, upstream gradient last, each made by make(shape) -> tensor or array."""
    if op == "rope":
        B, T, H, D = shape
        return [make((B, T, H, D)), make((B, H, T, D))]  # x as the (B, T, H, D) projection, dy per head
    if op == "rms_norm":
        return [make(shape), make(shape[-1:]), make(shape)]
    return [make(shape), make(shape), make(shape)]


def _providers(op: str, mod, args: list, torch_args: list) -> tuple[dict, dict]:
    """(ours, torch): mode -> fn for one op; mod is kernels.<op> or its _ref (same API)."""
    if op == "rms_norm":
        x, w, dy = args

        def ours_both():
            y, rstd = mod.rms_norm_forward(x, w)
            return mod.rms_norm_backward(dy, x, w, rstd)

        ours = {"fwd": lambda: mod.rms_norm_forward(x, w), "fwd+bwd": ours_both}
        tx, tw, tdy = torch_args
        theirs_fwd = lambda: F.rms_norm(tx, tx.shape[-1:], tw, 1e-6)  # noqa: E731
    elif op == "swiglu":
        g, u, dy = args

        def ours_both():
            mod.swiglu_forward(g, u)
            return mod.swiglu_backward(dy, g, u)

        ours = {"fwd": lambda: mod.swiglu_forward(g, u), "fwd+bwd": ours_both}
        tg, tu, tdy = torch_args
        theirs_fwd = lambda: F.silu(tg) * tu  # noqa: E731
    else:
        x_bthd, dy = args
        x = x_bthd.transpose(1, 2) if isinstance(x_bthd, torch.Tensor) else x_bthd.swapaxes(1, 2)  # (B, H, T, D)
        T, D = x.shape[2], x.shape[3]
        cos, sin = _rope_tables(T, D, torch_args[0])
        if not isinstance(x_bthd, torch.Tensor):
            cos, sin = cos.numpy(), sin.numpy()

        def ours_both():
            mod.rope_forward(x, cos, sin)
            return mod.rope_backward(dy, cos, sin)

        ours = {"fwd": lambda: mod.rope_forward(x, cos, sin), "fwd+bwd": ours_both}
        tx, tdy = torch_args[0].transpose(1, 2), torch_args[1]
        tcos, tsin = _rope_tables(T, D, tx)
        theirs_fwd = lambda: _torch_rope(tx, tcos, tsin)  # noqa: E731

    def theirs_fwd_no_grad():
        with torch.no_grad():
            return theirs_fwd()

    return ours, {"fwd": theirs_fwd_no_grad, "fwd+bwd": lambda: theirs_fwd().backward(tdy)}


def _rows(op, shape, mod, args, torch_args, itemsize, device, label, ours_name, quick) -> list[tuple]:
    ours, theirs = _providers(op, mod, args, torch_args)
    numel = int(np.prod(shape))
    fwd, both = BYTES_PER_ELEMENT_MOVED[op]
    nbytes = {"fwd": fwd * numel * itemsize, "fwd+bwd": both * numel * itemsize}
    copy = copy_bandwidth_gbs(numel * itemsize, device, quick)
    return compare(f"{op} {label} {'x'.join(map(str, shape))}", {ours_name: ours, "torch": theirs}, nbytes, copy,
                   quick)


def _leaves(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Torch copies for autograd: every input but the last (the upstream gradient) requires grad."""
    return [t.detach().clone().requires_grad_(i < len(tensors) - 1) for i, t in enumerate(tensors)]


def bench_cuda(args) -> list[tuple]:
    import importlib

    rows = []
    for op in args.ops:
        mod = importlib.import_module(f"kernels.{op.replace('_', '')}")
        for dtype_name in args.dtypes:
            def make(shape, dtype=DTYPES[dtype_name]):
                return torch.randn(shape, device="cuda", dtype=dtype)

            for shape in GPU_SHAPES[op][:1] if args.quick else GPU_SHAPES[op]:
                ins = _inputs(op, shape, make)
                itemsize = ins[0].element_size()
                rows += _rows(op, shape, mod, ins, _leaves(ins), itemsize, "cuda", dtype_name, "ours", args.quick)
    return rows


def bench_cpu(args) -> list[tuple]:
    import importlib

    torch.set_num_threads(1)  # NumPy's elementwise ops use one core: compare like with like
    rng = np.random.default_rng(0)
    rows = []
    for op in args.ops:
        mod = importlib.import_module(f"kernels.{op.replace('_', '')}_ref")
        for shape in CPU_SHAPES[op][:1] if args.quick else CPU_SHAPES[op]:
            ins = _inputs(op, shape, lambda s: rng.standard_normal(s, dtype=np.float32))
            torch_ins = _leaves([torch.from_numpy(a) for a in ins])
            rows += _rows(op, shape, mod, ins, torch_ins, 4, "cpu", "fp32", "numpy-ref", args.quick)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS, help="which kernels to time")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="GPU dtypes")


def main(argv: list[str] | None = None) -> None:
    bench_main("decoder_kernels", __doc__, "RMSNorm, SwiGLU, RoPE", bench_cuda, bench_cpu, add_arguments, argv)


if __name__ == "__main__":
    main()
