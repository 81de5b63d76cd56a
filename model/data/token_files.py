"""Training batches read straight from prepared token files (model.data.corpus) through a memory map.

`token_file_loaders(data_dir, context_length, batch_size)` returns the (train, val) loaders
of ``model.train --data``. Nothing is loaded up front: a batch reads its windows from
``np.memmap`` pages, so a corpus larger than memory trains with flat memory. An epoch is
as many windows as the split holds without overlap. Training batches are random windows
(any start offset, nanoGPT's ``get_batch``), window i of an epoch drawn from
``default_rng([seed, epoch, i])``, so the sampler needs no state beyond the loop's (epoch,
batch), which the checkpoint keeps: resume is exact. With `sequential` (and always for
validation) batch b holds the windows that follow each other from token
``b x batch_size x context_length``. Under torchrun the loaders yield global batches and
each rank computes on its own slice: disjoint windows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from model.data.corpus import META_FILE, TOKENIZER_NAME, read_meta
from model.data.windows import DataLoader


class TokenFileError(ValueError):
    """A --data directory that cannot be trained on; the message says what to do."""


class TokenWindows:
    """(input, target) windows of `context_length` tokens of a uint16 token file, indexed by
    start offset; ``len`` is the number of non-overlapping windows."""

    def __init__(self, path: str | os.PathLike, context_length: int):
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")  # (N,), never read whole
        self.context_length = context_length
        if len(self.tokens) < context_length + 1:
            raise TokenFileError(f"{path} holds {len(self.tokens)} tokens, too few for one window of context length "
                                 f"{context_length} (needs {context_length + 1}); give more text or a shorter context")

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.context_length

    def __getitem__(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        window = self.tokens[start : start + self.context_length + 1].astype(np.int64)  # (T + 1,)
        return window[:-1], window[1:]


class TokenFileLoader(DataLoader):
    """Batches of `TokenWindows`: random windows, or consecutive ones when not `random_windows`."""

    def __init__(self, windows: TokenWindows, batch_size: int, *, random_windows: bool, drop_last: bool,
                 seed: int = 0):
        super().__init__(windows, batch_size, shuffle=random_windows, drop_last=drop_last, seed=seed)

    def batch_indices(self, epoch: int, start: int) -> Iterator[np.ndarray]:
        windows: TokenWindows = self.dataset
        span = windows.context_length
        for b in range(start, len(self)):
            items = range(b * self.batch_size, min((b + 1) * self.batch_size, len(windows)))
            if self.shuffle:
                # NOTE: a generator per (seed, epoch, window) instead of a permutation of all windows:
                # memory does not grow with the corpus, any batch can be redrawn, and N batches of B
                # hold the windows of one batch of N x B (what --grad-accum relies on).
                last = len(windows.tokens) - span
                yield np.array([np.random.default_rng([self.seed, epoch, i]).integers(0, last) for i in items])
            else:
                yield np.arange(items.start, items.stop) * span


def token_file_loaders(data_dir: str | os.PathLike, context_length: int, batch_size: int, *, sequential: bool = False,
                       seed: int = 0) -> tuple[TokenFileLoader, TokenFileLoader]:
    """The (train, val) loaders of a directory written by model.data.corpus.prepare_corpus."""
    directory = Path(data_dir)
    meta = read_meta(directory)
    if meta is None:
        raise TokenFileError(f"--data {data_dir}: no {META_FILE} there; prepare the directory first with "
                             f"python -m model.prepare_data INPUT --out {data_dir}")
    if meta.get("tokenizer") != TOKENIZER_NAME or meta.get("dtype") != "uint16":
        raise TokenFileError(f"--data {data_dir}: tokenized with {meta.get('tokenizer')} ({meta.get('dtype')}), "
                             f"expected {TOKENIZER_NAME} (uint16); prepare it again with python -m model.prepare_data")
    loaders = []
    for split, train in (("train", True), ("val", False)):
        windows = TokenWindows(directory / f"{split}.bin", context_length)
        loaders.append(TokenFileLoader(windows, batch_size, random_windows=train and not sequential, drop_last=train,
                                       seed=seed))
    return loaders[0], loaders[1]
