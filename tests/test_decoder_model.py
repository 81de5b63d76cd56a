"""Llama 3 / Qwen3 decoder: tiny random folders written by transformers, loaded by us, compared
with LlamaForCausalLM / Qwen3ForCausalLM (logits, per-layer activations, gradients, greedy
tokens), plus KV cache, bf16 and sharded files, export, errors and LoRA fine-tuning."""

import json
import shutil

import numpy as np
import pytest

import engine
from engine import functional as F
from engine import optim
from model.decoder import PRESETS, chat_reply, estimate_memory, get_decoder_config, load_hf_folder
from model.decoder.config import count_parameters
from model.decoder.hf import HFFolderError, config_from_hf, config_to_hf, export_hf_folder, load_hf_model
from model.decoder.safetensors_io import bf16_to_float32, float32_to_bf16, read_header, read_tensor
from model.lora import apply_lora, merge_lora
from model.sampling import generate
from tests.helpers.op_check import assert_close

KINDS = ("llama", "qwen3")
IDS = np.random.default_rng(1).integers(0, 320, size=(2, 37))  # prime; > the 32-position blended wavelength


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """fp32 tiny-llama and tiny-qwen3, and a bf16 sharded tiny-llama, built once for the module."""
    pytest.importorskip("transformers", reason="transformers writes the reference folders (pip install transformers)")
    from tests.fixtures.make_tiny_llama_qwen import make_tiny_folder

    root = tmp_path_factory.mktemp("hf")
    out = {kind: make_tiny_folder(kind, root / kind) for kind in KINDS}
    out["llama-bf16-sharded"] = make_tiny_folder("llama", root / "llama-bf16", dtype="bfloat16", shard=True, seed=1)
    return out


def reference(directory):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


# --- configs, without transformers ---
def test_preset_sizes_are_the_published_ones():
    assert get_decoder_config("qwen3-0.6b", n_layers=2).n_layers == 2 and PRESETS["qwen3-0.6b"].n_layers == 28
    with pytest.raises(ValueError, match="n_heads \\(6\\) must be a multiple of n_kv_heads \\(4\\)"):
        get_decoder_config("llama-3.2-1b", n_heads=6, n_kv_heads=4)
    assert {name: count_parameters(c) for name, c in PRESETS.items()} == {
        "llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824,
        "qwen3-0.6b": 596_049_920, "qwen3-1.7b": 1_720_574_976}
    est = estimate_memory(PRESETS["qwen3-0.6b"], bytes_per_value=2, tokens=1024)
    assert est.weight_bytes == 2 * 596_049_920
    assert est.kv_cache_bytes == 2 * 28 * 8 * 1024 * 128 * 2  # K and V, layers, kv heads, tokens, head dim, bf16
    assert "GiB" in str(est)


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_survives_the_hf_layout(name):
    config = PRESETS[name]
    assert config_from_hf(config_to_hf(config)) == config
    v5 = config_to_hf(config)  # transformers 5 nests theta and scaling in rope_parameters
    v5["rope_parameters"] = {"rope_theta": v5.pop("rope_theta"), **(v5.pop("rope_scaling") or {"rope_type": "default"})}
    assert config_from_hf(v5) == config


def test_bf16_conversion_rounds_like_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 1e3
    x[:6] = [np.inf, -np.inf, np.nan, 0.0, -0.0, 3.4e38]
    ref = torch.from_numpy(x).to(torch.bfloat16)
    ours = float32_to_bf16(x)
    number = ~np.isnan(x)  # NaN payloads may differ; NaN must stay NaN
    assert np.array_equal(ours[number], ref.view(torch.int16).numpy().view(np.uint16)[number])
    assert np.array_equal(bf16_to_float32(ours), ref.float().numpy(), equal_nan=True)


# --- against transformers ---
@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_activations_match_transformers(folders, kind):
    import torch

    model = load_hf_model(folders[kind])
    ref = reference(folders[kind])
    hidden = []
    logits = model(IDS, hidden_states=hidden).numpy()
    with torch.no_grad():
        out = ref(torch.from_numpy(IDS), output_hidden_states=True)
    assert_close(logits, out.logits.numpy(), 1e-4, 1e-4, f"{kind} logits")
    # transformers' last hidden state is after the final norm
    hidden[-1] = model.norm(hidden[-1])
    assert len(hidden) == len(out.hidden_states) == model.config.n_layers + 1
    for i, (ours, theirs) in enumerate(zip(hidden, out.hidden_states)):
        assert_close(ours.numpy(), theirs.numpy(), 1e-4, 1e-4, f"{kind} hidden state {i}")


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_transformers(folders, kind):
    import torch

    model = load_hf_model(folders[kind])
    ref = reference(folders[kind])
    targets = np.roll(IDS, -1, axis=1)
    F.cross_entropy(model(IDS), targets).backward()
    logits = ref(torch.from_numpy(IDS)).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).reshape(-1)
                                      ).backward()
    theirs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g = theirs[name if name == "lm_head.weight" else "model." + name].grad.numpy()
        assert_close(p.grad, g, 1e-5, 1e-4, f"{kind} grad of {name}")


@pytest.mark.parametrize("kind", KINDS)  # llama's head is tied to embed_tokens, qwen3's is not
def test_fused_loss_equals_the_cross_entropy_of_the_logits(folders, kind):
    targets = np.roll(IDS, -1, axis=1)
    targets[0, 30:] = -100  # padding the loss skips
    results = []
    for fused in (True, False):
        model = load_hf_model(folders[kind])
        loss = model(IDS, targets=targets) if fused else F.cross_entropy(model(IDS), targets)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (fused_loss, fused_grads), (loss, grads) = results
    assert model.config.tie_weights == (kind == "llama")
    assert fused_loss == pytest.approx(loss, abs=1e-5)
    for name, grad in grads.items():
        assert_close(fused_grads[name], grad, 1e-5, 1e-5, f"{kind} fused-loss grad of {name}")


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_matches_transformers_and_the_cache(folders, kind):
    import torch

    model = load_hf_model(folders[kind])
    ref = reference(folders[kind])
    prompt = IDS[0, :9]
    cached = generate(model, prompt, 20)
    assert np.array_equal(cached, generate(model, prompt, 20, use_cache=False))
    with torch.no_grad():
        theirs = ref.generate(torch.from_numpy(prompt)[None], max_new_tokens=20, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0].numpy()
    assert np.array_equal(cached, theirs), f"ours {cached[9:]} vs transformers {theirs[9:]}"


def test_kv_cache_steps_equal_the_full_forward(folders):
    model = load_hf_model(folders["qwen3"])
    full = model(IDS).numpy()
    cache = model.new_kv_cache()
    with engine.no_grad():
        parts = [model(IDS[:, :20], kv_cache=cache)] + [model(IDS[:, t:t + 1], kv_cache=cache) for t in range(20, 37)]
    assert cache.keys[0].shape == (2, 1, 37, 16)  # the cache holds the single K/V head, not the 4 query heads
    assert_close(np.concatenate([p.numpy() for p in parts], axis=1), full, 1e-5, 1e-5, "cached logits")


def test_bf16_sharded_folder_loads_exactly(folders):
    import torch

    directory = folders["llama-bf16-sharded"]
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    model = load_hf_model(directory)
    ref = reference(directory)  # widened to fp32 by torch
    theirs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert np.array_equal(p.numpy(), theirs[name if name == "lm_head.weight" else "model." + name]
                              .detach().numpy()), name
    with torch.no_grad():
        assert_close(model(IDS).numpy(), ref(torch.from_numpy(IDS)).logits.numpy(), 1e-4, 1e-4, "bf16 logits")


def test_export_round_trips(folders, tmp_path):
    import torch

    model = load_hf_model(folders["qwen3"])
    out = export_hf_folder(model, tmp_path / "fp32", tokenizer_dir=folders["qwen3"])
    assert (out / "tokenizer.json").is_file()
    with torch.no_grad():
        theirs = reference(out)(torch.from_numpy(IDS)).logits.numpy()
    assert_close(model(IDS).numpy(), theirs, 1e-4, 1e-4, "exported logits in transformers")
    # bf16 in, bf16 out: the stored bits come back unchanged
    source = folders["llama-bf16-sharded"]
    out = export_hf_folder(load_hf_model(source), tmp_path / "bf16", dtype="bfloat16")
    original = {}
    for shard in source.glob("model-*.safetensors"):
        original |= read_header(shard)
    exported = read_header(out / "model.safetensors")
    assert set(exported) == set(original) - {"lm_head.weight"}
    for name, info in exported.items():
        assert info.dtype == "BF16"
        assert np.array_equal(read_tensor(info), read_tensor(original[name])), name


def test_folder_errors_name_the_problem(folders, tmp_path, monkeypatch):
    bad = shutil.copytree(folders["llama"], tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    with pytest.raises(HFFolderError, match=r"mlp.gate_proj.weight is \(96, 64\), config.json implies \(100, 64\)"):
        load_hf_model(bad)
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(HFFolderError, match="model_type is 'mistral'"):
        load_hf_model(bad)
    (bad / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("model.decoder.hf.available_memory", lambda: 10_000)
    with pytest.raises(HFFolderError, match=r"the weights need 0.0 GiB in float32, only 0.0 GiB are free"):
        load_hf_model(bad)
    load_hf_model(bad, check_memory=False)
    (bad / "model.safetensors").unlink()
    with pytest.raises(HFFolderError, match="neither model.safetensors nor"):
        load_hf_model(bad)


def test_lora_fine_tuning_lowers_the_loss_and_merges(folders, tmp_path):
    model, tokenizer, template = load_hf_folder(folders["llama"])
    # lm_head is tied to embed_tokens: merging unties it, and the export must say so
    counts = apply_lora(model, rank=4, alpha=8.0, targets=["q_proj", "v_proj", "gate_proj", "lm_head"])
    per_layer = (4 * 64 + 64 * 4) + (4 * 64 + 32 * 4) + (4 * 64 + 96 * 4)  # A (rank, in) + B (out, rank)
    assert counts.layers == 7 and counts.trainable == 2 * per_layer + 4 * 64 + 336 * 4
    ids = np.asarray([template.encode(tokenizer, [{"role": "user", "content": "Say hi"},
                                                  {"role": "assistant", "content": "Hi there!"}])])
    inputs, targets = ids[:, :-1], ids[:, 1:]
    opt = optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.6 * losses[0], losses
    with engine.no_grad():
        adapted = model(inputs).numpy()
    merge_lora(model)
    with engine.no_grad():
        assert_close(model(inputs).numpy(), adapted, 1e-5, 1e-5, "merged logits")
    reloaded = load_hf_model(export_hf_folder(model, tmp_path / "merged"))
    assert not reloaded.config.tie_weights
    with engine.no_grad():
        assert_close(reloaded(inputs).numpy(), adapted, 1e-5, 1e-5, "exported merged logits")


def test_chat_reply_stops_at_the_end_of_turn(folders):
    model, tokenizer, template = load_hf_folder(folders["qwen3"])
    assert template.name == "qwen3"
    messages = [{"role": "user", "content": "Hello"}]
    prompt = template.encode(tokenizer, messages)
    out = generate(model, np.asarray(prompt), 12)
    reply = chat_reply(model, tokenizer, template, messages, max_new_tokens=12)
    tail = [int(t) for t in out[len(prompt):]]
    stop = tokenizer.added_tokens["<|im_end|>"]
    assert reply == tokenizer.decode(tail[:tail.index(stop)] if stop in tail else tail)


def test_numpy_and_triton_backends_agree():
    """The same tiny Qwen3-style model (GQA, q/k norm, untied) on both backends: loss and every gradient."""
    from model.decoder import DecoderConfig, DecoderModel

    config = DecoderConfig(model_type="qwen3", vocab_size=50, context_length=32, emb_dim=32, hidden_dim=48,
                           n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, qk_norm=True, tie_weights=False)
    ids = np.random.default_rng(2).integers(0, 50, size=(2, 11))
    state, results = None, {}
    for backend in ("numpy", "triton"):
        engine.set_backend(backend)
        engine.manual_seed(0)
        model = DecoderModel(config)
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        loss = F.cross_entropy(model(ids), np.roll(ids, -1, axis=1))
        loss.backward()
        results[backend] = loss.item(), {n: engine.get_backend().to_numpy(p.grad) for n, p in model.named_parameters()}
    assert results["triton"][0] == pytest.approx(results["numpy"][0], abs=1e-5)
    for name, grad in results["numpy"][1].items():
        assert_close(results["triton"][1][name], grad, 1e-5, 1e-4, f"triton grad of {name}")


def test_triton_kv_cache_steps_equal_the_full_forward():
    """RoPE at a position offset and grouped-query attention over cached keys, in the Triton kernels."""
    from model.decoder import DecoderConfig, DecoderModel

    engine.set_backend("triton")
    engine.manual_seed(0)
    config = DecoderConfig(model_type="qwen3", vocab_size=50, context_length=32, emb_dim=32, hidden_dim=48,
                           n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, qk_norm=True, tie_weights=False)
    model = DecoderModel(config)
    ids = np.random.default_rng(3).integers(0, 50, size=(2, 13))
    with engine.no_grad():
        full = model(ids).numpy()
        cache = model.new_kv_cache()
        parts = [model(ids[:, :9], kv_cache=cache)] + [model(ids[:, t:t + 1], kv_cache=cache) for t in range(9, 13)]
    assert cache.keys[0].shape == (2, 2, 13, 16)
    assert_close(np.concatenate([p.numpy() for p in parts], axis=1), full, 1e-5, 1e-5, "cached logits")
