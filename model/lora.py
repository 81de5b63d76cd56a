"""LoRA, low-rank adaptation (Hu et al. 2021; the book's appendix E), for any engine Module.

A frozen Linear ``y = x Wᵀ + b`` learns only a low-rank update:

    y = x Wᵀ + b + scale · (x Aᵀ) Bᵀ,    A (rank, in), B (out, rank), scale = alpha / rank

A starts as torch's ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(in), 1/sqrt(in)), the
same as a fresh ``nn.Linear`` weight; B starts at zero, so a freshly wrapped model computes
exactly what the base model does.

Parameter names. `LoRALinear` keeps the wrapped layer under ``.base`` and adds two
parameters beside it, so wrapping ``h.0.attn.c_attn`` gives::

    h.0.attn.c_attn.base.weight   (out, in)   frozen
    h.0.attn.c_attn.base.bias     (out,)      frozen (if the Linear has one)
    h.0.attn.c_attn.lora_A        (rank, in)  trainable
    h.0.attn.c_attn.lora_B        (out, rank) trainable

`merge_lora` folds ``scale · B @ A`` into ``base.weight`` and puts the plain Linear back,
so a merged model has the original names again (and loads, exports and runs as before).
`save_lora` / `load_lora` store only the adapters: ``PATH.safetensors`` (``<layer>.lora_A``,
``<layer>.lora_B``) and ``PATH.json`` (rank, alpha, the wrapped layers and their shapes).

NOTE: code that reads ``layer.weight`` directly instead of calling the layer (our
GPT's MLP does, to fuse c_fc's bias into the GELU kernel) sees the effective weight
``W + scale · B @ A``, a differentiable Tensor, so LoRA is never silently bypassed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import safetensors
import safetensors.numpy

import engine
from engine import functional as F
from engine import nn
from model.data.files import atomic_write
from model.decoder.model import DecoderModel
from model.weights.checkpoint import checkpoint_paths

FORMAT = "scratchgpt-lora"
DECODER_BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VERSION = 1


class LoRAError(ValueError):
    """An adapter file does not fit the model (or is not an adapter file); the message says why."""


class LoRACounts(NamedTuple):
    layers: int  # Linear layers wrapped
    trainable: int  # parameters with requires_grad
    total: int  # all parameters (each shared one once)

    def __str__(self) -> str:
        share = 100.0 * self.trainable / self.total if self.total else 0.0
        return (f"LoRA on {self.layers} Linear layers: {self.trainable:,} trainable of {self.total:,} "
                f"parameters ({share:.2f}%)")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (kept as ``.base``) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        self.base = base.requires_grad_(False)
        dtype = base.weight.dtype
        # NOTE: kaiming_uniform_(a=sqrt(5)) has bound gain·sqrt(3/in) = sqrt(1/3)·sqrt(3/in) = 1/sqrt(in):
        # exactly how nn.Linear initialises its weight, so a fresh Linear (in -> rank) supplies A.
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, dtype=dtype).weight  # (rank, in)
        self.lora_B = nn.Parameter(engine.zeros(self.out_features, rank, dtype=dtype))  # (out, rank)

    def forward(self, x: engine.Tensor) -> engine.Tensor:
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)  # (..., rank) -> (..., out)
        return self.base(x) + update * self.scale  # (..., out)

    @property
    def weight(self) -> engine.Tensor:
        """The effective weight ``W + scale · B @ A`` (out, in): differentiable, read-only."""
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scale

    @property
    def bias(self) -> engine.Tensor | None:
        return self.base.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}")


# --- wrapping, counting, merging ---
def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared parameter once."""
    return model.num_parameters(trainable_only=True), model.num_parameters()


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by dotted name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, targets: Iterable[str] | None) -> bool:
    return targets is None or any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: Iterable[str] | str | None = None) -> LoRACounts:
    """Wrap every ``nn.Linear`` of ``model`` (or those named by ``targets``) in a `LoRALinear`,
    in place, and freeze every parameter except the new A and B matrices.

    ``targets`` are module names; one matches a layer whose dotted name equals it or ends
    with ``"." + target`` (``"c_attn"`` matches every ``h.<i>.attn.c_attn``). A target that
    matches no Linear is an error, as is a model that already has LoRA layers."""
    if isinstance(targets, str):
        targets = [targets]
    targets = None if targets is None else list(targets)
    if lora_layers(model):
        raise LoRAError("apply_lora: the model already has LoRA layers (merge_lora them first, or use a fresh model)")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if targets is not None:
        unmatched = [t for t in targets if not any(_matches(name, [t]) for name in linears)]
        if unmatched:
            raise LoRAError(f"apply_lora: targets {unmatched} match no nn.Linear; the Linear layers are: "
                            f"{', '.join(linears) or '(none)'}")
    chosen = [name for name in linears if _matches(name, targets)]
    if not chosen:
        raise LoRAError(f"apply_lora: {type(model).__name__} has no nn.Linear layer to adapt")
    return _wrap(model, chosen, rank, alpha)


def _wrap(model: nn.Module, names: list[str], rank: int, alpha: float) -> LoRACounts:
    if "" in names:
        raise LoRAError("apply_lora: the model is itself a Linear; wrap it with LoRALinear(model, rank, alpha)")
    wrapped = {name: LoRALinear(_get(model, name), rank, alpha) for name in names}  # checks rank/alpha first
    model.requires_grad_(False)
    for name, layer in wrapped.items():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
        _set(model, name, layer)
    return LoRACounts(len(names), *count_trainable(model))


def merge_lora(model: nn.Module) -> int:
    """Fold each LoRA update into its base weight (``W += scale · B @ A``) and put the plain
    Linear back under the original name. Returns the number of layers merged.

    The merged model computes what the adapted one did (up to float rounding), without the
    extra matmuls. Merged weights keep the base's requires_grad (frozen after `apply_lora`).
    NOTE: a merged weight is a new Parameter: a base weight that was tied to another (a
    GPT-2 head tied to ``wte``) is untied rather than changing the other one too; save such a
    model with ``tie_weights=False`` in its config, or loading it would tie them again."""
    layers = lora_layers(model)
    if "" in layers:
        raise LoRAError("merge_lora: the model is itself a LoRALinear; use its .base after merging by hand")
    for name, layer in layers.items():
        base = layer.base
        with engine.no_grad():
            merged = layer.weight  # (out, in)
        base.weight = nn.Parameter(merged.data, requires_grad=base.weight.requires_grad)
        if base.bias is not None:
            base.bias = base.bias  # re-registered after the new weight: parameter order as before
        _set(model, name, base)
    return len(layers)


def _get(model: nn.Module, name: str) -> nn.Module:
    module = model
    for part in name.split("."):
        module = getattr(module, part)
    return module


def _set(model: nn.Module, name: str, value: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(_get(model, parent) if parent else model, attr, value)


# --- adapter files ---
def save_lora(model: nn.Module, path: str | os.PathLike) -> os.PathLike:
    """Write only the adapters of ``model``: ``PATH.safetensors`` (``<layer>.lora_A`` / ``.lora_B``)
    and ``PATH.json`` (format, rank, alpha, wrapped layers and their in/out sizes). Returns
    the base path (a given ``.safetensors`` / ``.json`` suffix is dropped)."""
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("save_lora: the model has no LoRA layers (apply_lora first)")
    settings = {(m.rank, m.alpha) for m in layers.values()}
    if len(settings) != 1:
        raise LoRAError(f"save_lora: the layers mix (rank, alpha) {sorted(settings)}; an adapter file holds one")
    (rank, alpha), = settings
    tensors_path, json_path = checkpoint_paths(path)
    tensors = {}
    for name, m in layers.items():
        tensors[f"{name}.lora_A"] = np.ascontiguousarray(m.lora_A.numpy())
        tensors[f"{name}.lora_B"] = np.ascontiguousarray(m.lora_B.numpy())
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "rank": rank,
        "alpha": alpha,
        "targets": list(layers),
        "shapes": {name: {"in_features": m.in_features, "out_features": m.out_features} for name, m in layers.items()},
        "dtype": str(next(iter(tensors.values())).dtype),
    }
    atomic_write(tensors_path, lambda tmp: safetensors.numpy.save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    text = json.dumps(meta, indent=1)
    atomic_write(json_path, lambda tmp: tmp.write_text(text))
    return tensors_path.with_suffix("")


def read_lora(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, tensors) of an adapter file pair, checked against each other."""
    tensors_path, json_path = checkpoint_paths(path)
    missing = [str(p) for p in (json_path, tensors_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"LoRA adapter {tensors_path.with_suffix('')}: missing {' and '.join(missing)} "
                                "(an adapter is PATH.safetensors + PATH.json, as written by save_lora)")
    try:
        meta = json.loads(json_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoRAError(f"{json_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LoRAError(f"{json_path}: not a LoRA adapter file (no \"format\": \"{FORMAT}\")")
    if meta.get("version") != VERSION:
        raise LoRAError(f"{json_path}: adapter format version {meta.get('version')!r}, this code reads {VERSION}")
    absent = [key for key in ("rank", "alpha", "targets") if key not in meta]
    if absent:
        raise LoRAError(f"{json_path}: missing fields {', '.join(absent)}")
    try:
        tensors = safetensors.numpy.load_file(str(tensors_path))
    except (safetensors.SafetensorError, OSError) as err:
        raise LoRAError(f"{tensors_path}: damaged safetensors file ({err})") from None
    expected = {f"{name}.{ab}" for name in meta["targets"] for ab in ("lora_A", "lora_B")}
    if set(tensors) != expected:
        raise LoRAError(f"{tensors_path}: tensors {sorted(set(tensors) ^ expected)} disagree with {json_path.name}")
    return meta, tensors


def load_lora(model: nn.Module, path: str | os.PathLike) -> LoRACounts:
    """Load adapters written by `save_lora` into ``model``.

    A model without LoRA layers first gets them (`apply_lora` on exactly the saved layers,
    with the saved rank and alpha, freezing everything else). A model that has them must
    match: the same wrapped layers, rank and alpha. Every mismatch (layer names, rank,
    alpha, in/out sizes) raises `LoRAError` listing them, before anything is changed."""
    meta, tensors = read_lora(path)
    rank, alpha, targets = meta["rank"], meta["alpha"], list(meta["targets"])
    tensors_path = checkpoint_paths(path)[0]
    layers = lora_layers(model)
    problems = []
    if layers:
        if set(layers) != set(targets):
            only_file = sorted(set(targets) - set(layers))
            only_model = sorted(set(layers) - set(targets))
            problems.append(f"wrapped layers differ (only in the file: {only_file}; only in the model: {only_model})")
        settings = {(m.rank, m.alpha) for m in layers.values()}
        if settings != {(rank, float(alpha))}:
            problems.append(f"the file has rank {rank}, alpha {alpha:g}; the model's LoRA layers have "
                            f"(rank, alpha) {sorted(settings)}")
    candidates = dict(model.named_modules())
    for name in targets:
        module = candidates.get(name)
        if not isinstance(module, (nn.Linear, LoRALinear)):
            if not layers:
                problems.append(f"{name} is not an nn.Linear in the model")
            continue
        a_shape, b_shape = tensors[f"{name}.lora_A"].shape, tensors[f"{name}.lora_B"].shape
        if (a_shape, b_shape) != ((rank, module.in_features), (module.out_features, rank)):
            problems.append(f"{name}: the file has A {a_shape}, B {b_shape}; a rank-{rank} adapter of this "
                            f"{module.in_features} -> {module.out_features} layer needs "
                            f"A {(rank, module.in_features)}, B {(module.out_features, rank)}")
    if problems:
        raise LoRAError(f"load_lora {tensors_path}: the adapter does not fit this model: " + "; ".join(problems))
    counts = _wrap(model, targets, rank, alpha) if not layers else LoRACounts(len(layers), *count_trainable(model))
    model.load_state_dict(tensors, strict=False)
    return counts


def apply_block_lora(model: nn.Module, rank: int, alpha: float) -> LoRACounts:
    """LoRA on every Linear of the blocks, and on the head unless it is tied to the token
    embedding: a GPTModel's c_attn, c_proj, c_fc; a DecoderModel's (Llama 3 / Qwen3) q/k/v/o_proj
    and gate/up/down_proj, peft's "all linear" choice for them.

    NOTE: merging a LoRA head tied to the embedding would untie it, and a checkpoint of a
    tied config stores the two under one Parameter: the merged head would be lost."""
    if isinstance(model, DecoderModel):
        targets, embedding = list(DECODER_BLOCK_LINEARS), model.embed_tokens
    else:
        targets, embedding = ["c_attn", "c_proj", "c_fc"], model.wte
    targets += [] if model.lm_head.weight is embedding.weight else ["lm_head"]
    return apply_lora(model, rank=rank, alpha=alpha, targets=targets)
