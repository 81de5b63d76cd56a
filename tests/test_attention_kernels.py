"""Fused attention: the NumPy reference against torch, the Triton kernels against the reference.

On a CPU machine the kernels run through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), whose cost is about programs × loop iterations: shapes stay at
B·H <= 4 and T <= 257.
"""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels import attention_ref as ref
from kernels.attention import attention_backward, attention_dropout_mask, attention_forward
from tests.helpers.kernel_check import kernel_device

DEVICE = kernel_device()
ON_GPU = DEVICE == "cuda"


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float


# Tolerances of the Triton kernels against the float64 reference run on the same
# (already rounded) inputs: (output o, log-sum-exp, gradients dq/dk/dv).
TOLERANCES = {
    # fp32 tl.dot is exact in the interpreter and tf32x3 (fp32-accurate) on the GPU; the
    # slack covers fp32 rounding summed over up to 257 keys.
    torch.float32: (Tol(2e-5, 2e-5), Tol(2e-5, 1e-5), Tol(5e-5, 5e-5)),
    # fp16: P and dS are rounded to fp16 (11-bit mantissa, ~5e-4 relative) before their
    # tl.dot, and the outputs are stored in fp16. lse stays fp32-accurate: fp16 products
    # are exact in the fp32 accumulator.
    torch.float16: (Tol(4e-3, 4e-3), Tol(2e-5, 1e-5), Tol(1e-2, 1e-2)),
    # bf16: 8-bit mantissa, ~8x fp16's error (the interpreter runs it with the tl.dot fix in conftest.py).
    torch.bfloat16: (Tol(3e-2, 3e-2), Tol(2e-5, 1e-5), Tol(6e-2, 6e-2)),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(name, actual, expected, tol: Tol) -> None:
    """Fail with the largest violation (value, position) unless |actual - expected| <= atol + rtol·|expected|."""
    actual = actual.detach().double().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    actual, expected = actual.astype(np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected)
    excess = np.nan_to_num(err - (tol.atol + tol.rtol * np.abs(expected)), nan=np.inf)
    if (excess > 0).any():
        where = np.unravel_index(np.argmax(excess), excess.shape)
        worst = np.unravel_index(np.argmax(np.nan_to_num(err, nan=np.inf)), err.shape)
        pytest.fail(
            f"{name}: {(excess > 0).sum()} of {err.size} elements out of tolerance (atol={tol.atol}, rtol={tol.rtol}); "
            f"max abs diff {np.nanmax(err) if not np.isnan(err).all() else np.nan:.3e} at {worst}; "
            f"worst relative to tolerance at {where}: got {actual[where]:.6g}, want {expected[where]:.6g}"
        )


def random_problem(B, H, T, S, D, dtype, seed=0, Hkv=None):
    """q, k, v, do as torch tensors of `dtype` on the kernel device (one shared upstream gradient do);
    k and v have Hkv heads (default H)."""
    gen = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(B, H, T, D, generator=gen) for _ in range(2))
    k, v = (torch.randn(B, Hkv or H, S, D, generator=gen) for _ in range(2))
    return tuple(x.to(dtype=dtype, device=DEVICE) for x in (q, k, v, do))


def as64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy()


# ---------------------------------------------------------------------------------------
# The NumPy reference against torch (float64 autograd)
# ---------------------------------------------------------------------------------------


def torch_attention(q, k, v, scale, causal, keep=None, dropout_p=0.0):
    """Explicit torch attention (bottom-right causal mask, dropout by a given keep-mask); returns (o, lse)."""
    T, S = q.shape[2], k.shape[2]
    scores = scale * q @ k.transpose(-1, -2)  # (B, H, T, S)
    if causal:
        visible = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)
        scores = scores.masked_fill(~visible, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    return p @ v, torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("T, S", [(9, 9), (5, 13), (1, 7)])
def test_reference_matches_torch_float64(T, S, causal, dropout_p, rng):
    B, H, D = 2, 3, 8
    q = rng.standard_normal((B, H, T, D))
    k, v = rng.standard_normal((2, B, H, S, D))
    do = rng.standard_normal((B, H, T, D))
    mask = rng.random((B, H, T, S)) >= dropout_p if dropout_p else None
    scale = 0.3

    o, lse = ref.attention_forward(q, k, v, scale=scale, causal=causal, dropout_mask=mask, dropout_p=dropout_p)
    dq, dk, dv = ref.attention_backward(do, q, k, v, o, lse, scale=scale, causal=causal,
                                        dropout_mask=mask, dropout_p=dropout_p)

    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    keep = torch.tensor(mask) if mask is not None else None
    t_o, t_lse = torch_attention(tq, tk, tv, scale, causal, keep, dropout_p)
    t_o.backward(torch.tensor(do))
    tight = Tol(1e-12, 1e-10)
    for name, ours, theirs in (("o", o, t_o), ("lse", lse, t_lse), ("dq", dq, tq.grad), ("dk", dk, tk.grad),
                               ("dv", dv, tv.grad)):
        assert_close(name, ours, as64(theirs), tight)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("H, Hkv, T, S", [(6, 2, 5, 5), (4, 1, 3, 8), (4, 4, 1, 6)])
def test_grouped_query_reference_matches_torch_float64(H, Hkv, T, S, causal, rng):
    """K/V heads shared by groups of query heads, as torch computes it with repeated K/V."""
    B, D, scale = 2, 8, 0.4
    q, do = rng.standard_normal((2, B, H, T, D))
    k, v = rng.standard_normal((2, B, Hkv, S, D))
    o, lse = ref.attention_forward(q, k, v, scale=scale, causal=causal)
    dq, dk, dv = ref.attention_backward(do, q, k, v, o, lse, scale=scale, causal=causal)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    t_o, t_lse = torch_attention(tq, tk.repeat_interleave(H // Hkv, 1), tv.repeat_interleave(H // Hkv, 1),
                                 scale, causal)
    t_o.backward(torch.tensor(do))
    assert dk.shape == dv.shape == (B, Hkv, S, D)
    for name, ours, theirs in (("o", o, t_o), ("lse", lse, t_lse), ("dq", dq, tq.grad), ("dk", dk, tk.grad),
                               ("dv", dv, tv.grad)):
        assert_close(name, ours, as64(theirs), Tol(1e-12, 1e-10))


@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_torch_sdpa(causal, rng):
    q, k, v = rng.standard_normal((3, 2, 2, 11, 16))
    o, _ = ref.attention_forward(q, k, v, causal=causal)
    expected = F.scaled_dot_product_attention(*(torch.tensor(x) for x in (q, k, v)), is_causal=causal)
    assert_close("o", o, expected.numpy(), Tol(1e-12, 1e-10))


def test_reference_preserves_float32(rng):
    q, k, v, do = rng.standard_normal((4, 1, 2, 6, 8)).astype(np.float32)
    o, lse = ref.attention_forward(q, k, v)
    grads = ref.attention_backward(do, q, k, v, o, lse)
    assert [x.dtype for x in (o, lse, *grads)] == [np.float32] * 5


# ---------------------------------------------------------------------------------------
# The Triton kernels against the reference
# ---------------------------------------------------------------------------------------

# (B, H, T, S, D, causal, scale); head dims 8..128 cover padding to 16, 32, 64 and 128.
KERNEL_CASES = [
    (1, 2, 1, 1, 16, True, None),  # a single query and key
    (2, 2, 17, 17, 24, True, None),  # prime T, D padded 24 -> 32
    (1, 3, 100, 100, 64, True, 0.2),  # custom scale
    (2, 1, 257, 257, 80, True, None),  # tails in every tile size, D padded 80 -> 128
    (1, 2, 1, 77, 64, True, None),  # KV-cache decode step: one query sees every key
    (1, 2, 40, 97, 16, True, None),  # causal with S > T: bottom-right aligned diagonal
    (1, 2, 33, 33, 8, True, None),  # smallest head dim, padded 8 -> 16
    (1, 2, 9, 9, 12, True, None),  # head dim 12: zero-padded to 16 by the launcher, sliced back
    (1, 1, 64, 64, 128, True, None),  # largest head dim
    (1, 2, 17, 53, 16, False, None),
    (2, 2, 100, 37, 80, False, None),  # more queries than keys
    (1, 2, 257, 257, 24, False, 1.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, H, T, S, D, causal, scale", KERNEL_CASES)
def test_kernels_match_reference(B, H, T, S, D, causal, scale, dtype):
    q, k, v, do = random_problem(B, H, T, S, D, dtype)
    o, lse = attention_forward(q, k, v, scale=scale, causal=causal)
    dq, dk, dv = attention_backward(do, q, k, v, o, lse, scale=scale, causal=causal)
    assert (o.dtype, lse.dtype, dq.dtype, dk.dtype, dv.dtype) == (dtype, torch.float32, dtype, dtype, dtype)

    r_o, r_lse = ref.attention_forward(as64(q), as64(k), as64(v), scale=scale, causal=causal)
    r_dq, r_dk, r_dv = ref.attention_backward(as64(do), as64(q), as64(k), as64(v), r_o, r_lse,
                                              scale=scale, causal=causal)
    tol_o, tol_lse, tol_grad = TOLERANCES[dtype]
    assert_close("o", o, r_o, tol_o)
    assert_close("lse", lse, r_lse, tol_lse)
    for name, ours, want in (("dq", dq, r_dq), ("dk", dk, r_dk), ("dv", dv, r_dv)):
        assert_close(name, ours, want, tol_grad)


# (B, H, Hkv, T, S, D, causal, dropout_p): Llama-like groups of 2, 3 and 4, multi-query (Hkv = 1),
# a prefill, KV-cache steps with S > T, and dropout drawn per query head.
GQA_CASES = [
    (2, 4, 2, 17, 17, 24, True, 0.0),
    (1, 6, 2, 1, 45, 64, True, 0.0),  # decode step: one query per head sees every cached key
    (1, 4, 1, 9, 70, 16, True, 0.0),  # multi-query, causal with S > T
    (1, 3, 1, 40, 33, 80, False, 0.0),
    (1, 4, 2, 50, 50, 16, True, 0.3),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, H, Hkv, T, S, D, causal, dropout_p", GQA_CASES)
def test_grouped_query_kernels_match_reference(B, H, Hkv, T, S, D, causal, dropout_p, dtype):
    seed = 77
    q, k, v, do = random_problem(B, H, T, S, D, dtype, Hkv=Hkv)
    o, lse = attention_forward(q, k, v, causal=causal, dropout_p=dropout_p, seed=seed)
    dq, dk, dv = attention_backward(do, q, k, v, o, lse, causal=causal, dropout_p=dropout_p, seed=seed)
    assert dk.shape == dv.shape == (B, Hkv, S, D)

    mask = attention_dropout_mask(B, H, T, S, dropout_p, seed, DEVICE).cpu().numpy() if dropout_p else None
    r_o, r_lse = ref.attention_forward(as64(q), as64(k), as64(v), causal=causal, dropout_mask=mask,
                                       dropout_p=dropout_p)
    r_grads = ref.attention_backward(as64(do), as64(q), as64(k), as64(v), r_o, r_lse, causal=causal,
                                     dropout_mask=mask, dropout_p=dropout_p)
    tol_o, tol_lse, tol_grad = TOLERANCES[dtype]
    assert_close("o", o, r_o, tol_o)
    assert_close("lse", lse, r_lse, tol_lse)
    for name, ours, want in zip(("dq", "dk", "dv"), (dq, dk, dv), r_grads):
        assert_close(name, ours, want, tol_grad)


def test_kernels_accept_non_contiguous_inputs():
    q, k, v, do = random_problem(1, 2, 20, 20, 16, torch.float32)
    # The same values laid out (B, T, H, D) and viewed as (B, H, T, D).
    q_t, k_t, v_t, do_t = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, do))
    assert not q_t.is_contiguous()
    o, lse = attention_forward(q, k, v)
    o_t, lse_t = attention_forward(q_t, k_t, v_t)
    assert torch.equal(o, o_t) and torch.equal(lse, lse_t)
    for g, g_t in zip(attention_backward(do, q, k, v, o, lse), attention_backward(do_t, q_t, k_t, v_t, o_t, lse_t)):
        assert torch.equal(g, g_t)


# ---------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------


def test_dropout_mask_is_seeded_and_keeps_one_minus_p():
    shape, p = (2, 2, 64, 96), 0.3
    mask = attention_dropout_mask(*shape, p, seed=11, device=DEVICE)
    assert mask.dtype == torch.bool and tuple(mask.shape) == shape
    assert torch.equal(mask, attention_dropout_mask(*shape, p, seed=11, device=DEVICE))
    assert not torch.equal(mask, attention_dropout_mask(*shape, p, seed=12, device=DEVICE))
    # 24576 draws: the kept fraction's standard deviation is ~0.003.
    assert abs(mask.float().mean().item() - (1 - p)) < 0.02
    assert attention_dropout_mask(*shape, 0.0, seed=11, device=DEVICE).all()


def test_dropout_forward_is_seeded():
    q, k, v, _ = random_problem(1, 2, 40, 40, 16, torch.float32)
    o1, _ = attention_forward(q, k, v, dropout_p=0.2, seed=3)
    o2, _ = attention_forward(q, k, v, dropout_p=0.2, seed=3)
    o3, _ = attention_forward(q, k, v, dropout_p=0.2, seed=4)
    assert torch.equal(o1, o2)
    assert not torch.equal(o1, o3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, H, T, S, D, causal", [(1, 2, 100, 100, 24, True), (2, 1, 60, 90, 64, False),
                                                   (1, 1, 1, 70, 16, True)])
def test_dropout_kernels_match_reference_with_same_mask(B, H, T, S, D, causal, dtype):
    p, seed = 0.3, 1234
    q, k, v, do = random_problem(B, H, T, S, D, dtype, seed=1)
    o, lse = attention_forward(q, k, v, causal=causal, dropout_p=p, seed=seed)
    grads = attention_backward(do, q, k, v, o, lse, causal=causal, dropout_p=p, seed=seed)

    mask = attention_dropout_mask(B, H, T, S, p, seed, DEVICE).cpu().numpy()
    r_o, r_lse = ref.attention_forward(as64(q), as64(k), as64(v), causal=causal, dropout_mask=mask, dropout_p=p)
    r_grads = ref.attention_backward(as64(do), as64(q), as64(k), as64(v), r_o, r_lse, causal=causal,
                                     dropout_mask=mask, dropout_p=p)
    tol_o, tol_lse, tol_grad = TOLERANCES[dtype]
    assert_close("o", o, r_o, tol_o)
    assert_close("lse", lse, r_lse, tol_lse)
    for name, ours, want in zip(("dq", "dk", "dv"), grads, r_grads):
        assert_close(name, ours, want, tol_grad)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def _bad_inputs(make) -> dict:
    """description -> ((q, k, v), kwargs, message regex) for inputs the launcher must reject."""
    good = (make(1, 2, 4, 16), make(1, 2, 4, 16), make(1, 2, 4, 16))
    return {
        "rank 3 q": ((make(2, 4, 16), *good[1:]), {}, "rank 4"),
        "head dim 136": ((make(1, 2, 4, 136),) * 3, {}, "between 1 and 128, got D=136"),
        "k head dim differs": ((good[0], make(1, 2, 4, 8), good[2]), {}, "shape"),
        "v length differs": ((good[0], good[1], make(1, 2, 5, 16)), {}, "shape"),
        "K/V heads not dividing H": ((make(1, 3, 4, 16), make(1, 2, 4, 16), make(1, 2, 4, 16)), {},
                                     "Hkv dividing H=3"),
        "causal with S < T": ((make(1, 2, 6, 16), *good[1:]), {"causal": True}, "S=4 < T=6"),
        "dropout_p = 1": (good, {"dropout_p": 1.0}, "dropout_p"),
    }


BAD_INPUTS = list(_bad_inputs(lambda *shape: None))


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_kernel_launcher_rejects_bad_inputs(case):
    qkv, kwargs, message = _bad_inputs(lambda *shape: torch.zeros(shape, device=DEVICE))[case]
    with pytest.raises(ValueError, match=message):
        attention_forward(*qkv, **kwargs)


# The reference accepts any head dim.
@pytest.mark.parametrize("case", [c for c in BAD_INPUTS if not c.startswith("head dim")])
def test_reference_rejects_bad_inputs(case):
    (q, k, v), kwargs, message = _bad_inputs(lambda *shape: np.zeros(shape))[case]
    if "dropout_p" in kwargs:  # give it the mask it needs, so only dropout_p is wrong
        kwargs = {**kwargs, "dropout_mask": np.ones(q.shape[:3] + k.shape[2:3], dtype=bool)}
    with pytest.raises(ValueError, match=message):
        ref.attention_forward(q, k, v, **kwargs)


def test_kernel_launcher_rejects_mismatched_dtypes_and_bad_backward_shapes():
    q, k, v, do = random_problem(1, 1, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="dtypes differ"):
        attention_forward(q, k.half(), v)
    o, lse = attention_forward(q, k, v)
    with pytest.raises(ValueError, match="do must be"):
        attention_backward(do[:, :, :4], q, k, v, o, lse)
    with pytest.raises(ValueError, match="lse must be"):
        attention_backward(do, q, k, v, o, lse[:, :, :4])


def test_reference_rejects_bad_dtype_and_mask():
    q = np.zeros((1, 1, 4, 8), dtype=np.int64)
    with pytest.raises(ValueError, match="float32 or float64"):
        ref.attention_forward(q, q, q)
    x = np.zeros((1, 1, 4, 8))
    with pytest.raises(ValueError, match="dropout_mask"):
        ref.attention_forward(x, x, x, dropout_mask=np.ones((1, 1, 4, 3), dtype=bool))
    with pytest.raises(ValueError, match="needs a dropout_mask"):
        ref.attention_forward(x, x, x, dropout_p=0.1)
