"""NumPy reference for rotary position embedding (RoPE) in the "rotate half" layout of
Llama and Qwen3: the ground truth the Triton kernels in ``kernels/rope.py`` answer to, and
the numpy backend's kernel pair.

x (B, H, T, D) holds, per head and position, D / 2 pairs (x_i, x_{i + D/2}); pair i turns
by the angle pos · inv_freq_i. The caller computes the tables cos, sin (P, D/2) on the
host for positions 0 … P-1 (plain RoPE from any rope_theta, or with Llama 3's frequency
scaling: only the tables differ); ``offset`` is the position of row t = 0, the number of
tokens already in a KV cache::

    c, s = cos[offset + t], sin[offset + t]
    y[:D/2] = x[:D/2] * c - x[D/2:] * s
    y[D/2:] = x[D/2:] * c + x[:D/2] * s

The backward is the inverse rotation (the same formula with -s), since a rotation's
transpose is its inverse. Arrays keep x's dtype (float32 or float64).
"""

import numpy as np


def _rotate(x, cos, sin, offset, direction):
    half = x.shape[-1] // 2
    T = x.shape[-2]
    c = cos[offset:offset + T].astype(x.dtype)  # (T, D/2)
    s = direction * sin[offset:offset + T].astype(x.dtype)  # (T, D/2)
    x1, x2 = x[..., :half], x[..., half:]  # (B, H, T, D/2) each
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)  # (B, H, T, D)


def rope_forward(x, cos, sin, offset=0):
    """x (B, H, T, D); cos, sin (P, D/2) with P >= offset + T -> x rotated (B, H, T, D)."""
    return _rotate(x, cos, sin, offset, 1.0)


def rope_backward(dy, cos, sin, offset=0):
    """dy (B, H, T, D) -> dx (B, H, T, D): the inverse rotation of dy."""
    return _rotate(dy, cos, sin, offset, -1.0)
