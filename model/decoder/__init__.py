"""Llama 3 / Qwen3 decoders on our engine: the model, Hugging Face folders, tokenizer, chat.

    from model.decoder import load_hf_folder, chat_reply
    model, tokenizer, template = load_hf_folder("path/to/Qwen3-0.6B")
    print(chat_reply(model, tokenizer, template, [{"role": "user", "content": "Hi!"}]))

`model(ids, kv_cache=...)` has `GPTModel`'s interface, so `model.generate.generate`,
LoRA (`model.lora.apply_lora(model, rank, alpha, targets=["q_proj", "v_proj"])`) and the
optimizers drive it as they drive GPT-2.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from model.decoder.chat import ChatTemplate, Message, chat_template_for
from model.decoder.config import PRESETS, DecoderConfig, estimate_memory, get_decoder_config
from model.decoder.hf import HFFolderError, export_hf_folder, load_hf_model, read_hf_config
from model.decoder.model import DecoderModel
from model.decoder.tokenizer import HFTokenizer, TokenizerFileError
from model.sampling import generate

__all__ = ["PRESETS", "ChatTemplate", "DecoderConfig", "DecoderModel", "HFFolderError", "HFTokenizer",
           "TokenizerFileError", "chat_reply", "chat_template_for", "estimate_memory", "export_hf_folder",
           "get_decoder_config", "load_hf_folder", "load_hf_model", "read_hf_config"]


def load_hf_folder(directory: str | os.PathLike, dtype: str = "float32"
                   ) -> tuple[DecoderModel, HFTokenizer, ChatTemplate | None]:
    """(model, tokenizer, chat template or None) of a Llama / Qwen3 Hugging Face folder."""
    model = load_hf_model(directory, dtype)
    tokenizer = HFTokenizer.from_folder(directory)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise HFFolderError(f"{directory}: the tokenizer has ids up to {tokenizer.vocab_size - 1}, the model's "
                            f"vocab_size is {model.config.vocab_size}")
    return model, tokenizer, chat_template_for(model.config.model_type, tokenizer)


def chat_reply(model: DecoderModel, tokenizer: HFTokenizer, template: ChatTemplate, messages: list[Message],
               max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, **template_options: Any) -> str:
    """The assistant's next reply to ``messages`` (text up to the first stop token).

    ``template_options`` go to the template (``date_string`` for Llama, ``enable_thinking``
    for Qwen3)."""
    prompt = template.encode(tokenizer, messages, add_generation_prompt=True, **template_options)
    stops = template.stop_ids(tokenizer)
    out = generate(model, np.asarray(prompt), max_new_tokens, temperature, top_k, top_p,
                   eos_id=stops[0] if stops else None, seed=seed)
    reply = [int(t) for t in out[len(prompt):]]
    for i, t in enumerate(reply):
        if t in stops:
            reply = reply[:i]
            break
    return tokenizer.decode(reply)
