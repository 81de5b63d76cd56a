"""Instruction data for fine-tuning (the book's chapter 7): loading, the Alpaca prompt,
the 85/10/5 split, a pre-tokenized dataset and the padding/masking collate function.

An entry is ``{"instruction": str, "input": str (may be empty or absent), "output": str}``.
Its training text is ``format_input(entry) + format_response(entry)``::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:            <- these two lines only when "input" is non-empty
    {input}

    ### Response:
    {output}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from model.data.datadir import data_file
from model.tokenizers.gpt2 import encode_text

INSTRUCTION_DATA_FILE = "instruction-data.json"
PAD_TOKEN_ID = 50256  # GPT-2's <|endoftext|>, also used as padding
IGNORE_INDEX = -100  # target positions the loss skips (F.cross_entropy's default)
RESPONSE_HEADER = "### Response:"

_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


class InstructionDataError(ValueError):
    """An instruction-data file is not valid JSON or holds malformed entries; the message names them."""


# --- the prompt format ---
def format_input(entry: dict[str, Any]) -> str:
    """The book's Alpaca-style prompt: preamble, instruction and (if non-empty) input."""
    text = f"{_PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def format_response(entry: dict[str, Any]) -> str:
    """The response part appended to `format_input` for training: header and output."""
    return f"\n\n{RESPONSE_HEADER}\n{entry['output']}"


# --- loading and validation ---
def validate_entries(data: Any, source: str, required: Sequence[str] = ("instruction", "output"),
                     optional: Sequence[str] = ("input",)) -> list[dict[str, Any]]:
    """`data` itself if it is a list of entries whose `required` fields are present and are
    strings (and `optional` ones are strings when present); else `InstructionDataError`
    naming every bad entry index and field (the first 10, and how many in all)."""
    if not isinstance(data, list):
        raise InstructionDataError(f"{source}: expected a JSON list of entries, got {type(data).__name__}")
    problems = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            problems.append(f"entry {i}: expected an object with fields {', '.join(required)}, "
                            f"got {type(entry).__name__}")
            continue
        for name in required:
            if name not in entry:
                problems.append(f"entry {i}: field {name!r} is missing")
            elif not isinstance(entry[name], str):
                problems.append(f"entry {i}: field {name!r} must be a string, got {type(entry[name]).__name__}")
        for name in optional:
            if name in entry and not isinstance(entry[name], str):
                problems.append(f"entry {i}: field {name!r} must be a string, got {type(entry[name]).__name__}")
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise InstructionDataError(f"{source}: {len(problems)} problem(s) in the entries:\n  {shown}{more}")
    return data


def read_json_entries(path: str | os.PathLike, required: Sequence[str] = ("instruction", "output"),
                      optional: Sequence[str] = ("input",)) -> list[dict[str, Any]]:
    """Entries of the JSON list in `path`, checked by `validate_entries`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InstructionDataError(
            f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except UnicodeDecodeError as err:
        raise InstructionDataError(f"{path}: not UTF-8 text ({err})") from None
    except OSError as err:
        raise InstructionDataError(f"{path}: cannot read it ({err.strerror or err})") from None
    return validate_entries(data, str(path), required, optional)


def load_instruction_data(path: str | os.PathLike | None = None,
                          data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The entries of `path`, or of ``instruction-data.json`` in the data dir (downloaded when
    missing and online). Nothing is skipped: any bad entry raises `InstructionDataError`."""
    if path is None:
        path = data_file(INSTRUCTION_DATA_FILE, data_dir)
    return read_json_entries(path)


def split_data(data: Sequence[Any]) -> tuple[list[Any], list[Any], list[Any]]:
    """The book's split, in its order: (train, test, val) = first 85%, next 10%, the rest
    (935 / 110 / 55 of 1100). No shuffling: the file's order decides."""
    train_portion = int(len(data) * 0.85)
    test_portion = int(len(data) * 0.1)
    train = list(data[:train_portion])
    test = list(data[train_portion:train_portion + test_portion])
    val = list(data[train_portion + test_portion:])
    return train, test, val


# --- tokenized dataset and batches ---
class InstructionExample(NamedTuple):
    ids: list[int]  # tokens of format_input(entry) + format_response(entry)
    prompt_length: int  # how many leading tokens are the prompt (masked by --mask-prompt)


class InstructionDataset:
    """The book's InstructionDataset: every entry tokenized once, up front."""

    def __init__(self, entries: Sequence[dict[str, Any]], tokenizer: Any):
        self.entries = list(entries)
        self.examples: list[InstructionExample] = []
        for entry in self.entries:
            prompt = format_input(entry)
            ids = encode_text(tokenizer, prompt + format_response(entry))
            prompt_ids = encode_text(tokenizer, prompt)
            # NOTE: as in the book's exercise 7.2 the prompt is tokenized on its own; should
            # BPE merge across the prompt/response boundary, only the common prefix counts.
            n = 0
            while n < min(len(ids), len(prompt_ids)) and ids[n] == prompt_ids[n]:
                n += 1
            self.examples.append(InstructionExample(ids, n))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> InstructionExample:
        return self.examples[index]


def collate(
    batch: Sequence[InstructionExample | Sequence[int]],
    pad_token_id: int = PAD_TOKEN_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    mask_prompt: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The book's custom_collate_fn: (inputs, targets), each (B, T) int64.

    Each sequence gets one end-of-text token and is padded with `pad_token_id` to the
    longest sequence + 1; inputs are ``seq[:-1]``, targets ``seq[1:]``. In the targets
    every padding position except the first end-of-text becomes `ignore_index` (the model
    learns to stop, and nothing else about padding). With `mask_prompt` (items must be
    `InstructionExample`s) the targets that predict prompt tokens are `ignore_index` too,
    so only the response is learned. Finally both are cut to `allowed_max_length`.
    """
    if not batch:
        raise ValueError("collate: empty batch")
    items = [item if isinstance(item, InstructionExample) else InstructionExample(list(item), 0) for item in batch]
    if mask_prompt and not all(isinstance(item, InstructionExample) for item in batch):
        raise TypeError("collate: mask_prompt needs InstructionExample items (they carry the prompt length)")
    width = max(len(item.ids) for item in items) + 1  # longest sequence + its end-of-text
    inputs = np.full((len(items), width - 1), pad_token_id, dtype=np.int64)  # (B, T)
    targets = np.full((len(items), width - 1), ignore_index, dtype=np.int64)  # (B, T)
    for row, (ids, prompt_length) in enumerate(items):
        n = len(ids)
        if n == 0:
            raise ValueError(f"collate: item {row} of the batch holds no tokens")
        inputs[row, :n] = ids
        targets[row, :n - 1] = ids[1:]
        # NOTE: the book masks every target equal to the pad id but the first; we mask by
        # position (the padding), which is the same unless the text itself holds token 50256.
        targets[row, n - 1] = pad_token_id  # the one end-of-text the model must predict
        if mask_prompt:
            # target i predicts token i + 1: the first prompt_length - 1 targets are prompt tokens
            targets[row, :max(prompt_length - 1, 0)] = ignore_index
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs, targets
