"""Shared helpers for ``python -m bench.<name>``: timing, bandwidth and table printing.

    time_ms(fn, quick)            median milliseconds of fn() after warmup (GPU or CPU)
    copy_bandwidth_gbs(n, dev)    measured device copy bandwidth for n bytes, in GB/s
    gbs(nbytes, ms)               bytes moved per millisecond -> GB/s (1 GB = 1e9 bytes)
    compare(label, providers, nbytes, copy_gbs)
                                  time every provider in every mode -> rows for COMPARE_HEADERS
    print_table(headers, rows)    aligned columns, numbers formatted
    bench_main(name, doc, ...)    the shared `main`: parser, GPU or CPU run, table, ratio note

Every bench reports speed as ours/theirs: the baseline's time over this provider's in the
same run, so > 1 means ours is faster (`RATIO_NOTE`).

Timing on CUDA uses ``triton.testing.do_bench`` (CUDA events, and it clears the L2 cache
before every repeat so memory-bound kernels are not timed from cache). On the CPU it is
``time.perf_counter`` around each call: warmup calls, then the median of the repeats.
"""

import argparse
import statistics
import time
from typing import Any, Callable, Sequence

import torch


def time_ms(fn: Callable[[], object], quick: bool = False) -> float:
    """Median wall time of one fn() call in milliseconds."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                             return_mode="median"))  # fmt: skip
    warmup, repeats = (1, 3) if quick else (2, 7)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def gbs(nbytes: float, ms: float) -> float:
    """GB/s for nbytes moved in ms milliseconds (1 GB = 1e9 bytes)."""
    return nbytes / (ms * 1e-3) / 1e9


def copy_bandwidth_gbs(nbytes: int, device: str | torch.device, quick: bool = False) -> float:
    """Bandwidth of a plain device copy of nbytes: it reads nbytes and writes nbytes.

    The ceiling a memory-bound kernel of about that size can hope for on this device.
    """
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return gbs(2 * nbytes, time_ms(lambda: dst.copy_(src), quick))


COMPARE_HEADERS = ("case", "mode", "provider", "ms", "GB/s", "% of copy", "speed vs torch")
RATIO_NOTE = ("speed vs torch / vs sdpa: the baseline's time over this provider's, measured in the same run "
              "(ours/theirs as speed: > 1 = ours faster)")


def compare(
    label: str,
    providers: dict[str, dict[str, Callable[[], object]]],
    nbytes: dict[str, float],
    copy_gbs: float,
    quick: bool = False,
    baseline: str = "torch",
) -> list[tuple]:
    """Time providers[name][mode]() for every mode in nbytes; one row per (mode, provider).

    GB/s is nbytes[mode] (the bytes the operation must move, the same for every provider)
    over the time; "% of copy" compares it with copy_gbs; "speed vs torch" is the
    baseline's time over this provider's (above 1 means faster than the baseline).
    """
    rows = []
    for mode, moved in nbytes.items():
        times = {name: time_ms(fns[mode], quick) for name, fns in providers.items()}
        for name, ms in times.items():
            rate = gbs(moved, ms)
            rows.append((label, mode, name, ms, rate, 100.0 * rate / copy_gbs, times[baseline] / ms))
    return rows


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows under headers in aligned columns; floats below 100 get 3 significant digits."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def bench_main(name: str, doc: str, title: str, bench_cuda: Callable[[Any], list | None],
               bench_cpu: Callable[[Any], list | None], add_arguments: Callable[[Any], None] | None = None,
               argv: Sequence[str] | None = None) -> None:
    """The `main` of ``python -m bench.<name>``: parse (``--quick`` plus `add_arguments`), run
    `bench_cuda(args)` on a CUDA GPU, else `bench_cpu(args)`, print the rows they return under
    COMPARE_HEADERS (a bench with its own columns prints them itself and returns None), then the
    ratio convention."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats (a smoke run)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        print(f"{title} on {torch.cuda.get_device_name()}: ours (Triton) vs torch")
        rows = bench_cuda(args)
    else:
        print(f"{title}, no CUDA GPU: our NumPy reference vs torch on the CPU")
        rows = bench_cpu(args)
    if rows is not None:
        print_table(COMPARE_HEADERS, rows)
    print(RATIO_NOTE)
