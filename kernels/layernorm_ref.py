"""NumPy reference for LayerNorm over the last dimension: the ground truth the Triton
kernels in ``kernels/layernorm.py`` answer to, and the numpy backend's kernel pair.

Written for clarity, not speed. Arrays keep their dtype (float32 or float64): every
intermediate is computed in the dtype of ``x``.

Forward, for one row x of length N::

    mean = sum(x) / N
    rstd = 1 / sqrt(sum((x - mean)**2) / N + eps)      # biased variance, as torch
    xhat = (x - mean) * rstd
    y    = xhat * weight + bias

Backward, with g = dy * weight::

    dx      = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dweight = sum over rows of dy * xhat
    dbias   = sum over rows of dy
"""

import numpy as np


def layer_norm_forward(x, weight, bias, eps=1e-5):
    """x (..., N); weight, bias (N,) -> y (..., N), mean (...), rstd (...)."""
    mean = x.mean(axis=-1)  # (...)
    xc = x - mean[..., None]  # (..., N)
    var = (xc * xc).mean(axis=-1)  # (...)
    rstd = (1.0 / np.sqrt(var + eps)).astype(x.dtype)  # (...)
    y = xc * rstd[..., None] * weight + bias  # (..., N)
    return y.astype(x.dtype), mean, rstd


def layer_norm_backward(dy, x, weight, mean, rstd):
    """dy, x (..., N); weight (N,); mean, rstd (...) -> dx (..., N), dweight (N,), dbias (N,)."""
    n = x.shape[-1]
    xhat = (x - mean[..., None]) * rstd[..., None]  # (..., N)
    g = dy * weight  # (..., N)
    mean_g = g.sum(axis=-1, keepdims=True) / n  # (..., 1)
    mean_gx = (g * xhat).sum(axis=-1, keepdims=True) / n  # (..., 1)
    dx = rstd[..., None] * (g - mean_g - xhat * mean_gx)  # (..., N)
    lead = tuple(range(x.ndim - 1))
    dweight = (dy * xhat).sum(axis=lead)  # (N,)
    dbias = dy.sum(axis=lead)  # (N,)
    return dx.astype(x.dtype), dweight.astype(x.dtype), dbias.astype(x.dtype)
