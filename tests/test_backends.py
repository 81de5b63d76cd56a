"""The numpy and triton backends give the same outputs and gradients.

On a machine without CUDA the triton backend runs its kernels in Triton's CPU interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), so this checks the real kernel code.
"""

from typing import Callable

import numpy as np
import pytest

import engine
from engine import functional as F
from tests.helpers.models import OurBlock
from tests.helpers.op_check import assert_close


def run_on(backend: str, fn: Callable, arrays: list[np.ndarray], upstream_seed: int = 1):
    """fn(*tensors) on ``backend``: (output, [input gradients]) as NumPy arrays."""
    engine.set_backend(backend)
    inputs = [engine.tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays]
    out = fn(*inputs)
    upstream = np.random.default_rng(upstream_seed).standard_normal(out.shape).astype(np.float32)
    out.backward(upstream)
    grads = [engine.get_backend().to_numpy(t.grad) for t in inputs if t.requires_grad]
    return out.numpy(), grads


def check_backends_agree(fn: Callable, arrays: list[np.ndarray], atol: float = 1e-5, rtol: float = 1e-5) -> None:
    ref_out, ref_grads = run_on("numpy", fn, arrays)
    out, grads = run_on("triton", fn, arrays)
    assert_close(out, ref_out, atol, rtol, "output")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, atol, rtol, f"grad {i}")


def randn(*shape):
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


def test_gelu_and_bias_gelu():
    check_backends_agree(F.gelu, [randn(3, 37)])
    check_backends_agree(F.bias_gelu, [randn(2, 5, 24), randn(24)])


def test_layer_norm():
    check_backends_agree(lambda x, w, b: F.layer_norm(x, w, b), [randn(2, 7, 48), randn(48), randn(48)])


@pytest.mark.parametrize("shape,causal", [((1, 2, 17, 16), True), ((2, 1, 9, 12), False), ((1, 1, 1, 8), True)])
def test_attention(shape, causal):
    check_backends_agree(
        lambda q, k, v: F.attention(q, k, v, causal=causal), [randn(*shape), randn(*shape) * 0.5, randn(*shape)]
    )


def test_attention_kv_cache_step_with_more_keys_than_queries():
    check_backends_agree(
        lambda q, k, v: F.causal_attention(q, k, v), [randn(1, 2, 1, 16), randn(1, 2, 9, 16), randn(1, 2, 9, 16)]
    )


def test_cross_entropy():
    targets = np.array([[1, 4, -100], [0, 2, 3]])
    check_backends_agree(lambda x: F.cross_entropy(x, targets), [randn(2, 3, 5) * 10])


def test_generic_ops_and_indexing():
    idx = np.array([0, 2, 2])

    def fn(a, b):
        x = (a @ b.T).softmax(-1) * a.sum(-1, keepdims=True).tanh() - a.max(0) / 3
        y = x[idx] + x[:, 1:2].exp() + engine.concatenate([x, x[idx, 0:1].reshape(3, 1)], axis=1)[:, :4]
        return y.log_softmax(-1) + (a**2).mean() + engine.where(x > 0, x, 0.0)

    check_backends_agree(fn, [randn(3, 4), randn(4, 4)])


def test_embedding():
    ids = np.array([[0, 3, 3], [1, 0, 2]])
    check_backends_agree(lambda w: F.embedding(ids, w) * 2, [randn(5, 8)])


def test_transformer_block_forward_and_every_gradient():
    engine.set_backend("numpy")
    engine.manual_seed(0)
    state = OurBlock().state_dict()
    ids = np.arange(12).reshape(2, 6) % 11
    results = {}
    for name in ("numpy", "triton"):
        engine.set_backend(name)
        model = OurBlock()
        model.load_state_dict(state)
        logits = model(ids)
        loss = F.cross_entropy(logits, (ids + 1) % 11)
        loss.backward()
        results[name] = (
            logits.numpy(),
            {n: engine.get_backend().to_numpy(p.grad) for n, p in model.named_parameters()},
        )
    assert_close(results["triton"][0], results["numpy"][0], 1e-5, 1e-5, "logits")
    for n, g in results["numpy"][1].items():
        assert_close(results["triton"][1][n], g, 1e-5, 1e-4, f"grad {n}")


def test_triton_backend_rejects_unknown_dtypes():
    engine.set_backend("triton")
    with pytest.raises(TypeError, match="'float8' is not supported by the triton backend"):
        engine.zeros(2, dtype="float8")


def test_rng_state_round_trips_on_both_backends():
    for name in ("numpy", "triton"):
        engine.set_backend(name)
        engine.manual_seed(3)
        state = engine.get_backend().rng_state()
        a = engine.randn(4).numpy()
        engine.get_backend().set_rng_state(state)
        np.testing.assert_array_equal(engine.randn(4).numpy(), a)


def test_autocast_needs_the_triton_backend():
    with pytest.raises(ValueError, match="needs the triton backend"):
        with engine.autocast("bfloat16"):
            pass


def test_autocast_bf16_keeps_fp32_weights_grads_and_loss():
    # Where each dtype flows; the bf16 numbers are checked against torch in the test below.
    import torch

    engine.set_backend("triton")
    engine.manual_seed(0)
    model = OurBlock()
    ids = np.arange(12).reshape(2, 6) % 11
    with engine.autocast("bfloat16"):
        logits = model(ids)
        loss = F.cross_entropy(logits, (ids + 1) % 11)
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    loss.backward()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
    assert engine.functional.linear(engine.ones(2, 8), model.proj.weight).dtype == torch.float32  # off again


def test_small_gpt_under_bf16_autocast_trains_like_torch_bf16_autocast():
    """Three AdamW steps under ``engine.autocast("bfloat16")`` (triton backend) against the
    torch twin under ``torch.autocast("cpu", bfloat16)``, from the same weights and batches.

    Tolerances: bf16 keeps 8 significant bits (unit roundoff 2**-9 ~ 2e-3), and the two sides
    round at different places (our fused kernels vs torch's ops), so they differ by a few bf16
    roundings, not by fp32 noise. Gradients: relative Frobenius error per parameter <= 2e-2
    (~10 roundings; measured <= 8e-3, the same size as torch bf16 vs torch fp32). Losses are fp32
    means over 32 tokens, which average the rounding errors out: |diff| <= 1e-3 (measured 2e-4).
    """
    import torch

    from bench.torch_gpt import from_state_dict
    from engine import optim
    from model.config import get_config
    from model.gpt import GPTModel

    config = get_config("tiny", vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
    engine.manual_seed(0)
    state = GPTModel(config).state_dict()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 97, size=(2, 17)) for _ in range(3)]

    engine.set_backend("triton")
    model = GPTModel(config)
    model.load_state_dict(state)
    opt = optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    losses, grads = [], None
    for batch in batches:
        with engine.autocast("bfloat16"):
            loss = F.cross_entropy(model(batch[:, :-1]), batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        grads = grads or {n: engine.get_backend().to_numpy(p.grad) for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())

    def torch_run(bf16: bool):
        twin = from_state_dict(config, state)
        torch_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.1)
        torch_losses, torch_grads = [], None
        for batch in map(torch.from_numpy, batches):
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = twin(batch[:, :-1])  # (B, T, vocab)
            torch_loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            torch_opt.zero_grad()
            torch_loss.backward()
            torch_grads = torch_grads or {n: p.grad.numpy().copy() for n, p in twin.named_parameters()}
            torch_opt.step()
            torch_losses.append(torch_loss.item())
        return torch_losses, torch_grads

    ref_losses, ref_grads = torch_run(bf16=True)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-3, rtol=0)
    errors = {n: np.linalg.norm(grads[n] - g) / np.linalg.norm(g) for n, g in ref_grads.items()}
    assert max(errors.values()) <= 2e-2, {n: f"{e:.2e}" for n, e in errors.items() if e > 2e-2}
    # and the run really was bf16: fp32 gradients sit a few bf16 roundings away from ours
    fp32_grads = torch_run(bf16=False)[1]
    assert max(np.linalg.norm(grads[n] - g) / np.linalg.norm(g) for n, g in fp32_grads.items()) > 1e-3


def test_small_gpt_same_logits_gradients_and_first_losses_on_both_backends():
    from engine import optim
    from model.config import get_config
    from model.gpt import GPTModel
    from model.sampling import generate

    config = get_config("tiny", vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
    engine.set_backend("numpy")
    engine.manual_seed(0)
    state = GPTModel(config).state_dict()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 97, size=(2, 17)) for _ in range(3)]
    results = {}
    for name in ("numpy", "triton"):
        engine.set_backend(name)
        model = GPTModel(config)
        model.load_state_dict(state)
        opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        losses, first_logits, first_grads = [], None, None
        for batch in batches:
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits, batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            if first_logits is None:
                first_logits = logits.numpy()
                first_grads = {n: engine.get_backend().to_numpy(p.grad) for n, p in model.named_parameters()}
            opt.step()
            losses.append(loss.item())
        prompt = batches[0][:1, :4]
        generated = [generate(model, prompt, 6, use_cache=c) for c in (True, False)]
        results[name] = (first_logits, first_grads, losses, generated)
    ref, ours = results["numpy"], results["triton"]
    assert_close(ours[0], ref[0], 1e-5, 1e-5, "logits")
    for n, g in ref[1].items():
        assert_close(ours[1][n], g, 1e-5, 1e-4, f"grad {n}")
    np.testing.assert_allclose(ours[2], ref[2], atol=1e-5)
    np.testing.assert_array_equal(ours[3][0], ours[3][1])  # cached == uncached on triton
    np.testing.assert_array_equal(ours[3][0], ref[3][0])  # and the same tokens as numpy


def test_rms_norm_swiglu_and_rope():
    check_backends_agree(lambda x, w: F.rms_norm(x, w), [randn(2, 7, 48), randn(48)])
    check_backends_agree(lambda x, w: F.rms_norm(x, w), [randn(2, 5, 3, 16), randn(16)])  # per-head q/k norm
    check_backends_agree(F.swiglu, [randn(3, 37) * 4, randn(3, 37)])
    angles = np.arange(9)[:, None] * 10000.0 ** -(np.arange(0, 16, 2) / 16)  # (9, 8)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    check_backends_agree(lambda x: F.rope(x.transpose(1, 2), engine.tensor(cos), engine.tensor(sin), 4),
                         [randn(2, 5, 3, 16)])


@pytest.mark.parametrize("T, S", [(9, 9), (1, 12), (4, 12)])
def test_grouped_query_attention_with_kv_cache_shapes(T, S):
    check_backends_agree(F.causal_attention, [randn(1, 4, T, 16), randn(1, 2, S, 16) * 0.5, randn(1, 2, S, 16)])
