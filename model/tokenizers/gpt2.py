"""GPT-2's tokenizer as a fast `tiktoken.Encoding`, built from the local BPE files.

``tiktoken.get_encoding("gpt2")`` would download its files; here they come from the data
directory (``gpt2/encoder.json`` and ``gpt2/vocab.bpe``, downloaded only when missing),
parsed by our own `BytePairTokenizer.from_gpt2_files`, and handed to tiktoken's Rust
encoder.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import tiktoken

from model.data.datadir import data_file
from model.tokenizers.bpe import ENDOFTEXT, BytePairTokenizer


def gpt2_tokenizer(data_dir: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """The GPT-2 encoding (50257 tokens, ``<|endoftext|>`` = 50256) from the data dir."""
    return _load(data_file("gpt2/encoder.json", data_dir), data_file("gpt2/vocab.bpe", data_dir))


def gpt2_tokenizer_from_files(vocab_json: str | os.PathLike, merges_txt: str | os.PathLike) -> tiktoken.Encoding:
    """The GPT-2 encoding from a Hugging Face folder's ``vocab.json`` and ``merges.txt`` (the
    same files as encoder.json and vocab.bpe under other names)."""
    return _load(Path(vocab_json), Path(merges_txt))


@functools.lru_cache(maxsize=None)
def _load(encoder_json: Path, vocab_bpe: Path) -> tiktoken.Encoding:
    return BytePairTokenizer.from_gpt2_files(encoder_json, vocab_bpe).to_tiktoken("gpt2")


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """The project's one rule for special tokens: ``<|endoftext|>`` written in the text is the
    end-of-text token (the book's pretraining text and prompts use it so); any other
    special-token text is ordinary text. Works for tiktoken, our BPE and the simple tokenizers."""
    if isinstance(tokenizer, tiktoken.Encoding):
        return tokenizer.encode(text, allowed_special={ENDOFTEXT}, disallowed_special=())
    if isinstance(tokenizer, BytePairTokenizer):
        return tokenizer.encode(text, allowed_special={ENDOFTEXT})
    return tokenizer.encode(text)
