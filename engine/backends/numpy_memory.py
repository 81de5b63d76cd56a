"""How the numpy backend's process gets memory for its arrays.

A training step allocates and frees gigabytes of arrays, each written soon after. On Linux
each fresh page costs a fault (zeroing, accounting, and on a VM often the host's work too),
so the backend asks, once, at import:

* NumPy not to back large arrays with transparent huge pages: several arrays are written
  only in places (the embedding gradient: 512 rows of a (50257, 768) array), and with huge
  pages each touched row faults in and zeroes 2 MiB. On the 2-core VM a gpt2-small step at
  2x256 took 4.9 s with them and 3.6 s without (backward 2.6 s against 1.6 s).
* glibc's malloc to serve every block from its heap and keep freed memory there for
  reuse, rather than map large blocks afresh and hand them back to the kernel on free,
  to fault them in again next step. By default a block over 32 MiB (the largest mmap
  threshold glibc allows) is always a fresh mapping, as a step's logits and its LM head and
  embedding gradients are; on the 2-core VM a fresh 103 MB matmul output cost 25K faults
  and 45-80 ms more than a reused one. Keeping blocks up to 32 MiB took the faults of a
  6-step gpt2-small run from 2.85M to 1.63M; keeping all of them took a mini step from
  433K to 144K faults per 12-step run and its time by 15-30%.

Each is skipped where the user set its environment variable (``NUMPY_MADVISE_HUGEPAGE``,
``MALLOC_MMAP_MAX_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) or the
platform lacks it, and both where ``SCRATCHGPT_TUNE_MEMORY=0`` (a process that embeds the
engine and wants its allocator left alone; ``bench.train`` runs torch so, as its users do).
The price: the process's resident memory does not shrink after its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import numpy as np

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)


def _no_huge_pages() -> None:
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None)
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is not None and "NUMPY_MADVISE_HUGEPAGE" not in os.environ:
        setter(False)


def _keep_freed_blocks() -> None:
    if any(f"MALLOC_{name}_" in os.environ for name in ("MMAP_MAX", "MMAP_THRESHOLD", "TRIM_THRESHOLD")):
        return
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): its malloc keeps its own policy
        return
    if mallopt is not None:
        mallopt(_M_MMAP_MAX, 0)  # no block gets a mapping of its own: all come from the heap
        mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # and freed memory stays in it


OPT_OUT = "SCRATCHGPT_TUNE_MEMORY"  # "0": leave both settings as the process has them


def tune_process_memory() -> None:
    """Apply both settings (idempotent), unless ``SCRATCHGPT_TUNE_MEMORY=0``."""
    if os.environ.get(OPT_OUT) == "0":
        return
    _no_huge_pages()
    _keep_freed_blocks()
