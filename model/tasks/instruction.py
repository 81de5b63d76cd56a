"""Instruction following (the book's chapter 7): the data of a run, and the model's responses.

`InstructionData` splits instruction-data.json 85/10/5 (train/test/val) and batches it
(inputs padded per batch with the end-of-text token, padding targets ignored);
`generate_responses` answers test entries greedily (KV cache, stopping at end-of-text).
The end-of-text token is GPT-2's unless given (a Llama / Qwen3 folder's eos_token).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from model.data.instructions import (
    PAD_TOKEN_ID,
    RESPONSE_HEADER,
    InstructionDataError,
    InstructionDataset,
    collate,
    format_input,
    load_instruction_data,
    split_data,
)
from model.data.windows import DataLoader
from model.gpt import GPTModel
from model.sampling import generate
from model.tokenizers.gpt2 import encode_text

RESPONSES_FILE = "instruction-data-with-response.json"


@dataclass
class InstructionData:
    """The entries of a run and the loaders of its training and validation splits."""

    train_data: list[dict[str, Any]]
    test_data: list[dict[str, Any]]
    val_data: list[dict[str, Any]]
    train_set: InstructionDataset
    train_loader: DataLoader
    val_loader: DataLoader

    def summary(self, max_length: int, mask_prompt: bool) -> list[str]:
        """Lines that describe the data; a warning when --mask-prompt leaves entries nothing to learn."""
        n = len(self.train_data) + len(self.test_data) + len(self.val_data)
        cut = sum(len(ex.ids) > max_length for ex in self.train_set.examples)
        lines = [f"{n} entries: {len(self.train_data)} train / {len(self.test_data)} test / {len(self.val_data)} val; "
                 f"{len(self.train_loader)} training batches of {self.train_loader.batch_size}; {cut} training "
                 f"sequences cut to {max_length} tokens"]
        lost = sum(ex.prompt_length >= max_length for ex in self.train_set.examples) if mask_prompt else 0
        if lost:
            lines.append(f"warning: {lost} training entries have no response tokens within {max_length} tokens, "
                         "so --mask-prompt leaves them nothing to learn")
        return lines


def load_instruction_run(tokenizer: Any, batch_size: int, max_length: int, *, mask_prompt: bool = False,
                         seed: int = 123, data_file: str | None = None, data_dir: str | None = None,
                         max_test_entries: int | None = None, pad_token_id: int = PAD_TOKEN_ID) -> InstructionData:
    """Read, split and batch the instruction data (`batch_size`: the global batch), each
    sequence ended and padded with `pad_token_id` (the tokenizer's end-of-text)."""
    data = load_instruction_data(data_file, data_dir)
    train_data, test_data, val_data = split_data(data)
    if not train_data or not val_data:
        raise InstructionDataError(f"{len(data)} entries are too few: the 85/10/5 split leaves "
                                   f"{len(train_data)} for training and {len(val_data)} for validation")
    if max_test_entries is not None:
        test_data = test_data[:max_test_entries]
    train_set, val_set = InstructionDataset(train_data, tokenizer), InstructionDataset(val_data, tokenizer)
    batch_fn = functools.partial(collate, pad_token_id=pad_token_id, allowed_max_length=max_length,
                                 mask_prompt=mask_prompt)
    train_loader = DataLoader(train_set, batch_size, shuffle=True, drop_last=True, seed=seed, collate_fn=batch_fn)
    val_loader = DataLoader(val_set, batch_size, shuffle=False, drop_last=False, collate_fn=batch_fn)
    return InstructionData(train_data, test_data, val_data, train_set, train_loader, val_loader)


# --- responses ---
def extract_response(generated: str) -> str:
    """The model's answer in text generated after a prompt: what follows the first
    "### Response:" header (all of it when there is none), stripped."""
    _, header, after = generated.partition(RESPONSE_HEADER)
    return (after if header else generated).strip()


def generate_response(model: GPTModel, tokenizer: Any, entry: dict[str, Any], max_new_tokens: int = 256,
                      eos_id: int = PAD_TOKEN_ID) -> str:
    """Greedy response (KV cache, stops at `eos_id`) to ``format_input(entry)``."""
    prompt_ids = encode_text(tokenizer, format_input(entry))
    out = generate(model, np.asarray([prompt_ids], dtype=np.int64), max_new_tokens, temperature=0.0,
                   eos_id=eos_id, use_cache=True)  # (1, T + n)
    new_ids = [int(t) for t in out[0, len(prompt_ids):]]
    if eos_id in new_ids:
        new_ids = new_ids[:new_ids.index(eos_id)]
    return extract_response(tokenizer.decode(new_ids))


def generate_responses(model: GPTModel, tokenizer: Any, entries: Sequence[dict[str, Any]],
                       max_new_tokens: int = 256, progress: bool = True,
                       eos_id: int = PAD_TOKEN_ID) -> list[dict[str, Any]]:
    """Copies of `entries`, each with the generated ``model_response`` (ended at `eos_id`)."""
    return [{**entry, "model_response": generate_response(model, tokenizer, entry, max_new_tokens, eos_id)}
            for entry in tqdm(entries, desc="responding", unit="entry", disable=not progress)]

