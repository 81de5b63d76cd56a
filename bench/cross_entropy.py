"""Benchmark the LM head + loss: ``python -m bench.cross_entropy [--tokens 512,2048] [--repeats 3]``.

Three providers compute loss = cross_entropy(x @ Wᵀ, targets) and its gradients dx, dW
for GPT-2's head (E 768, V 50257) at N = B·T tokens:

    fused    F.linear_cross_entropy: chunks of rows, never the (N, V) logits
    unfused  F.cross_entropy(F.linear(x, W), targets): the whole (N, V) logits and gradient
    torch    torch.nn.functional.cross_entropy(x @ W.T, targets) with torch.autograd

On a CUDA GPU the engine runs the triton backend (fp32); without one, the numpy backend,
and torch runs on the CPU. "peak MB" is the memory the loss step adds on top of its
inputs: ``torch.cuda.max_memory_allocated`` on the GPU, ``tracemalloc`` for the numpy
backend (torch's CPU allocations are invisible to it: "-"). "speed vs unfused" is the
unfused time over the provider's (above 1 means faster). Times are the median of the
repeats, with min-max as the spread.
"""

import argparse
import statistics
import time
import tracemalloc

import numpy as np
import torch

import engine
from bench.common import bench_main, print_table
from engine import functional as F

EMB, VOCAB = 768, 50257
GPU_TOKENS = "512,2048,8192"  # 2x256 ... 8x1024
CPU_TOKENS = "512"  # each step is ~120 GFLOP at N=512: larger N takes minutes per provider here


def engine_step(fused: bool, x: np.ndarray, w: np.ndarray, targets: np.ndarray):
    """One loss + backward through the engine, on the active backend."""
    xs, ws = engine.tensor(x, requires_grad=True), engine.tensor(w, requires_grad=True)
    if fused:
        loss = F.linear_cross_entropy(xs, ws, targets)
    else:
        loss = F.cross_entropy(F.linear(xs, ws), targets)
    loss.backward()
    return loss.item()


def torch_step(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss = torch.nn.functional.cross_entropy(x @ w.T, targets)
    loss.backward()
    return loss.item()


def peak_mb(step, on_cuda: bool, traced: bool) -> tuple[float | None, float]:
    """(memory one step adds on top of what exists before it, at its peak, in MB; its loss)."""
    if on_cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = step()
        return (torch.cuda.max_memory_allocated() - before) / 1e6, loss
    if not traced:
        return None, step()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    loss = step()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return (peak - before) / 1e6, loss


def times_ms(step, on_cuda: bool, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if on_cuda:
            torch.cuda.synchronize()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def measure(n: int, on_cuda: bool, repeats: int) -> list[tuple]:
    """Table rows of the three providers at N = n tokens."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, EMB), dtype=np.float32)  # (N, E)
    w = rng.standard_normal((VOCAB, EMB), dtype=np.float32) * np.float32(0.02)  # (V, E)
    targets = rng.integers(0, VOCAB, size=n)  # (N,)
    tx, tw, tt = (torch.from_numpy(a).to("cuda" if on_cuda else "cpu") for a in (x, w, targets))
    steps = {
        "fused": lambda: engine_step(True, x, w, targets),
        "unfused": lambda: engine_step(False, x, w, targets),
        "torch": lambda: torch_step(tx, tw, tt),
    }
    # NOTE: the memory step comes first and doubles as the warmup of the timed ones.
    results = {name: (*peak_mb(step, on_cuda, name != "torch"), times_ms(step, on_cuda, repeats))
               for name, step in steps.items()}
    unfused_mb, unfused_ms = results["unfused"][0], statistics.median(results["unfused"][2])
    rows = []
    for name, (mb, loss, ts) in results.items():
        med = statistics.median(ts)
        rows.append((n, name, med, f"{min(ts):.0f}-{max(ts):.0f}", "-" if mb is None else mb,
                     "-" if mb is None or unfused_mb is None else mb / unfused_mb, unfused_ms / med,
                     f"{loss:.6f}"))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    on_cuda = torch.cuda.is_available()
    parser.add_argument("--tokens", default=GPU_TOKENS if on_cuda else CPU_TOKENS,
                        help="comma-separated token counts N = B·T")
    parser.add_argument("--repeats", type=int, default=10 if on_cuda else 3, help="timed steps per provider")


def run(args: argparse.Namespace, on_cuda: bool) -> None:
    """Print the table (its own columns) for every N in --tokens."""
    engine.set_backend("triton" if on_cuda else "numpy")
    print(f"E={EMB}, V={VOCAB}, fp32, loss + backward")
    repeats = 1 if args.quick else args.repeats
    rows = [row for n in args.tokens.split(",") for row in measure(int(n), on_cuda, repeats)]
    print_table(("N", "provider", "ms", "spread ms", "peak MB", "peak vs unfused", "speed vs unfused", "loss"), rows)


def main() -> None:
    bench_main("cross_entropy", __doc__, "LM head + loss", lambda args: run(args, True),
               lambda args: run(args, False), add_arguments)


if __name__ == "__main__":
    main()
