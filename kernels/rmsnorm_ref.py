"""NumPy reference for RMSNorm over the last dimension (Llama, Qwen3; also Qwen3's per-head
q/k norm): the ground truth the Triton kernels in ``kernels/rmsnorm.py`` answer to, and the
numpy backend's kernel pair.

Written for clarity, not speed. Arrays keep their dtype (float32 or float64).

Forward, for one row x of length N::

    rstd = 1 / sqrt(sum(x**2) / N + eps)
    y    = x * rstd * weight

Backward, with xhat = x * rstd and g = dy * weight (no mean is subtracted, so only one
correction term, from rstd's dependence on x)::

    dx      = rstd * (g - xhat * mean(g * xhat))
    dweight = sum over rows of dy * xhat
"""

import numpy as np


def rms_norm_forward(x, weight, eps=1e-6):
    """x (..., N); weight (N,) -> y (..., N), rstd (...)."""
    rstd = (1.0 / np.sqrt((x * x).mean(axis=-1) + eps)).astype(x.dtype)  # (...)
    y = x * rstd[..., None] * weight  # (..., N)
    return y.astype(x.dtype), rstd


def rms_norm_backward(dy, x, weight, rstd):
    """dy, x (..., N); weight (N,); rstd (...) -> dx (..., N), dweight (N,)."""
    xhat = x * rstd[..., None]  # (..., N)
    g = dy * weight  # (..., N)
    mean_gx = (g * xhat).mean(axis=-1, keepdims=True)  # (..., 1)
    dx = rstd[..., None] * (g - xhat * mean_gx)  # (..., N)
    dweight = (dy * xhat).sum(axis=tuple(range(x.ndim - 1)))  # (N,)
    return dx.astype(x.dtype), dweight.astype(weight.dtype)
