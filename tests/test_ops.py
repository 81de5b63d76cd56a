"""Every primitive op: output and input gradients against torch float64, plus a gradcheck."""

import numpy as np
import pytest
import torch

import engine
from tests.helpers.op_check import check_op

BINARY_SHAPES = [
    ((3, 4), (3, 4)),
    ((2, 3, 5), (5,)),  # trailing broadcast
    ((4, 1, 3), (1, 5, 1)),  # size-1 dims both sides
    ((7,), (2, 1, 7)),  # rank promotion
    ((), (3, 2)),  # scalar tensor
]


@pytest.mark.parametrize("shapes", BINARY_SHAPES)
@pytest.mark.parametrize(
    "name,ours,ref",
    [
        ("add", lambda a, b: a + b, lambda a, b: a + b),
        ("sub", lambda a, b: a - b, lambda a, b: a - b),
        ("mul", lambda a, b: a * b, lambda a, b: a * b),
        ("div", lambda a, b: a / (b * b + 0.5), lambda a, b: a / (b * b + 0.5)),
    ],
)
def test_binary(shapes, name, ours, ref):
    check_op(shapes, ours, ref)


@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((2, 3), (3,)), ((5,), ())])
def test_pow_tensor_exponent(shapes):
    check_op(shapes, lambda a, b: a**b, lambda a, b: a**b, low=0.5, high=2.0)


@pytest.mark.parametrize("exponent", [2, 3, 0.5, -1.5])
def test_pow_scalar(exponent):
    check_op([(3, 5)], lambda a: a**exponent, lambda a: a**exponent, low=0.5, high=2.0)


def test_scalar_on_the_left():
    check_op([(2, 3)], lambda a: 1.5 - 2.0 / (a * a + 1) + 3 * a, lambda a: 1.5 - 2.0 / (a * a + 1) + 3 * a)


def test_neg():
    check_op([(4, 3)], lambda a: -a, lambda a: -a)


@pytest.mark.parametrize(
    "shapes",
    [
        ((3, 4), (4, 5)),
        ((2, 3, 4), (4, 5)),  # batched @ matrix
        ((2, 1, 3, 4), (5, 4, 2)),  # broadcast batch dims
        ((4,), (4, 3)),  # vector @ matrix
        ((2, 3, 4), (4,)),  # batched matrix @ vector
        ((4,), (4,)),  # dot
        ((1, 7, 1), (1, 1, 9)),  # size-1 contraction and rows
    ],
)
def test_matmul(shapes):
    check_op(shapes, lambda a, b: a @ b, lambda a, b: a @ b)


@pytest.mark.parametrize("axis,keepdims", [(None, False), (0, False), (1, True), ((0, 2), False), (-1, True)])
def test_sum_mean(axis, keepdims):
    dim = axis if axis is not None else tuple(range(3))
    check_op([(3, 4, 5)], lambda a: a.sum(axis, keepdims), lambda a: a.sum(dim=dim, keepdim=keepdims))
    check_op([(3, 4, 5)], lambda a: a.mean(axis, keepdims), lambda a: a.mean(dim=dim, keepdim=keepdims))


@pytest.mark.parametrize("axis,keepdims", [(None, False), (1, False), (-1, True), ((0, 1), True)])
def test_max(axis, keepdims):
    dim = axis if axis is not None else tuple(range(3))
    check_op([(3, 4, 5)], lambda a: a.max(axis, keepdims), lambda a: torch.amax(a, dim=dim, keepdim=keepdims))


def test_max_shares_gradient_among_ties():
    x = engine.tensor([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]], requires_grad=True, dtype="float64")
    x.max(axis=1).sum().backward()
    np.testing.assert_allclose(x.grad, [[0, 0.5, 0.5], [0.5, 0, 0.5]])


@pytest.mark.parametrize(
    "name,ours,ref,low",
    [
        ("exp", lambda a: a.exp(), torch.exp, -2.0),
        ("log", lambda a: a.log(), torch.log, 0.1),
        ("sqrt", lambda a: a.sqrt(), torch.sqrt, 0.1),
        ("tanh", lambda a: a.tanh(), torch.tanh, -3.0),
        ("relu", lambda a: a.relu(), torch.relu, -2.0),
    ],
)
def test_unary(name, ours, ref, low):
    check_op([(3, 1, 4)], ours, ref, low=low)


def test_reshape_permute_transpose():
    check_op([(2, 3, 4)], lambda a: a.reshape(4, -1) * 2, lambda a: a.reshape(4, -1) * 2)
    check_op([(2, 3, 4)], lambda a: a.permute(2, 0, 1) * 2, lambda a: a.permute(2, 0, 1) * 2)
    check_op([(2, 3, 4)], lambda a: a.transpose(0, 2) * 2, lambda a: a.transpose(0, 2) * 2)
    check_op([(3, 5)], lambda a: a.T @ a, lambda a: a.T @ a)


@pytest.mark.parametrize(
    "index",
    [
        (slice(1, None), slice(None, None, 2)),
        (1,),
        (Ellipsis, -1),
        (np.array([0, 2, 2, 1]),),  # repeated rows accumulate
        (np.array([[0, 1], [2, 2]]), slice(1, 3)),
        (np.array([0, 2]), np.array([1, 3])),  # pointwise gather
    ],
)
def test_getitem(index):
    torch_index = tuple(torch.tensor(i) if isinstance(i, np.ndarray) else i for i in index)
    check_op([(3, 4, 5)], lambda a: a[index] * 1.0, lambda a: a[torch_index] * 1.0)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concatenate_and_stack(axis):
    check_op(
        [(2, 3), (2, 3), (2, 3)],
        lambda a, b, c: engine.concatenate([a, b * 2, c], axis=axis),
        lambda a, b, c: torch.cat([a, b * 2, c], dim=axis),
    )
    check_op(
        [(2, 3), (2, 3)],
        lambda a, b: engine.stack([a, b * b], axis=axis),
        lambda a, b: torch.stack([a, b * b], dim=axis),
    )


def test_where_and_masked_fill():
    mask = np.random.default_rng(1).random((3, 4)) > 0.5
    check_op(
        [(3, 4), (4,)],
        lambda a, b: engine.where(mask, a, b),
        lambda a, b: torch.where(torch.tensor(mask), a, b),
    )
    check_op(
        [(3, 4)],
        lambda a: a.masked_fill(mask, -1e9).softmax(-1),
        lambda a: a.masked_fill(torch.tensor(mask), -1e9).softmax(-1),
    )


@pytest.mark.parametrize("axis", [0, -1])
def test_softmax_and_log_softmax(axis):
    check_op([(3, 5)], lambda a: a.softmax(axis), lambda a: torch.softmax(a, dim=axis))
    check_op([(3, 5)], lambda a: a.log_softmax(axis), lambda a: torch.log_softmax(a, dim=axis))


def test_softmax_stable_for_large_inputs():
    x = engine.tensor([[1000.0, 1001.0, 999.0]], dtype="float32")
    np.testing.assert_allclose(x.softmax(-1).numpy(), torch.softmax(torch.tensor(x.numpy()), -1).numpy(), rtol=1e-6)
    assert np.isfinite(x.log_softmax(-1).numpy()).all()


def test_var():
    check_op([(3, 6)], lambda a: a.var(-1, keepdims=True), lambda a: a.var(-1, keepdim=True, unbiased=False))


def test_astype_is_differentiable():
    x = engine.tensor(np.ones(3), requires_grad=True, dtype="float64")
    y = x.astype("float32") * 2
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_allclose(x.grad, 2.0)
