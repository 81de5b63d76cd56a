"""GELU and bias + GELU: the Triton kernels against the NumPy reference, the reference against torch.

On a CPU machine the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); on a GPU natively. The reference is evaluated in float64 on the
very values the kernel saw (inputs rounded to the kernel dtype), so each tolerance
below measures the kernel's own error.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels import gelu as tri
from kernels import gelu_ref as ref
from tests.helpers.kernel_check import kernel_device
from tests.helpers.op_check import assert_close

DEVICE = kernel_device()

# (dtype, atol, rtol) for y and dx. fp32: the sigmoid form and the reference's tanh differ
# in the last bits, and gelu' reaches ~1.13, so dx = dy * gelu' carries a few ulps.
TOLERANCES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    # fp16 output: one rounding to 11 significant bits (2**-11 ~ 4.9e-4 relative).
    pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
    # bf16 output: one rounding to 8 significant bits (2**-8 ~ 3.9e-3 relative).
    pytest.param(torch.bfloat16, 2e-2, 1e-2, id="bf16"),
]
# Primes, non-powers of two, a single element, one row, many rows, 3-D input.
SHAPES = [(1, 1), (7,), (3, 100), (1, 768), (3, 8192), (257, 97), (257, 768), (2, 3, 64)]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def make_inputs(shape, dtype, seed=0):
    """x, bias, dy as kernel-device tensors of dtype (one shared upstream gradient)."""
    rng = np.random.default_rng(seed)
    x = 3.0 * rng.standard_normal(shape)  # wide enough to reach both tails
    bias = rng.standard_normal(shape[-1])
    dy = rng.standard_normal(shape)
    return [torch.tensor(a, dtype=dtype, device=DEVICE) for a in (x, bias, dy)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_gelu_kernel_matches_reference(shape, dtype, atol, rtol):
    x, _, dy = make_inputs(shape, dtype)
    y = tri.gelu_forward(x)
    dx = tri.gelu_backward(dy, x)
    assert y.dtype == dx.dtype == dtype and y.shape == dx.shape == x.shape
    x64, dy64 = to_numpy(x), to_numpy(dy)
    assert_close(to_numpy(y), ref.gelu_forward(x64), atol, rtol, "y")
    assert_close(to_numpy(dx), ref.gelu_backward(dy64, x64), atol, rtol, "dx")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_bias_gelu_kernel_matches_reference(shape, dtype, atol, rtol):
    x, bias, dy = make_inputs(shape, dtype)
    y = tri.bias_gelu_forward(x, bias)
    dx, dbias = tri.bias_gelu_backward(dy, x, bias)
    assert y.dtype == dx.dtype == dbias.dtype == dtype and dbias.shape == bias.shape
    x64, b64, dy64 = to_numpy(x), to_numpy(bias), to_numpy(dy)
    rdx, rdbias = ref.bias_gelu_backward(dy64, x64, b64)
    assert_close(to_numpy(y), ref.bias_gelu_forward(x64, b64), atol, rtol, "y")
    assert_close(to_numpy(dx), rdx, atol, rtol, "dx")
    # dbias adds up to 257 rows in fp32: relaxed atol for the longer sums.
    assert_close(to_numpy(dbias), rdbias, 10 * atol, rtol, "dbias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_large_inputs_stay_finite(dtype):
    """The tails: gelu(x) -> x and gelu' -> 1 for large x, both -> 0 for large -x; never inf or nan."""
    big = torch.finfo(dtype).max
    values = [-big, -1e4, -100.0, -20.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 20.0, 100.0, 1e4, big]
    x = torch.tensor(values, dtype=dtype, device=DEVICE)
    y, dx = tri.gelu_forward(x), tri.gelu_backward(torch.ones_like(x), x)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all(), f"y={y}, dx={dx}"
    x64 = to_numpy(x)
    assert_close(to_numpy(y), ref.gelu_forward(x64), 1e-6, 2e-3, "y")
    assert_close(to_numpy(dx), ref.gelu_backward(np.ones_like(x64), x64), 1e-6, 2e-3, "dx")
    assert to_numpy(y)[-1] == x64[-1] and to_numpy(dx)[0] == 0.0


@pytest.mark.parametrize("shape", [(5,), (4, 7), (2, 3, 16)], ids=str)
def test_reference_matches_torch_float64(shape):
    rng = np.random.default_rng(1)
    x, dy, bias = 3.0 * rng.standard_normal(shape), rng.standard_normal(shape), rng.standard_normal(shape[-1])
    tx, tb = torch.tensor(x, requires_grad=True), torch.tensor(bias, requires_grad=True)
    ty = F.gelu(tx, approximate="tanh")
    ty.backward(torch.tensor(dy))
    assert_close(ref.gelu_forward(x), to_numpy(ty), 1e-12, 1e-12, "y")
    assert_close(ref.gelu_backward(dy, x), to_numpy(tx.grad), 1e-12, 1e-12, "dx")

    tx.grad = None
    ty = F.gelu(tx + tb, approximate="tanh")
    ty.backward(torch.tensor(dy))
    dx, dbias = ref.bias_gelu_backward(dy, x, bias)
    assert_close(ref.bias_gelu_forward(x, bias), to_numpy(ty), 1e-12, 1e-12, "bias y")
    assert_close(dx, to_numpy(tx.grad), 1e-12, 1e-12, "bias dx")
    assert_close(dbias, to_numpy(tb.grad), 1e-12, 1e-12, "dbias")


def test_reference_keeps_float32():
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
    b = np.zeros(4, dtype=np.float32)
    outs = [ref.gelu_forward(x), ref.gelu_backward(x, x), ref.bias_gelu_forward(x, b), *ref.bias_gelu_backward(x, x, b)]
    assert {a.dtype for a in outs} == {np.dtype(np.float32)}


def test_non_contiguous_and_empty_inputs():
    x, bias, dy = make_inputs((64, 5), torch.float32)
    xt, dyt = x.t(), dy.t()  # (5, 64), not contiguous
    assert_close(to_numpy(tri.gelu_forward(xt)), ref.gelu_forward(to_numpy(xt)), 1e-5, 1e-5, "y")
    dx, _ = tri.bias_gelu_backward(dyt, xt, torch.zeros(64, device=DEVICE))
    assert_close(to_numpy(dx), ref.gelu_backward(to_numpy(dyt), to_numpy(xt)), 1e-5, 1e-5, "dx")
    empty = torch.empty(0, 8, device=DEVICE)
    assert tri.gelu_forward(empty).shape == (0, 8)
    dx, dbias = tri.bias_gelu_backward(empty, empty, torch.ones(8, device=DEVICE))
    assert dx.shape == (0, 8) and float(dbias.abs().sum()) == 0.0


def test_errors_name_the_values():
    x = torch.zeros(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"bias has shape \(7,\), expected \(8,\)"):
        tri.bias_gelu_forward(x, torch.zeros(7, device=DEVICE))
    with pytest.raises(ValueError, match=r"bias has shape \(8, 1\)"):
        tri.bias_gelu_backward(x, x, torch.zeros(8, 1, device=DEVICE))
    with pytest.raises(ValueError, match=r"dy has shape \(4, 9\), expected x's shape \(4, 8\)"):
        tri.gelu_backward(torch.zeros(4, 9, device=DEVICE), x)
    with pytest.raises(ValueError, match="int64"):
        tri.gelu_forward(x.long())
    with pytest.raises(ValueError, match="one device"):
        tri.bias_gelu_forward(x, torch.zeros(8, device="meta"))
