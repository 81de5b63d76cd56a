"""RMSNorm: the Triton kernels against the NumPy reference, the reference against torch.

The reference runs in float64 on the very values the kernel saw (inputs rounded to the
kernel dtype), so each tolerance measures the kernel's own error.
"""

import numpy as np
import pytest
import torch

from kernels import rmsnorm as tri
from kernels import rmsnorm_ref as ref
from tests.helpers.kernel_check import kernel_device
from tests.helpers.op_check import assert_close

DEVICE = kernel_device()

# (dtype, atol, rtol) for y and dx; rstd is compared at the fp32 row.
TOLERANCES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    # fp16 output: one rounding to 11 significant bits (2**-11 ~ 4.9e-4 relative).
    pytest.param(torch.float16, 4e-3, 4e-3, id="fp16"),
    # bf16 output: one rounding to 8 significant bits (2**-8 ~ 3.9e-3 relative); the kernels
    # only load, cast to fp32 and store bf16, which the interpreter does right.
    pytest.param(torch.bfloat16, 3e-2, 2e-2, id="bf16"),
]
# N = 1, primes, non-powers of two, the largest N; one row, many rows; a per-head q/k norm shape.
SHAPES = [(3, 1), (3, 7), (3, 100), (1, 2048), (2, tri.MAX_N), (257, 100), (2, 5, 3, 128), (2, 13, 7, 80)]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def make_inputs(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 2.0 + 0.5
    weight = 1.0 + 0.5 * rng.standard_normal(shape[-1])
    dy = rng.standard_normal(shape)
    return [torch.tensor(a, dtype=dtype, device=DEVICE) for a in (x, weight, dy)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_kernel_matches_reference(shape, dtype, atol, rtol):
    x, weight, dy = make_inputs(shape, dtype)
    y, rstd = tri.rms_norm_forward(x, weight, 1e-6)
    dx, dweight = tri.rms_norm_backward(dy, x, weight, rstd)
    assert (y.dtype, dx.dtype, dweight.dtype, rstd.dtype) == (dtype, dtype, dtype, torch.float32)
    assert rstd.shape == x.shape[:-1]

    x64, w64, dy64 = map(to_numpy, (x, weight, dy))
    ry, rrstd = ref.rms_norm_forward(x64, w64, 1e-6)
    rdx, rdw = ref.rms_norm_backward(dy64, x64, w64, rrstd)
    assert_close(to_numpy(y), ry, atol, rtol, "y")
    assert_close(to_numpy(rstd), rrstd, 1e-5, 1e-5, "rstd")
    assert_close(to_numpy(dx), rdx, atol, rtol, "dx")
    # dweight adds up to 257 rows in fp32 (then rounds to dtype): relaxed atol for the longer sums.
    assert_close(to_numpy(dweight), rdw, 10 * atol, rtol, "dweight")


def test_fp32_weight_with_half_activations_and_zero_rows():
    x, _, dy = make_inputs((5, 100), torch.float16)
    _, weight, _ = make_inputs((5, 100), torch.float32)
    y, rstd = tri.rms_norm_forward(x, weight)
    dx, dweight = tri.rms_norm_backward(dy, x, weight, rstd)
    assert (y.dtype, dx.dtype, dweight.dtype) == (torch.float16, torch.float16, torch.float32)
    ry, rrstd = ref.rms_norm_forward(to_numpy(x), to_numpy(weight))
    assert_close(to_numpy(dweight), ref.rms_norm_backward(to_numpy(dy), to_numpy(x), to_numpy(weight), rrstd)[1],
                 1e-4, 1e-5, "dweight")
    empty = torch.empty(0, 64, device=DEVICE)
    y, rstd = tri.rms_norm_forward(empty, torch.ones(64, device=DEVICE))
    dx, dw = tri.rms_norm_backward(empty, empty, torch.ones(64, device=DEVICE), rstd)
    assert y.shape == dx.shape == (0, 64) and rstd.shape == (0,) and float(dw.abs().sum()) == 0.0


@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 2, 16)], ids=str)
def test_reference_matches_torch_float64(shape):
    rng = np.random.default_rng(1)
    x, dy, w = rng.standard_normal(shape) + 1.0, rng.standard_normal(shape), rng.standard_normal(shape[-1])
    tx, tw = (torch.tensor(a, requires_grad=True) for a in (x, w))
    ty = torch.nn.functional.rms_norm(tx, (shape[-1],), tw, eps=1e-6)
    ty.backward(torch.tensor(dy))
    y, rstd = ref.rms_norm_forward(x, w, 1e-6)
    dx, dw = ref.rms_norm_backward(dy, x, w, rstd)
    for what, got, want in [("y", y, ty), ("dx", dx, tx.grad), ("dweight", dw, tw.grad)]:
        assert_close(got, to_numpy(want), 1e-12, 1e-12, what)


def test_errors_name_the_values():
    x, w = torch.zeros(4, 8, device=DEVICE), torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\), expected \(8,\)"):
        tri.rms_norm_forward(x, torch.ones(7, device=DEVICE))
    with pytest.raises(ValueError, match=r"N=20000 must be in \[1, 16384\]"):
        tri.rms_norm_forward(torch.zeros(1, 20000, device=DEVICE), torch.ones(20000, device=DEVICE))
    with pytest.raises(ValueError, match="int64"):
        tri.rms_norm_forward(x.long(), w)
    _, rstd = tri.rms_norm_forward(x, w)
    with pytest.raises(ValueError, match=r"rstd has shape \(3,\), expected \(4,\)"):
        tri.rms_norm_backward(x, x, w, rstd[:3])
