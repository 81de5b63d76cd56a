"""The numpy backend's worker threads and BLAS thread control.

NumPy releases the GIL inside ufunc loops over more than a few hundred elements and
inside BLAS calls, so work split into chunks on a few Python threads runs on several
cores at once. The pool has one thread per core the process may use (``OMP_NUM_THREADS``
caps it, as it caps BLAS); the calling thread takes the first share itself.

Where the work comes in many like pieces (chunks of an array, groups of attention heads,
the last rows of a product) the pieces are handed out one at a time to whichever thread
is free, not split in equal shares up front: on a shared machine one core is often slower
for a while, and with fixed shares the other then waits for it.

NOTE: measured in a gpt2-small step at 2x1024 on the 2-core VM, fixed shares left one thread
waiting for the other 0.71-0.78 s of a 15.1-15.6 s step (0.50-0.54 s of it in products, 0.15 s
in attention); handing out pieces, 0.22 s of 15.2 s.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np
from threadpoolctl import ThreadpoolController


def _thread_count() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(cores, int(omp))) if omp.isdigit() and int(omp) > 0 else max(1, cores)


THREADS = _thread_count()
_pool = ThreadPoolExecutor(THREADS - 1, thread_name_prefix="scratchgpt-numpy") if THREADS > 1 else None
_blas = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]


def on_threads(work: Callable[[int], None], threads: int = THREADS) -> None:
    """Run ``work(t)`` for t = 0 .. threads − 1 at once, t = 0 on the calling thread; returns
    when all are done and re-raises the first error."""
    threads = min(threads, THREADS)
    if threads <= 1 or _pool is None:
        work(0)
        return
    futures = [_pool.submit(work, t) for t in range(1, threads)]
    try:
        work(0)
    finally:
        for f in futures:
            f.result()


def parallel_pieces(n: int, piece: int, body: Callable[..., None], min_per_thread: int = 1,
                    scratch: Callable[[int], tuple] | None = None) -> None:
    """Run ``body(lo, hi, *buffers)`` over pieces of ``range(n)`` of about ``piece`` items (at
    least one per thread; fewer threads when a thread would get less than ``min_per_thread``
    items), handing the pieces out one at a time to whichever thread is free. ``scratch(size)``
    makes one thread's buffers for pieces of up to ``size`` items, once per thread. The pieces'
    bounds depend only on n, piece and the thread count, never on which thread runs which."""
    threads = max(1, min(THREADS, n // max(1, min_per_thread)))
    pieces = -(-max(1, -(-n // max(1, piece))) // threads) * threads  # a multiple of the threads
    bounds = [n * i // pieces for i in range(pieces + 1)]
    size = -(-n // pieces)
    counter = itertools.count()

    def work(_: int) -> None:
        buffers: Any = None
        while (i := next(counter)) < pieces:  # next() on a count is atomic under the GIL
            lo, hi = bounds[i], bounds[i + 1]
            if lo == hi:
                continue
            if buffers is None:
                buffers = scratch(size) if scratch is not None else ()
            body(lo, hi, *buffers)

    if n > 0:
        on_threads(work, threads)


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
# The last 1/TAIL_SHARE of a product's rows go in TAIL_PIECES column pieces to whichever thread
# is free first. Pieces of rows would each pack the whole of b again (a 768x3072 weight: 9 MB);
# a column piece packs only the tail's rows of a and its own columns of b.
# NOTE: on the 2-core VM, the 153 products of a gpt2-small step at 2x1024 took 0.93 and 0.89 of
# the time of equal shares (mean of 6 alternating repeats, each run's pairs 0.65-1.00); tails of
# 1/8 and 1/32 gained less (0.98, 0.96), 8 pieces of 1/16 about as much (0.91).
TAIL_SHARE, TAIL_PIECES = 16, 4
MIN_COLS_PER_PIECE = 64


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for 2-D (M, K) @ (K, N): the rows of a split among our threads, one BLAS thread each,
    all but the last rows in equal shares and those in column pieces handed out as threads
    come free (see TAIL_SHARE).

    NOTE: measured on a 2-core machine (shared, so noisy), the row split matched or beat
    OpenBLAS's own two threads on the model's products (e.g. 512x768 @ 768x3072: 128-180 ms
    against 225-288 ms), and it keeps OpenBLAS's worker threads, which spin after each call,
    from competing with our threads' elementwise work."""
    M, N = a.shape[0], b.shape[1]
    if M < 2 * MIN_ROWS_PER_THREAD or THREADS == 1:
        return a @ b
    out = np.empty((M, N), dtype=np.result_type(a, b))  # (M, N)
    threads = min(THREADS, M // MIN_ROWS_PER_THREAD)
    tail = M // TAIL_SHARE if M // TAIL_SHARE >= MIN_ROWS_PER_THREAD and N >= TAIL_PIECES * MIN_COLS_PER_PIECE else 0
    head = M - tail
    rows = [head * t // threads for t in range(threads + 1)]
    cols = [N * i // TAIL_PIECES for i in range(TAIL_PIECES + 1)]
    jobs = [(slice(rows[t], rows[t + 1]), slice(None)) for t in range(threads)]  # (rows, columns)
    if tail:
        jobs += [(slice(head, M), slice(cols[i], cols[i + 1])) for i in range(TAIL_PIECES)]

    def job(lo: int, hi: int) -> None:
        r, c = jobs[lo]
        np.matmul(a[r], b[:, c], out=out[r, c])

    with one_blas_thread():
        parallel_pieces(len(jobs), 1, job)
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
        parallel_pieces(a3.shape[0], -(-a3.shape[0] // THREADS), body)  # one piece per thread
    return out.reshape(lead + out.shape[-2:])
