"""CPU microbenchmarks: our NumPy references and engine ops against torch CPU.

    pytest bench --benchmark-only

Kept out of the default test run (pytest's testpaths is ``tests``). Each group pairs our
provider with torch on the same inputs; pytest-benchmark prints them side by side.
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


@pytest.fixture(autouse=True)
def _numpy_backend():
    engine.set_backend("numpy")


def _torch_fwd_bwd(fn, *arrays):
    inputs = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*inputs)
    out.backward(torch.ones_like(out))


@pytest.mark.benchmark(group="gelu fwd+bwd")
def test_gelu_numpy(benchmark):
    benchmark(lambda: gelu_ref.gelu_backward(DY, gelu_ref.gelu_forward(X)))


@pytest.mark.benchmark(group="gelu fwd+bwd")
def test_gelu_torch(benchmark):
    benchmark(_torch_fwd_bwd, lambda x: TF.gelu(x, approximate="tanh"), X)


@pytest.mark.benchmark(group="layer_norm fwd+bwd")
def test_layer_norm_numpy(benchmark):
    def run():
        y, mean, rstd = layernorm_ref.layer_norm_forward(X, W, BIAS)
        return layernorm_ref.layer_norm_backward(DY, X, W, mean, rstd)

    benchmark(run)


@pytest.mark.benchmark(group="layer_norm fwd+bwd")
def test_layer_norm_torch(benchmark):
    benchmark(_torch_fwd_bwd, lambda x, w, b: TF.layer_norm(x, (COLS,), w, b), X, W, BIAS)


@pytest.mark.benchmark(group="causal attention fwd+bwd")
def test_attention_numpy(benchmark):
    def run():
        o, lse = attention_ref.attention_forward(Q, K, V)
        return attention_ref.attention_backward(DO, Q, K, V, o, lse)

    benchmark(run)


@pytest.mark.benchmark(group="causal attention fwd+bwd")
def test_attention_torch(benchmark):
    benchmark(_torch_fwd_bwd, lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True), Q, K, V)


@pytest.mark.benchmark(group="cross_entropy fwd+bwd")
def test_cross_entropy_numpy(benchmark):
    def run():
        nll, row_max, log_sum = cross_entropy_ref.cross_entropy_forward(LOGITS, TARGETS)
        dnll = np.full(nll.shape, 1.0 / len(nll), dtype=np.float32)  # the mean's gradient
        return cross_entropy_ref.cross_entropy_backward(dnll, LOGITS, TARGETS, row_max, log_sum)

    benchmark(run)


@pytest.mark.benchmark(group="cross_entropy fwd+bwd")
def test_cross_entropy_torch(benchmark):
    targets = torch.tensor(TARGETS)
    benchmark(_torch_fwd_bwd, lambda x: TF.cross_entropy(x, targets), LOGITS)


@pytest.mark.benchmark(group="engine matmul+softmax fwd+bwd")
def test_engine_matmul_softmax(benchmark):
    def run():
        a, b = engine.tensor(X, requires_grad=True), engine.tensor(X[:COLS].T.copy(), requires_grad=True)
        (a @ b).softmax(-1).sum().backward()

    benchmark(run)


@pytest.mark.benchmark(group="engine matmul+softmax fwd+bwd")
def test_torch_matmul_softmax(benchmark):
    benchmark(_torch_fwd_bwd, lambda a, b: (a @ b).softmax(-1), X, X[:COLS].T.copy())


@pytest.mark.benchmark(group="engine cross_entropy fwd+bwd")
def test_engine_cross_entropy(benchmark):
    def run():
        F.cross_entropy(engine.tensor(LOGITS, requires_grad=True), TARGETS).backward()

    benchmark(run)
