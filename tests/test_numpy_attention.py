"""The numpy backend's blocked attention gives the reference's values, gradients and dropout mask."""

import tracemalloc

import numpy as np
import pytest

from engine.backends import numpy_attention
from kernels import attention_ref as ref


def reference_keep_mask(seed, dropout_p, B, H, T, S):
    """The numpy backend's seed-to-mask contract: one float32 draw per (b, h, t, s)."""
    return np.random.default_rng(seed).random((B, H, T, S), dtype=np.float32) >= dropout_p


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize(
    "T, S, causal, Hkv",
    [
        (300, 300, True, 3),  # three blocks, the last one short
        (300, 300, False, 3),
        (1, 1, True, 3),
        (1, 9, True, 3),  # a KV-cache decode step: the one query sees every key
        (5, 133, True, 3),  # bottom-right causal with more keys than queries, odd stream offsets
        (129, 70, False, 3),
        (150, 150, True, 1),  # grouped-query attention: 3 query heads share one K/V head
        (7, 133, True, 1),
    ],
)
def test_blocked_attention_matches_the_reference(T, S, causal, Hkv, dropout_p):
    B, H, D, seed, scale = 2, 3, 8, 1234, 0.3
    rng = np.random.default_rng(T * 1000 + S)
    q, do = rng.standard_normal((2, B, H, T, D))
    k, v = rng.standard_normal((2, B, Hkv, S, D))
    mask = reference_keep_mask(seed, dropout_p, B, H, T, S) if dropout_p else None
    o_ref, lse_ref = ref.attention_forward(q, k, v, scale, causal, mask, dropout_p)
    grads_ref = ref.attention_backward(do, q, k, v, o_ref, lse_ref, scale, causal, mask, dropout_p)

    o, lse = numpy_attention.attention_forward(q, k, v, scale, causal, dropout_p, seed)
    grads = numpy_attention.attention_backward(do, q, k, v, o, lse, scale, causal, dropout_p, seed)
    np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-12, atol=1e-12)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-11, atol=1e-11, err_msg=f"d{name}")


def test_float32_on_strided_inputs_keeps_dtype_and_values():
    """Heads sliced out of a fused qkv projection (non-contiguous views), as the model passes them."""
    B, T, H, D = 2, 200, 4, 16
    qkv = np.random.default_rng(0).standard_normal((B, T, 3, H, D)).astype(np.float32)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, H, T, D) views
    o, lse = numpy_attention.attention_forward(q, k, v, 0.25, True, 0.0, 0)
    o_ref, lse_ref = ref.attention_forward(q, k, v, 0.25, True)
    assert o.dtype == lse.dtype == np.float32 and o.shape == q.shape and lse.shape == (B, H, T)
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)


def test_blocked_attention_rejects_what_the_reference_rejects():
    q = np.zeros((1, 1, 4, 8))
    with pytest.raises(ValueError, match="at least as many keys"):
        numpy_attention.attention_forward(q, q[:, :, :2], q[:, :, :2], 1.0, True, 0.0, 0)


def _attention_peak_bytes(T: int) -> int:
    q, k, v, do = np.random.default_rng(0).standard_normal((4, 1, 1, T, 8))
    tracemalloc.start()
    o, lse = numpy_attention.attention_forward(q, k, v, 0.3, True, 0.1, 7)
    numpy_attention.attention_backward(do, q, k, v, o, lse, 0.3, True, 0.1, 7)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_memory_grows_with_t_not_t_squared():
    small, large = _attention_peak_bytes(1024), _attention_peak_bytes(4096)
    assert large < 5 * small, f"peak {small} bytes at T=1024, {large} at T=4096 (T² would be 16x)"
    assert large < 4096 * 4096 * 8 / 4, f"peak {large} bytes: a quarter of one (T, T) float64 matrix"



@pytest.mark.parametrize("B, H, T", [(1, 12, 64), (2, 12, 1024), (2, 12, 256), (3, 5, 40), (1, 1, 8)])
def test_head_groups_cover_each_head_once_within_a_batch_row_and_feed_every_thread(B, H, T, monkeypatch):
    groups = []
    monkeypatch.setattr(numpy_attention, "parallel_pieces", lambda n, piece, body: [body(i, i + 1) for i in range(n)])
    q = np.zeros((B, H, T, 8), dtype=np.float32)
    numpy_attention._Problem(q, q, q, None, True, 0.0, 0).split(lambda h0, h1: groups.append((h0, h1)))
    heads = [h for h0, h1 in groups for h in range(h0, h1)]
    assert sorted(heads) == list(range(B * H))
    assert all((h1 - 1) // H == h0 // H for h0, h1 in groups)  # no group spans two batch rows
    assert len(groups) >= min(numpy_attention.THREADS, B * H)
