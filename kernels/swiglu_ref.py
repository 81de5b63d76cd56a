"""NumPy reference for SwiGLU, the gated MLP activation of Llama and Qwen3: the ground truth
the Triton kernels in ``kernels/swiglu.py`` answer to, and the numpy backend's kernel pair.

    y = silu(gate) * up,   silu(g) = g * sigmoid(g)

    dgate = dy * up * sigmoid(g) * (1 + g * (1 - sigmoid(g)))      (= dy * up * silu'(g))
    dup   = dy * silu(g)

NOTE: sigmoid(g) = (1 + tanh(g / 2)) / 2 cannot overflow; 1 / (1 + exp(-g)) overflows
exp for g < -88 in float32. Arrays keep their dtype (float32 or float64).
"""

import numpy as np


def _sigmoid(g):
    return 0.5 * (1.0 + np.tanh(0.5 * g))


def swiglu_forward(gate, up):
    """gate, up (...) -> silu(gate) * up (...)."""
    return (gate * _sigmoid(gate) * up).astype(gate.dtype)


def swiglu_backward(dy, gate, up):
    """dy, gate, up (...) -> dgate (...), dup (...)."""
    s = _sigmoid(gate)
    dgate = dy * up * s * (1.0 + gate * (1.0 - s))
    dup = dy * gate * s
    return dgate.astype(gate.dtype), dup.astype(up.dtype)
