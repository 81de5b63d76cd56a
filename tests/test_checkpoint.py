"""Checkpoints: round trips (model, optimizer, step, extra), atomic writes, damaged files, the old layout."""

import json
import os

import numpy as np
import pytest
import safetensors
import safetensors.numpy

import engine
from engine import functional as F
from engine import optim
from model.config import GPTConfig, parameter_shapes
from model.gpt import GPTModel
from model.weights import checkpoint as ckpt_module
from model.weights.checkpoint import (
    FORMAT,
    META_KEY,
    CheckpointError,
    CheckpointNotFoundError,
    NonFiniteWeightsError,
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
    assert os.listdir(tmp_path / "run") == ["step5.safetensors"]  # one file, no temp files left
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
    # the file's name works as the path, too (and the old layout's .json name)
    assert load_checkpoint(json_path).step == 5 and load_checkpoint(tensors_path).step == 5


def test_saved_file_has_the_umasks_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        base = save_checkpoint(tmp_path / "ck", make_model(), CONFIG)
    finally:
        os.umask(old)
    assert checkpoint_paths(base)[0].stat().st_mode & 0o777 == 0o640  # not a temp file's 0600


def test_parameter_shapes_are_the_models():
    for config in (CONFIG, GPTConfig(**{**CONFIG.to_dict(), "qkv_bias": True, "tie_weights": True, "n_layers": 3})):
        model = GPTModel(config)
        shapes = {name: p.shape for name, p in ckpt_module._all_named_parameters(model)}
        assert shapes == parameter_shapes(config)


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
    assert os.listdir(tmp_path) == ["ck.safetensors"]  # temp file removed
    assert load_checkpoint(base).step == 1  # the previous checkpoint is intact
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "new", model, model.config)
    assert not (tmp_path / "new.safetensors").exists()


def test_next_save_removes_temp_files_of_killed_saves(tmp_path):
    model = make_model()
    # what a killed save leaves (ours, and tempfile.mkstemp's of earlier versions), and bystanders
    stale = [".ck.safetensors.0123456789abcdef.tmp", ".ck.safetensors.k2_9xq0a.tmp"]
    kept = [".other.safetensors.0123456789abcdef.tmp", ".ck.safetensors.x.0123456789abcdef.tmp", "ck.txt"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
    killed = tmp_path / ".ck.safetensors.fedcba9876543210.tmp"  # a temp dir with safetensors' own temp file
    killed.mkdir()
    (killed / ".tmpAb12Cd").write_bytes(b"partial")
    save_checkpoint(tmp_path / "ck", model, model.config)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["ck.safetensors"])


def test_non_finite_weights_are_not_saved(tmp_path):
    model = make_model()
    opt = optim.AdamW(model.parameters())
    train_steps(model, opt, 1)
    base = save_checkpoint(tmp_path / "ck", model, model.config, opt, step=1)
    before = checkpoint_paths(base)[0].read_bytes()
    state = model.state_dict()
    state["wpe.weight"][3, :2] = [np.inf, -np.inf]
    model.load_state_dict(state)
    with pytest.raises(NonFiniteWeightsError, match=r"refusing to save .*ck\.safetensors: tensor model\.wpe\.weight "
                       r"holds 2 NaN/inf values .*previous checkpoint is unchanged"):
        save_checkpoint(base, model, model.config, opt, step=2)
    assert checkpoint_paths(base)[0].read_bytes() == before and os.listdir(tmp_path) == ["ck.safetensors"]


@pytest.fixture
def saved(tmp_path):
    model = make_model()
    opt = optim.AdamW(model.parameters())
    train_steps(model, opt, 1)
    base = save_checkpoint(tmp_path / "ck", model, model.config, opt, step=3)
    return base, checkpoint_paths(base)[0]


def rewrite(tensors_path, change_meta=None, change_tensors=None, header=None):
    """Rewrite the checkpoint file through ``change_meta(meta)`` and ``change_tensors(tensors)``,
    or with ``header`` as its whole header metadata."""
    with safetensors.safe_open(str(tensors_path), framework="np") as f:
        metadata = f.metadata()
    tensors = safetensors.numpy.load_file(tensors_path)
    if change_meta is not None:
        meta = json.loads(metadata[META_KEY])
        change_meta(meta)
        metadata[META_KEY] = json.dumps(meta)
    if change_tensors is not None:
        change_tensors(tensors)
    safetensors.numpy.save_file(tensors, tensors_path, metadata=header or metadata)


def test_missing_files(saved, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nothere.safetensors") as info:
        load_checkpoint(tmp_path / "nothere")
    assert isinstance(info.value, FileNotFoundError)


def test_bad_metadata_json(saved):
    base, tensors_path = saved
    rewrite(tensors_path, header={"format": FORMAT, META_KEY: "{not json"})
    with pytest.raises(CheckpointError, match=r"ck\.safetensors: its header's checkpoint metadata is not valid JSON"):
        load_checkpoint(base)
    rewrite(tensors_path, header={"format": "something else"})
    with pytest.raises(CheckpointError, match="not a scratchgpt checkpoint"):
        load_checkpoint(base)


@pytest.mark.parametrize("field, value, message", [
    ("extra", "oops", "extra is a str"),
    ("step", None, "step is a NoneType"),
    ("tied", {"lm_head.weight": 3}, "tied is not a name -> name map"),
    ("optimizer", {"scalars": {}, "buffers": {"exp_avg": "x"}}, "optimizer needs scalars"),
    ("version", 7, "format version 7, this code reads 2"),
])
def test_malformed_metadata_fields(saved, field, value, message):
    base, tensors_path = saved
    rewrite(tensors_path, change_meta=lambda meta: meta.update({field: value}))
    with pytest.raises(CheckpointError, match=rf"ck\.safetensors: .*{message}"):
        load_checkpoint(base)


def test_truncated_safetensors(saved):
    base, tensors_path = saved
    data = tensors_path.read_bytes()
    tensors_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ck.safetensors: damaged or truncated"):
        load_checkpoint(base)


def test_damaged_safetensors_header(saved):
    base, tensors_path = saved
    data = bytearray(tensors_path.read_bytes())
    data[8:16] = b"garbage!"  # the JSON header starts at byte 8; the size stays the same
    tensors_path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="ck.safetensors: damaged or truncated safetensors file"):
        load_checkpoint(base)


def test_missing_tensor(saved):
    base, tensors_path = saved
    rewrite(tensors_path, change_tensors=lambda t: t.pop("model.h.1.mlp.c_fc.weight"))
    with pytest.raises(CheckpointError, match=r"do not fit its config \(missing h.1.mlp.c_fc.weight\)"):
        load_checkpoint(base)


def test_shape_mismatch(saved):
    base, tensors_path = saved
    rewrite(tensors_path, change_tensors=lambda t: t.update({"model.wpe.weight": np.zeros((3, 16), np.float32)}))
    with pytest.raises(CheckpointError, match=r"\(wpe.weight is \[3, 16\], not \[12, 16\]\)"):
        load_checkpoint(base)


def test_config_that_does_not_fit_the_weights(saved):
    base, tensors_path = saved
    rewrite(tensors_path, change_meta=lambda meta: meta["config"].update(n_layers=1))
    load_checkpoint(base)  # a smaller config does not allocate more than is stored
    with pytest.raises(CheckpointError, match="unexpected keys: h.1"):
        load_model_from_checkpoint(base)
    rewrite(tensors_path, change_meta=lambda meta: meta["config"].update(n_heads=5))
    with pytest.raises(CheckpointError, match="bad config.*divisible"):
        load_checkpoint(base)
    rewrite(tensors_path, change_meta=lambda meta: meta["config"].update(n_heads=2, n_layers=3))
    with pytest.raises(CheckpointError, match="missing h.2.ln_1.weight, h.2.ln_1.bias"):
        load_checkpoint(base)


def write_version_1(base, save_id="0" * 32):
    """Turn a checkpoint into the old two-file layout: metadata in PATH.json, a save id in both."""
    tensors_path, json_path = checkpoint_paths(base)
    with safetensors.safe_open(str(tensors_path), framework="np") as f:
        meta = json.loads(f.metadata()[META_KEY])
    tensors = safetensors.numpy.load_file(tensors_path)
    safetensors.numpy.save_file(tensors, tensors_path, metadata={"format": FORMAT, "save_id": "0" * 32})
    meta.update(version=1, save_id=save_id, safetensors_bytes=tensors_path.stat().st_size,
                tensors={name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in tensors.items()})
    json_path.write_text(json.dumps(meta))


def test_version_1_checkpoints_still_load(saved):
    base, tensors_path = saved
    model, ckpt = load_model_from_checkpoint(base)
    write_version_1(base)
    model_v1, ckpt_v1 = load_model_from_checkpoint(base)
    assert (ckpt_v1.step, ckpt_v1.config, ckpt_v1.extra) == (ckpt.step, ckpt.config, ckpt.extra)
    np.testing.assert_array_equal(model_v1(IDS).numpy(), model(IDS).numpy())
    # a new save over it writes the new layout and drops the old metadata file
    save_checkpoint(base, model_v1, ckpt_v1.config, step=4)
    assert os.listdir(tensors_path.parent) == ["ck.safetensors"] and load_checkpoint(base).step == 4


def test_version_1_files_from_different_saves(saved):
    base, tensors_path = saved
    write_version_1(base, save_id="1" * 32)
    with pytest.raises(CheckpointError, match="different saves"):
        load_checkpoint(base)
    checkpoint_paths(base)[1].write_text("{broken")
    with pytest.raises(CheckpointError, match=r"ck\.json: not valid JSON"):
        load_checkpoint(base)
    tensors_path.unlink()
    with pytest.raises(CheckpointError, match=r"ck\.json is there but .*ck\.safetensors is missing"):
        load_checkpoint(base)
