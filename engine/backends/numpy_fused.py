"""The numpy backend's elementwise and row-wise kernels: the references in ``kernels/``,
run chunk by chunk on the backend's threads.

Each chunk (CHUNK elements) is small enough that the several temporaries a NumPy
expression makes stay in the CPU's caches, so a formula of ten ufuncs reads and writes
main memory about once instead of ten times; chunks are shared among the threads (NumPy
releases the GIL inside each ufunc). Every element goes through the same operations in
the same order as in the reference, so the results are bit for bit the reference's;
only sums over rows (LayerNorm's and RMSNorm's weight and bias gradients) add per-thread
partial sums.

NOTE: a ufunc call costs about 1.7 us before it touches an element, under the GIL, so
chunks must be large: on the 2-core VM, AdamW over 162M parameters took 680-800 ms in
chunks of 16K elements and 215-235 ms in chunks of 256K (GELU and LayerNorm 2-4x faster
too), although 256K-element temporaries spill from L2 into L3.

Signatures are the references' (and the backend's).
"""

from __future__ import annotations

import numpy as np

from engine.backends.numpy_threads import chunks, one_blas_thread, parallel_ranges
from kernels import cross_entropy_ref, gelu_ref, layernorm_ref, rmsnorm_ref, swiglu_ref

CHUNK = 2**18  # elements per piece: 1 MiB of float32 per temporary (see the NOTE above)


def _over_elements(n: int, body) -> None:
    """body(lo, hi) over CHUNK-sized pieces of range(n), shared among the threads."""

    def part(start: int, stop: int) -> None:
        for lo, hi in chunks(start, stop, CHUNK):
            body(lo, hi)

    parallel_ranges(n, part, min_per_thread=CHUNK)


def _over_rows(rows: int, width: int, body) -> None:
    """body(lo, hi) over pieces of about CHUNK elements of a (rows, width) array."""
    per_piece = max(1, CHUNK // max(1, width))

    def part(start: int, stop: int) -> None:
        for lo, hi in chunks(start, stop, per_piece):
            body(lo, hi)

    parallel_ranges(rows, part, min_per_thread=per_piece)


# --- AdamW ---
def _adamw_piece(p, g, m, v, tmp, lr, beta1, beta2, eps, weight_decay, bias1, bias2_sqrt) -> None:
    """The AdamW update in place on p, m, v, through the scratch buffer tmp (all the same size)."""
    np.multiply(g, 1 - beta1, out=tmp)
    p *= 1 - lr * weight_decay
    m *= beta1
    m += tmp
    np.multiply(g, g, out=tmp)
    tmp *= 1 - beta2
    v *= beta2
    v += tmp
    np.sqrt(v, out=tmp)
    tmp *= 1 / bias2_sqrt
    tmp += eps
    np.divide(m, tmp, out=tmp)
    tmp *= lr / bias1
    p -= tmp


def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, bias1, bias2_sqrt) -> None:
    """p ← p·(1 − lr·wd);  m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²;
    p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε), in place, one pass over memory."""
    hyper = (lr, beta1, beta2, eps, weight_decay, bias1, bias2_sqrt)
    if not (p.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
        _adamw_piece(p, g, m, v, np.empty_like(p), *hyper)
        return
    p1, m1, v1 = p.reshape(-1), m.reshape(-1), v.reshape(-1)
    g1 = np.ascontiguousarray(g, dtype=p.dtype).reshape(-1)

    def body(start: int, stop: int) -> None:
        tmp = np.empty(min(CHUNK, stop - start), dtype=p.dtype)
        for lo, hi in chunks(start, stop, CHUNK):
            _adamw_piece(p1[lo:hi], g1[lo:hi], m1[lo:hi], v1[lo:hi], tmp[: hi - lo], *hyper)

    parallel_ranges(p1.size, body, min_per_thread=CHUNK)


# --- gradient accumulation and norm ---
def add_(out, a) -> None:
    """out += a in place (same shape), both cores on large contiguous arrays."""
    if not (out.flags.c_contiguous and a.flags.c_contiguous):
        np.add(out, a, out=out)
        return
    out1, a1 = out.reshape(-1), a.reshape(-1)

    def body(lo, hi):
        np.add(out1[lo:hi], a1[lo:hi], out=out1[lo:hi])

    _over_elements(out1.size, body)


def squared_norm(a) -> float:
    """sum(a²) as a Python float: a BLAS dot per chunk (no temporary of a's size), the chunks'
    sums added in float64."""
    a1 = np.ascontiguousarray(a).reshape(-1)
    sums: dict[int, float] = {}  # first element of a thread's part -> its sum

    def part(start, stop):
        # NOTE: squares beyond float32's range give inf, which is the answer (the NaN/inf guard reads it);
        # errstate is per thread, so it is set here
        with np.errstate(over="ignore"):
            sums[start] = sum(float(np.dot(a1[lo:hi], a1[lo:hi])) for lo, hi in chunks(start, stop, CHUNK))

    with one_blas_thread():  # the chunks are split among our threads already
        parallel_ranges(a1.size, part, min_per_thread=CHUNK)
    return sum(sums[start] for start in sorted(sums))  # a fixed order: the same bits every run


# --- GELU ---
def gelu_forward(x):
    x1 = np.ascontiguousarray(x).reshape(-1)
    out = np.empty_like(x1)

    def body(lo, hi):
        out[lo:hi] = gelu_ref.gelu_forward(x1[lo:hi])

    _over_elements(x1.size, body)
    return out.reshape(x.shape)


def gelu_backward(dy, x):
    x1 = np.ascontiguousarray(x).reshape(-1)
    dy1 = np.ascontiguousarray(dy).reshape(-1)
    dx = np.empty_like(x1)

    def body(lo, hi):
        dx[lo:hi] = gelu_ref.gelu_backward(dy1[lo:hi], x1[lo:hi])

    _over_elements(x1.size, body)
    return dx.reshape(x.shape)


def bias_gelu_forward(x, bias):
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])  # (rows, N)
    out = np.empty(x2.shape, dtype=x.dtype)

    def body(lo, hi):
        out[lo:hi] = gelu_ref.bias_gelu_forward(x2[lo:hi], bias)

    _over_rows(x2.shape[0], x2.shape[1], body)
    return out.reshape(x.shape)


def bias_gelu_backward(dy, x, bias):
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])  # (rows, N)
    dy2 = np.ascontiguousarray(dy).reshape(x2.shape)
    dx = np.empty(x2.shape, dtype=x.dtype)

    def body(lo, hi):
        dx[lo:hi] = gelu_ref.gelu_backward(dy2[lo:hi], x2[lo:hi] + bias)

    _over_rows(x2.shape[0], x2.shape[1], body)
    dbias = dx.sum(axis=0)  # (N,), summed as the reference does
    return dx.reshape(x.shape), dbias.astype(x.dtype)


# --- SwiGLU ---
def swiglu_forward(gate, up):
    g1, u1 = (np.ascontiguousarray(a).reshape(-1) for a in (gate, up))
    out = np.empty_like(g1)

    def body(lo, hi):
        out[lo:hi] = swiglu_ref.swiglu_forward(g1[lo:hi], u1[lo:hi])

    _over_elements(g1.size, body)
    return out.reshape(gate.shape)


def swiglu_backward(dy, gate, up):
    dy1, g1, u1 = (np.ascontiguousarray(a).reshape(-1) for a in (dy, gate, up))
    dgate, dup = np.empty_like(g1), np.empty_like(u1)

    def body(lo, hi):
        dgate[lo:hi], dup[lo:hi] = swiglu_ref.swiglu_backward(dy1[lo:hi], g1[lo:hi], u1[lo:hi])

    _over_elements(g1.size, body)
    return dgate.reshape(gate.shape), dup.reshape(up.shape)


# --- LayerNorm ---
def layer_norm_forward(x, weight, bias, eps=1e-5):
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])  # (rows, N)
    y = np.empty(x2.shape, dtype=x.dtype)
    mean = np.empty(x2.shape[0], dtype=x.dtype)
    rstd = np.empty(x2.shape[0], dtype=x.dtype)

    def body(lo, hi):
        y[lo:hi], mean[lo:hi], rstd[lo:hi] = layernorm_ref.layer_norm_forward(x2[lo:hi], weight, bias, eps)

    _over_rows(x2.shape[0], x2.shape[1], body)
    return y.reshape(x.shape), mean.reshape(x.shape[:-1]), rstd.reshape(x.shape[:-1])


def layer_norm_backward(dy, x, weight, mean, rstd):
    n = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, n)  # (rows, N)
    dy2 = np.ascontiguousarray(dy).reshape(x2.shape)
    mean1, rstd1 = mean.reshape(-1), rstd.reshape(-1)
    dx = np.empty(x2.shape, dtype=x.dtype)
    sums: dict[int, np.ndarray] = {}  # first row of a thread's part -> its (dweight, dbias) sums

    def part(start, stop):
        total = sums[start] = np.zeros((2, n), dtype=x.dtype)
        for lo, hi in chunks(start, stop, max(1, CHUNK // n)):
            dx[lo:hi], dw, db = layernorm_ref.layer_norm_backward(dy2[lo:hi], x2[lo:hi], weight, mean1[lo:hi],
                                                                  rstd1[lo:hi])
            total[0] += dw
            total[1] += db

    parallel_ranges(x2.shape[0], part, min_per_thread=max(1, CHUNK // n))
    dweight, dbias = sum(sums[start] for start in sorted(sums))  # a fixed order: the same bits every run
    return dx.reshape(x.shape), dweight, dbias


# --- RMSNorm ---
def rms_norm_forward(x, weight, eps=1e-6):
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])  # (rows, N)
    y = np.empty(x2.shape, dtype=x.dtype)
    rstd = np.empty(x2.shape[0], dtype=x.dtype)

    def body(lo, hi):
        y[lo:hi], rstd[lo:hi] = rmsnorm_ref.rms_norm_forward(x2[lo:hi], weight, eps)

    _over_rows(x2.shape[0], x2.shape[1], body)
    return y.reshape(x.shape), rstd.reshape(x.shape[:-1])


def rms_norm_backward(dy, x, weight, rstd):
    n = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, n)  # (rows, N)
    dy2 = np.ascontiguousarray(dy).reshape(x2.shape)
    rstd1 = rstd.reshape(-1)
    dx = np.empty(x2.shape, dtype=x.dtype)
    sums: dict[int, np.ndarray] = {}  # first row of a thread's part -> its dweight sum

    def part(start, stop):
        total = sums[start] = np.zeros(n, dtype=weight.dtype)
        for lo, hi in chunks(start, stop, max(1, CHUNK // n)):
            dx[lo:hi], dw = rmsnorm_ref.rms_norm_backward(dy2[lo:hi], x2[lo:hi], weight, rstd1[lo:hi])
            total += dw

    parallel_ranges(x2.shape[0], part, min_per_thread=max(1, CHUNK // n))
    dweight = sum(sums[start] for start in sorted(sums)) if sums else np.zeros(n, dtype=weight.dtype)
    return dx.reshape(x.shape), dweight


# --- cross-entropy over vocabulary rows ---
def cross_entropy_forward(logits, targets, ignore_index=-100):
    cross_entropy_ref._check(logits, targets, ignore_index)  # once, so the error names the first bad target
    n = logits.shape[0]
    nll, row_max, log_sum = (np.empty(n, dtype=logits.dtype) for _ in range(3))

    def body(lo, hi):
        nll[lo:hi], row_max[lo:hi], log_sum[lo:hi] = cross_entropy_ref.cross_entropy_forward(
            logits[lo:hi], targets[lo:hi], ignore_index)

    _over_rows(n, logits.shape[1], body)
    return nll, row_max, log_sum


def cross_entropy_backward(dnll, logits, targets, row_max, log_sum, ignore_index=-100, inplace=False):
    cross_entropy_ref._check(logits, targets, ignore_index)
    out = logits if inplace else np.empty_like(logits)
    dnll = np.broadcast_to(dnll, targets.shape)

    def body(lo, hi):
        if not inplace:
            out[lo:hi] = logits[lo:hi]
        cross_entropy_ref.cross_entropy_backward(dnll[lo:hi], out[lo:hi], targets[lo:hi], row_max[lo:hi],
                                                 log_sum[lo:hi], ignore_index, inplace=True)

    _over_rows(logits.shape[0], logits.shape[1], body)
    return out
