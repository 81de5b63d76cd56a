"""A model to run, with its tokenizer and chat format, from whatever the user points at.

`load_for_inference(source)` takes a checkpoint (PATH or PATH.safetensors), a run directory
(its latest checkpoint, or its best with ``best=True``) or a Hugging Face folder: GPT-2
(config.json + model.safetensors, with vocab.json + merges.txt when present, else GPT-2's
files from the data dir) or Llama 3 / Qwen3 (``model_type`` in config.json, through
model.decoder). A checkpoint saved by ``model.instruct`` names its prompt template; one of
a Llama 3 / Qwen3 run reads its tokenizer from the files beside it (the run directory). A
classifier is refused with the command to use instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.tasks.chat import ChatFormat, prompt_chat_format
from model.tokenizers.gpt2 import encode_text, gpt2_tokenizer, gpt2_tokenizer_from_files
from model.weights.checkpoint import CheckpointError, build_model, load_checkpoint, resolve_checkpoint
from model.weights.hf import load_hf_gpt2
from model.weights.start import StartTokenizer, gpt2_start_tokenizer, is_decoder_folder, load_start_tokenizer


@dataclass
class InferenceModel:
    model: Any  # GPTModel or model.decoder.DecoderModel
    encode: Callable[[str], list[int]]  # a prompt's ids (a Llama tokenizer adds its BOS)
    decode: Callable[[list[int]], str]
    chat: ChatFormat  # how a conversation becomes ids ("plain": continuation)
    description: str


def load_for_inference(source: str | os.PathLike, best: bool = False,
                       data_dir: str | os.PathLike | None = None) -> InferenceModel:
    """The model ``source`` names, ready to generate (see the module doc). Raises
    `CheckpointError` (or model.decoder's `HFFolderError`) with one line naming the problem."""
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        if best:
            raise CheckpointError(f"--best takes a run directory; {path} is a Hugging Face folder")
        return load_hf_for_inference(path, data_dir)
    ckpt = load_checkpoint(resolve_checkpoint(path, best))
    if "classifier" in ckpt.extra:
        raise CheckpointError(f"{ckpt.path} is a spam classifier, not a language model: classify a message with "
                              f"scratchgpt classify predict TEXT --checkpoint {ckpt.path}")
    try:
        model = build_model(ckpt.config, ckpt.state_dict)
    except KeyError as err:
        raise CheckpointError(f"{ckpt.path}: weights do not fit its config: {err.args[0]}") from None
    tokenizer = load_start_tokenizer(ckpt.config, checkpoint=ckpt.path, data_dir=data_dir)
    return prompt_inference(model, tokenizer, ckpt.extra.get("prompt_template"), f"checkpoint {ckpt.path}")


def load_hf_for_inference(directory: Path, data_dir: str | os.PathLike | None = None) -> InferenceModel:
    """A Hugging Face folder: GPT-2 into our GPTModel, Llama 3 / Qwen3 into model.decoder's."""
    if is_decoder_folder(directory):
        from model.decoder import load_hf_folder

        model, tokenizer, template = load_hf_folder(directory)
        if template is None:
            chat = ChatFormat("plain", lambda messages: tokenizer.encode("".join(m["content"] for m in messages)),
                              tuple(tokenizer.added_tokens[t] for t in ("<|end_of_text|>", "<|endoftext|>")
                                    if t in tokenizer.added_tokens))
        else:
            chat = ChatFormat(template.name, lambda messages: template.encode(tokenizer, messages),
                              tuple(template.stop_ids(tokenizer)))
        return InferenceModel(model, tokenizer.encode, tokenizer.decode, chat,
                              f"{model.config.model_type} from {directory}")
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    tokenizer = gpt2_tokenizer_from_files(vocab, merges) if vocab.is_file() and merges.is_file() \
        else gpt2_tokenizer(data_dir)
    model = load_hf_gpt2(directory, drop_rate=0.0)
    return prompt_inference(model, gpt2_start_tokenizer(tokenizer), None, f"Hugging Face GPT-2 from {directory}")


def prompt_inference(model: Any, tokenizer: StartTokenizer, template: str | None, description: str) -> InferenceModel:
    """A model with the tokenizer it was trained with and the prompt template its checkpoint
    names (None: plain continuation); a reply ends at the tokenizer's end-of-text token."""
    encode = lambda text: encode_text(tokenizer.tokenizer, text)  # noqa: E731
    if model.config.vocab_size <= tokenizer.eos_id:
        raise CheckpointError(f"{description}: its vocab_size {model.config.vocab_size} does not hold the tokenizer's "
                              f"end-of-text id {tokenizer.eos_id}: it was not trained with this tokenizer")
    try:
        chat = prompt_chat_format(template, encode, tokenizer.eos_id, tokenizer.eos_text)
    except ValueError as err:
        raise CheckpointError(f"{description}: {err}") from None
    return InferenceModel(model, encode, tokenizer.tokenizer.decode, chat, description)
