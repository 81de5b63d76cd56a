"""Training curves as PNG files (matplotlib, Agg backend: no display needed).

`plot_losses` draws a run's losses against steps (every step's training loss, the
evaluations marked on it, the learning rate on a second y-axis); `plot_curves` is the
generic figure the fine-tuning commands use for their loss and accuracy curves (as the book's).
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
    """A `model.training.loop.train` history against optimizer steps: the training loss of
    every step, the train and val loss of each evaluation marked on it, and the learning rate
    on a second y-axis."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    step_loss = history.get("step_loss") or []
    steps = range(1, len(step_loss) + 1)
    lines = ax.plot(steps, step_loss, linewidth=0.8, alpha=0.45, color="tab:blue", label="training loss (step)")
    lines += ax.plot(history["step"], history["train_loss"], "o-", markersize=4, color="tab:blue",
                     label="training loss (evaluation)")
    lines += ax.plot(history["step"], history["val_loss"], "s-.", markersize=4, color="tab:orange",
                     label="validation loss (evaluation)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    lr = history.get("lr") or []
    if len(lr) == len(step_loss) and lr:
        right = ax.twinx()
        lines += right.plot(steps, lr, ":", color="tab:gray", label="learning rate")
        right.set_ylabel("learning rate")
        right.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.legend(lines, [line.get_label() for line in lines], fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
