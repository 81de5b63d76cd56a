"""Turning token ids into training batches (the book's chapter 2 data pipeline, in NumPy).

`SlidingWindowDataset` cuts one long token stream into (input, target) windows, the
target shifted one token to the right; `DataLoader` batches and shuffles them with a
reproducible per-epoch order; `create_dataloaders` does the book's train/val split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from model.tokenizers.gpt2 import encode_text


class SlidingWindowDataset:
    """Windows of `context_length` tokens every `stride` tokens, with next-token targets.

    ``inputs[i] = ids[i*stride : i*stride + context_length]`` and ``targets[i]`` is the
    same window one token later. `inputs` and `targets` are read-only views of one
    ``(N, context_length + 1)`` window array over the ids (no copy, even with stride 1).
    """

    def __init__(self, token_ids: Sequence[int] | np.ndarray, context_length: int, stride: int):
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"token_ids must be one flat sequence, got shape {ids.shape}")
        if context_length < 1 or stride < 1:
            raise ValueError(f"context_length and stride must be positive, got {context_length} and {stride}")
        if len(ids) < context_length + 1:
            raise ValueError(
                f"{len(ids)} tokens are too few for context_length {context_length}: one window "
                f"needs {context_length + 1} (inputs plus the shifted target)"
            )
        # Window starts 0, stride, 2*stride, ... while a full window plus its target fits,
        # as the book's `range(0, len(ids) - context_length, stride)`.
        windows = np.lib.stride_tricks.sliding_window_view(ids, context_length + 1)[::stride]
        self.inputs = windows[:, :-1]  # (N, T)
        self.targets = windows[:, 1:]  # (N, T)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index):
        return self.inputs[index].copy(), self.targets[index].copy()


def stack_batch(items: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Default collate: stack each field of the items into one array."""
    return tuple(np.stack(field) for field in zip(*items))


class DataLoader:
    """Batches of a dataset, shuffled with a reproducible order per epoch.

    Epoch ``e`` visits the items in ``np.random.default_rng([seed, e]).permutation(n)``
    (or in order, without `shuffle`). Each completed pass moves to the next epoch; a pass
    left early (``break``) does not, so the next pass replays the same epoch from the start.
    To resume a run exactly, save `state` and later call `load_state` (or
    ``set_epoch(epoch, batch)``): the next pass starts at that epoch's batch `batch`.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        collate_fn: Callable[[list[Any]], Any] = stack_batch,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.collate_fn = collate_fn
        self.epoch = 0  # epoch of the next pass
        self._start_batch = 0  # batch the next pass starts at (set by set_epoch)
        self._position: tuple[int, int] | None = None  # (epoch, batches done) of the outermost running pass

    def __len__(self) -> int:
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        """Item indices in the order epoch `epoch` visits them."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def batch_indices(self, epoch: int, start: int) -> Iterator[np.ndarray]:
        """The dataset indices of each batch of epoch `epoch` from its batch `start` on."""
        order = self.order(epoch)
        for b in range(start, len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]

    def __iter__(self) -> Iterator[Any]:
        epoch, start = self.epoch, self._start_batch
        self._start_batch = 0
        # NOTE: only the outermost pass is tracked in `state`, so an evaluation pass over
        # the same loader inside a training pass does not disturb what a checkpoint saves.
        outer = self._position is None
        try:
            for b, indices in enumerate(self.batch_indices(epoch, start), start):
                if outer:
                    self._position = (epoch, b + 1)
                yield self.collate_fn([self.dataset[int(i)] for i in indices])
            if self.epoch == epoch:  # unless set_epoch moved it meanwhile
                self.epoch = epoch + 1
        finally:
            if outer:
                self._position = None

    def set_epoch(self, epoch: int, batch: int = 0) -> None:
        """Make the next pass run epoch `epoch`, starting at its batch `batch`."""
        if not 0 <= batch <= len(self):
            raise ValueError(f"batch {batch} is outside an epoch of {len(self)} batches")
        self.epoch, self._start_batch = epoch, batch

    @property
    def state(self) -> dict[str, int]:
        """Where the next batch comes from: ``{"seed", "epoch", "batch"}`` (save it in checkpoints)."""
        epoch, batch = self._position if self._position is not None else (self.epoch, self._start_batch)
        if batch >= len(self) > 0:
            epoch, batch = epoch + 1, 0
        return {"seed": self.seed, "epoch": epoch, "batch": batch}

    def load_state(self, state: dict[str, int]) -> None:
        """Continue from a saved `state`."""
        if state["seed"] != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this loader has seed {self.seed}")
        self.set_epoch(state["epoch"], state["batch"])


def split_text(text: str, train_fraction: float = 0.9) -> tuple[str, str]:
    """Split `text` at character ``int(train_fraction * len(text))`` into (train, val)."""
    if not 0.0 <= train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in [0, 1], got {train_fraction}")
    split = int(train_fraction * len(text))
    return text[:split], text[split:]


def create_dataloaders(
    text: str,
    tokenizer,
    context_length: int,
    stride: int,
    batch_size: int,
    train_fraction: float = 0.9,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """The book's loaders: the first `train_fraction` of the text for training (shuffled,
    last partial batch dropped), the rest for validation (in order, all batches)."""
    loaders = []
    for name, part, train in zip(("training", "validation"), split_text(text, train_fraction), (True, False)):
        try:
            dataset = SlidingWindowDataset(encode_text(tokenizer, part), context_length, stride)
        except ValueError as err:
            raise ValueError(f"the {name} split ({len(part)} characters) is too short: {err}") from err
        loaders.append(DataLoader(dataset, batch_size, shuffle=train, drop_last=train, seed=seed))
    return loaders[0], loaders[1]
