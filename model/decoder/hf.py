"""Hugging Face Llama / Qwen3 folders in and out of `DecoderModel`.

A folder holds ``config.json`` (``model_type`` llama or qwen3), the weights as
``model.safetensors`` or shards listed by ``model.safetensors.index.json`` (fp32, fp16 or
bf16), and the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``).

Loading checks the config, reads every shard's header and checks names and shapes against
the config, estimates the memory, and only then builds the model and fills it one tensor at
a time (the peak is the model plus one tensor). Our names are HF's without ``model.``;
a tied head is not stored (a stored copy of it is ignored, as transformers does).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

import engine
from model.data.files import atomic_write, write_json_atomic
from model.decoder.config import DecoderConfig, RopeScaling, estimate_memory, parameter_shapes
from model.decoder.model import DecoderModel
from model.decoder.safetensors_io import SafetensorsError, TensorInfo, read_header, read_tensor, write_safetensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class HFFolderError(ValueError):
    """A Hugging Face folder that cannot be loaded; the message names the file and the fix."""


# --- config ---
def config_from_hf(hf: dict[str, Any]) -> DecoderConfig:
    """`DecoderConfig` for a Llama or Qwen3 ``config.json`` dict (transformers 4 or 5 layout)."""
    model_type = hf.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"model_type is {model_type!r}; this loader reads {', '.join(_ARCHITECTURES)}")
    unsupported = [f"{key}={hf[key]!r}" for key, ok in (("hidden_act", "silu"), ("attention_bias", False),
                                                        ("mlp_bias", False), ("use_sliding_window", False))
                   if key in hf and hf[key] != ok]
    if unsupported:
        raise ValueError(f"unsupported {model_type} options: {', '.join(unsupported)}")
    # transformers 5 writes rope_parameters {rope_type, rope_theta, ...}; 4 and the released
    # folders write rope_theta plus rope_scaling {rope_type, factor, ...} (or null).
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                              int(rope["original_max_position_embeddings"]))
    elif rope_type == "default":
        scaling = None
    else:
        raise ValueError(f"rope type {rope_type!r} is not supported (only default and llama3)")
    try:
        return DecoderConfig(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            context_length=hf["max_position_embeddings"],
            emb_dim=hf["hidden_size"],
            hidden_dim=hf["intermediate_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            qk_norm=model_type == "qwen3",
            tie_weights=bool(hf.get("tie_word_embeddings", False)),
        )
    except KeyError as err:
        raise ValueError(f"{model_type} config is missing field {err.args[0]!r}") from None


def config_to_hf(config: DecoderConfig) -> dict[str, Any]:
    """A ``config.json`` dict that transformers loads as LlamaForCausalLM / Qwen3ForCausalLM."""
    s = config.rope_scaling
    scaling = None if s is None else {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                                      "high_freq_factor": s.high_freq_factor,
                                      "original_max_position_embeddings": s.original_context_length}
    return {
        "architectures": [_ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.context_length,
        "hidden_size": config.emb_dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_weights,
        "torch_dtype": "float32",
    }


# --- reading a folder ---
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFFolderError(f"{path} is missing: not a Hugging Face model folder") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HFFolderError(f"{path}: not valid JSON ({err})") from None


def read_hf_config(directory: str | os.PathLike) -> DecoderConfig:
    path = Path(directory) / "config.json"
    hf = _read_json(path)
    try:
        return config_from_hf(hf)
    except ValueError as err:
        raise HFFolderError(f"{path}: {err}") from None


def weight_headers(directory: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every stored tensor's header, across ``model.safetensors`` or the shards of its index."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFFolderError(f"{index}: no \"weight_map\" object")
        files = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise HFFolderError(f"{directory} holds neither model.safetensors nor model.safetensors.index.json")
    headers: dict[str, TensorInfo] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise HFFolderError(f"{path} is listed in model.safetensors.index.json but missing")
        try:
            headers |= read_header(path)
        except SafetensorsError as err:
            raise HFFolderError(str(err)) from None
    if weight_map is not None:
        wrong = sorted(n for n, f in weight_map.items() if n not in headers or headers[n].path.name != f)
        if wrong:
            raise HFFolderError(f"{index}: tensors {', '.join(wrong[:8])} are not in the shard the index names")
    return headers


def _hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


def check_weights(config: DecoderConfig, headers: dict[str, TensorInfo]) -> None:
    """Raise HFFolderError listing every missing, unexpected or mis-shaped tensor."""
    expected = {_hf_name(n): s for n, s in parameter_shapes(config).items()}
    stored = {n: i.shape for n, i in headers.items() if not (config.tie_weights and n == "lm_head.weight")}
    problems = []
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing:
        problems.append(f"missing {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:8])}{' …' if len(unexpected) > 8 else ''}")
    problems += [f"{n} is {stored[n]}, config.json implies {s}" for n, s in expected.items()
                 if n in stored and stored[n] != s]
    if problems:
        raise HFFolderError("the weights do not match config.json: " + "; ".join(problems))


def available_memory() -> int | None:
    """Bytes the OS can still give this process (MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_hf_model(directory: str | os.PathLike, dtype: str = "float32", check_memory: bool = True) -> DecoderModel:
    """A `DecoderModel` holding the folder's weights in ``dtype`` on the active backend
    (bf16 / fp16 files are widened; NumPy computes in float32)."""
    config = read_hf_config(directory)
    headers = weight_headers(directory)
    check_weights(config, headers)
    estimate = estimate_memory(config, bytes_per_value=2 if dtype in ("bfloat16", "float16") else
                               np.dtype(dtype).itemsize, tokens=0)
    # NOTE: only host memory is checked; on the triton backend the weights go to the GPU.
    free = available_memory() if check_memory else None
    if free is not None and engine.get_backend().name == "numpy" and estimate.weight_bytes > free:
        raise HFFolderError(f"{directory}: the weights need {estimate.weight_bytes / 1024**3:.1f} GiB in {dtype}, "
                            f"only {free / 1024**3:.1f} GiB are free; use a smaller model or a machine with more "
                            "memory")
    backend = engine.get_backend()
    rng_state = backend.rng_state()  # NOTE: building draws init values; loading must not move the RNG
    try:
        model = DecoderModel(config, init_weights=False)
    finally:
        backend.set_rng_state(rng_state)
    for name, p in model.named_parameters():
        info = headers[_hf_name(name)]
        p.data = backend.asarray(read_tensor(info, np.float32), dtype)
    return model


# --- writing a folder ---
def export_hf_folder(model: DecoderModel, directory: str | os.PathLike, dtype: str = "float32",
                     tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write ``model`` as a Hugging Face folder (config.json + model.safetensors in ``dtype``,
    "float32" or "bfloat16") that transformers loads; copy the tokenizer files of
    ``tokenizer_dir`` beside them. A LoRA model must be merged first (`merge_lora`)."""
    directory = Path(directory)
    # NOTE: merging LoRA into a tied lm_head unties it (see model.lora.merge_lora): export it untied.
    config = dataclasses.replace(model.config, tie_weights=model.lm_head.weight is model.embed_tokens.weight)
    names = {n for n, _ in model.named_parameters()}
    expected = set(parameter_shapes(config))
    if names != expected:
        raise ValueError(f"export_hf_folder: the model's parameters differ from a plain {config.model_type} "
                         f"({sorted(names ^ expected)[:4]} …); merge LoRA layers first (model.lora.merge_lora)")
    tensors = {_hf_name(n): p.numpy() for n, p in model.named_parameters()}
    write_safetensors(directory / "model.safetensors", tensors, dtype, metadata={"format": "pt"})
    write_json_atomic(directory / "config.json", {**config_to_hf(config), "torch_dtype": dtype})
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, directory)
    return directory


def copy_tokenizer_files(source_dir: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Copy the tokenizer files of ``source_dir`` that exist into ``directory``, each atomically."""
    for name in TOKENIZER_FILES:
        source = Path(source_dir) / name
        if source.is_file() and source.resolve() != (Path(directory) / name).resolve():
            atomic_write(Path(directory) / name, lambda tmp, source=source: shutil.copyfile(source, tmp))
