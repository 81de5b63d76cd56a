"""The numpy backend's chunked, threaded kernels give the references' results bit for bit
(LayerNorm's weight and bias gradients, summed per thread, to rounding)."""

import os
import platform
import subprocess
import sys

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
    """GELU runs as x·σ(2u), the tanh form's equal: it matches the reference evaluated in
    float64 to a few float32 steps (closer than the float32 reference itself comes)."""
    x, dy, bias = *arrays(shape, dtype, 2), arrays(shape[-1:], dtype, 1, seed=1)[0]
    x64, dy64, bias64 = (a.astype(np.float64) for a in (x, dy, bias))
    atol, rtol = (2e-6, 1e-5) if dtype == np.float32 else (1e-13, 1e-12)

    def close(ours, expected, scale=1.0):
        assert ours.dtype == dtype and ours.shape == expected.shape
        np.testing.assert_allclose(ours, expected, rtol=rtol, atol=atol * scale)

    close(numpy_fused.gelu_forward(x), gelu_ref.gelu_forward(x64))
    close(numpy_fused.gelu_backward(dy, x), gelu_ref.gelu_backward(dy64, x64), np.abs(dy).max())
    close(numpy_fused.bias_gelu_forward(x, bias), gelu_ref.bias_gelu_forward(x64, bias64))
    dx, dbias = numpy_fused.bias_gelu_backward(dy, x, bias)
    rdx, rdbias = gelu_ref.bias_gelu_backward(dy64, x64, bias64)
    close(dx, rdx, np.abs(dy).max())
    close(dbias, rdbias, np.abs(dy).max() * shape[0])


def test_gelu_at_the_extremes(dtype):
    x = np.array([-1e30, -200, -10, 0, 10, 200, 1e30], dtype=dtype)
    dy = np.full_like(x, 3)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # no warning escapes either
        y, dx = numpy_fused.gelu_forward(x), numpy_fused.gelu_backward(dy, x)
    np.testing.assert_array_equal(y[[0, 1, 3, 5, 6]], x[[0, 1, 3, 5, 6]] * [0, 0, 0, 1, 1])
    np.testing.assert_allclose(dx, gelu_ref.gelu_backward(dy.astype(np.float64), x.astype(np.float64)), atol=1e-30)


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


@pytest.mark.parametrize("n0, n1", [(1, 600), (3, 250)], ids=["one-outer-row", "pieces-across-outer-rows"])
def test_add_into_a_strided_slice(n0, n1, dtype):
    """The q/k/v slice of a fused projection's gradient, added to from a transposed view: in
    pieces of the first two axes (past MIN_PER_THREAD, so on the threads), bit for bit numpy's
    +=, and nothing outside the slice touched."""
    (base,) = arrays((n0, n1, 3, 4, 64), dtype, 1)
    (src,) = arrays((n0, 4, n1, 64), dtype, 1, seed=1)
    values = src.transpose(0, 2, 1, 3)  # (n0, n1, 4, 64), not contiguous
    expected = base.copy()
    expected[:, :, 1] += values
    assert base[:, :, 1].size >= 2 * numpy_fused.MIN_PER_THREAD
    numpy_fused.add_(base[:, :, 1], values)
    assert_same_bits(base, expected)


def test_index_add_with_basic_indices():
    from engine.backends.numpy_backend import NumpyBackend

    (out,) = arrays((600, 3, 256), np.float32, 1)
    (values,) = arrays((600, 256), np.float32, 1, seed=1)
    expected = out.copy()
    expected[:, 2] += values
    expected[5, 1, 7] += 2.5
    NumpyBackend().index_add_(out, (slice(None), 2), values)
    NumpyBackend().index_add_(out, (5, 1, 7), np.float32(2.5))  # one element: a scalar, not a view
    assert_same_bits(out, expected)


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


@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_loss_and_grad_in_one_pass(shape, dtype):
    """exp(x − m) once for loss and gradient: the loss has the reference's bits, the gradient
    its value to rounding, ignored rows are zero, and the gradient lands in the logits."""
    (logits,) = arrays(shape, dtype, 1)
    rng = np.random.default_rng(2)
    targets = rng.integers(0, shape[1], shape[0])
    targets[::3] = -100
    dnll = rng.standard_normal(shape[0]).astype(dtype)
    expected = logits.copy()
    expected_nll = cross_entropy_ref.cross_entropy_loss_and_grad(expected, targets, dnll)
    ours = logits.copy()
    assert_same_bits(numpy_fused.cross_entropy_loss_and_grad(ours, targets, dnll), expected_nll)
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(ours, expected, rtol=8 * eps, atol=4 * eps * np.abs(dnll).max())
    assert not ours[::3].any()
    # against the definition: dnll · (softmax − onehot), in float64
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    valid = np.flatnonzero(targets != -100)
    p[valid, targets[valid]] -= 1
    np.testing.assert_allclose(ours[valid], (p * dnll[:, None])[valid], rtol=1e-4 if dtype == np.float32 else 1e-12,
                               atol=1e-6 if dtype == np.float32 else 1e-14)


def test_cross_entropy_names_the_first_bad_target():
    logits = np.zeros((5, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="target 9 out of range for 4 classes"):
        numpy_fused.cross_entropy_forward(logits, np.array([0, 9, 1, 7, 2]))
    with pytest.raises(ValueError, match="target 9 out of range for 4 classes"):
        numpy_fused.cross_entropy_loss_and_grad(logits, np.array([0, 9, 1, 7, 2]), np.ones(5, np.float32))


def _run(code: str, env: dict) -> str:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


def test_the_backend_turns_off_huge_pages_unless_the_user_chose():
    code = "import engine.backends.numpy_backend, numpy as np; print(np._core.multiarray._get_madvise_hugepage())"
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    chosen = dict(env, NUMPY_MADVISE_HUGEPAGE="1")
    assert [_run(code, e) for e in (env, chosen)] == ["False\n", "True\n"]


MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "SCRATCHGPT_TUNE_MEMORY")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc settings are glibc's")
def test_a_large_block_freed_is_reused_without_page_faults_unless_the_user_chose():
    """A 64 MiB block (over glibc's largest mmap threshold) freed and asked for again: from the
    kept heap it faults in nothing; as a fresh mapping, every one of its 16K 4 KiB pages."""
    code = """if True:
        import resource, numpy as np
        import engine.backends.numpy_backend
        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        np.ones(2**24, np.float32)
        before = faults()
        np.ones(2**24, np.float32)
        print(faults() - before)"""
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARIABLES}
    env["NUMPY_MADVISE_HUGEPAGE"] = "0"  # 4 KiB pages in every case, so the counts compare
    tuned = int(_run(code, env))
    untouched = [int(_run(code, dict(env, **{name: value})))
                 for name, value in (("SCRATCHGPT_TUNE_MEMORY", "0"), ("MALLOC_MMAP_MAX_", "65536"))]
    assert tuned < 1000 and min(untouched) > 16000, (tuned, untouched)
