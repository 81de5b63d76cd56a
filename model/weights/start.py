"""The one loader of a model to start from (our checkpoint, a Hugging Face GPT-2, Llama 3 or
Qwen3 folder, or random init) and of the tokenizer its token ids belong to."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.config import get_config
from model.decoder.config import DecoderConfig
from model.decoder.hf import HFFolderError, load_hf_model, read_hf_config
from model.decoder.tokenizer import HFTokenizer, TokenizerFileError
from model.gpt import GPTModel
from model.tokenizers.bpe import ENDOFTEXT
from model.tokenizers.gpt2 import gpt2_tokenizer
from model.weights.checkpoint import CheckpointError, ModelConfig, build_model, load_checkpoint, resolve_checkpoint
from model.weights.hf import load_hf_gpt2
from model.weights.hub import download_hf_model

DECODER_TYPES = ("llama", "qwen3")  # model_type values model.decoder loads
_DECODER_EOS = ("<|end_of_text|>", "<|endoftext|>")  # Llama 3's and Qwen's end of text, when no eos_token is named


def hf_model_type(directory: str | os.PathLike) -> str | None:
    """``model_type`` in a folder's config.json (None when there is none or it is unreadable)."""
    try:
        return json.loads((Path(directory) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def is_decoder_folder(directory: str | os.PathLike) -> bool:
    """Whether a Hugging Face folder holds a Llama 3 / Qwen3 (True) or a GPT-2 (False); any
    other model_type is a `CheckpointError`. A folder without a readable config.json counts
    as GPT-2, whose loader names the missing file."""
    model_type = hf_model_type(directory)
    if model_type in (None, "gpt2") or model_type in DECODER_TYPES:
        return model_type in DECODER_TYPES
    raise CheckpointError(f"{Path(directory) / 'config.json'}: model_type {model_type!r} is not supported: give a "
                          f"Hugging Face folder of a GPT-2, Llama 3 ({DECODER_TYPES[0]}) or Qwen3 ({DECODER_TYPES[1]})")


def load_start_model(*, checkpoint: str | os.PathLike | None = None, hf_model: str | None = None,
                     hf_dir: str | os.PathLike | None = None, preset: str | None = None,
                     cache_dir: str | os.PathLike | None = None, drop_rate: float | None = None,
                     context_length: int | None = None, **config: Any) -> tuple[Any, str]:
    """(model, what it is in words) from the first source given: `checkpoint` (a language
    model written by save_checkpoint), a local `hf_dir` (GPT-2, Llama 3 or Qwen3), a downloaded
    `hf_model`, else random initialisation of `preset` (with `context_length` and further
    GPTConfig fields `config`). `drop_rate` replaces a GPT-2's dropout rate (None keeps it);
    Llama 3 and Qwen3 have no dropout, so for them it must be None or 0."""
    drop = {} if drop_rate is None else {"drop_rate": drop_rate}
    if checkpoint:
        ckpt = load_checkpoint(checkpoint)
        if "classifier" in (ckpt.extra or {}):
            raise CheckpointError(f"{ckpt.path} is a classifier; give a GPT (language model) checkpoint, "
                                  "e.g. from python -m model.train")
        if isinstance(ckpt.config, DecoderConfig):
            _check_no_dropout(ckpt.config, drop_rate, f"checkpoint {ckpt.path}")
            drop = {}
        try:
            return build_model(dataclasses.replace(ckpt.config, **drop), ckpt.state_dict), f"checkpoint {ckpt.path}"
        except KeyError as err:
            raise CheckpointError(f"{ckpt.path}: weights do not fit its config: {err.args[0]}") from None
    if hf_model:
        hf_dir = download_hf_model(hf_model, cache_dir)  # then loaded as --hf-dir loads a folder
    if hf_dir and is_decoder_folder(hf_dir):
        try:
            _check_no_dropout(read_hf_config(hf_dir), drop_rate, str(hf_dir))
            model = load_hf_model(hf_dir)
        except HFFolderError as err:
            raise CheckpointError(str(err)) from None
        return model, f"Hugging Face {model.config.model_type} from {hf_dir}"
    if hf_dir:
        return load_hf_gpt2(hf_dir, **drop), f"Hugging Face GPT-2 from {hf_dir}"
    if preset is None:
        raise ValueError("load_start_model: give a checkpoint, hf_model, hf_dir or preset")
    overrides = {**drop, **config} | ({} if context_length is None else {"context_length": context_length})
    return GPTModel(get_config(preset, **overrides)), f"random initialisation ({preset})"


def _check_no_dropout(config: DecoderConfig, drop_rate: float | None, source: str) -> None:
    if drop_rate:
        raise CheckpointError(f"{source} is a {config.model_type} model, which has no dropout: --drop-rate "
                              f"{drop_rate:g} only applies to GPT-2; leave it at 0")


@dataclass(frozen=True)
class StartTokenizer:
    """The tokenizer a model's ids belong to, and its end-of-text token: what ends a response
    and pads a batch (GPT-2's <|endoftext|>, or the eos_token a Llama / Qwen3 folder names)."""

    tokenizer: Any  # tiktoken.Encoding (GPT-2) or model.decoder.HFTokenizer
    eos_id: int
    eos_text: str
    folder: Path | None = None  # where a Llama / Qwen3 tokenizer's files are (None: GPT-2's)


def gpt2_start_tokenizer(tokenizer: Any) -> StartTokenizer:
    """A GPT-2 tiktoken encoding, with <|endoftext|> ending and padding."""
    return StartTokenizer(tokenizer, tokenizer.eot_token, ENDOFTEXT)


def load_start_tokenizer(config: ModelConfig, *, checkpoint: str | os.PathLike | None = None,
                         hf_dir: str | os.PathLike | None = None,
                         data_dir: str | os.PathLike | None = None) -> StartTokenizer:
    """The tokenizer of a model of ``config``: GPT-2's from the data dir, or for a Llama 3 /
    Qwen3 the files of ``hf_dir``, else those beside ``checkpoint`` (a run directory holds the
    files of the folder the run started from). Raises `CheckpointError` naming what is missing."""
    if not isinstance(config, DecoderConfig):
        return gpt2_start_tokenizer(gpt2_tokenizer(data_dir))
    if hf_dir:
        folder = Path(hf_dir)
    elif checkpoint:
        folder = resolve_checkpoint(checkpoint).parent
    else:
        raise ValueError("load_start_tokenizer: a Llama / Qwen3 tokenizer needs hf_dir or checkpoint")
    return decoder_tokenizer(folder, config)


def decoder_tokenizer(folder: Path, config: DecoderConfig) -> StartTokenizer:
    """The Llama 3 / Qwen3 tokenizer in ``folder``, checked against the model's vocabulary."""
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder / 'tokenizer.json'} is missing: a {config.model_type} model needs the "
                              "tokenizer files of the Hugging Face folder it came from; copy them there")
    try:
        tokenizer = HFTokenizer.from_folder(folder)
    except (TokenizerFileError, ValueError) as err:
        raise CheckpointError(f"{folder}: {err}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has ids up to {tokenizer.vocab_size - 1}, the model's "
                              f"vocab_size is {config.vocab_size}: they do not belong together")
    names = ((tokenizer.eos_token,) if tokenizer.eos_token else ()) + _DECODER_EOS
    eos = next((name for name in names if name in tokenizer.added_tokens), None)
    if eos is None:
        raise CheckpointError(f"{folder}: tokenizer_config.json names no eos_token and the tokenizer has none of "
                              f"{', '.join(_DECODER_EOS)}: add \"eos_token\" to tokenizer_config.json")
    return StartTokenizer(tokenizer, tokenizer.added_tokens[eos], eos, folder)
