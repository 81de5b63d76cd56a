"""NumPy reference for GELU (tanh approximation, as GPT-2) and fused bias + GELU: the
ground truth the Triton kernels in ``kernels/gelu.py`` answer to, and the numpy
backend's kernel pair.

    gelu(x)  = 0.5 * x * (1 + t),   t = tanh(u),   u = c * (x + a * x**3)
    gelu'(x) = 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * c * (1 + 3 * a * x**2)

with c = sqrt(2 / pi) and a = 0.044715. Arrays keep their dtype (float32 or float64).

NOTE: the cubic overflows float32 for |x| > ~7e12 and then gelu'(x) would be
0 * inf = nan. The polynomial is evaluated at x clipped to [-CLIP, CLIP]: beyond
|x| = 10, tanh(u) is already exactly +-1 in float64, so the clip changes no value.
"""

import numpy as np

SQRT_2_OVER_PI = 0.7978845608028654
GELU_A = 0.044715
CLIP = 100.0


def _tanh_and_du(x):
    """t = tanh(u(x)) and du/dx, both safe for any finite x."""
    xc = np.clip(x, -CLIP, CLIP)
    t = np.tanh(SQRT_2_OVER_PI * (xc + GELU_A * xc * xc * xc))
    du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_A * xc * xc)
    return t, du


def gelu_forward(x):
    """x (...) -> y (...)."""
    t, _ = _tanh_and_du(x)
    return (0.5 * x * (1.0 + t)).astype(x.dtype)


def gelu_backward(dy, x):
    """dy, x (...) -> dx (...)."""
    t, du = _tanh_and_du(x)
    dgelu = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    return (dy * dgelu).astype(x.dtype)


def bias_gelu_forward(x, bias):
    """x (..., N), bias (N,) -> gelu(x + bias) (..., N)."""
    return gelu_forward(x + bias)


def bias_gelu_backward(dy, x, bias):
    """dy, x (..., N), bias (N,) -> dx (..., N), dbias (N,)."""
    dx = gelu_backward(dy, x + bias)
    dbias = dx.reshape(-1, x.shape[-1]).sum(axis=0)
    return dx, dbias.astype(x.dtype)
