"""LayerNorm: the Triton kernels against the NumPy reference, the reference against torch.

On a CPU machine the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); on a GPU natively. The reference is evaluated in float64 on the
very values the kernel saw (inputs rounded to the kernel dtype), so each tolerance
below measures the kernel's own error.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels import layernorm as tri
from kernels import layernorm_ref as ref
from tests.helpers.kernel_check import kernel_device
from tests.helpers.op_check import assert_close

DEVICE = kernel_device()

# (dtype, atol, rtol) for y and dx; mean and rstd are compared at the fp32 row.
TOLERANCES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    # fp16 output: one rounding to 11 significant bits (2**-11 ~ 4.9e-4 relative).
    pytest.param(torch.float16, 4e-3, 4e-3, id="fp16"),
    # bf16 output: one rounding to 8 significant bits (2**-8 ~ 3.9e-3 relative).
    pytest.param(torch.bfloat16, 3e-2, 2e-2, id="bf16"),
]
# Primes, non-powers of two, N = 1, the largest N, one row, many rows, 3-D input.
SHAPES = [
    (3, 1),
    (3, 7),
    (3, 64),
    (3, 100),
    (3, 768),
    (3, 8192),
    (2, tri.MAX_N),
    (1, 768),
    (257, 100),
    (257, 768),
    (2, 5, 97),
]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def make_inputs(shape, dtype, seed=0):
    """x, weight, bias, dy as kernel-device tensors of dtype (one shared upstream gradient)."""
    rng = np.random.default_rng(seed)
    n = shape[-1]
    x = rng.standard_normal(shape) * 2.0 + 0.5  # a non-zero mean exercises the centering
    weight = 1.0 + 0.5 * rng.standard_normal(n)
    bias = 0.5 * rng.standard_normal(n)
    dy = rng.standard_normal(shape)
    return [torch.tensor(a, dtype=dtype, device=DEVICE) for a in (x, weight, bias, dy)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_kernel_matches_reference(shape, dtype, atol, rtol):
    x, weight, bias, dy = make_inputs(shape, dtype)
    y, mean, rstd = tri.layer_norm_forward(x, weight, bias)
    dx, dweight, dbias = tri.layer_norm_backward(dy, x, weight, mean, rstd)
    assert (y.dtype, dx.dtype, dweight.dtype, dbias.dtype) == (dtype,) * 4
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == x.shape[:-1]

    x64, w64, b64, dy64 = map(to_numpy, (x, weight, bias, dy))
    ry, rmean, rrstd = ref.layer_norm_forward(x64, w64, b64)
    rdx, rdw, rdb = ref.layer_norm_backward(dy64, x64, w64, rmean, rrstd)
    assert_close(to_numpy(y), ry, atol, rtol, "y")
    assert_close(to_numpy(mean), rmean, 1e-5, 1e-5, "mean")
    # rstd = 1/sqrt(eps) ~ 316 when N = 1: relative tolerance carries it.
    assert_close(to_numpy(rstd), rrstd, 1e-5, 1e-5, "rstd")
    assert_close(to_numpy(dx), rdx, atol, rtol, "dx")
    # dweight, dbias add up to 257 rows in fp32: relaxed atol for the longer sums.
    assert_close(to_numpy(dweight), rdw, 10 * atol, rtol, "dweight")
    assert_close(to_numpy(dbias), rdb, 10 * atol, rtol, "dbias")


def test_fp32_parameters_with_half_activations():
    """The mixed-precision case: fp16 x and dy, fp32 weight and bias."""
    x, _, _, dy = make_inputs((5, 100), torch.float16)
    _, weight, bias, _ = make_inputs((5, 100), torch.float32)
    y, mean, rstd = tri.layer_norm_forward(x, weight, bias)
    dx, dweight, dbias = tri.layer_norm_backward(dy, x, weight, mean, rstd)
    assert (y.dtype, dx.dtype, dweight.dtype) == (torch.float16, torch.float16, torch.float32)
    x64, w64, b64, dy64 = map(to_numpy, (x, weight, bias, dy))
    ry, rmean, rrstd = ref.layer_norm_forward(x64, w64, b64)
    rdx, rdw, _ = ref.layer_norm_backward(dy64, x64, w64, rmean, rrstd)
    assert_close(to_numpy(y), ry, 4e-3, 4e-3, "y")
    assert_close(to_numpy(dx), rdx, 4e-3, 4e-3, "dx")
    assert_close(to_numpy(dweight), rdw, 1e-4, 1e-5, "dweight")


def test_non_contiguous_input_is_copied():
    x, weight, bias, dy = make_inputs((100, 6), torch.float32)
    xt = x.t()  # (6, 100), not contiguous
    y, mean, rstd = tri.layer_norm_forward(xt, torch.ones(100, device=DEVICE), torch.zeros(100, device=DEVICE))
    ry, _, _ = ref.layer_norm_forward(to_numpy(xt), np.ones(100), np.zeros(100))
    assert_close(to_numpy(y), ry, 1e-5, 1e-5, "y")
    dx, _, _ = tri.layer_norm_backward(dy.t(), xt, torch.ones(100, device=DEVICE), mean, rstd)
    assert dx.shape == (6, 100)


def test_zero_rows():
    x = torch.empty(0, 64, device=DEVICE)
    w, b = torch.ones(64, device=DEVICE), torch.zeros(64, device=DEVICE)
    y, mean, rstd = tri.layer_norm_forward(x, w, b)
    assert y.shape == (0, 64) and mean.shape == (0,)
    dx, dw, db = tri.layer_norm_backward(x, x, w, mean, rstd)
    assert dx.shape == (0, 64) and float(dw.abs().sum()) == 0.0 and float(db.abs().sum()) == 0.0


@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 64)], ids=str)
def test_reference_matches_torch_float64(shape):
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal(shape) + 1.0, rng.standard_normal(shape)
    w, b = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = F.layer_norm(tx, (shape[-1],), tw, tb, eps=1e-5)
    ty.backward(torch.tensor(dy))

    y, mean, rstd = ref.layer_norm_forward(x, w, b, eps=1e-5)
    dx, dw, db = ref.layer_norm_backward(dy, x, w, mean, rstd)
    for what, got, want in [("y", y, ty), ("dx", dx, tx.grad), ("dweight", dw, tw.grad), ("dbias", db, tb.grad)]:
        assert_close(got, to_numpy(want), 1e-12, 1e-12, what)
    assert y.dtype == dx.dtype == np.float64


def test_reference_keeps_float32():
    x = np.ones((2, 3), dtype=np.float32)
    w, b = np.ones(3, dtype=np.float32), np.zeros(3, dtype=np.float32)
    y, mean, rstd = ref.layer_norm_forward(x, w, b)
    dx, dw, db = ref.layer_norm_backward(x, x, w, mean, rstd)
    assert {a.dtype for a in (y, mean, rstd, dx, dw, db)} == {np.dtype(np.float32)}


def test_errors_name_the_values():
    x = torch.zeros(4, 8, device=DEVICE)
    w, b = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\), expected \(8,\)"):
        tri.layer_norm_forward(x, torch.ones(7, device=DEVICE), b)
    with pytest.raises(ValueError, match=r"bias has shape \(8, 1\)"):
        tri.layer_norm_forward(x, w, b[:, None])
    with pytest.raises(ValueError, match="at least one dimension"):
        tri.layer_norm_forward(torch.tensor(1.0, device=DEVICE), w, b)
    with pytest.raises(ValueError, match=r"N=20000 must be in \[1, 16384\]"):
        tri.layer_norm_forward(
            torch.zeros(1, 20000, device=DEVICE), torch.ones(20000, device=DEVICE), torch.zeros(20000, device=DEVICE)
        )
    with pytest.raises(ValueError, match="int64"):
        tri.layer_norm_forward(x.long(), w, b)
    with pytest.raises(ValueError, match="one device"):
        tri.layer_norm_forward(x, w.to("meta"), b)

    _, mean, rstd = tri.layer_norm_forward(x, w, b)
    with pytest.raises(ValueError, match=r"dy has shape \(4, 9\)"):
        tri.layer_norm_backward(torch.zeros(4, 9, device=DEVICE), x, w, mean, rstd)
    with pytest.raises(ValueError, match=r"rstd has shape \(3,\), expected \(4,\)"):
        tri.layer_norm_backward(x, x, w, mean, rstd[:3])
