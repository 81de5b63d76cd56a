"""The book's word-level tokenizers (chapter 2): a regex splitter and a fixed vocabulary.

`SimpleTokenizerV1` knows only the words it was built from; `SimpleTokenizerV2` maps
unknown words to ``<|unk|>`` and knows ``<|endoftext|>``. They exist to teach the idea;
the models use byte-pair encoding (`model.tokenizers.bpe`, `model.tokenizers.gpt2`).
"""

from __future__ import annotations

import re

SPLIT_PATTERN = r'([,.:;?_!"()\']|--|\s)'
ENDOFTEXT, UNK = "<|endoftext|>", "<|unk|>"
SPECIAL_TOKENS = (ENDOFTEXT, UNK)


def split_words(text: str) -> list[str]:
    """Split on punctuation, ``--`` and whitespace, keeping punctuation, dropping whitespace."""
    return [piece.strip() for piece in re.split(SPLIT_PATTERN, text) if piece.strip()]


def build_vocab(text: str, special_tokens: tuple[str, ...] = ()) -> dict[str, int]:
    """Token -> id for the sorted unique tokens of `text`, then `special_tokens` at the end."""
    tokens = sorted(set(split_words(text)))
    tokens += [t for t in special_tokens if t not in tokens]
    return {token: i for i, token in enumerate(tokens)}


def join_words(tokens: list[str]) -> str:
    """Join with spaces, then drop the space before punctuation (the book's rule)."""
    return re.sub(r'\s+([,.:;?!"()\'])', r"\1", " ".join(tokens))


class UnknownTokenError(KeyError):
    """A word that is not in a SimpleTokenizerV1 vocabulary."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


class SimpleTokenizerV1:
    """Word-level tokenizer over a fixed vocabulary; unknown words are an error."""

    def __init__(self, vocab: dict[str, int]):
        self.str_to_int = dict(vocab)
        self.int_to_str = {i: s for s, i in vocab.items()}

    @classmethod
    def from_text(cls, text: str) -> SimpleTokenizerV1:
        return cls(build_vocab(text))

    @property
    def vocab_size(self) -> int:
        return len(self.str_to_int)

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in split_words(text):
            if token not in self.str_to_int:
                raise UnknownTokenError(
                    f"{token!r} is not in the vocabulary ({self.vocab_size} tokens); "
                    f"SimpleTokenizerV2 maps unknown words to {UNK}"
                )
            ids.append(self.str_to_int[token])
        return ids

    def decode(self, ids: list[int]) -> str:
        return join_words([self.int_to_str[i] for i in ids])


class SimpleTokenizerV2(SimpleTokenizerV1):
    """Like V1, but unknown words become ``<|unk|>`` (the vocabulary must hold it)."""

    def __init__(self, vocab: dict[str, int]):
        if UNK not in vocab:
            raise ValueError(
                f"SimpleTokenizerV2 needs {UNK} in its vocabulary; build it with build_vocab(text, SPECIAL_TOKENS)"
            )
        super().__init__(vocab)

    @classmethod
    def from_text(cls, text: str) -> SimpleTokenizerV2:
        return cls(build_vocab(text, SPECIAL_TOKENS))

    def encode(self, text: str) -> list[int]:
        unk = self.str_to_int[UNK]
        return [self.str_to_int.get(token, unk) for token in split_words(text)]
