"""The numpy backend's elementwise and row-wise kernels: the references in ``kernels/``,
run chunk by chunk on the backend's threads (GELU in an equal form of its own, see below).

Each chunk (CHUNK elements) is small enough that the several temporaries a NumPy
expression makes stay in the CPU's caches, so a formula of ten ufuncs reads and writes
main memory about once instead of ten times; chunks go to whichever thread is free (NumPy
releases the GIL inside each ufunc). Except in GELU and ``cross_entropy_loss_and_grad``,
every element goes through the same operations in the same order as in the reference, so
the results are bit for bit the reference's; only sums over rows (LayerNorm's and
RMSNorm's weight and bias gradients) add per-chunk partial sums, in the chunks' order.

NOTE: a ufunc call costs about 1.7 us before it touches an element, under the GIL, so
chunks must be large: on the 2-core VM, AdamW over 162M parameters took 680-800 ms in
chunks of 16K elements and 215-235 ms in chunks of 256K (GELU and LayerNorm 2-4x faster
too), although 256K-element temporaries spill from L2 into L3.

Signatures are the references' (and the backend's).
"""

from __future__ import annotations

import numpy as np

from engine.backends.numpy_threads import one_blas_thread, parallel_pieces
from kernels import cross_entropy_ref, gelu_ref, layernorm_ref, rmsnorm_ref, swiglu_ref

CHUNK = 2**18  # elements per piece: 1 MiB of float32 per temporary (see the NOTE above)
# NOTE: a thread takes a part only if it holds this many elements: a hand-off costs ~0.1 ms, and
# parts of a whole CHUNK kept a (512, 768) LayerNorm (the book's 2x256 batch) on one core
MIN_PER_THREAD = 2**16


def _over_elements(n: int, body) -> None:
    """body(lo, hi) over CHUNK-sized pieces of range(n), shared among the threads."""
    parallel_pieces(n, CHUNK, body, min_per_thread=MIN_PER_THREAD)


def _over_rows(rows: int, width: int, body, scratch: int = 0, dtype=None) -> None:
    """body(lo, hi, *buffers) over pieces of about CHUNK elements of a (rows, width) array;
    each thread has its own ``scratch`` buffers of a piece's shape (hi − lo, width)."""
    def piece(lo: int, hi: int, *buffers) -> None:
        body(lo, hi, *(b[: hi - lo] for b in buffers))

    parallel_pieces(rows, max(1, CHUNK // max(1, width)), piece,
                    min_per_thread=max(1, MIN_PER_THREAD // max(1, width)),
                    scratch=lambda size: [np.empty((size, width), dtype) for _ in range(scratch)])


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

    def body(lo: int, hi: int, tmp: np.ndarray) -> None:
        _adamw_piece(p1[lo:hi], g1[lo:hi], m1[lo:hi], v1[lo:hi], tmp[: hi - lo], *hyper)

    parallel_pieces(p1.size, CHUNK, body, min_per_thread=MIN_PER_THREAD,
                    scratch=lambda size: (np.empty(size, dtype=p.dtype),))


# --- gradient accumulation and norm ---
def add_(out, a) -> None:
    """out += a in place (same shape), both cores on large arrays. Strided ones (the q, k, v
    slices of one projection's gradient) go in pieces of their first two axes.

    NOTE: on the 2-core VM, adding a 2x1024 batch's dq, dk, dv into their slices of the qkv
    gradient took 0.65 of the time of numpy's single-threaded += (median of 31 pairs)."""
    if out.size < 2 * MIN_PER_THREAD or out.ndim == 0 or np.shape(a) != out.shape:
        np.add(out, a, out=out)
        return
    if out.flags.c_contiguous and a.flags.c_contiguous:
        out, a = out.reshape(-1), a.reshape(-1)
    if out.ndim == 1:
        def body(lo, hi):
            np.add(out[lo:hi], a[lo:hi], out=out[lo:hi])

        _over_elements(out.size, body)
        return
    n0, n1 = out.shape[:2]

    def rows(lo, hi):  # rows lo..hi of the first two axes taken as one: (n0·n1, ...)
        for i in range(lo // n1, (hi - 1) // n1 + 1):
            j = slice(max(lo - i * n1, 0), min(hi - i * n1, n1))
            np.add(out[i, j], a[i, j], out=out[i, j])

    row = out.size // (n0 * n1)  # elements per row
    parallel_pieces(n0 * n1, max(1, CHUNK // max(1, row)), rows, min_per_thread=max(1, MIN_PER_THREAD // max(1, row)))


def squared_norm(a) -> float:
    """sum(a²) as a Python float: a BLAS dot per chunk (no temporary of a's size), the chunks'
    sums added in float64."""
    a1 = np.ascontiguousarray(a).reshape(-1)
    sums: dict[int, float] = {}  # first element of a piece -> its sum

    def piece(lo, hi):
        # NOTE: squares beyond float32's range give inf, which is the answer (the NaN/inf guard reads it);
        # errstate is per thread, so it is set here
        with np.errstate(over="ignore"):
            sums[lo] = float(np.dot(a1[lo:hi], a1[lo:hi]))

    with one_blas_thread():  # the pieces are split among our threads already
        parallel_pieces(a1.size, CHUNK, piece, min_per_thread=MIN_PER_THREAD)
    return sum(sums[lo] for lo in sorted(sums))  # a fixed order: the same bits every run


# --- GELU ---
# NOTE: not the reference's formula. 0.5·(1 + tanh(u)) is exactly σ(2u), so gelu(x) = x·σ(z) with
# z = 2u, and gelu'(x) = σ(z) + x·σ(z)·(1 − σ(z))·z'(x): one exp in place of tanh (np.tanh costs
# 4-6.6 ns an element here, np.exp 2-2.5), no 1 + t or 1 − t² to cancel, and every step in place in
# the chunk's buffers. It equals the reference to rounding (tests/test_numpy_fused.py); the Triton
# kernel (kernels/gelu.py) uses the same form.
_Z = 2 * gelu_ref.SQRT_2_OVER_PI  # z = _Z·(x + a·x³)
GRAD_CLIP = 10.0  # beyond |x| = 10, σ(z) is 0 or 1 in float64 and x·σ(1 − σ)·z' below 1e-30


def _exp_minus_z(x, e) -> None:
    """e ← exp(−z(x)), in place."""
    with np.errstate(over="ignore"):  # x³ or exp(−z) = inf for a huge |x| still gives σ = 0 or 1
        np.multiply(x, x, out=e)
        e *= gelu_ref.GELU_A
        e += 1
        e *= x
        e *= -_Z
        np.exp(e, out=e)


def _gelu_piece(x, y) -> None:
    """y ← x·σ(z(x)) = x / (1 + exp(−z))."""
    _exp_minus_z(x, y)
    y += 1
    np.divide(x, y, out=y)


def _gelu_grad_piece(dy, x, dx, xc, e) -> None:
    """dx ← dy·(σ + x·σ(1 − σ)·z'), through the scratch buffers xc and e. 1 − σ is e·σ, not a
    difference: near σ = 1 that would keep only float32's 6e-8 steps of it."""
    np.clip(x, -GRAD_CLIP, GRAD_CLIP, out=xc)  # keeps exp(−z) finite, so σ(1 − σ) is never inf·0
    _exp_minus_z(xc, e)
    np.add(e, 1, out=dx)
    np.reciprocal(dx, out=dx)  # σ
    e *= dx
    e *= dx  # σ(1 − σ)
    e *= xc  # x·σ(1 − σ), x clipped: beyond the clip the true term is below 1e-30, not x·1e-37
    np.multiply(xc, xc, out=xc)
    xc *= 3 * gelu_ref.GELU_A
    xc += 1
    xc *= _Z  # z'
    e *= xc
    e += dx
    np.multiply(e, dy, out=dx)


def _rows(a, dtype=None):
    """a as a contiguous (rows, last dim) array (in ``dtype`` if given)."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)


def gelu_forward(x):
    x2 = _rows(x, x.dtype)  # (rows, N)
    y = np.empty_like(x2)
    _over_rows(*x2.shape, lambda lo, hi: _gelu_piece(x2[lo:hi], y[lo:hi]))
    return y.reshape(x.shape)


def gelu_backward(dy, x):
    x2, dy2 = _rows(x, x.dtype), _rows(dy, x.dtype)  # (rows, N) each
    dx = np.empty_like(x2)

    def body(lo, hi, xc, s):
        _gelu_grad_piece(dy2[lo:hi], x2[lo:hi], dx[lo:hi], xc, s)

    _over_rows(*x2.shape, body, scratch=2, dtype=x.dtype)
    return dx.reshape(x.shape)


def bias_gelu_forward(x, bias):
    x2 = _rows(x, x.dtype)  # (rows, N)
    y = np.empty_like(x2)

    def body(lo, hi, xb):
        np.add(x2[lo:hi], bias, out=xb)
        _gelu_piece(xb, y[lo:hi])

    _over_rows(*x2.shape, body, scratch=1, dtype=x.dtype)
    return y.reshape(x.shape)


def bias_gelu_backward(dy, x, bias):
    x2, dy2 = _rows(x, x.dtype), _rows(dy, x.dtype)  # (rows, N) each
    dx = np.empty_like(x2)

    def body(lo, hi, xb, xc, s):
        np.add(x2[lo:hi], bias, out=xb)
        _gelu_grad_piece(dy2[lo:hi], xb, dx[lo:hi], xc, s)

    _over_rows(*x2.shape, body, scratch=3, dtype=x.dtype)
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
    x2 = _rows(x)  # (rows, N)
    y = np.empty(x2.shape, dtype=x.dtype)
    mean = np.empty(x2.shape[0], dtype=x.dtype)
    rstd = np.empty(x2.shape[0], dtype=x.dtype)

    def body(lo, hi):
        y[lo:hi], mean[lo:hi], rstd[lo:hi] = layernorm_ref.layer_norm_forward(x2[lo:hi], weight, bias, eps)

    _over_rows(x2.shape[0], x2.shape[1], body)
    return y.reshape(x.shape), mean.reshape(x.shape[:-1]), rstd.reshape(x.shape[:-1])


def layer_norm_backward(dy, x, weight, mean, rstd):
    n = x.shape[-1]
    x2, dy2 = _rows(x), _rows(dy)  # (rows, N) each
    mean1, rstd1 = mean.reshape(-1), rstd.reshape(-1)
    dx = np.empty(x2.shape, dtype=x.dtype)
    sums: dict[int, tuple] = {}  # first row of a piece -> its (dweight, dbias)

    def piece(lo, hi):
        dx[lo:hi], dw, db = layernorm_ref.layer_norm_backward(dy2[lo:hi], x2[lo:hi], weight, mean1[lo:hi], rstd1[lo:hi])
        sums[lo] = dw, db

    parallel_pieces(x2.shape[0], max(1, CHUNK // n), piece, min_per_thread=max(1, MIN_PER_THREAD // n))
    dweight, dbias = np.zeros(n, dtype=x.dtype), np.zeros(n, dtype=x.dtype)
    for lo in sorted(sums):  # a fixed order: the same bits every run
        dweight += sums[lo][0]
        dbias += sums[lo][1]
    return dx.reshape(x.shape), dweight, dbias


# --- RMSNorm ---
def rms_norm_forward(x, weight, eps=1e-6):
    x2 = _rows(x)  # (rows, N)
    y = np.empty(x2.shape, dtype=x.dtype)
    rstd = np.empty(x2.shape[0], dtype=x.dtype)

    def body(lo, hi):
        y[lo:hi], rstd[lo:hi] = rmsnorm_ref.rms_norm_forward(x2[lo:hi], weight, eps)

    _over_rows(x2.shape[0], x2.shape[1], body)
    return y.reshape(x.shape), rstd.reshape(x.shape[:-1])


def rms_norm_backward(dy, x, weight, rstd):
    n = x.shape[-1]
    x2, dy2 = _rows(x), _rows(dy)  # (rows, N) each
    rstd1 = rstd.reshape(-1)
    dx = np.empty(x2.shape, dtype=x.dtype)
    sums: dict[int, np.ndarray] = {}  # first row of a piece -> its dweight

    def piece(lo, hi):
        dx[lo:hi], sums[lo] = rmsnorm_ref.rms_norm_backward(dy2[lo:hi], x2[lo:hi], weight, rstd1[lo:hi])

    parallel_pieces(x2.shape[0], max(1, CHUNK // n), piece, min_per_thread=max(1, MIN_PER_THREAD // n))
    dweight = np.zeros(n, dtype=weight.dtype)
    for lo in sorted(sums):  # a fixed order: the same bits every run
        dweight += sums[lo]
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


def cross_entropy_loss_and_grad(logits, targets, dnll, ignore_index=-100):
    """The reference's forward and in-place backward with exp(x − m) computed once per
    element instead of twice (exp is most of the cost: ~2 ns an element here, a subtraction
    0.15): its row sum s gives the loss, and times dnll/s it is the gradient. nll has the
    reference's bits; dlogits differs from it by rounding (e/s against exp(x − m − log s))."""
    cross_entropy_ref._check(logits, targets, ignore_index)
    n = logits.shape[0]
    nll = np.empty(n, dtype=logits.dtype)
    dnll = np.broadcast_to(np.asarray(dnll, dtype=logits.dtype), (n,))

    def body(lo, hi):
        x, t = logits[lo:hi], targets[lo:hi]  # (r, V) overwritten by its gradient, (r,)
        valid = t != ignore_index  # (r,)
        rows = np.arange(hi - lo)
        row_max = x.max(axis=1)  # (r,)
        target_shifted = x[rows, np.where(valid, t, 0)] - row_max  # (r,) before x is overwritten
        x -= row_max[:, None]
        np.exp(x, out=x)  # (r, V) exp(x − m)
        row_sum = x.sum(axis=1)  # (r,)
        nll[lo:hi] = np.where(valid, np.log(row_sum) - target_shifted, 0)
        scale = np.where(valid, dnll[lo:hi], 0).astype(x.dtype, copy=False)  # (r,)
        x *= (scale / row_sum)[:, None]  # softmax · dnll
        x[rows[valid], t[valid]] -= scale[valid]

    _over_rows(n, logits.shape[1], body)
    return nll
