"""RoPE: the Triton kernel against the NumPy reference, the reference against torch."""

import numpy as np
import pytest
import torch

from kernels import rope as tri
from kernels import rope_ref as ref
from tests.helpers.kernel_check import kernel_device
from tests.helpers.op_check import assert_close

DEVICE = kernel_device()

TOLERANCES = [
    pytest.param(torch.float32, 1e-6, 1e-5, id="fp32"),
    # fp16 output: one rounding to 11 significant bits of values up to ~4.
    pytest.param(torch.float16, 4e-3, 2e-3, id="fp16"),
    # bf16 output: one rounding to 8 significant bits; all math is fp32 after the load.
    pytest.param(torch.bfloat16, 3e-2, 1e-2, id="bf16"),
]
# (B, H, T, D, offset): head dims 2, 6 (non-power-of-two half), 64, 80, 128; primes; a decode step.
CASES = [(1, 1, 1, 2, 0), (2, 3, 7, 6, 0), (1, 2, 13, 64, 5), (2, 1, 5, 80, 0), (1, 2, 1, 128, 37)]


def tables(n_positions: int, head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """Plain RoPE tables (n_positions, head_dim / 2), float64."""
    inv_freq = theta ** -(np.arange(0, head_dim, 2) / head_dim)
    angles = np.arange(n_positions)[:, None] * inv_freq[None, :]
    return np.cos(angles), np.sin(angles)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


@pytest.mark.parametrize("B, H, T, D, offset", CASES, ids=str)
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_kernel_matches_reference(B, H, T, D, offset, dtype, atol, rtol):
    rng = np.random.default_rng(0)
    cos, sin = tables(offset + T + 3, D, theta=500000.0)
    # x as a (B, T, H, D) projection viewed as heads: the strided input the kernel fuses with.
    x = torch.tensor(rng.standard_normal((B, T, H, D)), dtype=dtype, device=DEVICE).transpose(1, 2)
    dy = torch.tensor(rng.standard_normal((B, H, T, D)), dtype=dtype, device=DEVICE)
    tcos, tsin = (torch.tensor(a, dtype=torch.float32, device=DEVICE) for a in (cos, sin))
    y = tri.rope_forward(x, tcos, tsin, offset)
    dx = tri.rope_backward(dy, tcos, tsin, offset)
    assert y.dtype == dx.dtype == dtype and y.is_contiguous() and y.shape == (B, H, T, D)
    c64, s64 = to_numpy(tcos), to_numpy(tsin)
    assert_close(to_numpy(y), ref.rope_forward(to_numpy(x), c64, s64, offset), atol, rtol, "y")
    assert_close(to_numpy(dx), ref.rope_backward(to_numpy(dy), c64, s64, offset), atol, rtol, "dx")


def test_reference_matches_torch_float64():
    """Against Hugging Face's formula (x * cos + rotate_half(x) * sin with duplicated tables)
    in torch autograd, at an offset."""
    rng = np.random.default_rng(1)
    B, H, T, D, offset = 2, 3, 5, 8, 4
    cos, sin = tables(offset + T, D)
    x, dy = rng.standard_normal((B, H, T, D)), rng.standard_normal((B, H, T, D))
    tx = torch.tensor(x, requires_grad=True)
    c = torch.tensor(np.concatenate([cos, cos], -1)[offset:])  # (T, D)
    s = torch.tensor(np.concatenate([sin, sin], -1)[offset:])
    ty = tx * c + torch.cat([-tx[..., D // 2:], tx[..., : D // 2]], -1) * s
    ty.backward(torch.tensor(dy))
    assert_close(ref.rope_forward(x, cos, sin, offset), ty.detach().numpy(), 1e-12, 1e-12, "y")
    assert_close(ref.rope_backward(dy, cos, sin, offset), tx.grad.numpy(), 1e-12, 1e-12, "dx")


def test_errors_name_the_values():
    x = torch.zeros(1, 2, 4, 8, device=DEVICE)
    cos = torch.zeros(4, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"cos has shape \(4, 4\), expected \(P >= 5, 4\) for positions 1..4"):
        tri.rope_forward(x, cos, cos, offset=1)
    with pytest.raises(ValueError, match="D=7 must be even"):
        tri.rope_forward(torch.zeros(1, 1, 1, 7, device=DEVICE), cos, cos)
    with pytest.raises(ValueError, match=r"x must be \(B, H, T, D\)"):
        tri.rope_forward(torch.zeros(4, 8, device=DEVICE), cos, cos)
