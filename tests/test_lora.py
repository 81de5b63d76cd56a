"""LoRA: identity at initialisation, gradients only into A and B, merging, adapter files."""

import json
import math

import numpy as np
import pytest
import safetensors.numpy

import engine
from engine import functional as F
from engine import nn, optim
from model.config import get_config
from model.gpt import GPTModel
from model.lora import LoRAError, LoRALinear, apply_lora, count_trainable, load_lora, lora_layers, merge_lora, save_lora

RANK, ALPHA = 4, 8.0


def tiny_gpt(seed: int = 0, emb_dim: int = 32) -> GPTModel:
    """A float64 GPT small enough to train in milliseconds (dropout off: outputs are exact)."""
    engine.manual_seed(seed)
    config = get_config("tiny", vocab_size=97, context_length=16, emb_dim=emb_dim, n_layers=2, n_heads=2, drop_rate=0.0)
    return GPTModel(config).to("float64")


IDS = np.random.default_rng(0).integers(0, 97, (2, 12))


def train_steps(model: nn.Module, steps: int = 3, lr: float = 1e-2) -> None:
    opt = optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(IDS), IDS).backward()
        opt.step()


def test_lora_linear_init_shapes_and_names():
    base = nn.Linear(50, 7)
    layer = LoRALinear(base, RANK, ALPHA)
    assert dict((n, p.shape) for n, p in layer.named_parameters()) == {
        "base.weight": (7, 50), "base.bias": (7,), "lora_A": (RANK, 50), "lora_B": (7, RANK)}
    assert layer.scale == ALPHA / RANK
    a = layer.lora_A.numpy()
    assert np.abs(a).max() <= 1 / math.sqrt(50) and a.std() > 0.5 / math.sqrt(50) / math.sqrt(3)  # U(±1/sqrt(in))
    assert not layer.lora_B.numpy().any()
    assert not base.weight.requires_grad and layer.lora_A.requires_grad and layer.lora_B.requires_grad
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(3, 3), 0, 1.0)


def test_wrapped_model_equals_base_model_at_initialisation():
    model = tiny_gpt()
    before = model(IDS).numpy()
    names = list(model.state_dict())
    counts = apply_lora(model, RANK, ALPHA)
    assert counts.layers == 9  # 4 per block (c_attn, attn.c_proj, c_fc, mlp.c_proj) + lm_head
    layers = lora_layers(model)
    assert counts.trainable == sum(m.lora_A.size + m.lora_B.size for m in layers.values())
    assert (counts.trainable, counts.total) == count_trainable(model)
    assert "h.0.attn.c_attn.base.weight" in model.state_dict() and "h.0.attn.c_attn.lora_A" in model.state_dict()
    np.testing.assert_array_equal(model(IDS).numpy(), before)  # B = 0: exactly the base model
    merge_lora(model)
    assert list(model.state_dict()) == names  # original names, original order


def test_gradients_reach_only_lora_parameters():
    model = tiny_gpt()
    apply_lora(model, RANK, ALPHA)
    train_steps(model, 1)  # B != 0 afterwards, so A gets a nonzero gradient too
    model.zero_grad()
    F.cross_entropy(model(IDS), IDS).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    lora = {n for n, _ in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    assert with_grad == lora
    assert all(np.abs(p.grad).max() > 0 for n, p in model.named_parameters() if n in lora)


def test_merged_outputs_equal_unmerged_after_training():
    model = tiny_gpt()
    apply_lora(model, RANK, ALPHA)
    train_steps(model, 3)
    assert all(np.abs(m.lora_B.numpy()).max() > 0 for m in lora_layers(model).values())
    adapted = model(IDS).numpy()
    assert merge_lora(model) == 9
    assert not lora_layers(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    np.testing.assert_allclose(model(IDS).numpy(), adapted, rtol=1e-10, atol=1e-10)


def test_targets_select_layers_by_name():
    model = tiny_gpt()
    counts = apply_lora(model, RANK, ALPHA, targets=["c_attn", "mlp.c_proj"])
    assert sorted(lora_layers(model)) == ["h.0.attn.c_attn", "h.0.mlp.c_proj", "h.1.attn.c_attn", "h.1.mlp.c_proj"]
    assert counts.layers == 4
    with pytest.raises(LoRAError, match="already has LoRA layers"):
        apply_lora(model, RANK, ALPHA)
    with pytest.raises(LoRAError, match=r"targets \['q_proj'\] match no nn.Linear.*h.0.attn.c_attn"):
        apply_lora(tiny_gpt(), RANK, ALPHA, targets=["q_proj"])


def test_adapter_save_load_round_trip(tmp_path):
    base_state = tiny_gpt().state_dict()
    model = tiny_gpt()
    apply_lora(model, RANK, ALPHA, targets=["c_attn", "c_fc"])
    train_steps(model, 3)
    expected = model(IDS).numpy()
    base_path = save_lora(model, tmp_path / "adapter")
    stored = safetensors.numpy.load_file(str(tmp_path / "adapter.safetensors"))
    assert all(name.endswith((".lora_A", ".lora_B")) for name in stored) and len(stored) == 8  # adapters only
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert (meta["rank"], meta["alpha"], len(meta["targets"])) == (RANK, ALPHA, 4)

    fresh = tiny_gpt(seed=1)  # other init: the base weights come from base_state
    fresh.load_state_dict(base_state)
    counts = load_lora(fresh, base_path)  # adds the LoRA layers itself
    assert counts.layers == 4
    np.testing.assert_allclose(fresh(IDS).numpy(), expected, rtol=1e-12, atol=1e-12)

    wrapped = tiny_gpt()
    apply_lora(wrapped, RANK, ALPHA, targets=["c_attn", "c_fc"])
    load_lora(wrapped, str(base_path) + ".safetensors")  # into existing layers; a suffix is fine
    np.testing.assert_allclose(wrapped(IDS).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_adapter_mismatches_give_clear_errors(tmp_path):
    model = tiny_gpt()
    apply_lora(model, RANK, ALPHA, targets=["c_attn"])
    path = save_lora(model, tmp_path / "adapter")

    other_rank = tiny_gpt()
    apply_lora(other_rank, 2, ALPHA, targets=["c_attn"])
    with pytest.raises(LoRAError, match="rank 4, alpha 8.*the model's LoRA layers have"):
        load_lora(other_rank, path)
    other_layers = tiny_gpt()
    apply_lora(other_layers, RANK, ALPHA, targets=["c_fc"])
    with pytest.raises(LoRAError, match=r"wrapped layers differ \(only in the file: \['h.0.attn.c_attn'"):
        load_lora(other_layers, path)
    wider = tiny_gpt(emb_dim=64)
    before = wider.state_dict()
    with pytest.raises(LoRAError, match="h.0.attn.c_attn: the file has A"):
        load_lora(wider, path)
    assert not lora_layers(wider) and wider.state_dict().keys() == before.keys()  # nothing changed
    with pytest.raises(FileNotFoundError, match="missing .*nowhere.json"):
        load_lora(tiny_gpt(), tmp_path / "nowhere")
    (tmp_path / "adapter.json").write_text('{"format": "something else"}')
    with pytest.raises(LoRAError, match="not a LoRA adapter file"):
        load_lora(tiny_gpt(), path)
    with pytest.raises(LoRAError, match="no LoRA layers"):
        save_lora(tiny_gpt(), tmp_path / "none")


def test_lora_linear_same_on_numpy_and_triton_backends():
    x = np.random.default_rng(1).standard_normal((3, 5, 24)).astype(np.float32)
    up = np.random.default_rng(2).standard_normal((3, 5, 10)).astype(np.float32)
    results = {}
    for name in ("numpy", "triton"):
        engine.set_backend(name)
        layer = nn.Linear(24, 10)
        layer.load_state_dict({"weight": np.linspace(-1, 1, 240, dtype=np.float32).reshape(10, 24),
                               "bias": np.linspace(0, 1, 10, dtype=np.float32)})
        lora = LoRALinear(layer, RANK, ALPHA)
        lora.load_state_dict({"lora_A": np.full((RANK, 24), 0.1, np.float32),
                              "lora_B": np.full((10, RANK), -0.2, np.float32)}, strict=False)
        xt = engine.tensor(x, requires_grad=True)
        out = lora(xt)
        out.backward(up)
        merged = lora.weight.numpy()
        results[name] = (out.numpy(), engine.get_backend().to_numpy(lora.lora_A.grad), merged)
    for got, want in zip(results["triton"], results["numpy"]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_merged_lora_on_a_tied_head_saves_and_reloads_untied(tmp_path):
    """merge_lora unties a head tied to wte; the checkpoint must record that, or loading
    would tie the weights again and one of them would silently win."""
    import numpy as np

    from model.config import get_config
    from model.gpt import GPTModel
    from model.lora import apply_lora, merge_lora
    from model.weights.checkpoint import load_model_from_checkpoint, save_checkpoint

    model = GPTModel(get_config("tiny", tie_weights=True, drop_rate=0.0))
    apply_lora(model, rank=2, alpha=4)
    model.lm_head.lora_B.data = np.ones_like(model.lm_head.lora_B.data)
    merge_lora(model)
    save_checkpoint(tmp_path / "ckpt", model, model.config)
    reloaded, checkpoint = load_model_from_checkpoint(tmp_path / "ckpt")
    assert checkpoint.config.tie_weights is False
    ids = np.arange(10).reshape(1, 10)
    np.testing.assert_array_equal(reloaded(ids).numpy(), model(ids).numpy())
