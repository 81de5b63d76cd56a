"""One helper so each op test is one line: our op against torch in float64.

``check_op`` builds random inputs of the given shapes, runs ``our_fn`` on engine tensors and
``torch_fn`` on torch tensors, compares the outputs, then backpropagates ONE shared random
upstream gradient through both and compares every input gradient. Optionally it also runs a
finite-difference gradcheck on the same inputs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

import engine


def assert_close(ours: np.ndarray, ref: np.ndarray, atol: float, rtol: float, what: str) -> None:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    err = np.abs(ours - ref) - (atol + rtol * np.abs(ref))
    if err.size and err.max() > 0:
        worst = np.unravel_index(int(np.argmax(err)), err.shape)
        raise AssertionError(
            f"{what}: max |diff| {np.abs(ours - ref).max():.3g}; worst at {tuple(int(i) for i in worst)}: "
            f"ours {ours[worst]:.10g} vs reference {ref[worst]:.10g} (atol {atol}, rtol {rtol})"
        )


def check_op(
    shapes: Sequence[tuple[int, ...]],
    our_fn: Callable[..., engine.Tensor],
    torch_fn: Callable[..., torch.Tensor],
    atol: float = 1e-10,
    rtol: float = 1e-7,
    gradcheck: bool = True,
    low: float = -2.0,
    high: float = 2.0,
    seed: int = 0,
) -> None:
    rng = np.random.default_rng(seed)
    arrays = [rng.uniform(low, high, size=s) for s in shapes]  # float64
    ours_in = [engine.tensor(a, requires_grad=True, dtype="float64") for a in arrays]
    torch_in = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = our_fn(*ours_in)
    ref = torch_fn(*torch_in)
    assert_close(out.numpy(), ref.detach().numpy(), atol, rtol, "forward")
    upstream = rng.standard_normal(ref.shape)
    out.backward(upstream)
    ref.backward(torch.tensor(upstream))
    for i, (a, b) in enumerate(zip(ours_in, torch_in)):
        ref_grad = np.zeros(b.shape) if b.grad is None else b.grad.numpy()
        our_grad = np.zeros(a.shape) if a.grad is None else a.grad
        assert_close(our_grad, ref_grad, atol, rtol, f"grad of input {i} {a.shape}")
    if gradcheck:
        engine.gradcheck(our_fn, *arrays)
