"""Hugging Face GPT-2 checkpoints (``model.safetensors`` + ``config.json``) in and out of our model.

Our parameter names are GPT-2's, so the map is short:

* HF names may carry a ``transformer.`` prefix (``save_pretrained`` output) or not (the
  ``gpt2`` repository's file); ``lm_head.weight`` never has one and is absent when tied.
* HF's ``Conv1D`` stores weights (in, out); our Linear holds (out, in). The four Conv1D
  weights (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) are transposed.
* ``attn.bias`` / ``attn.masked_bias`` are the causal-mask buffers of old exports: ignored.

GPT-2 has a qkv bias and a tied head, so a loaded config has ``qkv_bias=True`` and
``tie_weights=True`` (unless ``tie_word_embeddings`` is false). Loading checks config.json
against the tensor shapes in the safetensors header before reading data or building the
model, and refuses NaN/inf weights (`NonFiniteWeightsError`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from model.config import GPTConfig
from model.data.datadir import data_file
from model.data.files import atomic_write, write_json_atomic
from model.gpt import GPTModel, model_from_state_dict
from model.tokenizers.bpe import ENDOFTEXT
from model.weights.checkpoint import CheckpointError, check_finite, shape_misfits
from model.weights.hub import HFDownloadError, download_hf_model  # noqa: F401  HFDownloadError: re-exported

HF_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
_CONV1D = re.compile(r"^h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
_GPT2_VOCAB = 50257  # GPT-2's tokens; the last is <|endoftext|>


# --- config ---
def config_from_hf(hf: dict[str, Any], **overrides: Any) -> GPTConfig:
    """GPTConfig for a Hugging Face GPT-2 ``config.json`` dict (``overrides`` e.g. drop_rate=0.0)."""
    try:
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"model_type is {hf['model_type']!r}, not 'gpt2'")
        if hf.get("activation_function", "gelu_new") not in _TANH_GELUS:
            raise ValueError(f"activation_function {hf['activation_function']!r} is not the tanh GELU (gelu_new)")
        if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
            raise ValueError(f"n_inner {hf['n_inner']} is not 4 * n_embd")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn") or not hf.get(
            "scale_attn_weights", True
        ):
            raise ValueError("non-standard attention scaling (scale_attn_* / reorder_and_upcast_attn) is not supported")
        fields = dict(
            vocab_size=hf["vocab_size"],
            context_length=hf.get("n_positions", hf.get("n_ctx")),
            emb_dim=hf["n_embd"],
            n_heads=hf["n_head"],
            n_layers=hf["n_layer"],
            drop_rate=float(hf.get("resid_pdrop", 0.1)),
            qkv_bias=True,
            tie_weights=bool(hf.get("tie_word_embeddings", True)),
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
        return GPTConfig(**{**fields, **overrides})
    except KeyError as err:
        raise ValueError(f"GPT-2 config is missing field {err.args[0]!r}") from None


def config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for ``config`` (what ``transformers`` loads as GPT2LMHeadModel)."""
    hf = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.emb_dim,
        "n_head": config.n_heads,
        "n_layer": config.n_layers,
        "n_inner": None,
        "resid_pdrop": config.drop_rate,
        "embd_pdrop": config.drop_rate,
        "attn_pdrop": config.drop_rate,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02,
        "tie_word_embeddings": config.tie_weights,
    }
    if config.vocab_size > 50256:  # GPT-2's <|endoftext|>
        hf.update(bos_token_id=50256, eos_token_id=50256)
    return hf


# --- weights ---
def state_from_hf(tensors: dict[str, np.ndarray], config: GPTConfig) -> dict[str, np.ndarray]:
    """Our state dict (float32 unless float64) from HF-named GPT-2 tensors. Names are not
    checked here: loading it into a model (strict) reports missing and unexpected ones."""
    state: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        name = name.removeprefix("transformer.")
        if _IGNORED.match(name):
            continue
        array = np.asarray(array)
        if array.dtype != np.float64:
            array = array.astype(np.float32)
        state[name] = np.ascontiguousarray(array.T) if _CONV1D.match(name) else array
    if config.tie_weights and "wte.weight" in state:
        # NOTE: as in transformers, the tie overrides a stored lm_head.weight.
        state["lm_head.weight"] = state["wte.weight"]
    return state


def state_to_hf(model: GPTModel) -> dict[str, np.ndarray]:
    """HF GPT2LMHeadModel tensors (``transformer.`` names, Conv1D layout) for ``model``;
    a tied head is left out, a model without qkv bias gets zero biases."""
    config = model.config
    tensors = {}
    for name, array in model.state_dict().items():
        if name == "lm_head.weight":
            if not head_is_tied(model):
                tensors[name] = array
            continue
        tensors[f"transformer.{name}"] = np.ascontiguousarray(array.T) if _CONV1D.match(name) else array
    if not config.qkv_bias:
        for i in range(config.n_layers):
            zeros = np.zeros(3 * config.emb_dim, dtype=tensors["transformer.wte.weight"].dtype)
            tensors[f"transformer.h.{i}.attn.c_attn.bias"] = zeros
    return tensors


def head_is_tied(model: GPTModel) -> bool:
    """Whether the head is wte's Parameter: the model decides, not ``config.tie_weights``,
    since `merge_lora` unties a merged head of a tied config."""
    return model.lm_head.weight is model.wte.weight


def _hf_shapes(weights_path: Path) -> dict[str, tuple[int, ...]]:
    """Our names and shapes of the tensors in an HF file, from its header alone (no data read)."""
    shapes = {}
    with safetensors.safe_open(str(weights_path), framework="np") as f:
        for hf_name in f.keys():
            name = hf_name.removeprefix("transformer.")
            if not _IGNORED.match(name):
                shape = tuple(f.get_slice(hf_name).get_shape())
                shapes[name] = shape[::-1] if _CONV1D.match(name) else shape
    return shapes


# --- files ---
def load_hf_gpt2(hf_dir: str | os.PathLike, **overrides: Any) -> GPTModel:
    """Our GPTModel holding the Hugging Face GPT-2 in ``hf_dir`` (``model.safetensors`` +
    ``config.json``). ``overrides`` change config fields that do not touch shapes
    (e.g. ``drop_rate=0.0``). Raises `CheckpointError` naming the file and the problem."""
    hf_dir = Path(hf_dir)
    config_path, weights_path = hf_dir / "config.json", hf_dir / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(
                f"{path} not found: a Hugging Face GPT-2 directory holds config.json and model.safetensors "
                f"(from https://huggingface.co/gpt2/tree/main, or download_hf_gpt2)"
            )
    try:
        config = config_from_hf(json.loads(config_path.read_text()), **overrides)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{config_path}: not a usable GPT-2 config ({err})") from None
    try:
        shapes = _hf_shapes(weights_path)
        problems = shape_misfits(config, shapes)  # before reading data or allocating a model
        if problems:
            raise CheckpointError(f"{weights_path}: does not fit {config_path.name}: {problems}")
        tensors = safetensors.numpy.load_file(weights_path)
    except (safetensors.SafetensorError, TypeError, ValueError) as err:
        raise CheckpointError(f"{weights_path}: cannot read ({err})") from None
    check_finite(tensors, str(weights_path), "these weights are broken: download or export them again")
    try:
        return model_from_state_dict(config, state_from_hf(tensors, config))
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{weights_path}: does not fit {config_path.name}: {err.args[0]}") from None


def export_hf(model: GPTModel, out_dir: str | os.PathLike) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 directory (model.safetensors + config.json); returns it.
    An untied head (``lm_head.weight``, ``tie_word_embeddings: false``) is written whatever the
    config says, so the exported model gives the logits ``model`` gives."""
    out_dir = Path(out_dir)
    tensors = state_to_hf(model)
    config = replace(model.config, tie_weights=head_is_tied(model))
    atomic_write(out_dir / "model.safetensors",
                 lambda tmp: safetensors.numpy.save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_json_atomic(out_dir / "config.json", config_to_hf(config))
    return out_dir


def export_hf_tokenizer(out_dir: str | os.PathLike, config: GPTConfig,
                        data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write GPT-2's tokenizer files beside an exported model, as ``transformers`` reads them:
    ``vocab.json`` and ``merges.txt`` (OpenAI's encoder.json and vocab.bpe from the data dir,
    which are those files), ``tokenizer_config.json``, ``special_tokens_map.json`` and
    ``generation_config.json``. Returns the paths written."""
    if config.vocab_size < _GPT2_VOCAB:
        raise ValueError(f"the model's vocab_size is {config.vocab_size}, below GPT-2's {_GPT2_VOCAB}: its tokens "
                         "are not GPT-2's, so no GPT-2 tokenizer files can go with it")
    out_dir = Path(out_dir)
    written = []
    for ours, theirs in (("gpt2/encoder.json", "vocab.json"), ("gpt2/vocab.bpe", "merges.txt")):
        data = data_file(ours, data_dir).read_bytes()
        written.append(atomic_write(out_dir / theirs, lambda tmp, data=data: tmp.write_bytes(data)))
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    tokenizer_config = {**special, "tokenizer_class": "GPT2Tokenizer", "model_max_length": config.context_length,
                        "add_prefix_space": False, "add_bos_token": False, "clean_up_tokenization_spaces": False}
    files = {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special,
             "generation_config.json": {"bos_token_id": _GPT2_VOCAB - 1, "eos_token_id": _GPT2_VOCAB - 1}}
    written += [write_json_atomic(out_dir / name, content) for name, content in files.items()]
    return written


def download_hf_gpt2(name: str = "gpt2", cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory holding OpenAI GPT-2 ``name``'s config.json and model.safetensors, downloaded
    from huggingface.co (model.weights.hub) into ``cache_dir`` unless already there."""
    if name not in HF_MODELS:
        raise ValueError(f"unknown GPT-2 model {name!r}: choose one of {', '.join(HF_MODELS)}")
    return download_hf_model(name, cache_dir)
