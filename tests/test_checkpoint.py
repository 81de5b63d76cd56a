"""Checkpoints: round trips (model, optimizer, step, extra), atomic writes, and damaged files."""

import json
import os

import numpy as np
import pytest
import safetensors
import safetensors.numpy

import engine
from engine import functional as F
from engine import optim
from model.config import GPTConfig
from model.gpt import GPTModel
from model.weights import checkpoint as ckpt_module
from model.weights.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    checkpoint_paths,
    load_checkpoint,
    load_model_from_checkpoint,
    save_checkpoint,
)

CONFIG = GPTConfig(vocab_size=53, context_length=12, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)
IDS = np.random.default_rng(0).integers(0, 53, size=(2, 12))


@pytest.fixture(autouse=True)
def numpy_backend():
    engine.set_backend("numpy")
    engine.manual_seed(0)


def make_model(**overrides) -> GPTModel:
    return GPTModel(GPTConfig(**{**CONFIG.to_dict(), **overrides}))


def train_steps(model, opt, n=2):
    for _ in range(n):
        loss = F.cross_entropy(model(IDS[:, :-1]), IDS[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("tie_weights", [False, True])
def test_save_load_gives_identical_logits(tmp_path, tie_weights):
    model = make_model(tie_weights=tie_weights, qkv_bias=tie_weights)
    base = save_checkpoint(tmp_path / "run" / "step5", model, model.config, step=5, extra={"note": "hi"})
    tensors_path, json_path = checkpoint_paths(base)
    assert tensors_path.is_file() and json_path.is_file()
    assert sorted(os.listdir(tmp_path / "run")) == ["step5.json", "step5.safetensors"]  # no temp files left
    loaded, ckpt = load_model_from_checkpoint(base)
    assert ckpt.config == model.config and ckpt.step == 5 and ckpt.extra == {"note": "hi"}
    assert ckpt.optimizer_state is None
    np.testing.assert_array_equal(loaded(IDS).numpy(), model(IDS).numpy())
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(ckpt.state_dict[name], value)
    with safetensors.safe_open(str(tensors_path), framework="np") as f:
        stored = set(f.keys())
    assert ("model.lm_head.weight" in stored) != tie_weights  # a tied weight is stored once
    assert (loaded.lm_head.weight is loaded.wte.weight) == tie_weights
    # either file's name works as the path, too
    assert load_checkpoint(json_path).step == 5 and load_checkpoint(tensors_path).step == 5


def test_optimizer_state_round_trips(tmp_path):
    model = make_model()
    opt = optim.AdamW(model.parameters(), lr=1e-3)
    train_steps(model, opt)
    rng_state = engine.get_backend().rng_state()
    base = save_checkpoint(tmp_path / "ck", model, model.config, opt, step=2, extra={"rng": rng_state, "pos": 7})

    before = engine.get_backend().rng_state()
    loaded, ckpt = load_model_from_checkpoint(base)
    assert engine.get_backend().rng_state() == before  # building the model did not move the RNG
    assert ckpt.extra == {"rng": rng_state, "pos": 7}
    opt2 = optim.AdamW(loaded.parameters(), lr=0.5)
    opt2.load_state_dict(ckpt.optimizer_state)
    assert opt2.step_count == 2 and opt2.lr == 1e-3
    for a, b in zip(opt.state_dict()["buffers"]["exp_avg_sq"], opt2.state_dict()["buffers"]["exp_avg_sq"]):
        np.testing.assert_array_equal(a, b)
    # the resumed run takes exactly the step the original takes
    train_steps(model, opt, 1)
    train_steps(loaded, opt2, 1)
    for (name, value), other in zip(model.state_dict().items(), loaded.state_dict().values()):
        np.testing.assert_array_equal(value, other, err_msg=name)


def test_optimizer_buffers_that_are_none(tmp_path):
    model = make_model()
    sgd = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # no step yet: every buffer is None
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "ck", model, model.config, sgd))
    assert ckpt.optimizer_state["buffers"]["momentum_buffers"] == [None] * len(model.parameters())
    optim.SGD(model.parameters(), lr=0.1, momentum=0.9).load_state_dict(ckpt.optimizer_state)


def test_float64_model_stays_float64(tmp_path):
    model = make_model().to("float64")
    loaded, _ = load_model_from_checkpoint(save_checkpoint(tmp_path / "ck", model, model.config))
    assert loaded.wte.weight.dtype == np.float64
    np.testing.assert_array_equal(loaded(IDS).numpy(), model(IDS).numpy())


def test_extra_must_be_json(tmp_path):
    model = make_model()
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "ck", model, model.config, extra={"bad": object()})
    assert not any(tmp_path.iterdir())


def test_interrupted_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    model = make_model()
    base = save_checkpoint(tmp_path / "ck", model, model.config, step=1)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_module.safetensors.numpy, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ck", make_model(), model.config, step=2)
    assert sorted(os.listdir(tmp_path)) == ["ck.json", "ck.safetensors"]  # temp file removed
    assert load_checkpoint(base).step == 1  # the previous checkpoint is intact
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "new", model, model.config)
    assert not (tmp_path / "new.safetensors").exists() and not (tmp_path / "new.json").exists()


@pytest.fixture
def saved(tmp_path):
    model = make_model()
    opt = optim.AdamW(model.parameters())
    train_steps(model, opt, 1)
    base = save_checkpoint(tmp_path / "ck", model, model.config, opt, step=3)
    return base, *checkpoint_paths(base)


def test_missing_files(saved, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nothere.json") as info:
        load_checkpoint(tmp_path / "nothere")
    assert isinstance(info.value, FileNotFoundError)
    base, tensors_path, json_path = saved
    tensors_path.unlink()
    with pytest.raises(CheckpointError, match="ck.safetensors"):
        load_checkpoint(base)


def test_bad_json(saved):
    base, _, json_path = saved
    json_path.write_text(json_path.read_text()[:-40])
    with pytest.raises(CheckpointError, match=r"ck\.json: not valid JSON"):
        load_checkpoint(base)


def test_malformed_json_fields(saved):
    base, _, json_path = saved
    meta = json.loads(json_path.read_text())
    meta["tensors"] = "oops"
    json_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="ck.json"):
        load_checkpoint(base)


def test_truncated_safetensors(saved):
    base, tensors_path, _ = saved
    data = tensors_path.read_bytes()
    tensors_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ck.safetensors.*truncated"):
        load_checkpoint(base)


def test_damaged_safetensors_header(saved):
    base, tensors_path, _ = saved
    data = bytearray(tensors_path.read_bytes())
    data[8:16] = b"garbage!"  # the JSON header starts at byte 8; the size stays the same
    tensors_path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="ck.safetensors: damaged safetensors file"):
        load_checkpoint(base)


def rewrite_tensors(tensors_path, json_path, change):
    """Rewrite the safetensors file through ``change(tensors)``, keeping save id and byte count in step."""
    with safetensors.safe_open(str(tensors_path), framework="np") as f:
        metadata = f.metadata()
    tensors = safetensors.numpy.load_file(tensors_path)
    change(tensors)
    safetensors.numpy.save_file(tensors, tensors_path, metadata=metadata)
    meta = json.loads(json_path.read_text())
    meta["safetensors_bytes"] = tensors_path.stat().st_size
    json_path.write_text(json.dumps(meta))


def test_missing_tensor(saved):
    base, tensors_path, json_path = saved
    rewrite_tensors(tensors_path, json_path, lambda t: t.pop("model.h.1.mlp.c_fc.weight"))
    with pytest.raises(CheckpointError, match="missing tensors model.h.1.mlp.c_fc.weight"):
        load_checkpoint(base)


def test_shape_mismatch(saved):
    base, tensors_path, json_path = saved
    rewrite_tensors(tensors_path, json_path, lambda t: t.update({"model.wpe.weight": np.zeros((3, 16), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model.wpe.weight is float32\[3, 16\]"):
        load_checkpoint(base)


def test_files_from_different_saves(saved, tmp_path):
    base, tensors_path, _ = saved
    model = make_model()
    twin = save_checkpoint(tmp_path / "twin", model, CONFIG, optim.AdamW(model.parameters()))
    os.replace(checkpoint_paths(twin)[0], tensors_path)  # same tensors and size, another save id
    with pytest.raises(CheckpointError, match="different saves"):
        load_checkpoint(base)


def test_config_that_does_not_fit_the_weights(saved):
    base, _, json_path = saved
    meta = json.loads(json_path.read_text())
    meta["config"]["n_layers"] = 1
    json_path.write_text(json.dumps(meta))
    load_checkpoint(base)  # the files themselves are consistent
    with pytest.raises(CheckpointError, match="unexpected keys: h.1"):
        load_model_from_checkpoint(base)
    meta["config"]["n_heads"] = 5
    json_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="bad config.*divisible"):
        load_checkpoint(base)
