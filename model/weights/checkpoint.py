"""Saving and loading training checkpoints: safetensors for arrays, JSON for the rest. Never pickle.

A checkpoint at ``PATH`` is two files:

* ``PATH.safetensors``: model parameters as ``model.<name>`` (a tied weight once, under
  its first name) and optimizer buffers as ``optimizer.<buffer>.<index>`` (index = the
  parameter's position in the optimizer);
* ``PATH.json``: format version, config, step, optimizer scalars (step count, lr), the
  trainer's ``extra`` dict (RNG state, data position, …), which names are tied, and a
  manifest of every tensor's shape and dtype.

Each file is written to a temp file in the same directory and moved into place with
``os.replace`` (atomic on POSIX), the JSON last. Both carry the same random save id, so
a pair from different saves (a save interrupted between the two renames) is detected on
load rather than silently mixed.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from engine import nn, optim
from model.config import GPTConfig
from model.data.files import atomic_write
from model.gpt import GPTModel, model_from_state_dict

FORMAT = "scratchgpt-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or does not fit the model; the message names the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint files at the given path."""


@dataclass
class Checkpoint:
    config: GPTConfig
    state_dict: dict[str, np.ndarray]  # every parameter name, tied ones included
    optimizer_state: dict[str, Any] | None  # as `Optimizer.state_dict()` returns it
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the base path (without suffix)


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(``PATH.safetensors``, ``PATH.json``); a given ``.safetensors``/``.json`` suffix is dropped first."""
    base = _base(path)
    return Path(f"{base}.safetensors"), Path(f"{base}.json")


def _base(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    config: GPTConfig,
    optimizer: optim.Optimizer | None = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (+ ``optimizer``, ``step``, ``extra``) as ``PATH.safetensors`` + ``PATH.json``.

    ``extra`` must be JSON-serialisable (checked before anything is written). Returns
    the base path, which `load_checkpoint` takes."""
    base = _base(path)
    tensors_path, json_path = checkpoint_paths(base)
    extra = {} if extra is None else extra
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as err:
        raise TypeError(f"save_checkpoint: extra must be JSON-serialisable ({err})") from None

    tensors: dict[str, np.ndarray] = {}
    params = dict(model.named_parameters())  # each Parameter once, under its first name
    first_name = {id(p): name for name, p in params.items()}
    for name, p in params.items():
        tensors[f"model.{name}"] = np.ascontiguousarray(p.numpy())
    tied = {name: first_name[id(p)] for name, p in _all_named_parameters(model) if name not in params}
    if config.tie_weights and not tied:
        # NOTE: the model was untied after it was built (merge_lora on a tied head): record
        # that, or loading would tie the two weights again and one would silently win.
        config = replace(config, tie_weights=False)

    optimizer_meta = None
    if optimizer is not None:
        state = optimizer.state_dict()
        buffers = state.pop("buffers")
        for buffer, arrays in buffers.items():
            for i, array in enumerate(arrays):
                if array is not None:
                    tensors[f"optimizer.{buffer}.{i}"] = np.ascontiguousarray(array)
        optimizer_meta = {
            "type": type(optimizer).__name__,
            "scalars": state,
            "buffers": {buffer: len(arrays) for buffer, arrays in buffers.items()},
        }

    save_id = secrets.token_hex(16)
    base.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
        tensors_path,
        lambda tmp: safetensors.numpy.save_file(tensors, str(tmp), metadata={"format": FORMAT, "save_id": save_id}),
    )
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "save_id": save_id,
        "safetensors_bytes": tensors_path.stat().st_size,
        "config": config.to_dict(),
        "step": int(step),
        "tied": tied,
        "tensors": {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in tensors.items()},
        "optimizer": optimizer_meta,
        "extra": extra,
    }
    text = json.dumps(meta, indent=1)
    atomic_write(json_path, lambda tmp: tmp.write_text(text))
    return base


def _all_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every (name, Parameter), tied weights under each of their names."""
    out = []
    for prefix, module in model.named_modules():
        for name, value in vars(module).items():
            if isinstance(value, nn.Parameter):
                out.append((f"{prefix}.{name}" if prefix else name, value))
    return out


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and check the checkpoint at ``path`` (base path, or either file's name).

    Raises `CheckpointNotFoundError` when the files are missing and `CheckpointError` for
    bad JSON, a damaged or truncated safetensors file, files from different saves, or
    tensors missing / unexpected / of the wrong shape compared with the manifest."""
    base = _base(path)
    tensors_path, json_path = checkpoint_paths(base)
    missing = [str(p) for p in (json_path, tensors_path) if not p.is_file()]
    if missing:
        cls = CheckpointNotFoundError if len(missing) == 2 else CheckpointError
        raise cls(
            f"checkpoint {base}: missing {' and '.join(missing)} "
            "(a checkpoint is PATH.safetensors + PATH.json, as written by save_checkpoint)"
        )
    meta = _read_meta(json_path)
    try:
        return _checkpoint_from(base, meta)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{json_path}: malformed checkpoint metadata ({type(err).__name__}: {err})") from None


def _checkpoint_from(base: Path, meta: dict[str, Any]) -> Checkpoint:
    tensors_path, json_path = checkpoint_paths(base)
    try:
        config = GPTConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{json_path}: bad config ({err})") from None

    size = tensors_path.stat().st_size
    if size != meta["safetensors_bytes"]:
        raise CheckpointError(
            f"{tensors_path}: {size} bytes, but {json_path.name} says {meta['safetensors_bytes']}: "
            "the file is truncated or from another save"
        )
    tensors = _read_tensors(tensors_path, meta)

    state = {name[len("model."):]: a for name, a in tensors.items() if name.startswith("model.")}
    for alias, target in meta["tied"].items():
        if target not in state:
            raise CheckpointError(f"{json_path}: tied weight {alias!r} points at {target!r}, which is not stored")
        state[alias] = state[target]

    optimizer_state = None
    if meta["optimizer"] is not None:
        opt = meta["optimizer"]
        buffers = {
            buffer: [tensors.get(f"optimizer.{buffer}.{i}") for i in range(count)]
            for buffer, count in opt["buffers"].items()
        }
        optimizer_state = {**opt["scalars"], "buffers": buffers}
    return Checkpoint(config, state, optimizer_state, meta["step"], meta["extra"], base)


def _read_meta(json_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(json_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{json_path}: not valid JSON ({err}); the file is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{json_path}: not a scratchgpt checkpoint (no \"format\": \"{FORMAT}\")")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{json_path}: checkpoint format version {meta.get('version')!r}, this code reads {VERSION}"
        )
    types = {"save_id": str, "safetensors_bytes": int, "config": dict, "step": int, "tied": dict,
             "tensors": dict, "optimizer": (dict, type(None)), "extra": dict}
    absent = [key for key in types if key not in meta]
    if absent:
        raise CheckpointError(f"{json_path}: missing fields {', '.join(absent)}")
    wrong = [key for key, kind in types.items() if not isinstance(meta[key], kind)]
    if wrong:
        raise CheckpointError(f"{json_path}: fields of the wrong type: {', '.join(wrong)}")
    return meta


def _listing(names: set[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _read_tensors(tensors_path: Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    manifest: dict[str, Any] = meta["tensors"]
    try:
        with safetensors.safe_open(str(tensors_path), framework="np") as f:
            save_id = (f.metadata() or {}).get("save_id")
            if save_id != meta["save_id"]:
                raise CheckpointError(
                    f"{tensors_path}: save id {save_id} differs from {meta['save_id']} in the JSON: the two files "
                    "come from different saves (was a save interrupted?)"
                )
            names = set(f.keys())
            problems = []
            if set(manifest) - names:
                problems.append(f"missing tensors {_listing(set(manifest) - names)}")
            if names - set(manifest):
                problems.append(f"unexpected tensors {_listing(names - set(manifest))}")
            if problems:
                raise CheckpointError(f"{tensors_path}: " + "; ".join(problems))
            tensors = {name: f.get_tensor(name) for name in manifest}
    except safetensors.SafetensorError as err:
        raise CheckpointError(f"{tensors_path}: damaged safetensors file ({err})") from None
    for name, a in tensors.items():
        want = manifest[name]
        if list(a.shape) != list(want["shape"]) or str(a.dtype) != want["dtype"]:
            raise CheckpointError(
                f"{tensors_path}: tensor {name} is {a.dtype}{list(a.shape)}, the manifest says "
                f"{want['dtype']}{want['shape']}"
            )
    return tensors


def load_model_from_checkpoint(path: str | os.PathLike) -> tuple[GPTModel, Checkpoint]:
    """A `GPTModel` built from the checkpoint's config and holding its weights (in the
    stored dtype; the engine's RNG state is left as it was), plus the `Checkpoint`
    (optimizer state, step, extra)."""
    ckpt = load_checkpoint(path)
    try:
        model = model_from_state_dict(ckpt.config, ckpt.state_dict)
    except KeyError as err:
        raise CheckpointError(f"{ckpt.path}: weights do not fit its config: {err.args[0]}") from None
    return model, ckpt
