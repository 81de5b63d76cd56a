"""Saving and loading training checkpoints: one safetensors file, metadata in its header. Never pickle.

A checkpoint at ``PATH`` is ``PATH.safetensors``:

* tensors: model parameters as ``model.<name>`` (a tied weight once, under its first name)
  and optimizer buffers as ``optimizer.<buffer>.<index>`` (index = the parameter's
  position in the optimizer);
* header metadata (safetensors' ``__metadata__``): ``format`` and ``checkpoint``, a JSON
  text with the format version, config, step, optimizer scalars (step count, lr), the
  trainer's ``extra`` dict (RNG state, data position, …) and which names are tied. A Llama /
  Qwen3 model (model.decoder) adds ``"family": "decoder"`` and its `DecoderConfig`; a GPT-2
  checkpoint has no family entry: its metadata and tensors are written exactly as before.

Weights and metadata are one file, written by `atomic_write` (temp file, fsync, rename),
so a process killed at any instant leaves the previous checkpoint or the new one, never a
mix. Saving refuses NaN/inf values (a diverged run cannot overwrite a good checkpoint) and
loading refuses them too. Loading checks the config against the stored shapes, read from
the header, before reading tensor data or building a model: a config that does not fit its
weights (say ``emb_dim`` 32768 beside tiny tensors) fails at once instead of allocating GBs.

Version-1 checkpoints (``PATH.safetensors`` + ``PATH.json`` sharing a random save id) still
load; saving to their path writes the new layout and removes the old ``PATH.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

import engine
from engine import nn, optim
from model.config import GPTConfig, parameter_shapes
from model.data.files import atomic_write
from model.decoder.config import DecoderConfig
from model.decoder.config import parameter_shapes as decoder_parameter_shapes
from model.decoder.model import DecoderModel
from model.gpt import GPTModel, model_from_state_dict

FORMAT = "scratchgpt-checkpoint"
VERSION = 2
META_KEY = "checkpoint"  # the header metadata entry holding the JSON
ModelConfig = GPTConfig | DecoderConfig


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or does not fit the model; the message names the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint file at the given path."""


class NonFiniteWeightsError(CheckpointError):
    """A tensor holds NaN or inf: such weights are neither saved nor loaded. The message
    names the file and the tensor."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (disk full, file too large, read-only directory, …); the
    previous checkpoint at that path, if any, is unchanged and no temp file is left."""


@dataclass
class Checkpoint:
    config: ModelConfig  # a DecoderConfig for a Llama / Qwen3 model
    state_dict: dict[str, np.ndarray]  # every parameter name, tied ones included
    optimizer_state: dict[str, Any] | None  # as `Optimizer.state_dict()` returns it
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the base path (without suffix)


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(``PATH.safetensors``, ``PATH.json``); a given ``.safetensors``/``.json`` suffix is dropped
    first. A checkpoint is the first; the second is a version-1 checkpoint's metadata (and
    a LoRA adapter's, which keeps the two-file layout)."""
    base = _base(path)
    return Path(f"{base}.safetensors"), Path(f"{base}.json")


def _base(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def resolve_checkpoint(path: str | os.PathLike, best: bool = False) -> Path:
    """The checkpoint a user means by ``path``: a checkpoint (with or without suffix), or a run
    directory, whose latest checkpoint is ``DIR/checkpoint`` and, with ``best``, whose best
    (lowest validation loss) is ``DIR/best``. Raises `CheckpointNotFoundError` naming what is missing."""
    path = Path(path)
    if not path.is_dir() or (not best and checkpoint_paths(path)[0].is_file()):  # DIR.safetensors wins
        if best:
            raise CheckpointError(f"--best takes a run directory, and {path} is not one")
        return _base(path)
    name = "best" if best else "checkpoint"
    if not checkpoint_paths(path / name)[0].is_file():
        what = ("no best checkpoint (best.safetensors): best.* is kept by runs with --save-every N; drop --best "
                "for the latest") if best else "no checkpoint.safetensors: is it a run's --out-dir?"
        raise CheckpointNotFoundError(f"run directory {path} holds {what}")
    return path / name


def check_finite(tensors: Mapping[str, np.ndarray], where: str, advice: str) -> None:
    """Raise `NonFiniteWeightsError` ("``where``: tensor NAME holds N NaN/inf values …
    ``advice``") for the first floating-point tensor holding a NaN or an inf."""
    for name, array in tensors.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            count = array.size - int(np.count_nonzero(np.isfinite(array)))
            raise NonFiniteWeightsError(
                f"{where}: tensor {name} holds {count} NaN/inf values (of {array.size}); {advice}"
            )


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    config: ModelConfig,
    optimizer: optim.Optimizer | None = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (+ ``optimizer``, ``step``, ``extra``) as ``PATH.safetensors``, atomically.

    ``extra`` must be JSON-serialisable and every value finite (both checked before anything
    is written: `NonFiniteWeightsError`). A failed write raises `CheckpointSaveError` and
    leaves the previous checkpoint as it was. Returns the base path, which
    `load_checkpoint` takes."""
    base = _base(path)
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
    check_finite(tensors, f"refusing to save {checkpoint_paths(base)[0]}",
                 "the run diverged (learning rate too high? bad data?); the previous checkpoint is unchanged")

    meta = {
        "format": FORMAT,
        "version": VERSION,
        **_config_meta(config),
        "step": int(step),
        "tied": tied,
        "optimizer": optimizer_meta,
        "extra": extra,
    }
    _write(base, tensors, meta)
    return base


def _config_meta(config: ModelConfig) -> dict[str, Any]:
    """The metadata entries naming the model: its config, and its family unless GPT-2."""
    return ({"family": "decoder"} if isinstance(config, DecoderConfig) else {}) | {"config": config.to_dict()}


def _write(base: Path, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """``base.safetensors`` holding ``tensors`` and ``meta`` in its header, atomically (a
    version-1 ``base.json`` beside it is removed)."""
    tensors_path, legacy_json = checkpoint_paths(base)
    header = {"format": FORMAT, META_KEY: json.dumps(meta)}

    def write(tmp: Path) -> None:
        try:
            safetensors.numpy.save_file(tensors, str(tmp), metadata=header)
        except safetensors.SafetensorError as err:  # an I/O error (ENOSPC, EFBIG) inside the writer
            raise OSError(str(err)) from None

    try:
        atomic_write(tensors_path, write)
    except OSError as err:
        raise CheckpointSaveError(
            f"could not save checkpoint {tensors_path}: {err.strerror or err}; the previous checkpoint there "
            "(if any) is unchanged: free some disk space or choose another --out-dir"
        ) from err
    if _is_legacy_meta(legacy_json):
        legacy_json.unlink(missing_ok=True)  # the new file carries its own metadata


def save_weights_only(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Copy the checkpoint at ``path`` to ``out`` without its optimizer state and training
    loop state (a third of the size for AdamW): a file to share or to run, which every
    command loading a checkpoint accepts and ``--resume`` refuses. Returns ``out``'s base path."""
    ckpt = load_checkpoint(path)
    tensors: dict[str, np.ndarray] = {}
    tied: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, array in ckpt.state_dict.items():  # stored names come before their tied aliases
        if id(array) in first_name:
            tied[name] = first_name[id(array)]
        else:
            first_name[id(array)] = name
            tensors[f"model.{name}"] = array
    extra = {k: v for k, v in ckpt.extra.items() if k != "train_state"}
    meta = {"format": FORMAT, "version": VERSION, **_config_meta(ckpt.config), "step": ckpt.step, "tied": tied,
            "optimizer": None, "extra": extra}
    base = _base(out)
    _write(base, tensors, meta)
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
    """Read and check the checkpoint at ``path`` (base path, the file's name, or a run
    directory: its latest checkpoint).

    Raises `CheckpointNotFoundError` when there is no checkpoint file, `NonFiniteWeightsError`
    for NaN/inf values, and `CheckpointError` for a damaged or truncated file, malformed
    metadata, a version-1 pair from different saves, or a config that does not fit the
    stored tensor shapes (checked before any tensor data is read)."""
    base = resolve_checkpoint(path)
    tensors_path, json_path = checkpoint_paths(base)
    if not tensors_path.is_file():
        if json_path.is_file():
            raise CheckpointError(f"checkpoint {base}: {json_path} is there but {tensors_path} is missing")
        raise CheckpointNotFoundError(f"checkpoint {base}: missing {tensors_path} (the file save_checkpoint writes)")
    try:
        with safetensors.safe_open(str(tensors_path), framework="np") as f:
            meta = _read_meta(tensors_path, f.metadata() or {})
            shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
            config = _check_meta(meta, tensors_path)
            _check_fits(config, shapes, tensors_path)
            tensors = {name: f.get_tensor(name) for name in shapes}
    except safetensors.SafetensorError as err:
        raise CheckpointError(f"{tensors_path}: damaged or truncated safetensors file ({err})") from None
    check_finite(tensors, str(tensors_path), "the run that saved it had diverged: use an earlier checkpoint")

    state = {name[len("model."):]: a for name, a in tensors.items() if name.startswith("model.")}
    for alias, target in meta["tied"].items():
        if target not in state:
            raise CheckpointError(f"{tensors_path}: tied weight {alias!r} points at {target!r}, which is not stored")
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


def _read_meta(tensors_path: Path, header: dict[str, str]) -> dict[str, Any]:
    """The metadata dict: from the header (version 2) or from ``PATH.json`` (version 1)."""
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{tensors_path}: not a scratchgpt checkpoint (its header has no format {FORMAT})")
    if META_KEY not in header:
        return _read_legacy_meta(tensors_path, header.get("save_id"))
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{tensors_path}: its header's checkpoint metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("version") != VERSION:
        version = meta.get("version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{tensors_path}: checkpoint format version {version!r}, this code reads {VERSION}")
    return meta


def _is_legacy_meta(json_path: Path) -> bool:
    try:
        return json.loads(json_path.read_text()).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _read_legacy_meta(tensors_path: Path, save_id: str | None) -> dict[str, Any]:
    """Version 1: the metadata in ``PATH.json``, which must come from the same save."""
    json_path = checkpoint_paths(tensors_path)[1]
    if not json_path.is_file():
        raise CheckpointError(f"{tensors_path}: no checkpoint metadata in its header, and no {json_path}")
    try:
        meta = json.loads(json_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{json_path}: not valid JSON ({err}); the file is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != 1:
        raise CheckpointError(f"{json_path}: not the metadata of a version-1 scratchgpt checkpoint")
    if meta.get("save_id") != save_id:
        raise CheckpointError(
            f"{tensors_path}: save id {save_id} differs from {meta.get('save_id')} in {json_path.name}: the two "
            "files come from different saves (was a save interrupted?)"
        )
    return meta


def _check_meta(meta: dict[str, Any], where: Path) -> ModelConfig:
    """Check the metadata's fields (one clear error, never a traceback); returns the config."""
    types = {"config": dict, "step": int, "tied": dict, "optimizer": (dict, type(None)), "extra": dict}
    problems = [f"{key} missing" for key in types if key not in meta]
    problems += [f"{key} is a {type(meta[key]).__name__}" for key, kind in types.items()
                 if key in meta and not isinstance(meta[key], kind)]
    if not problems:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta["tied"].items()):
            problems.append("tied is not a name -> name map")
        opt = meta["optimizer"]
        if opt is not None and not (
            isinstance(opt.get("scalars"), dict)
            and isinstance(opt.get("buffers"), dict)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in opt["buffers"].values())
        ):
            problems.append("optimizer needs scalars (a dict) and buffers (name -> count)")
    if problems:
        raise CheckpointError(f"{where}: malformed checkpoint metadata: {'; '.join(problems)}")
    family = meta.get("family", "gpt2")
    if family not in ("gpt2", "decoder"):
        raise CheckpointError(f"{where}: model family {family!r} is unknown to this version (gpt2, decoder)")
    try:
        return (DecoderConfig if family == "decoder" else GPTConfig).from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: bad config ({err})") from None


def shape_misfits(config: ModelConfig, shapes: Mapping[str, Sequence[int]]) -> str:
    """How tensors of these shapes (under our parameter names) fall short of the parameters of
    the model of ``config`` (GPTModel or DecoderModel): missing ones, wrong shapes; "" when none. The head may be absent
    (tied, or replaced by a classifier's); tensors the config does not name are left to the
    strict load, as a model of this config is no larger than they are. Shapes alone:
    loaders call this before reading data or building a model."""
    expected = decoder_parameter_shapes(config) if isinstance(config, DecoderConfig) else parameter_shapes(config)
    missing = [name for name in expected if name not in shapes and name != "lm_head.weight"]
    wrong = [f"{name} is {list(shapes[name])}, not {list(shape)}"
             for name, shape in expected.items() if name in shapes and tuple(shapes[name]) != shape]
    more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
    return "; ".join(([f"missing {', '.join(missing[:8])}{more}"] if missing else []) + wrong[:4])


def _check_fits(config: ModelConfig, shapes: dict[str, list[int]], where: Path) -> None:
    """The model that the config describes must be stored under ``model.`` (a language model)
    or ``model.gpt.`` (a classifier's body)."""
    embedding = "embed_tokens.weight" if isinstance(config, DecoderConfig) else "wte.weight"
    prefix = next((p for p in ("model.", "model.gpt.") if f"{p}{embedding}" in shapes), None)
    if prefix is None:
        raise CheckpointError(f"{where}: no model.{embedding} stored: not a checkpoint of the model its config names")
    problems = shape_misfits(config, {name[len(prefix):]: shape for name, shape in shapes.items()
                                      if name.startswith(prefix)})
    if problems:
        raise CheckpointError(f"{where}: the weights do not fit its config ({problems})")


def build_model(config: ModelConfig, state: dict[str, Any] | None = None) -> GPTModel | DecoderModel:
    """The model ``config`` describes (`DecoderModel` for a `DecoderConfig`, else `GPTModel`),
    holding ``state`` (every name, strict) when given. The engine's RNG state is left as it
    was. Raises the engine's KeyError when names or shapes do not fit."""
    if state is not None and not isinstance(config, DecoderConfig):
        return model_from_state_dict(config, state)  # which also keeps float64 weights float64
    backend = engine.get_backend()
    rng_state = backend.rng_state()
    try:
        model = DecoderModel(config, init_weights=False) if isinstance(config, DecoderConfig) else GPTModel(config)
    finally:
        backend.set_rng_state(rng_state)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


def load_model_from_checkpoint(path: str | os.PathLike) -> tuple[GPTModel | DecoderModel, Checkpoint]:
    """The model built from the checkpoint's config and holding its weights (in the stored
    dtype; the engine's RNG state is left as it was), plus the `Checkpoint` (optimizer
    state, step, extra)."""
    ckpt = load_checkpoint(path)
    try:
        model = build_model(ckpt.config, ckpt.state_dict)
    except KeyError as err:
        raise CheckpointError(f"{ckpt.path}: weights do not fit its config: {err.args[0]}") from None
    return model, ckpt
