"""The GPT model against the plain-PyTorch reference (bench/torch_gpt.py), in float64."""

import numpy as np
import pytest
import torch

import engine
from bench.torch_gpt import from_state_dict
from engine import functional as F
from engine import optim
from model.config import PRESETS, GPTConfig, get_config
from model.gpt import GPTModel, count_parameters, memory_report
from tests.helpers.op_check import assert_close

SMALL = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


@pytest.fixture(autouse=True)
def numpy_backend():
    engine.set_backend("numpy")
    yield


def small_model(dtype="float64", seed=0, **overrides) -> GPTModel:
    engine.manual_seed(seed)
    model = GPTModel(GPTConfig(**{**SMALL, **overrides}))
    return model.to(dtype) if dtype != "float32" else model


@pytest.mark.parametrize("qkv_bias, tie_weights", [(False, False), (True, True), (True, False)])
def test_logits_and_every_gradient_match_torch(qkv_bias, tie_weights):
    model = small_model(qkv_bias=qkv_bias, tie_weights=tie_weights)
    if qkv_bias:  # non-zero biases, so a mix-up of bias and weight layouts cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.data = p.data + 0.1 * np.random.default_rng(1).standard_normal(p.shape)
    ref = from_state_dict(model.config, model.state_dict())
    rng = np.random.default_rng(0)
    ids = rng.integers(0, SMALL["vocab_size"], size=(3, SMALL["context_length"]))
    logits = model(ids)  # (3, 16, 97)
    ref_logits = ref(torch.from_numpy(ids))
    assert_close(logits.numpy(), ref_logits.detach().numpy(), atol=1e-10, rtol=1e-8, what="logits")

    upstream = rng.standard_normal(logits.shape)
    logits.backward(upstream)
    ref_logits.backward(torch.from_numpy(upstream))
    names = [name for name, _ in model.named_parameters()]
    assert names == [name for name, _ in ref.named_parameters()]
    for name, p in model.named_parameters():
        assert_close(p.grad, ref.get_parameter(name).grad.numpy(), atol=1e-10, rtol=1e-8, what=f"grad of {name}")


def test_parameter_names_follow_gpt2():
    model = small_model(qkv_bias=True, tie_weights=True)
    layer = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
             "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
             "mlp.c_proj.weight", "mlp.c_proj.bias"]
    expected = ["wte.weight", "wpe.weight"] + [f"h.{i}.{n}" for i in range(2) for n in layer]
    expected += ["ln_f.weight", "ln_f.bias", "lm_head.weight"]
    assert list(model.state_dict()) == expected
    assert [n for n, _ in model.named_parameters()] == expected[:-1]  # the tied head once
    assert model.lm_head.weight is model.wte.weight
    assert model.h[0].attn.c_attn.weight.shape == (96, 32)  # (3·emb, emb)
    assert model.h[0].mlp.c_fc.weight.shape == (128, 32)  # (4·emb, emb)
    assert small_model(qkv_bias=False).h[0].attn.c_attn.bias is None


def test_init_is_gpt2_style():
    engine.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=2000, context_length=64, emb_dim=64, n_heads=4, n_layers=8))
    state = model.state_dict()
    proj_std = 0.02 / np.sqrt(2 * 8)
    for name, value in state.items():
        if ".ln_" in f".{name}":
            expected = 1.0 if name.endswith("weight") else 0.0
            assert np.all(value == expected), name
        elif name.endswith("bias"):
            assert np.all(value == 0), name
        else:
            std = proj_std if name.endswith("c_proj.weight") else 0.02
            assert abs(value.mean()) < 0.1 * std and abs(value.std() / std - 1) < 0.1, (name, value.std())


def test_parameter_counts_match_the_book():
    # Built for real once (the book's untied gpt2-small); the other sizes by the same formula,
    # which is checked against built models of small configs below.
    engine.manual_seed(0)
    gpt2_small = GPTModel(get_config("gpt2-small"))
    assert count_parameters(gpt2_small) == 163_009_536
    assert count_parameters(gpt2_small, exclude_output_head=True) == 124_412_160
    assert "621.83 MB" in memory_report(gpt2_small)
    # Hugging Face's gpt2: qkv bias and a tied head
    assert count_parameters(get_config("gpt2-small", qkv_bias=True, tie_weights=True)) == 124_439_808
    hf_sizes = {"gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    for name, n in hf_sizes.items():
        assert count_parameters(get_config(name, qkv_bias=True, tie_weights=True)) == n


@pytest.mark.parametrize("qkv_bias, tie_weights", [(False, False), (True, True), (False, True)])
def test_parameter_count_formula_matches_built_model(qkv_bias, tie_weights):
    model = small_model(qkv_bias=qkv_bias, tie_weights=tie_weights)
    for exclude in (False, True):
        assert count_parameters(model, exclude) == count_parameters(model.config, exclude)
    assert count_parameters(model) == sum(p.size for p in model.parameters())
    head = model.lm_head.weight.size
    assert count_parameters(model, True) == count_parameters(model) - (0 if tie_weights else head)


def test_kv_cache_matches_full_forward():
    model = small_model()
    model.eval()
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 12))
    with engine.no_grad():
        full = model(ids).numpy()  # (2, 12, 97)
        cache = model.new_kv_cache()
        parts, start = [], 0
        for size in (5, 1, 1, 3, 2):
            parts.append(model(ids[:, start:start + size], kv_cache=cache).numpy())
            start += size
            assert cache.length == start
    assert cache.keys[0].shape == (2, 4, 12, 8)  # (B, H, S, D)
    assert_close(np.concatenate(parts, axis=1), full, atol=1e-12, rtol=1e-10, what="cached logits")


def test_input_checks():
    model = small_model()
    with pytest.raises(ValueError, match="exceed context_length 16"):
        model(np.zeros((1, 17), dtype=np.int64))
    cache = model.new_kv_cache()
    with engine.no_grad():
        model(np.zeros((1, 10), dtype=np.int64), kv_cache=cache)
        with pytest.raises(ValueError, match="plus 10 cached"):
            model(np.zeros((1, 7), dtype=np.int64), kv_cache=cache)
    with pytest.raises(ValueError, match="batch, seq_len"):
        model(np.zeros(5, dtype=np.int64))


def test_dropout_only_in_training():
    model = small_model(drop_rate=0.5)
    ids = np.arange(16)[None]
    engine.manual_seed(1)
    a = model(ids).numpy()
    b = model(ids).numpy()
    engine.manual_seed(1)
    assert np.array_equal(model(ids).numpy(), a)  # the masks come from the engine's generator
    assert not np.allclose(a, b)
    model.eval()
    assert np.array_equal(model(ids).numpy(), model(ids).numpy())


def test_a_few_adamw_steps_fit_a_batch():
    model = small_model(dtype="float32", drop_rate=0.1)
    ids = np.random.default_rng(0).integers(0, 97, size=(4, 17))
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(ids[:, :-1]), ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - np.log(97)) < 0.1  # a fresh model guesses uniformly
    assert losses[-1] < losses[0] - 1.0


def test_config_presets_and_validation():
    assert set(PRESETS) >= {"gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny", "mini", "small-cpu"}
    assert (PRESETS["gpt2-xl"].emb_dim, PRESETS["gpt2-xl"].n_layers, PRESETS["gpt2-xl"].n_heads) == (1600, 48, 25)
    assert all(c.vocab_size == 50257 for c in PRESETS.values())
    config = get_config("tiny", drop_rate=0.0)
    assert config.drop_rate == 0.0 and PRESETS["tiny"].drop_rate == 0.1  # presets are not mutated
    assert GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="gpt2-small, gpt2-medium"):
        get_config("gpt3")
    with pytest.raises(ValueError, match="divisible by n_heads"):
        get_config("tiny", emb_dim=65)
    with pytest.raises(ValueError, match="unknown GPTConfig fields bogus"):
        get_config("tiny", bogus=1)
    with pytest.raises(ValueError, match="drop_rate"):
        GPTConfig(drop_rate=1.0)
    with pytest.raises(ValueError, match="unknown fields"):
        GPTConfig.from_dict({**config.to_dict(), "n_embd": 3})


def test_runs_on_the_triton_backend():
    """The same model code on the triton backend (Triton interpreter on CPU), float32."""
    try:
        engine.set_backend("triton")
    except (ImportError, RuntimeError) as err:
        pytest.skip(f"triton backend unavailable: {err}")
    try:
        model = small_model(dtype="float32")
        ref = from_state_dict(model.config, model.state_dict())
        ids = np.random.default_rng(0).integers(0, 97, size=(2, 9))
        logits = model(ids)
        assert_close(logits.numpy(), ref(torch.from_numpy(ids)).detach().numpy(), 1e-4, 1e-4, "triton logits")
        logits.backward(np.ones(logits.shape, dtype=np.float32))
        assert all(p.grad is not None for p in model.parameters())
    finally:
        engine.set_backend("numpy")


def test_init_schemes():
    """'gpt2': N(0, 0.02) weights and zero biases; 'book': PyTorch's layer defaults, as the book's model."""
    import numpy as np

    from model.config import get_config
    from model.gpt import GPTModel

    gpt2 = GPTModel(get_config("tiny", init="gpt2"))
    book = GPTModel(get_config("tiny", init="book"))
    assert abs(gpt2.wte.weight.numpy().std() - 0.02) < 0.002
    assert np.all(gpt2.h[0].mlp.c_fc.bias.numpy() == 0)
    assert abs(book.wte.weight.numpy().std() - 1.0) < 0.05  # nn.Embedding: N(0, 1)
    bound = 1 / np.sqrt(64)  # nn.Linear: U(-1/sqrt(in), 1/sqrt(in)), bias too
    c_fc = book.h[0].mlp.c_fc
    assert np.abs(c_fc.weight.numpy()).max() <= bound and c_fc.weight.numpy().std() > 0.8 * bound / np.sqrt(3)
    assert np.abs(c_fc.bias.numpy()).max() > 0
    with pytest.raises(ValueError, match="init must be one of gpt2, book"):
        get_config("tiny", init="xavier")


@pytest.mark.parametrize("tie_weights", [False, True])
def test_loss_with_targets_is_the_fused_head_and_equals_the_unfused_loss(tie_weights):
    """model(ids, targets=...) (F.linear_cross_entropy) gives the loss and every gradient of
    F.cross_entropy(model(ids), targets), ignored positions included."""
    ids = np.random.default_rng(2).integers(0, 97, size=(2, 9))
    targets = ids[:, 1:].copy()
    targets[0, :3] = -100
    results = []
    for fused in (True, False):
        model = small_model(dtype="float32", tie_weights=tie_weights)
        loss = model(ids[:, :-1], targets=targets) if fused else F.cross_entropy(model(ids[:, :-1]), targets)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (ref_loss, ref_grads) = results
    assert_close(loss, ref_loss, 1e-6, 1e-6, "loss")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_close(grads[name], ref_grads[name], 1e-5, 1e-5, name)
