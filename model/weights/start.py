"""The one loader of a model to start from: our checkpoint, Hugging Face GPT-2, or random init."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from model.config import get_config
from model.gpt import GPTModel, model_from_state_dict
from model.weights.checkpoint import CheckpointError, load_checkpoint
from model.weights.hf import load_hf_gpt2
from model.weights.hub import download_hf_model


def load_start_model(*, checkpoint: str | os.PathLike | None = None, hf_model: str | None = None,
                     hf_dir: str | os.PathLike | None = None, preset: str | None = None,
                     cache_dir: str | os.PathLike | None = None, drop_rate: float | None = None,
                     context_length: int | None = None, **config: Any) -> tuple[GPTModel, str]:
    """(model, what it is in words) from the first source given: `checkpoint` (a GPT language
    model written by save_checkpoint), a downloaded `hf_model` or a local `hf_dir`, else random
    initialisation of `preset` (with `context_length` and further GPTConfig fields `config`).
    `drop_rate` replaces the model's dropout rate (None keeps it)."""
    drop = {} if drop_rate is None else {"drop_rate": drop_rate}
    if checkpoint:
        ckpt = load_checkpoint(checkpoint)
        if "classifier" in (ckpt.extra or {}):
            raise CheckpointError(f"{ckpt.path} is a classifier; give a GPT (language model) checkpoint, "
                                  "e.g. from python -m model.train")
        try:
            return model_from_state_dict(dataclasses.replace(ckpt.config, **drop), ckpt.state_dict), \
                f"checkpoint {ckpt.path}"
        except KeyError as err:
            raise CheckpointError(f"{ckpt.path}: weights do not fit its config: {err.args[0]}") from None
    if hf_model:
        hf_dir = download_hf_model(hf_model, cache_dir)  # then loaded as --hf-dir loads a folder
    if hf_dir:
        return load_hf_gpt2(hf_dir, **drop), f"Hugging Face GPT-2 from {hf_dir}"
    if preset is None:
        raise ValueError("load_start_model: give a checkpoint, hf_model, hf_dir or preset")
    overrides = {**drop, **config} | ({} if context_length is None else {"context_length": context_length})
    return GPTModel(get_config(preset, **overrides)), f"random initialisation ({preset})"
