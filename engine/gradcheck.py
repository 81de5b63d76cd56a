"""Finite-difference gradient checking in float64."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from engine.backends import get_backend
from engine.tensor import Tensor, no_grad


class GradcheckError(AssertionError):
    pass


def gradcheck(fn: Callable[..., Tensor], *inputs: Any, eps: float = 1e-6, atol: float = 1e-5,
              rtol: float = 1e-4, seed: int = 0) -> bool:
    """Compare the analytic gradients of ``fn`` with central finite differences.

    Every float input is cast to float64. The scalar checked is ``sum(u * fn(*inputs))``
    for one random ``u``, so every output element contributes. Raises GradcheckError
    naming the input and the worst element on failure; returns True otherwise.
    """
    backend = get_backend()
    arrays = [np.asarray(x.numpy() if isinstance(x, Tensor) else x) for x in inputs]
    # float inputs become float64 leaves; integer inputs (ids, targets) pass through as they are
    leaves = [Tensor(a.astype(np.float64), requires_grad=True) if a.dtype.kind == "f" else x
              for a, x in zip(arrays, inputs)]
    out = fn(*leaves)
    upstream = np.random.default_rng(seed).standard_normal(out.shape)
    out.backward(backend.asarray(upstream, "float64"))

    def scalar() -> float:
        with no_grad():
            return float(np.sum(upstream * fn(*leaves).numpy()))

    for index, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor) or not leaf.requires_grad:
            continue
        analytic = np.zeros(leaf.shape) if leaf.grad is None else backend.to_numpy(leaf.grad)
        values = leaf.numpy().copy()
        numeric = np.zeros_like(values)
        flat = values.reshape(-1)
        for i in range(flat.size):
            orig = flat[i]
            flat[i] = orig + eps
            leaf.data = backend.asarray(values.copy(), "float64")
            plus = scalar()
            flat[i] = orig - eps
            leaf.data = backend.asarray(values.copy(), "float64")
            minus = scalar()
            flat[i] = orig
            numeric.reshape(-1)[i] = (plus - minus) / (2 * eps)
        leaf.data = backend.asarray(values, "float64")
        err = np.abs(analytic - numeric) - (atol + rtol * np.abs(numeric))
        if err.size and err.max() > 0:
            worst = np.unravel_index(int(np.argmax(err)), err.shape)
            raise GradcheckError(
                f"gradcheck failed for input {index} (shape {leaf.shape}) at {tuple(int(i) for i in worst)}: "
                f"analytic {analytic[worst]:.8g} vs numeric {numeric[worst]:.8g} "
                f"(|diff| {abs(analytic[worst] - numeric[worst]):.3g}, atol {atol}, rtol {rtol})"
            )
    return True
