"""Benchmark the fused causal attention kernels: `python -m bench.attention`.

On a CUDA GPU: our Triton kernels against torch's scaled_dot_product_attention (default
backend, and the flash backend when torch offers it) and a naive matmul-softmax-matmul,
forward and forward+backward, with B·T fixed so every row processes the same tokens.

FLOPs follow the FlashAttention convention: forward = 4·B·H·T²·D (two T×T×D matmuls of
2 FLOPs per multiply-add), halved when causal; backward = 2.5 × forward (five matmuls
against two), so forward+backward = 3.5 × forward.

``--group G`` runs grouped-query attention (H / G K/V heads, as Llama 3 and Qwen3): ours reads
the shared K/V heads in place, SDPA gets ``enable_gqa=True``, the naive provider repeats them.

Without a GPU, the numpy backend's blocked attention and the NumPy reference are compared
with torch's SDPA on the CPU at T = 256, 1024, 2048 instead.
"""

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import bench_main

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def attention_flops(B: int, H: int, T: int, D: int, causal: bool, mode: str) -> float:
    fwd = 4 * B * H * T * T * D / (2 if causal else 1)
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def naive_attention(q, k, v, causal: bool):
    """Materialises the (T, T) scores (and repeated K/V heads): the memory cost the fused kernel avoids."""
    T = q.shape[2]
    k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, T)
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


# ---------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------


def _providers(causal: bool) -> dict:
    """name -> attention(q, k, v) returning o; autograd-capable except ours (own backward)."""
    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])

    providers = {"sdpa": sdpa}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_flash(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return sdpa(q, k, v)

        providers["sdpa-flash"] = sdpa_flash
    except ImportError:
        pass
    providers["naive"] = lambda q, k, v: naive_attention(q, k, v, causal)
    return providers


def _time_cuda(provider: str, fn, q, k, v, do, causal: bool, mode: str):
    """(ms, peak MiB) of one call, or None when it runs out of memory or is unsupported."""
    import triton.testing

    from kernels.attention import attention_backward, attention_forward

    if provider == "ours":
        if mode == "fwd":
            def step():
                attention_forward(q, k, v, causal=causal)
        else:
            def step():
                o, lse = attention_forward(q, k, v, causal=causal)
                attention_backward(do, q, k, v, o, lse, causal=causal)
        grads = None
    else:
        if mode == "fwd":
            def step():
                with torch.no_grad():
                    fn(q, k, v)
            grads = None
        else:
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]

            def step():
                fn(*leaves).backward(do)
            grads = leaves
    try:
        step()  # compile / warm up, and fail early on OOM
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        ms = triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=grads)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    except RuntimeError as err:  # e.g. no flash kernel for this dtype / head dim
        print(f"  {provider}: {str(err).splitlines()[0][:100]}")
        return None
    return ms, peak


def bench_cuda(args) -> None:
    if args.quick:
        args.head_dims, args.seqlens = [64], [512, 2048]
    dtype = DTYPES[args.dtype]
    print(f"causal={args.causal}, {args.dtype}, {args.group} query heads per K/V head, B·T = {args.tokens} tokens, "
          f"H·D = {args.model_dim}")
    header = (f"{'mode':8} {'D':>4} {'T':>6} {'B':>4} {'H':>3} {'provider':11} {'ms':>9} {'TFLOP/s':>8} "
              f"{'vs sdpa':>8} {'peak MiB':>9}")
    print(header)
    print("-" * len(header))
    providers = _providers(args.causal)
    for mode in args.modes:
        for D in args.head_dims:
            H = args.model_dim // D
            for T in args.seqlens:
                B = max(1, args.tokens // T)
                gen = torch.Generator(device="cuda").manual_seed(0)
                q, do = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
                k, v = (torch.randn(B, H // args.group, T, D, device="cuda", dtype=dtype, generator=gen)
                        for _ in range(2))
                flops = attention_flops(B, H, T, D, args.causal, mode)
                results = {}
                for name in ["ours", *providers]:
                    if name == "naive" and T > args.naive_max_t:
                        continue
                    timing = _time_cuda(name, providers.get(name), q, k, v, do, args.causal, mode)
                    results[name] = timing
                sdpa = results.get("sdpa")
                for name, timing in results.items():
                    if timing is None:
                        print(f"{mode:8} {D:>4} {T:>6} {B:>4} {H:>3} {name:11} {'OOM/n.a.':>9}")
                        continue
                    ms, peak = timing
                    ratio = f"{sdpa[0] / ms:.2f}x" if sdpa else "-"
                    print(f"{mode:8} {D:>4} {T:>6} {B:>4} {H:>3} {name:11} {ms:9.3f} {flops / ms / 1e9:8.1f} "
                          f"{ratio:>8} {peak:9.0f}")
                del q, k, v, do
                torch.cuda.empty_cache()
    print("Peak MiB includes the inputs.")


# ---------------------------------------------------------------------------------------
# CPU fallback
# ---------------------------------------------------------------------------------------


def _time_cpu(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)  # best of N: the least disturbed run on a shared CPU


def _cpu_steps(mode: str, q, k, v, do, causal: bool) -> dict:
    """name -> one step of that provider in `mode`, on float32 (B, H, T, D) arrays."""
    from engine.backends import numpy_attention
    from kernels import attention_ref as ref

    scale = 1.0 / math.sqrt(q.shape[-1])
    leaves = [torch.from_numpy(x).requires_grad_() for x in (q, k, v)]
    gqa = k.shape[1] != q.shape[1]
    if mode == "fwd":
        def numpy_backend():
            numpy_attention.attention_forward(q, k, v, scale, causal, 0.0, 0)

        def numpy_ref():
            ref.attention_forward(q, k, v, scale, causal)

        def sdpa():
            with torch.no_grad():
                F.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=gqa)
    else:
        def numpy_backend():
            o, lse = numpy_attention.attention_forward(q, k, v, scale, causal, 0.0, 0)
            numpy_attention.attention_backward(do, q, k, v, o, lse, scale, causal, 0.0, 0)

        def numpy_ref():
            o, lse = ref.attention_forward(q, k, v, scale, causal)
            ref.attention_backward(do, q, k, v, o, lse, scale, causal)

        def sdpa():
            F.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=gqa).backward(torch.from_numpy(do))
    return {"numpy backend": numpy_backend, "numpy ref": numpy_ref, "torch sdpa": sdpa}


def bench_cpu(args) -> None:
    print(f"the numpy backend's blocked attention and the NumPy reference (torch {torch.get_num_threads()} threads)")
    B, H, D = 1, 12, 64
    seqlens = [256, 1024] if args.quick else [256, 1024, 2048]
    print(f"causal={args.causal}, float32, B={B}, H={H}, K/V heads {H // args.group}, D={D}")
    header = f"{'mode':8} {'T':>5} {'provider':14} {'ms':>9} {'vs sdpa':>8}"
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    for mode in args.modes:
        for T in seqlens:
            q, do = rng.standard_normal((2, B, H, T, D), dtype=np.float32)
            k, v = rng.standard_normal((2, B, H // args.group, T, D), dtype=np.float32)
            times = {name: _time_cpu(step, args.repeats) for name, step in _cpu_steps(mode, q, k, v, do,
                                                                                    args.causal).items()}
            for name, ms in times.items():
                print(f"{mode:8} {T:>5} {name:14} {ms:9.2f} {times['torch sdpa'] / ms:7.2f}x")
    print("vs sdpa: torch SDPA's time / this provider's. The NumPy reference is written for clarity, not speed; "
          "the numpy backend runs the blocked version.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="input dtype on the GPU")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="head dims to run")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384],
                        help="sequence lengths T to run (--quick on the GPU: D=64, T in 512, 2048)")
    parser.add_argument("--tokens", type=int, default=16384, help="B·T: batch size is tokens // T")
    parser.add_argument("--model-dim", type=int, default=2048, help="H·D: heads are model_dim // D")
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"],
                        help="what to time")
    parser.add_argument("--no-causal", dest="causal", action="store_false", help="full (non-causal) attention")
    parser.add_argument("--group", type=int, default=1,
                        help="query heads per K/V head (grouped-query attention; 4 for Llama 3.2 1B)")
    parser.add_argument("--naive-max-t", type=int, default=8192,
                        help="skip the naive provider above this T (its T×T scores grow quadratically)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repeats per shape on the CPU (the best is reported)")


def main(argv: list[str] | None = None) -> None:
    bench_main("attention", __doc__, "Causal attention", bench_cuda, bench_cpu, add_arguments, argv)


if __name__ == "__main__":
    main()
