"""The SMS Spam Collection for classification fine-tuning (the book's chapter 6 data).

Pipeline, as the book does it (its pandas calls are mirrored with NumPy):

1. `read_sms_spam`: ``sms_spam_collection/SMSSpamCollection.tsv`` from the data dir,
   5574 lines ``label<TAB>text`` (4827 ham, 747 spam). Fields are NOT quoted, so each line
   is split on its first tab by hand (a CSV reader with default quoting merges lines);
   a CRLF line end (a file saved on Windows) loses its CR.
   A missing file, a line without a tab or a label other than ham/spam raises
   `SpamDataError` naming the file and the line: nothing is skipped silently.
2. `balance`: ham undersampled to the number of spam messages (747 + 747 = 1494), the
   sample drawn as ``DataFrame.sample(n, random_state=seed)`` draws it
   (``RandomState(seed).choice(n_ham, n_spam, replace=False)``), ham first, then spam.
3. `random_split`: a seeded shuffle of all rows (``sample(frac=1, random_state=seed)``),
   then 70 / 10 / 20 %: ``train_end = int(n * 0.7)``, ``val_end = train_end + int(n * 0.1)``
   (1045 / 149 / 300 for 1494 rows).
4. `SpamDataset`: each message as GPT-2 BPE ids, truncated to ``max_length`` and padded
   with ``<|endoftext|>`` (50256) to one length. The training set is padded to its
   longest message (at most the model's context length); validation and test use the
   training set's length, as the book does. Labels: ham = 0, spam = 1.

NOTE on truncation: a message with more than ``max_length`` tokens keeps its FIRST
``max_length`` tokens (the book's behaviour). That is never silent: the dataset counts
them in ``num_truncated`` (the training command prints it) and `encode_message` warns
with `TruncationWarning` when asked to.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from model.data.datadir import data_file
from model.data.windows import DataLoader
from model.tokenizers.gpt2 import encode_text

SPAM_FILE = "sms_spam_collection/SMSSpamCollection.tsv"
LABELS = ("ham", "spam")  # index = class id
CLASS_NAMES = ("not spam", "spam")  # what `predict` prints for class 0 and 1
PAD_TOKEN_ID = 50256  # GPT-2's <|endoftext|>
SPLIT_SEED = 123  # the book's random_state for balancing and splitting


class SpamDataError(ValueError):
    """The spam file is missing or malformed; the message names the file (and the line)."""


class TruncationWarning(UserWarning):
    """A message had more tokens than the model takes and was cut to its first ``max_length``."""


@dataclass(frozen=True)
class Message:
    label: int  # 0 = ham, 1 = spam
    text: str
    line: int  # 1-based line number in the source file


# --- reading, balancing, splitting ---
def read_sms_spam(path: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None) -> list[Message]:
    """Every message of the SMS Spam Collection, in file order.

    ``path`` names the TSV file directly; otherwise it is `SPAM_FILE` in the data dir
    (``--data-dir`` / ``$SCRATCHGPT_DATA_DIR``, downloaded when online and missing)."""
    path = Path(path) if path is not None else data_file(SPAM_FILE, data_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpamDataError(
            f"{path}: SMS spam file not found (expected {SPAM_FILE} in the data dir: pass --data-dir DIR "
            "or set SCRATCHGPT_DATA_DIR)"
        ) from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise SpamDataError(f"{path}, line {line}: not valid UTF-8 ({err.reason})") from None
    # NOTE: split on "\n" only: str.splitlines() would also break lines at the C1 control
    # characters (e.g. U+0085) that such files carry inside messages.
    lines = content.split("\n")
    if lines and lines[-1] == "":  # the final newline ends the last line; it starts no new one
        lines.pop()
    messages = []
    for number, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        label, tab, text = line.partition("\t")
        if not tab:
            raise SpamDataError(f"{path}, line {number}: no tab separating label and text in {line[:60]!r}")
        if label not in LABELS:
            raise SpamDataError(f"{path}, line {number}: label {label[:40]!r} is neither 'ham' nor 'spam'")
        messages.append(Message(LABELS.index(label), text, number))
    if not messages:
        raise SpamDataError(f"{path}: the file holds no messages")
    return messages


def balance(messages: Sequence[Message], seed: int = SPLIT_SEED) -> list[Message]:
    """All spam plus as many ham messages, drawn without replacement (the book's
    create_balanced_dataset): the sampled ham first, then the spam in file order."""
    ham = [m for m in messages if m.label == 0]
    spam = [m for m in messages if m.label == 1]
    if len(ham) < len(spam):
        raise ValueError(f"balance: only {len(ham)} ham messages for {len(spam)} spam")
    picked = np.random.RandomState(seed).choice(len(ham), size=len(spam), replace=False)
    return [ham[i] for i in picked] + spam


def random_split(
    items: Sequence[Any], train_frac: float = 0.7, val_frac: float = 0.1, seed: int = SPLIT_SEED
) -> tuple[list[Any], list[Any], list[Any]]:
    """(train, val, test) after a seeded shuffle, as the book's random_split: the first
    ``int(n * train_frac)`` items train, the next ``int(n * val_frac)`` validate, the rest test."""
    if not (0 <= train_frac and 0 <= val_frac and train_frac + val_frac <= 1):
        raise ValueError(f"random_split: need 0 <= train_frac, val_frac and a sum <= 1, got {train_frac}, {val_frac}")
    order = np.random.RandomState(seed).choice(len(items), size=len(items), replace=False)
    shuffled = [items[i] for i in order]
    train_end = int(len(items) * train_frac)
    val_end = train_end + int(len(items) * val_frac)
    return shuffled[:train_end], shuffled[train_end:val_end], shuffled[val_end:]


# --- tokenising ---
def encode_message(
    tokenizer: Any, text: str, max_length: int, pad_token_id: int = PAD_TOKEN_ID, warn: bool = False
) -> tuple[np.ndarray, bool]:
    """(ids (max_length,) int64, truncated): ``text`` as BPE ids, cut to its first
    ``max_length`` tokens and right-padded with ``pad_token_id``.

    ``<|endoftext|>`` inside ``text`` is ordinary text here (it cannot end a message early).
    With ``warn``, a truncation raises a `TruncationWarning` saying how much was cut."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    ids = encode_text(tokenizer, text)
    truncated = len(ids) > max_length
    if truncated and warn:
        warnings.warn(
            f"the message has {len(ids)} tokens, more than the {max_length} the classifier takes: only its first "
            f"{max_length} tokens are classified",
            TruncationWarning,
            stacklevel=2,
        )
    out = np.full(max_length, pad_token_id, dtype=np.int64)
    out[: min(len(ids), max_length)] = ids[:max_length]
    return out, truncated




class SpamDataset:
    """Messages as fixed-length id arrays with their labels: item ``i`` is
    ``(ids (max_length,) int64, label int64)``.

    Without ``max_length`` the length is that of the longest message, capped at
    ``context_length`` (the book's training set); with it, every message is cut or
    padded to ``max_length`` (the book's validation and test sets). ``num_truncated``
    counts the messages that lost tokens."""

    def __init__(
        self,
        messages: Sequence[Message],
        tokenizer: Any,
        max_length: int | None = None,
        context_length: int | None = None,
        pad_token_id: int = PAD_TOKEN_ID,
    ):
        if not messages:
            raise ValueError("SpamDataset: no messages")
        encoded = [encode_text(tokenizer, m.text) for m in messages]
        if max_length is None:
            max_length = max(len(ids) for ids in encoded)
            if context_length is not None:
                max_length = min(max_length, context_length)
        elif context_length is not None and max_length > context_length:
            raise ValueError(f"SpamDataset: max_length {max_length} exceeds the context length {context_length}")
        if max_length < 1:
            raise ValueError(f"SpamDataset: max_length must be >= 1, got {max_length}")
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.messages = list(messages)
        self.inputs = np.full((len(encoded), max_length), pad_token_id, dtype=np.int64)  # (N, L)
        for row, ids in zip(self.inputs, encoded):
            row[: min(len(ids), max_length)] = ids[:max_length]
        self.labels = np.array([m.label for m in messages], dtype=np.int64)  # (N,)
        self.truncated_lines = [m.line for m, ids in zip(messages, encoded) if len(ids) > max_length]

    @property
    def num_truncated(self) -> int:
        return len(self.truncated_lines)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.int64]:
        return self.inputs[index], self.labels[index]


@dataclass
class SpamData:
    train: SpamDataset
    val: SpamDataset
    test: SpamDataset
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader

    @property
    def max_length(self) -> int:
        return self.train.max_length

    def truncation_note(self) -> str | None:
        """One line on how many messages were cut (None when none were)."""
        splits = (("train", self.train), ("val", self.val), ("test", self.test))
        counts = {name: ds.num_truncated for name, ds in splits}
        if not any(counts.values()):
            return None
        parts = ", ".join(f"{n} {name}" for name, n in counts.items() if n)
        return (f"note: {parts} message(s) had more than {self.max_length} tokens; only their first "
                f"{self.max_length} tokens are used")


def create_spam_loaders(
    tokenizer: Any,
    context_length: int,
    max_length: int | None = None,
    batch_size: int = 8,
    seed: int = 123,
    data_dir: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
    split_seed: int = SPLIT_SEED,
    pad_token_id: int = PAD_TOKEN_ID,
) -> SpamData:
    """The book's three loaders over the balanced, split SMS spam data.

    The training set is padded to its longest message, cut to ``max_length`` (default and
    upper bound: ``context_length``); validation and test take the training length.
    Training batches are shuffled (order seeded by ``seed``) with the last partial batch
    dropped; validation and test are in order with every example. ``pad_token_id``: the
    tokenizer's end-of-text (GPT-2's by default)."""
    if max_length is not None and not 1 <= max_length <= context_length:
        raise ValueError(f"max_length must be in [1, {context_length}] (the context length), got {max_length}")
    messages = balance(read_sms_spam(path, data_dir), split_seed)
    train_msgs, val_msgs, test_msgs = random_split(messages, 0.7, 0.1, split_seed)
    train = SpamDataset(train_msgs, tokenizer, max_length, context_length=context_length, pad_token_id=pad_token_id)
    val = SpamDataset(val_msgs, tokenizer, train.max_length, pad_token_id=pad_token_id)
    test = SpamDataset(test_msgs, tokenizer, train.max_length, pad_token_id=pad_token_id)
    return SpamData(
        train, val, test,
        DataLoader(train, batch_size, shuffle=True, drop_last=True, seed=seed),
        DataLoader(val, batch_size, shuffle=False, drop_last=False, seed=seed),
        DataLoader(test, batch_size, shuffle=False, drop_last=False, seed=seed),
    )
