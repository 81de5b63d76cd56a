"""Training curves as PNG files (matplotlib, Agg backend: no display needed).

`plot_losses` draws the book's chapter-5 figure (train and val loss against steps, with
tokens seen on a second x-axis); `plot_curves` is the generic version the fine-tuning
commands use for their loss and accuracy curves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def plot_curves(
    x: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    xlabel: str = "step",
    ylabel: str = "value",
    title: str | None = None,
    x2: Sequence[float] | None = None,
    x2label: str | None = None,
) -> Path:
    """Plot each of `curves` (label -> values, one per `x`) against `x` and save a PNG.

    With `x2` (e.g. tokens seen at each `x`), a second x-axis on top shows it too.
    Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, values) in enumerate(curves.items()):
        if len(values) != len(x):
            raise ValueError(f"plot_curves: curve {label!r} has {len(values)} values for {len(x)} x positions")
        ax.plot(x, values, linestyle="-" if i == 0 else "-.", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if curves:
        ax.legend()
    if x2 is not None and len(x2) == len(x) and len(x) > 0:
        # The book's trick: an invisible plot on a twin axis aligns the second scale.
        top = ax.twiny()
        top.plot(x2, next(iter(curves.values())), alpha=0)
        top.set_xlabel(x2label or "")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_losses(history: Mapping[str, Sequence[float]], path: str | os.PathLike) -> Path:
    """Train and val loss at each evaluation of a `model.training.loop.train` history, against
    optimizer steps (bottom axis) and tokens seen (top axis)."""
    return plot_curves(
        history["step"],
        {"training loss": history["train_loss"], "validation loss": history["val_loss"]},
        path,
        xlabel="step",
        ylabel="loss",
        x2=history.get("tokens_seen"),
        x2label="tokens seen",
    )
