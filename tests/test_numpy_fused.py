"""The numpy backend's chunked, threaded kernels give the references' results bit for bit
(LayerNorm's weight and bias gradients, summed per thread, to rounding)."""

import os

import numpy as np
import pytest

from engine.backends import numpy_fused
from kernels import cross_entropy_ref, gelu_ref, layernorm_ref, rmsnorm_ref, swiglu_ref

# with 4096-element chunks: more elements than one chunk on each of two threads, and a ragged last chunk
SHAPES = [(3, 5), (7, 9001), (40, 3 * 1024 + 5)]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(numpy_fused, "CHUNK", 4096)  # the real 2**18 would hold most shapes here in one chunk


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)


def arrays(shape, dtype, n, seed=0):
    rng = np.random.default_rng(seed)
    return [(3 * rng.standard_normal(shape)).astype(dtype) for _ in range(n)]


def assert_same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", SHAPES)
def test_gelu_and_bias_gelu(shape, dtype):
    x, dy, bias = *arrays(shape, dtype, 2), arrays(shape[-1:], dtype, 1, seed=1)[0]
    assert_same_bits(numpy_fused.gelu_forward(x), gelu_ref.gelu_forward(x))
    assert_same_bits(numpy_fused.gelu_backward(dy, x), gelu_ref.gelu_backward(dy, x))
    assert_same_bits(numpy_fused.bias_gelu_forward(x, bias), gelu_ref.bias_gelu_forward(x, bias))
    for ours, ref in zip(numpy_fused.bias_gelu_backward(dy, x, bias), gelu_ref.bias_gelu_backward(dy, x, bias)):
        assert_same_bits(ours, ref)


@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm(shape, dtype):
    x, dy, weight, bias = *arrays(shape, dtype, 2), *arrays(shape[-1:], dtype, 2, seed=1)
    y, mean, rstd = numpy_fused.layer_norm_forward(x, weight, bias, 1e-5)
    for ours, ref in zip((y, mean, rstd), layernorm_ref.layer_norm_forward(x, weight, bias, 1e-5)):
        assert_same_bits(ours, ref)
    dx, dw, db = numpy_fused.layer_norm_backward(dy, x, weight, mean, rstd)
    rdx, rdw, rdb = layernorm_ref.layer_norm_backward(dy, x, weight, mean, rstd)
    assert_same_bits(dx, rdx)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(dw, rdw, rtol=tol, atol=tol * shape[0])
    np.testing.assert_allclose(db, rdb, rtol=tol, atol=tol * shape[0])




@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_and_rms_norm(shape, dtype):
    gate, up, dy, weight = *arrays(shape, dtype, 3), arrays(shape[-1:], dtype, 1, seed=1)[0]
    assert_same_bits(numpy_fused.swiglu_forward(gate, up), swiglu_ref.swiglu_forward(gate, up))
    for ours, ref in zip(numpy_fused.swiglu_backward(dy, gate, up), swiglu_ref.swiglu_backward(dy, gate, up)):
        assert_same_bits(ours, ref)
    y, rstd = numpy_fused.rms_norm_forward(gate, weight, 1e-6)
    for ours, ref in zip((y, rstd), rmsnorm_ref.rms_norm_forward(gate, weight, 1e-6)):
        assert_same_bits(ours, ref)
    dx, dw = numpy_fused.rms_norm_backward(dy, gate, weight, rstd)
    rdx, rdw = rmsnorm_ref.rms_norm_backward(dy, gate, weight, rstd)
    assert_same_bits(dx, rdx)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(dw, rdw, rtol=tol, atol=tol * shape[0])


@pytest.mark.parametrize("size", [5, 70_001])
def test_adamw_update_in_place(size, dtype):
    p, g, m, v = arrays((size,), dtype, 4)
    v = np.abs(v)
    hyper = (1e-3, 0.9, 0.999, 1e-8, 0.1, 0.19, 0.04)
    expected = [a.copy() for a in (p, m, v)]
    numpy_fused._adamw_piece(*expected[:1], g, *expected[1:], np.empty_like(p), *hyper)
    numpy_fused.adamw_update(p, g, m, v, *hyper)
    for ours, ref in zip((p, m, v), expected):
        assert_same_bits(ours, ref)


@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_rows(shape, dtype):
    (logits,) = arrays(shape, dtype, 1)
    rng = np.random.default_rng(1)
    targets = rng.integers(0, shape[1], shape[0])
    targets[::3] = -100
    ours = numpy_fused.cross_entropy_forward(logits, targets)
    ref = cross_entropy_ref.cross_entropy_forward(logits, targets)
    for a, b in zip(ours, ref):
        assert_same_bits(a, b)
    dnll = rng.standard_normal(shape[0]).astype(dtype)
    expected = cross_entropy_ref.cross_entropy_backward(dnll, logits, targets, *ref[1:])
    assert_same_bits(numpy_fused.cross_entropy_backward(dnll, logits, targets, *ref[1:]), expected)
    in_place = logits.copy()
    assert numpy_fused.cross_entropy_backward(dnll, in_place, targets, *ref[1:], inplace=True) is in_place
    assert_same_bits(in_place, expected)


def test_cross_entropy_names_the_first_bad_target():
    logits = np.zeros((5, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="target 9 out of range for 4 classes"):
        numpy_fused.cross_entropy_forward(logits, np.array([0, 9, 1, 7, 2]))


def test_the_backend_turns_off_huge_pages_unless_the_user_chose():
    import subprocess
    import sys

    code = "import engine.backends.numpy_backend, numpy as np; print(np._core.multiarray._get_madvise_hugepage())"
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    chosen = dict(env, NUMPY_MADVISE_HUGEPAGE="1")
    outputs = [subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True).stdout
               for e in (env, chosen)]
    assert outputs == ["False\n", "True\n"]
