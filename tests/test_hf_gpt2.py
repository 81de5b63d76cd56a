"""Hugging Face GPT-2 checkpoints: written here (no downloads), loaded, checked against torch."""

import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as TF

import engine
from bench.torch_gpt import from_state_dict
from model.config import GPTConfig, get_config
from model.gpt import GPTModel
from model.lora import apply_lora, lora_layers, merge_lora
from model.weights.checkpoint import CheckpointError
from model.weights.hf import (
    HFDownloadError,
    config_from_hf,
    config_to_hf,
    download_hf_gpt2,
    export_hf,
    load_hf_gpt2,
)
from tests.helpers.op_check import assert_close

V, C, E, H, L = 71, 16, 32, 4, 2
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IDS = np.random.default_rng(1).integers(0, V, size=(2, C))


@pytest.fixture(autouse=True)
def numpy_backend():
    engine.set_backend("numpy")
    engine.manual_seed(0)


def hf_config(**changes):
    return {"model_type": "gpt2", "activation_function": "gelu_new", "vocab_size": V, "n_positions": C,
            "n_ctx": C, "n_embd": E, "n_head": H, "n_layer": L, "n_inner": None, "resid_pdrop": 0.1,
            "embd_pdrop": 0.1, "attn_pdrop": 0.1, "layer_norm_epsilon": 1e-5, **changes}


def hand_built_hf(directory, prefix="transformer.", dtype=np.float64):
    """A GPT-2 checkpoint as transformers writes it: Conv1D weights (in, out), mask buffers, tied head."""
    rng = np.random.default_rng(0)

    def r(*shape, scale=0.2, offset=0.0):
        return (offset + scale * rng.standard_normal(shape)).astype(dtype)

    t = {f"{prefix}wte.weight": r(V, E), f"{prefix}wpe.weight": r(C, E)}
    for i in range(L):
        h = f"{prefix}h.{i}."
        t |= {h + "ln_1.weight": r(E, offset=1.0), h + "ln_1.bias": r(E),
              h + "attn.c_attn.weight": r(E, 3 * E), h + "attn.c_attn.bias": r(3 * E),
              h + "attn.c_proj.weight": r(E, E), h + "attn.c_proj.bias": r(E),
              h + "ln_2.weight": r(E, offset=1.0), h + "ln_2.bias": r(E),
              h + "mlp.c_fc.weight": r(E, 4 * E), h + "mlp.c_fc.bias": r(4 * E),
              h + "mlp.c_proj.weight": r(4 * E, E), h + "mlp.c_proj.bias": r(E),
              h + "attn.bias": np.tril(np.ones((C, C), dtype))[None, None],
              h + "attn.masked_bias": np.array(-1e4, dtype)}
    t |= {f"{prefix}ln_f.weight": r(E, offset=1.0), f"{prefix}ln_f.bias": r(E)}
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(t, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config()))
    return {name.removeprefix(prefix): value for name, value in t.items()}


def hf_architecture_logits(t, ids):
    """GPT-2 as HF computes it, straight from the HF tensors: Conv1D is x @ W + b."""
    w = {name: torch.from_numpy(value) for name, value in t.items()}
    ids = torch.from_numpy(ids)
    x = w["wte.weight"][ids] + w["wpe.weight"][: ids.shape[1]]  # (B, T, E)
    B, T, _ = x.shape
    for i in range(L):
        p = f"h.{i}."
        a = TF.layer_norm(x, (E,), w[p + "ln_1.weight"], w[p + "ln_1.bias"], 1e-5)
        q, k, v = (a @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]).split(E, dim=2)
        q, k, v = (z.view(B, T, H, E // H).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        y = TF.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, E)
        x = x + y @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        m = TF.layer_norm(x, (E,), w[p + "ln_2.weight"], w[p + "ln_2.bias"], 1e-5)
        m = TF.gelu(m @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"], approximate="tanh")
        x = x + m @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    x = TF.layer_norm(x, (E,), w["ln_f.weight"], w["ln_f.bias"], 1e-5)
    return (x @ w["wte.weight"].T).numpy()


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_hand_built_hf_checkpoint_matches_torch(tmp_path, prefix):
    tensors = hand_built_hf(tmp_path, prefix)
    model = load_hf_gpt2(tmp_path)
    assert model.config == GPTConfig(vocab_size=V, context_length=C, emb_dim=E, n_heads=H, n_layers=L,
                                     drop_rate=0.1, qkv_bias=True, tie_weights=True)
    assert model.lm_head.weight is model.wte.weight and model.wte.weight.dtype == np.float64
    np.testing.assert_array_equal(model.h[1].mlp.c_fc.weight.numpy(), tensors["h.1.mlp.c_fc.weight"].T)
    model.eval()
    ours = model(IDS).numpy()
    assert_close(ours, hf_architecture_logits(tensors, IDS), 1e-10, 1e-8, "logits vs HF architecture")

    # bench/torch_gpt.py with the same weights, mapped by hand (Conv1D weights transposed)
    state = {name: (value.T if name.endswith(CONV1D) else value) for name, value in tensors.items()
             if not name.endswith((".attn.bias", ".attn.masked_bias"))}
    ref = from_state_dict(model.config, state).eval()
    assert_close(ours, ref(torch.from_numpy(IDS)).detach().numpy(), 1e-10, 1e-8, "logits vs bench.torch_gpt")


def test_float32_checkpoint_loads_as_float32(tmp_path):
    tensors = hand_built_hf(tmp_path, dtype=np.float32)
    model = load_hf_gpt2(tmp_path, drop_rate=0.0)
    assert model.wte.weight.dtype == np.float32 and model.config.drop_rate == 0.0
    expected = hf_architecture_logits({k: v.astype(np.float64) for k, v in tensors.items()}, IDS)
    assert_close(model(IDS).numpy(), expected, 1e-4, 1e-4, "float32 logits")


@pytest.mark.parametrize("qkv_bias, tie_weights", [(False, False), (True, True)])
def test_export_then_load_round_trip(tmp_path, qkv_bias, tie_weights):
    config = GPTConfig(vocab_size=V, context_length=C, emb_dim=E, n_heads=H, n_layers=L, drop_rate=0.0,
                       qkv_bias=qkv_bias, tie_weights=tie_weights)
    model = GPTModel(config)
    export_hf(model, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert (hf["n_embd"], hf["n_layer"], hf["n_head"], hf["n_positions"], hf["vocab_size"]) == (E, L, H, C, V)
    assert hf["tie_word_embeddings"] == tie_weights
    stored = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    assert stored["transformer.h.0.attn.c_attn.weight"].shape == (E, 3 * E)  # Conv1D: (in, out)
    assert stored["transformer.h.0.mlp.c_proj.weight"].shape == (4 * E, E)
    assert ("lm_head.weight" in stored) != tie_weights
    assert all(name.startswith("transformer.") for name in stored if name != "lm_head.weight")

    loaded = load_hf_gpt2(tmp_path, drop_rate=0.0)
    assert loaded.config.qkv_bias and loaded.config.tie_weights == tie_weights
    np.testing.assert_array_equal(loaded(IDS).numpy(), model(IDS).numpy())
    if not qkv_bias:
        assert not loaded.h[0].attn.c_attn.bias.numpy().any()


@pytest.mark.parametrize("merge_head", [False, True])
def test_export_keeps_a_head_that_merge_lora_untied(tmp_path, merge_head):
    config = GPTConfig(vocab_size=V, context_length=C, emb_dim=E, n_heads=H, n_layers=L, drop_rate=0.0,
                       qkv_bias=True, tie_weights=True)
    model = GPTModel(config)
    apply_lora(model, rank=2, alpha=4.0, targets=["lm_head", "c_fc"] if merge_head else ["c_fc"])
    rng = np.random.default_rng(2)
    for layer in lora_layers(model).values():  # a trained update (B starts at zero)
        layer.lora_B.data = engine.tensor(rng.normal(size=layer.lora_B.shape).astype(np.float32)).data
    merge_lora(model)
    assert model.config.tie_weights and (model.lm_head.weight is model.wte.weight) != merge_head
    export_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] == (not merge_head)
    assert ("lm_head.weight" in safetensors.numpy.load_file(tmp_path / "model.safetensors")) == merge_head
    loaded = load_hf_gpt2(tmp_path, drop_rate=0.0)
    np.testing.assert_array_equal(loaded(IDS).numpy(), model(IDS).numpy())


def test_config_of_openai_gpt2():
    # the fields of https://huggingface.co/gpt2/blob/main/config.json that matter here
    openai = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
              "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
              "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
              "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "vocab_size": 50257}
    config = config_from_hf(openai)
    assert config == get_config("gpt2-small", qkv_bias=True, tie_weights=True)
    assert config_from_hf(config_to_hf(config)) == config
    for bad in ({"activation_function": "relu"}, {"n_inner": 100}, {"scale_attn_by_inverse_layer_idx": True}):
        with pytest.raises(ValueError):
            config_from_hf({**openai, **bad})
    with pytest.raises(ValueError, match="n_embd"):
        config_from_hf({k: v for k, v in openai.items() if k != "n_embd"})


def test_bad_hf_directories(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_hf_gpt2(tmp_path)
    tensors = hand_built_hf(tmp_path)
    path = tmp_path / "model.safetensors"
    del tensors["h.1.mlp.c_fc.bias"]
    safetensors.numpy.save_file(tensors, path)
    with pytest.raises(CheckpointError, match="model.safetensors: does not fit config.json: missing h.1.mlp.c_fc.bias"):
        load_hf_gpt2(tmp_path)
    safetensors.numpy.save_file({**tensors, "h.1.mlp.c_fc.bias": np.zeros(4 * E), "h.0.extra": np.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="unexpected keys: h.0.extra"):
        load_hf_gpt2(tmp_path)
    safetensors.numpy.save_file({**tensors, "h.1.mlp.c_fc.bias": np.zeros(4 * E + 1)}, path)
    with pytest.raises(CheckpointError, match=rf"h.1.mlp.c_fc.bias is \[{4 * E + 1}\], not \[{4 * E}\]"):
        load_hf_gpt2(tmp_path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read"):
        load_hf_gpt2(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(n_head=5)))
    with pytest.raises(CheckpointError, match="config.json: not a usable GPT-2 config"):
        load_hf_gpt2(tmp_path)


class FakeResponse(io.BytesIO):
    status = 200

    def __init__(self, data: bytes, length: int | None = None):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data) if length is None else length)}


def test_download_writes_files_atomically(tmp_path, monkeypatch):
    source = tmp_path / "source"
    export_hf(GPTModel(GPTConfig(vocab_size=V, context_length=C, emb_dim=E, n_heads=H, n_layers=L)), source)
    fetched = []

    def fake_urlopen(request, timeout=None):
        fetched.append(request.full_url)
        return FakeResponse((source / request.full_url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    directory = download_hf_gpt2("gpt2", cache_dir=tmp_path / "cache")
    assert fetched == ["https://huggingface.co/gpt2/resolve/main/config.json",
                       "https://huggingface.co/gpt2/resolve/main/model.safetensors"]
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    load_hf_gpt2(directory)
    download_hf_gpt2("gpt2", cache_dir=tmp_path / "cache")  # already there: nothing fetched
    assert len(fetched) == 2

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(b"short", length=100))
    with pytest.raises(HFDownloadError, match="5 of 100 bytes"):
        download_hf_gpt2("gpt2-medium", cache_dir=tmp_path / "cache")
    # no file that looks complete: only the hidden partial one, which the next call resumes
    assert [p.name for p in (tmp_path / "cache" / "gpt2-medium").iterdir()] == [".config.json.incomplete"]


def test_download_offline_names_the_alternative(tmp_path, monkeypatch):
    def offline(request, timeout=None):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(HFDownloadError, match="--hf-dir"):
        download_hf_gpt2("gpt2-xl", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="gpt2, gpt2-medium"):
        download_hf_gpt2("gpt-5", cache_dir=tmp_path)
