"""CPU microbenchmarks: our NumPy references and engine ops against torch CPU.

    pytest bench --benchmark-only

Kept out of the default test run (pytest's testpaths is ``tests``). Each group pairs our
provider with torch on the same inputs; pytest-benchmark prints them side by side.

Fairness: every input, upstream gradient and leaf tensor is built once, at import, outside
the timed call (torch's leaves share the NumPy arrays' memory); a timed call is one forward
and one backward, and both sides compute the same outputs and gradients from the same
upstream gradient. Torch leaves drop their ``.grad`` before each backward, so neither side
pays for accumulating into a previous gradient. Both sides use their default thread counts.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import engine
from engine import functional as F
from kernels import attention_ref, cross_entropy_ref, gelu_ref, layernorm_ref

RNG = np.random.default_rng(0)
ROWS, COLS = 2048, 768  # a GPT-2 small activation for 2 x 1024 tokens
B, H, T, D = 2, 12, 256, 64  # the book's chapter-5 attention shape
VOCAB = 50257


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


X, DY = randn(ROWS, COLS), randn(ROWS, COLS)
W, BIAS = randn(COLS), randn(COLS)
Q, K, V, DO = (randn(B, H, T, D) for _ in range(4))
LOGITS = randn(512, VOCAB)
TARGETS = RNG.integers(0, VOCAB, size=512)
A, BT = X, X[:COLS].T.copy()  # (ROWS, COLS) @ (COLS, COLS)
DSOFT = randn(ROWS, COLS)  # upstream gradient of the softmax


def leaf(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).requires_grad_()


T_X, T_W, T_BIAS, T_DY = leaf(X), leaf(W), leaf(BIAS), torch.from_numpy(DY)
T_Q, T_K, T_V, T_DO = leaf(Q), leaf(K), leaf(V), torch.from_numpy(DO)
T_LOGITS, T_TARGETS, T_ONE = leaf(LOGITS), torch.from_numpy(TARGETS), torch.tensor(1.0)
T_A, T_BT, T_DSOFT = leaf(A), leaf(BT), torch.from_numpy(DSOFT)


@pytest.fixture(autouse=True)
def _numpy_backend():
    engine.set_backend("numpy")


def _torch_fwd_bwd(fn, leaves, upstream):
    for t in leaves:
        t.grad = None
    fn(*leaves).backward(upstream)


@pytest.mark.benchmark(group="gelu fwd+bwd")
def test_gelu_numpy(benchmark):
    def run():
        gelu_ref.gelu_forward(X)
        return gelu_ref.gelu_backward(DY, X)

    benchmark(run)


@pytest.mark.benchmark(group="gelu fwd+bwd")
def test_gelu_torch(benchmark):
    benchmark(_torch_fwd_bwd, lambda x: TF.gelu(x, approximate="tanh"), [T_X], T_DY)


@pytest.mark.benchmark(group="layer_norm fwd+bwd")
def test_layer_norm_numpy(benchmark):
    def run():
        y, mean, rstd = layernorm_ref.layer_norm_forward(X, W, BIAS)
        return layernorm_ref.layer_norm_backward(DY, X, W, mean, rstd)

    benchmark(run)


@pytest.mark.benchmark(group="layer_norm fwd+bwd")
def test_layer_norm_torch(benchmark):
    benchmark(_torch_fwd_bwd, lambda x, w, b: TF.layer_norm(x, (COLS,), w, b), [T_X, T_W, T_BIAS], T_DY)


@pytest.mark.benchmark(group="causal attention fwd+bwd")
def test_attention_numpy(benchmark):
    def run():
        o, lse = attention_ref.attention_forward(Q, K, V)
        return attention_ref.attention_backward(DO, Q, K, V, o, lse)

    benchmark(run)


@pytest.mark.benchmark(group="causal attention fwd+bwd")
def test_attention_torch(benchmark):
    benchmark(_torch_fwd_bwd, lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True),
              [T_Q, T_K, T_V], T_DO)


@pytest.mark.benchmark(group="cross_entropy fwd+bwd")
def test_cross_entropy_numpy(benchmark):
    def run():
        nll, row_max, log_sum = cross_entropy_ref.cross_entropy_forward(LOGITS, TARGETS)
        dnll = np.full(nll.shape, 1.0 / len(nll), dtype=np.float32)  # the mean's gradient
        return cross_entropy_ref.cross_entropy_backward(dnll, LOGITS, TARGETS, row_max, log_sum)

    benchmark(run)


@pytest.mark.benchmark(group="cross_entropy fwd+bwd")
def test_cross_entropy_engine(benchmark):
    logits = engine.tensor(LOGITS, requires_grad=True)

    def run():
        logits.grad = None
        F.cross_entropy(logits, TARGETS).backward()

    benchmark(run)


@pytest.mark.benchmark(group="cross_entropy fwd+bwd")
def test_cross_entropy_torch(benchmark):
    benchmark(_torch_fwd_bwd, lambda x: TF.cross_entropy(x, T_TARGETS), [T_LOGITS], T_ONE)


@pytest.mark.benchmark(group="engine matmul+softmax fwd+bwd")
def test_engine_matmul_softmax(benchmark):
    a, b = engine.tensor(A, requires_grad=True), engine.tensor(BT, requires_grad=True)

    def run():
        a.grad = b.grad = None
        (a @ b).softmax(-1).backward(DSOFT)

    benchmark(run)


@pytest.mark.benchmark(group="engine matmul+softmax fwd+bwd")
def test_torch_matmul_softmax(benchmark):
    benchmark(_torch_fwd_bwd, lambda a, b: (a @ b).softmax(-1), [T_A, T_BT], T_DSOFT)
