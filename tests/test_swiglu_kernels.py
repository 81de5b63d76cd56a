"""SwiGLU: the Triton kernels against the NumPy reference, the reference against torch."""

import numpy as np
import pytest
import torch

from kernels import swiglu as tri
from kernels import swiglu_ref as ref
from tests.helpers.kernel_check import kernel_device
from tests.helpers.op_check import assert_close

DEVICE = kernel_device()

TOLERANCES = [
    pytest.param(torch.float32, 1e-6, 1e-5, id="fp32"),
    # fp16 outputs: one rounding to 11 significant bits (2**-11 ~ 4.9e-4 relative).
    pytest.param(torch.float16, 1e-3, 2e-3, id="fp16"),
    # bf16 outputs: one rounding to 8 significant bits; all math is fp32 after the load.
    pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16"),
]
# Primes, non-powers of two, one element, an MLP-like (B, T, hidden) block.
SHAPES = [(1,), (7,), (3, 100), (257, 13), (2, 5, 688)]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_kernel_matches_reference(shape, dtype, atol, rtol):
    rng = np.random.default_rng(0)
    gate, up, dy = (torch.tensor(rng.standard_normal(shape) * 3, dtype=dtype, device=DEVICE) for _ in range(3))
    y = tri.swiglu_forward(gate, up)
    dgate, dup = tri.swiglu_backward(dy, gate, up)
    assert y.dtype == dgate.dtype == dup.dtype == dtype and y.shape == shape
    g64, u64, dy64 = map(to_numpy, (gate, up, dy))
    rdgate, rdup = ref.swiglu_backward(dy64, g64, u64)
    assert_close(to_numpy(y), ref.swiglu_forward(g64, u64), atol, rtol, "y")
    assert_close(to_numpy(dgate), rdgate, atol, rtol, "dgate")
    assert_close(to_numpy(dup), rdup, atol, rtol, "dup")


def test_extreme_gates_stay_finite():
    gate = torch.tensor([-1e4, -100.0, -88.0, 0.0, 88.0, 1e4], device=DEVICE)
    up, dy = torch.ones_like(gate), torch.ones_like(gate)
    y, (dgate, dup) = tri.swiglu_forward(gate, up), tri.swiglu_backward(dy, gate, up)
    g = to_numpy(gate)
    assert_close(to_numpy(y), ref.swiglu_forward(g, np.ones(6)), 1e-6, 1e-6, "y")
    assert_close(to_numpy(dgate), ref.swiglu_backward(np.ones(6), g, np.ones(6))[0], 1e-6, 1e-6, "dgate")
    assert torch.isfinite(dup).all()


def test_reference_matches_torch_float64():
    rng = np.random.default_rng(1)
    g, u, dy = (rng.standard_normal((4, 9)) * 3 for _ in range(3))
    tg, tu = (torch.tensor(a, requires_grad=True) for a in (g, u))
    ty = torch.nn.functional.silu(tg) * tu
    ty.backward(torch.tensor(dy))
    dgate, dup = ref.swiglu_backward(dy, g, u)
    assert_close(ref.swiglu_forward(g, u), ty.detach().numpy(), 1e-12, 1e-12, "y")
    assert_close(dgate, tg.grad.numpy(), 1e-12, 1e-12, "dgate")
    assert_close(dup, tu.grad.numpy(), 1e-12, 1e-12, "dup")


def test_errors_name_the_values():
    with pytest.raises(ValueError, match=r"share one shape, got \{'gate': \(2, 3\), 'up': \(3, 2\)\}"):
        tri.swiglu_forward(torch.zeros(2, 3, device=DEVICE), torch.zeros(3, 2, device=DEVICE))
    with pytest.raises(ValueError, match="int64"):
        tri.swiglu_forward(torch.zeros(3, device=DEVICE).long(), torch.zeros(3, device=DEVICE).long())
