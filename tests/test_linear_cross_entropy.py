"""F.linear_cross_entropy equals the unfused F.cross_entropy(F.linear(...)) on both backends,
chunked or not, and agrees with torch in float64."""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import engine
from engine import functional as F
from tests.helpers.op_check import assert_close, check_op

IGNORE = -100


def make_problem(n=23, e=8, v=13, seed=0, ignored=(1, 7)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, e)).astype(np.float32)
    w = (rng.standard_normal((v, e)) * 0.5).astype(np.float32)
    b = rng.standard_normal(v).astype(np.float32)
    t = rng.integers(0, v, size=n)
    t[list(ignored)] = IGNORE
    return x, w, b, t


def loss_and_grads(fused: bool, x, w, b, t, chunk_rows=None, with_bias=True):
    xs, ws, bs = (engine.tensor(a, requires_grad=True) for a in (x, w, b))
    bias = bs if with_bias else None
    if fused:
        loss = F.linear_cross_entropy(xs, ws, t, ignore_index=IGNORE, bias=bias, chunk_rows=chunk_rows)
    else:
        loss = F.cross_entropy(F.linear(xs, ws, bias), t, ignore_index=IGNORE)
    loss.backward(np.float32(1.7))  # a non-unit upstream gradient: backward must scale by it
    grads = [engine.get_backend().to_numpy(g.grad) for g in (xs, ws, bs) if g.grad is not None]
    return loss.item(), grads


@pytest.mark.parametrize("backend", ["numpy", "triton"])
@pytest.mark.parametrize("chunk_rows", [None, 1, 5], ids=["one-chunk", "chunk1", "chunk5"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_fused_equals_unfused(backend, chunk_rows, with_bias):
    engine.set_backend(backend)
    x, w, b, t = make_problem()
    loss, grads = loss_and_grads(True, x, w, b, t, chunk_rows, with_bias)
    ref_loss, ref_grads = loss_and_grads(False, x, w, b, t, with_bias=with_bias)
    assert len(grads) == len(ref_grads) == (3 if with_bias else 2)
    assert_close(loss, ref_loss, 1e-5, 1e-5, "loss")
    for name, g, r in zip(("dx", "dW", "db"), grads, ref_grads):
        assert_close(g, r, 1e-5, 1e-5, name)


def test_matches_torch_in_float64():
    _, _, _, t = make_problem(n=6, e=4, v=5, ignored=(2,))
    check_op(
        [(2, 3, 4), (5, 4), (5,)],
        lambda x, w, b: F.linear_cross_entropy(x, w, t.reshape(2, 3), bias=b, chunk_rows=2),
        lambda x, w, b: TF.cross_entropy(x.reshape(6, 4) @ w.T + b, torch.tensor(t)),
        gradcheck=False,
    )


@pytest.mark.parametrize("backend", ["numpy", "triton"])
def test_every_target_ignored_gives_zero_loss_and_gradients(backend):
    engine.set_backend(backend)
    x, w, b, _ = make_problem(n=4, ignored=())
    t = np.full(4, IGNORE)
    loss, grads = loss_and_grads(True, x, w, b, t, chunk_rows=3)
    assert loss == 0.0 and all(not np.any(g) for g in grads)


def test_no_grad_computes_only_the_loss():
    x, w, b, t = make_problem()
    with engine.no_grad():
        loss = F.linear_cross_entropy(engine.tensor(x), engine.tensor(w, requires_grad=True), t, bias=engine.tensor(b))
    ref = F.cross_entropy(F.linear(engine.tensor(x), engine.tensor(w), engine.tensor(b)), t)
    assert not loss.requires_grad
    assert_close(loss.item(), ref.item(), 1e-6, 1e-6, "loss")


def test_bad_shapes_get_one_clear_error():
    x, w, b, t = make_problem()
    with pytest.raises(ValueError, match="do not fit"):
        F.linear_cross_entropy(engine.tensor(x), engine.tensor(w[:, :3]), t)
    with pytest.raises(ValueError, match=r"targets of shape \(23,\)"):
        F.linear_cross_entropy(engine.tensor(x), engine.tensor(w), t[:5])
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        F.linear_cross_entropy(engine.tensor(x), engine.tensor(w), t, chunk_rows=0)
