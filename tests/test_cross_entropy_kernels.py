"""Cross-entropy: the Triton kernels against the NumPy reference, the reference against torch.

On a CPU machine the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); on a GPU natively. The reference is evaluated in float64 on the
very logits the kernel saw (rounded to the kernel dtype), so each tolerance measures
the kernel's own error.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels import cross_entropy as tri
from kernels import cross_entropy_ref as ref
from tests.helpers.kernel_check import kernel_device
from tests.helpers.op_check import assert_close

DEVICE = kernel_device()
IGNORE = -100

# (dtype, atol, rtol) for nll and dlogits; the math is fp32 whatever the logits' dtype.
TOLERANCES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    # fp16 dlogits: one rounding to 11 significant bits (2**-11 ~ 4.9e-4 relative); nll is fp32.
    pytest.param(torch.float16, 1e-3, 2e-3, id="fp16"),
    # bf16 dlogits: one rounding to 8 significant bits (2**-8 ~ 3.9e-3 relative).
    pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16"),
]
# (N, V): vocab 1 (every loss 0), primes, a power of two, GPT-2's 50257 (several blocks
# on the GPU, one in the interpreter), one row, many rows.
SHAPES = [(5, 1), (9, 7), (1, 64), (37, 101), (3, 50257), (130, 16)]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def make_inputs(n, v, dtype, seed=0, ignored=(0,)):
    """logits (N, V) in dtype, targets (N,) with the rows in ``ignored`` set to IGNORE, dnll (N,) fp32."""
    rng = np.random.default_rng(seed)
    logits = torch.tensor(rng.standard_normal((n, v)) * 3.0, dtype=dtype, device=DEVICE)
    targets = rng.integers(0, v, size=n)
    targets[[i for i in ignored if i < n]] = IGNORE
    dnll = torch.tensor(rng.standard_normal(n), dtype=torch.float32, device=DEVICE)
    return logits, torch.tensor(targets, device=DEVICE), dnll


def run_both(logits, targets, dnll):
    """(kernel, reference) results: each (nll, row_max, log_sum, dlogits) as float64 NumPy."""
    nll, row_max, log_sum = tri.cross_entropy_forward(logits, targets, IGNORE)
    dlogits = tri.cross_entropy_backward(dnll, logits, targets, row_max, log_sum, IGNORE)
    assert (nll.dtype, row_max.dtype, log_sum.dtype, dlogits.dtype) == (torch.float32,) * 3 + (logits.dtype,)
    x64, t = to_numpy(logits), targets.cpu().numpy()
    r = ref.cross_entropy_forward(x64, t, IGNORE)
    rd = ref.cross_entropy_backward(to_numpy(dnll), x64, t, r[1], r[2], IGNORE)
    return [to_numpy(a) for a in (nll, row_max, log_sum, dlogits)], [*r, rd]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_kernel_matches_reference(shape, dtype, atol, rtol):
    ours, theirs = run_both(*make_inputs(*shape, dtype))
    for what, a, b in zip(("nll", "row_max", "log_sum", "dlogits"), ours, theirs):
        # nll, row_max and log_sum are fp32 whatever the logits: fp32 tolerance.
        tol = (atol, rtol) if what == "dlogits" else (1e-5, 1e-5)
        assert_close(a, b, *tol, what)
    assert (ours[0][0], np.abs(ours[3][0]).max()) == (0.0, 0.0), "an ignored row has no loss and no gradient"


def test_every_row_ignored_gives_zeros_not_nan():
    logits, _, dnll = make_inputs(4, 7, torch.float32)
    targets = torch.full((4,), IGNORE, device=DEVICE)
    nll, row_max, log_sum = tri.cross_entropy_forward(logits, targets, IGNORE)
    dlogits = tri.cross_entropy_backward(dnll, logits, targets, row_max, log_sum, IGNORE)
    assert torch.equal(nll, torch.zeros_like(nll)) and torch.equal(dlogits, torch.zeros_like(dlogits))


def test_large_logits_stay_exact():
    """Logits near 3e4: the online log-sum-exp neither overflows nor loses the softmax's digits."""
    logits = torch.tensor([[1e4, 0.0, -1e4], [3e4, 3e4, 0.0], [-3e4, -3e4 + 1, -3e4]], device=DEVICE)
    targets = torch.tensor([1, 0, 2], device=DEVICE)
    nll, row_max, log_sum = tri.cross_entropy_forward(logits, targets, IGNORE)
    dlogits = tri.cross_entropy_backward(torch.ones(3, device=DEVICE), logits, targets, row_max, log_sum, IGNORE)
    ref_x = logits.cpu().double().requires_grad_()
    F.cross_entropy(ref_x, targets.cpu(), reduction="sum").backward()
    assert_close(to_numpy(nll), F.cross_entropy(ref_x, targets.cpu(), reduction="none").detach().numpy(),
                 1e-3, 1e-6, "nll")
    assert_close(to_numpy(dlogits), ref_x.grad.numpy(), 1e-6, 1e-5, "dlogits")


def test_inplace_backward_overwrites_the_logits():
    logits, targets, dnll = make_inputs(6, 50, torch.float32)
    stats = tri.cross_entropy_forward(logits, targets, IGNORE)[1:]
    expected = tri.cross_entropy_backward(dnll, logits, targets, *stats, IGNORE)
    out = tri.cross_entropy_backward(dnll, logits, targets, *stats, IGNORE, inplace=True)
    assert out.data_ptr() == logits.data_ptr()
    assert torch.equal(out, expected)


def test_loss_and_grad_is_forward_then_inplace_backward():
    logits, targets, dnll = make_inputs(6, 50, torch.float32)
    nll, *stats = tri.cross_entropy_forward(logits, targets, IGNORE)
    expected = tri.cross_entropy_backward(dnll, logits, targets, *stats, IGNORE)
    out = logits.clone()
    assert torch.equal(tri.cross_entropy_loss_and_grad(out, targets, dnll, IGNORE), nll)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="logits must be contiguous"):
        tri.cross_entropy_loss_and_grad(logits.t(), targets[:1].expand(50), dnll[:1].expand(50), IGNORE)


def test_reference_loss_and_grad_is_forward_then_backward():
    logits, targets, dnll = (to_numpy(a) for a in make_inputs(5, 9, torch.float32))
    targets = targets.astype(np.int64)
    nll, row_max, log_sum = ref.cross_entropy_forward(logits, targets, IGNORE)
    expected = ref.cross_entropy_backward(dnll, logits, targets, row_max, log_sum, IGNORE)
    out = logits.copy()
    np.testing.assert_array_equal(ref.cross_entropy_loss_and_grad(out, targets, dnll, IGNORE), nll)
    np.testing.assert_array_equal(out, expected)


def test_reference_matches_torch():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 11)) * 4
    t = rng.integers(0, 11, size=8)
    t[2] = IGNORE
    dnll = rng.standard_normal(8)
    nll, row_max, log_sum = ref.cross_entropy_forward(x, t, IGNORE)
    x_t = torch.tensor(x, requires_grad=True)
    torch_nll = F.cross_entropy(x_t, torch.tensor(t), ignore_index=IGNORE, reduction="none")
    torch_nll.backward(torch.tensor(dnll))
    assert_close(nll, torch_nll.detach().numpy(), 1e-12, 1e-12, "nll")
    assert_close(ref.cross_entropy_backward(dnll, x, t, row_max, log_sum, IGNORE), x_t.grad.numpy(), 1e-12, 1e-12,
                 "dlogits")


@pytest.mark.parametrize("module", [tri, ref], ids=["triton", "reference"])
def test_bad_inputs_get_one_clear_error(module):
    def make(*shape):
        return torch.zeros(shape, device=DEVICE) if module is tri else np.zeros(shape, dtype=np.float32)

    def ids(*values):
        return torch.tensor(values, device=DEVICE) if module is tri else np.array(values)

    with pytest.raises(ValueError, match="target 3 out of range for 3 classes"):
        module.cross_entropy_forward(make(2, 3), ids(0, 3))
    with pytest.raises(ValueError, match=r"targets must be \(N,\)"):
        module.cross_entropy_forward(make(2, 3), ids(0, 1, 2))
    with pytest.raises(ValueError, match=r"logits must be \(N, C\)"):
        module.cross_entropy_forward(make(2, 3, 4), ids(0, 1))
