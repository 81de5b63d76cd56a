"""Instruction fine-tuning: ``python -m model.instruct`` (the book's chapter 7).

With no arguments it runs the book's recipe: GPT-2 medium from Hugging Face (dropout 0),
instruction-data.json split 85/10/5 (train/test/val), inputs padded per batch with the
end-of-text token and padding targets ignored, AdamW(lr 5e-5, weight decay 0.1),
batch 8, 2 epochs, train/val loss every 5 steps over 5 batches, then a greedy response
(up to 256 tokens, stopping at end-of-text, with the KV cache) for every test entry.

Written to ``--out-dir``: ``checkpoint.safetensors`` + ``checkpoint.json`` (a plain
GPTModel; LoRA weights are merged into it), ``loss.png``, ``history.json``,
``instruction-data-with-response.json`` (the test entries plus ``model_response``) and
``scores.json`` (exact match, token F1, ROUGE-L; ``--judge`` adds an Ollama LLM judge).
``--evaluate FILE`` only scores an existing responses file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from model.data.instructions import (
    PAD_TOKEN_ID,
    RESPONSE_HEADER,
    format_input,
)
from model.gpt import GPTModel
from model.lora import LoRACounts, apply_lora
from model.sampling import generate

RESPONSES_FILE = "instruction-data-with-response.json"


# --- responses ---
def extract_response(generated: str) -> str:
    """The model's answer in text generated after a prompt: what follows the first
    "### Response:" header (all of it when there is none), stripped."""
    _, header, after = generated.partition(RESPONSE_HEADER)
    return (after if header else generated).strip()


def generate_response(model: GPTModel, tokenizer: Any, entry: dict[str, Any], max_new_tokens: int = 256,
                      eos_id: int = PAD_TOKEN_ID) -> str:
    """Greedy response (KV cache, stops at `eos_id`) to ``format_input(entry)``."""
    prompt_ids = tokenizer.encode(format_input(entry))
    out = generate(model, np.asarray([prompt_ids], dtype=np.int64), max_new_tokens, temperature=0.0,
                   eos_id=eos_id, use_cache=True)  # (1, T + n)
    new_ids = [int(t) for t in out[0, len(prompt_ids):]]
    if eos_id in new_ids:
        new_ids = new_ids[:new_ids.index(eos_id)]
    return extract_response(tokenizer.decode(new_ids))


def generate_responses(model: GPTModel, tokenizer: Any, entries: Sequence[dict[str, Any]],
                       max_new_tokens: int = 256, progress: bool = True) -> list[dict[str, Any]]:
    """Copies of `entries`, each with the generated ``model_response``."""
    return [{**entry, "model_response": generate_response(model, tokenizer, entry, max_new_tokens)}
            for entry in tqdm(entries, desc="responding", unit="entry", disable=not progress)]


def add_lora(model: GPTModel, rank: int, alpha: float) -> LoRACounts:
    """LoRA on every Linear of the blocks, and on the head unless it is tied to ``wte``.

    NOTE: merging a LoRA head tied to ``wte`` would untie it, and a checkpoint of a
    tied config stores the two under one Parameter: the merged head would be lost."""
    targets = ["c_attn", "c_proj", "c_fc"] + ([] if model.lm_head.weight is model.wte.weight else ["lm_head"])
    return apply_lora(model, rank=rank, alpha=alpha, targets=targets)
