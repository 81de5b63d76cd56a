"""The numpy backend's worker threads and BLAS thread control.

NumPy releases the GIL inside ufunc loops over more than a few hundred elements and
inside BLAS calls, so work split into chunks on a few Python threads runs on several
cores at once. The pool has one thread per core the process may use (``OMP_NUM_THREADS``
caps it, as it caps BLAS); the calling thread takes the first share itself.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
from threadpoolctl import ThreadpoolController


def _thread_count() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(cores, int(omp))) if omp.isdigit() and int(omp) > 0 else max(1, cores)


THREADS = _thread_count()
_pool = ThreadPoolExecutor(THREADS - 1, thread_name_prefix="scratchgpt-numpy") if THREADS > 1 else None
_blas = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]


def parallel_ranges(n: int, body: Callable[[int, int], None], min_per_thread: int = 1) -> None:
    """Run ``body(start, stop)`` over a split of ``range(n)`` into contiguous parts, one per
    thread (fewer when a part would hold less than ``min_per_thread`` items); returns when all
    are done and re-raises the first error."""
    parts = max(1, min(THREADS, n // max(1, min_per_thread)))
    if parts == 1 or _pool is None:
        if n > 0:
            body(0, n)
        return
    bounds = [n * i // parts for i in range(parts + 1)]
    futures = [_pool.submit(body, bounds[i], bounds[i + 1]) for i in range(1, parts)]
    try:
        body(bounds[0], bounds[1])
    finally:
        for f in futures:
            f.result()


def chunks(start: int, stop: int, size: int) -> Iterator[tuple[int, int]]:
    """(lo, hi) pieces of at most ``size`` covering [start, stop)."""
    for lo in range(start, stop, size):
        yield lo, min(lo + size, stop)


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS limited to one thread: for many small products run side by side on our own
    threads, where BLAS's own threads would only hand work back and forth.

    NOTE: measured on a 2-core machine, 24 per-head products of 256x64x256 took 368 ms with
    OpenBLAS's 2 threads (a thread hand-off per product) and 2.6 ms with one. The libraries'
    own setters are called directly: threadpoolctl's ``limit`` took 13 us a call, these 3.6."""
    saved = [(lib, lib.get_num_threads()) for lib in _blas]
    for lib, _ in saved:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in saved:
            if n is not None:  # a library that cannot say its count keeps the one just set
                lib.set_num_threads(n)


MIN_ROWS_PER_THREAD = 32  # below this a 2-D product stays one BLAS call


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for 2-D (M, K) @ (K, N): the rows of a split among our threads, one BLAS thread each.

    NOTE: measured on a 2-core machine (shared, so noisy), this matched or beat OpenBLAS's
    own two threads on the model's products (e.g. 512x768 @ 768x3072: 128-180 ms against
    225-288 ms), and it keeps OpenBLAS's worker threads, which spin after each call, from
    competing with our threads' elementwise work."""
    M = a.shape[0]
    if M < 2 * MIN_ROWS_PER_THREAD or THREADS == 1:
        return a @ b
    out = np.empty((M, b.shape[1]), dtype=np.result_type(a, b))  # (M, N)

    def body(lo: int, hi: int) -> None:
        np.matmul(a[lo:hi], b, out=out[lo:hi])

    with one_blas_thread():
        parallel_ranges(M, body, min_per_thread=MIN_ROWS_PER_THREAD)
    return out


def batched_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched a @ b over equal leading dims, (..., M, K) @ (..., K, N) -> (..., M, N).

    A stack of matrices reaches BLAS only when contiguous (transposed or sliced stacks fall
    to a slow loop), and per-matrix products are too small for BLAS threads: the stack is
    split across our threads instead, one BLAS thread each."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    lead = a.shape[:-2]
    a3 = a.reshape((-1,) + a.shape[-2:])  # (N, M, K)
    b3 = b.reshape((-1,) + b.shape[-2:])  # (N, K, N')
    out = np.empty((a3.shape[0], a3.shape[1], b3.shape[2]), dtype=np.result_type(a, b))  # (N, M, N')

    def body(lo: int, hi: int) -> None:
        np.matmul(a3[lo:hi], b3[lo:hi], out=out[lo:hi])

    with one_blas_thread():
        parallel_ranges(a3.shape[0], body)
    return out.reshape(lead + out.shape[-2:])
