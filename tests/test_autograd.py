"""Graph mechanics: deep chains, accumulation, freeing, no_grad and clear errors."""

import numpy as np
import pytest

import engine
from engine import functional as F


def test_ten_thousand_op_chain_backpropagates_without_recursion():
    x = engine.tensor(1.0, requires_grad=True, dtype="float64")
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.backward()
    np.testing.assert_allclose(x.grad, 1.0001**10_000, rtol=1e-9)


def test_gradients_accumulate_across_uses_and_calls():
    x = engine.tensor([1.0, 2.0], requires_grad=True, dtype="float64")
    (x * x + x).sum().backward()  # x used three times
    np.testing.assert_allclose(x.grad, [3.0, 5.0])
    (x * 2).sum().backward()  # a second backward accumulates into .grad
    np.testing.assert_allclose(x.grad, [5.0, 7.0])


def test_diamond_graph_counts_each_path_once():
    x = engine.tensor(3.0, requires_grad=True, dtype="float64")
    a = x * 2
    b = a * a + a  # a feeds two ops
    b.backward()
    np.testing.assert_allclose(x.grad, (2 * 6.0 + 1) * 2)


def test_second_backward_through_freed_graph_raises_unless_retained():
    x = engine.tensor([1.0, 2.0], requires_grad=True)
    y = (x.exp() * x).sum()
    y.backward(retain_graph=True)
    first = x.grad.copy()
    y.backward()
    np.testing.assert_allclose(x.grad, 2 * first, rtol=1e-6)
    with pytest.raises(RuntimeError, match="already freed.*retain_graph=True"):
        y.backward()


def test_saved_arrays_are_released_after_backward():
    x = engine.tensor(np.ones((4, 4)), requires_grad=True)
    y = x.exp()
    z = y.sum()
    z.backward()
    assert y._fn.saved == () and y._fn.freed


@pytest.mark.parametrize("retain_graph", [False, True])
def test_backward_frees_the_intermediate_arrays_while_the_loss_lives(retain_graph):
    """A training loop keeps its loss until the next step's forward: the finished pass must not
    keep the step's activations alive through it (a retained graph must)."""
    import weakref

    x = engine.tensor(np.ones((4, 4)), requires_grad=True)
    probes = []

    def forward():
        h = (x * 2).exp()  # intermediates only the graph holds
        probes.extend(weakref.ref(t.data) for t in (h, h._fn.parents[0]))
        return (h * h).sum()

    loss = forward()
    assert all(p() is not None for p in probes)
    loss.backward(retain_graph=retain_graph)
    assert [p() is None for p in probes] == [not retain_graph] * 2
    np.testing.assert_allclose(x.grad, 4 * np.exp(4.0), rtol=1e-6)
    assert loss.item() == pytest.approx(16 * np.exp(4.0), rel=1e-6)


def test_backward_on_non_scalar_needs_a_gradient():
    x = engine.tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"one-element tensor.*\(2, 3\)"):
        (x * 2).backward()
    with pytest.raises(ValueError, match=r"grad has shape \(3,\), expected \(2, 3\)"):
        (x * 2).backward(np.ones(3))


def test_backward_without_requires_grad_is_an_error():
    with pytest.raises(RuntimeError, match="does not require grad"):
        (engine.tensor([1.0]) * 2).sum().backward()


def test_no_grad_records_nothing_and_works_as_decorator():
    x = engine.tensor([1.0], requires_grad=True)
    with engine.no_grad():
        y = x * 2
    assert not y.requires_grad and y._fn is None

    @engine.no_grad()
    def f(t):
        return t * 3

    assert not f(x).requires_grad
    assert (x * 2).requires_grad  # re-enabled afterwards


def test_detach_cuts_the_graph():
    x = engine.tensor([2.0], requires_grad=True, dtype="float64")
    y = x * x.detach()
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [2.0])


def test_unsupported_dtypes_raise_clear_errors():
    with pytest.raises(TypeError, match="float16 is not supported by the numpy backend"):
        engine.tensor(np.ones(2, dtype=np.float16))
    with pytest.raises(TypeError, match="complex128"):
        engine.tensor(np.ones(2, dtype=np.complex128))
    with pytest.raises(TypeError, match="'float8' is not supported"):
        engine.zeros(2, dtype="float8")
    with pytest.raises(TypeError, match="only floating-point tensors can require gradients"):
        engine.tensor([1, 2], requires_grad=True)


@pytest.mark.parametrize(
    "fn,pattern",
    [
        (lambda a, b: a + b, r"add: shapes \(2, 3\) and \(4,\) cannot be broadcast"),
        (lambda a, b: a * b, r"mul: shapes \(2, 3\) and \(4,\)"),
        (lambda a, b: a @ b, r"matmul: shapes \(2, 3\) and \(4,\) do not match"),
        (lambda a, b: engine.concatenate([a, b.reshape(1, 4)]), r"concatenate: shapes \(2, 3\) and \(1, 4\)"),
    ],
)
def test_mismatched_shapes_name_the_op_and_both_shapes(fn, pattern):
    with pytest.raises(ValueError, match=pattern):
        fn(engine.zeros(2, 3), engine.zeros(4))


def test_reshape_and_index_errors_are_clear():
    x = engine.zeros(2, 3)
    with pytest.raises(ValueError, match=r"cannot reshape a tensor of shape \(2, 3\) \(6 elements\) into \(4, 2\)"):
        x.reshape(4, 2)
    with pytest.raises(IndexError, match=r"invalid for shape \(2, 3\)"):
        x[5]
    with pytest.raises(ValueError, match=r"layer_norm: weight \(3,\) and bias \(4,\)"):
        F.layer_norm(x, engine.ones(3), engine.zeros(4))


def test_float32_stays_float32():
    x = engine.tensor(np.ones((2, 2), dtype=np.float32), requires_grad=True)
    y = (x * 2.5 + 1) / 3 - x**2
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32
    assert engine.tensor([1.5]).dtype == np.float32  # Python floats default to float32


def test_leaf_grads_never_alias_each_other_or_the_callers_array():
    # Add hands the same upstream array to both inputs; in-place clipping of one must not touch the other.
    a = engine.tensor([1.0, 2.0], requires_grad=True)
    b = engine.tensor([3.0, 4.0], requires_grad=True)
    upstream = np.array([1.0, 1.0], dtype=np.float32)
    (a + b).backward(upstream)
    a.grad *= 0.5
    np.testing.assert_array_equal(b.grad, [1.0, 1.0])
    np.testing.assert_array_equal(upstream, [1.0, 1.0])
    c = engine.tensor([[1.0, 2.0]], requires_grad=True)
    c.reshape(2).backward(np.array([5.0, 6.0], dtype=np.float32))  # a view of the caller's array
    c.grad *= 0
    assert c.grad.base is None


def test_sums_in_place_never_change_an_array_seen_elsewhere():
    # x feeds a view path (reshape), the same array twice (x + x), slices and itself: the pass
    # sums these in place only into arrays it alone holds, so every result is the plain sum.
    rng = np.random.default_rng(0)
    x = engine.tensor(rng.standard_normal((4, 3)), requires_grad=True, dtype="float64")
    upstream = rng.standard_normal((4, 3))
    kept = upstream.copy()
    y = x + x + x.reshape(3, 4).reshape(4, 3) * 2 + x * 3
    z = engine.concatenate([x[:2], x[2:]], axis=0)
    (y + z).backward(upstream)
    np.testing.assert_allclose(x.grad, upstream * (1 + 1 + 2 + 3 + 1))
    np.testing.assert_array_equal(upstream, kept)


def test_slices_and_embedding_rows_add_into_the_gradient_they_meet():
    # the q/k/v split of one projection and a tied embedding + output head: their scattered
    # gradients are summed into the other uses exactly as dense arrays would be
    rng = np.random.default_rng(1)
    w = engine.tensor(rng.standard_normal((7, 4)), requires_grad=True, dtype="float64")
    ids = np.array([[3, 1, 3], [6, 3, 0]])
    h = F.embedding(ids, w)  # (2, 3, 4)
    qkv = h.reshape(2, 3, 2, 2)
    q, k = qkv[:, :, 0], qkv[:, :, 1]  # (2, 3, 2) each
    logits = F.linear((q * k).sum(axis=-1, keepdims=True) * h, w)  # (2, 3, 7), w used again
    upstream = rng.standard_normal((2, 3, 7))
    logits.backward(upstream)

    wd = w.data
    hd = wd[ids]
    qd, kd = hd[..., :2], hd[..., 2:]
    s = (qd * kd).sum(-1, keepdims=True)
    u = s * hd
    dw = np.einsum("btv,btd->vd", upstream, u)  # the head's use of w
    du = upstream @ wd
    dh = du * s
    ds = (du * hd).sum(-1, keepdims=True)
    dh = dh + np.concatenate([ds * kd, ds * qd], axis=-1)
    np.add.at(dw, ids.reshape(-1), dh.reshape(-1, 4))  # repeated id 3 sums its rows
    np.testing.assert_allclose(w.grad, dw, rtol=1e-12)


@pytest.mark.parametrize("shape", [(0,), (5,), (3, 70000), (1000, 33)])
def test_squared_norm_is_the_float64_sum_of_squares(shape):
    rng = np.random.default_rng(2)
    a = rng.standard_normal(shape).astype(np.float32) * 1e3
    expected = float(np.sum(a.astype(np.float64) ** 2))
    backend = engine.get_backend()
    np.testing.assert_allclose(backend.squared_norm(a), expected, rtol=1e-6)
    if a.ndim == 2:  # a transposed (non-contiguous) array too
        np.testing.assert_allclose(backend.squared_norm(a.T), expected, rtol=1e-6)
