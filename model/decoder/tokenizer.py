"""A Hugging Face byte-level BPE ``tokenizer.json`` run on tiktoken (no tokenizers/transformers).

What is read from the folder:

* ``model``: BPE ``vocab`` (byte-level strings -> id) and ``merges``. tiktoken merges the
  adjacent pair whose concatenation has the lowest rank; Hugging Face merges the pair
  listed first. The two agree when ids grow with merge order (every vocabulary converted
  from tiktoken, as Llama 3's and Qwen's are, and every one trained by BpeTrainer); we
  check that.
* ``pre_tokenizer``: a ``Split`` regex (behaviour Isolated) followed by ``ByteLevel``
  without its own regex, or a lone ``ByteLevel`` with GPT-2's regex.
* ``normalizer``: none or NFC.
* ``added_tokens``: every one (special or not, e.g. Qwen3's ``<think>``) is matched in the
  text before BPE, as the tokenizers library does.
* ``post_processor`` (``TemplateProcessing`` / ``ByteLevel`` / ``Sequence``): the ids put
  before and after a single text: Llama 3's adds ``<|begin_of_text|>``, Qwen's nothing.
  NOTE: it alone decides. ``add_bos_token`` / ``add_eos_token`` in ``tokenizer_config.json``
  change nothing for these folders in transformers (5.x, and 4.x's PreTrainedTokenizerFast
  and Qwen2TokenizerFast, the classes these folders name); a test checks that we agree.
  ``tokenizer_config.json`` gives the names of ``bos_token`` and ``eos_token``.
"""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path
from typing import Any

import tiktoken

from model.tokenizers.bpe import GPT2_PATTERN, gpt2_bytes_to_unicode


class TokenizerFileError(ValueError):
    """A tokenizer.json this reader does not support; the message says which part."""


class HFTokenizer:
    """encode / decode exactly as the folder's Hugging Face tokenizer does (single texts)."""

    def __init__(self, tokenizer_json: dict[str, Any], tokenizer_config: dict[str, Any] | None = None,
                 name: str = "hf"):
        config = tokenizer_config or {}
        model = tokenizer_json.get("model") or {}
        if model.get("type") != "BPE":
            raise TokenizerFileError(f"tokenizer model type {model.get('type')!r}: only byte-level BPE is supported")
        self.pattern = _pre_tokenizer_pattern(tokenizer_json.get("pre_tokenizer"))
        self.nfc = _uses_nfc(tokenizer_json.get("normalizer"))
        ranks = _mergeable_ranks(model["vocab"], model.get("merges") or [])
        added = tokenizer_json.get("added_tokens") or []
        for token in added:
            if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
                raise TokenizerFileError(f"added token {token['content']!r} uses lstrip/rstrip/single_word, "
                                         "which is not supported")
        self.added_tokens = {token["content"]: token["id"] for token in added}  # special or not: matched in text
        self.special_ids = {token["id"] for token in added if token.get("special")}  # what decode may skip
        # NOTE: an added token that is also a vocab entry is matched as a whole first anyway.
        added_ids = set(self.added_tokens.values())
        ranks = {b: i for b, i in ranks.items() if i not in added_ids}
        self.encoding = tiktoken.Encoding(name, pat_str=self.pattern, mergeable_ranks=ranks,
                                          special_tokens=self.added_tokens)
        self.bos_token, self.eos_token = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        self.prefix_ids, self.suffix_ids = _template_ids(tokenizer_json.get("post_processor"))

    @classmethod
    def from_folder(cls, directory: str | os.PathLike) -> HFTokenizer:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerFileError(f"{path} is missing: the folder has no Hugging Face fast tokenizer")
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        return cls(json.loads(path.read_text(encoding="utf-8")), config, name=directory.name)

    @property
    def vocab_size(self) -> int:
        """One past the largest id (added tokens included)."""
        return self.encoding.n_vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; added tokens written in the text become their ids, and with
        ``add_special_tokens`` the post-processor's BOS/EOS are added."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        ids = self.encoding.encode(text, allowed_special="all")
        return self.prefix_ids + ids + self.suffix_ids if add_special_tokens else ids

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) in self.special_ids)]
        return self.encoding.decode(ids, errors="replace")


def _token_text(token: Any) -> str | None:
    """tokenizer_config.json spells a token as a string or as an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _pre_tokenizer_pattern(pre: dict[str, Any] | None) -> str:
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2_PATTERN
    if kinds == ["Split", "ByteLevel"]:
        split, byte_level = steps
        if (split.get("behavior") == "Isolated" and not split.get("invert") and "Regex" in split.get("pattern", {})
                and not byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space")):
            return split["pattern"]["Regex"]
    raise TokenizerFileError(f"pre_tokenizer {kinds}: only Split(regex, Isolated) + ByteLevel, or a lone ByteLevel "
                             "without add_prefix_space, is supported")


def _uses_nfc(normalizer: dict[str, Any] | None) -> bool:
    if normalizer is None:
        return False
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    kinds = [s.get("type") for s in steps]
    if kinds in ([], ["NFC"]):
        return kinds == ["NFC"]
    raise TokenizerFileError(f"normalizer {kinds}: only none or NFC is supported")


def _mergeable_ranks(vocab: dict[str, int], merges: list[Any]) -> dict[bytes, int]:
    """bytes -> id for tiktoken, after checking that merge order and ids agree."""
    to_byte = {c: b for b, c in gpt2_bytes_to_unicode().items()}
    try:
        ranks = {bytes(to_byte[c] for c in token): i for token, i in vocab.items()}
    except KeyError as err:
        raise TokenizerFileError(f"vocab token with character {err.args[0]!r} is not byte-level BPE") from None
    last = -1
    for n, merge in enumerate(merges):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        whole = vocab.get(a + b)
        # NOTE: converted vocabularies list every split of a token, so equal ids may repeat.
        if whole is None or a not in vocab or b not in vocab or whole < last:
            raise TokenizerFileError(f"merge {n} ({a!r} {b!r}) does not build a token whose id is at least that of "
                                     "the merges before it; tiktoken's rank order would differ")
        last = whole
    return ranks


def _template_ids(post: dict[str, Any] | None) -> tuple[list[int], list[int]]:
    """Ids a post-processor puts before and after a single sequence."""
    if post is None or post.get("type") in ("ByteLevel",):
        return [], []
    if post.get("type") == "Sequence":
        prefix, suffix = [], []
        for step in post["processors"]:
            p, s = _template_ids(step)
            prefix, suffix = p + prefix, suffix + s
        return prefix, suffix
    if post.get("type") != "TemplateProcessing":
        raise TokenizerFileError(f"post_processor {post.get('type')!r}: only TemplateProcessing, ByteLevel and "
                                 "Sequence are supported")
    prefix, suffix, seen_text = [], [], False
    for item in post["single"]:
        if "Sequence" in item:
            seen_text = True
            continue
        ids = post["special_tokens"][item["SpecialToken"]["id"]]["ids"]
        (suffix if seen_text else prefix).extend(ids)
    return prefix, suffix
