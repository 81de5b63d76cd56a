"""The per-step record of a run: ``metrics.csv`` in the out-dir, and TensorBoard event files on request.

`MetricsLog` is an ``on_step`` hook of `model.training.loop.train`: after every optimizer
step it appends one row (step, tokens seen, the step's training loss, the validation loss
when the step was evaluated, learning rate, gradient norm before clipping, tokens per second,
seconds elapsed) and flushes it, so the file is complete up to the last finished step even
when the process is killed. A resumed run keeps the rows up to its checkpoint's step (the
file is rewritten atomically without the later ones, which the resumed run redoes) and
goes on counting elapsed time from there.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import time
from pathlib import Path
from typing import Any

from model.data.files import atomic_write

COLUMNS = ("step", "tokens_seen", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s")
TENSORBOARD_MISSING = ("--tensorboard needs the tensorboard and torch packages (torch.utils.tensorboard writes the "
                       "files): pip install -e '.[tensorboard]', or leave out --tensorboard")


def tensorboard_available() -> bool:
    """Whether `tensorboard_writer` can work: both packages are installed (checked without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("tensorboard", "torch"))


def tensorboard_writer(log_dir: str | os.PathLike) -> Any:
    """A TensorBoard ``SummaryWriter`` on `log_dir`; ImportError (with `TENSORBOARD_MISSING`) without the package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(TENSORBOARD_MISSING) from err
    return SummaryWriter(log_dir=str(log_dir))


class MetricsLog:
    """Appends a row to `path` per step (see the module docstring); with `tensorboard` (a
    SummaryWriter) the same scalars go to its event files."""

    def __init__(self, path: str | os.PathLike, state: Any, tensorboard: Any = None):
        """`state`: the `TrainState` the run starts from (step 0, or a resumed one)."""
        self.path = Path(path)
        self.tensorboard = tensorboard
        self.elapsed_before = _keep_rows_up_to(self.path, state.step)
        self.start = self.last_time = time.perf_counter()
        self.last_tokens = state.tokens_seen
        self.file = open(self.path, "a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.file)
        if self.file.tell() == 0:
            self.writer.writerow(COLUMNS)

    def __call__(self, state: Any, loss: float) -> None:
        now = time.perf_counter()
        h = state.history
        evaluated = bool(h["step"]) and h["step"][-1] == state.step
        rate = (state.tokens_seen - self.last_tokens) / (now - self.last_time) if now > self.last_time else None
        row = {"step": state.step, "tokens_seen": state.tokens_seen, "train_loss": loss,
               "val_loss": h["val_loss"][-1] if evaluated else None, "lr": h["lr"][-1] if h["lr"] else None,
               "grad_norm": h["grad_norm"][-1] if h["grad_norm"] else None, "tokens_per_s": rate,
               "elapsed_s": self.elapsed_before + now - self.start}
        self.writer.writerow(["" if row[c] is None else f"{row[c]:.6g}" if isinstance(row[c], float) else row[c]
                              for c in COLUMNS])
        self.file.flush()
        if self.tensorboard is not None:
            for name in COLUMNS[2:-1]:
                if row[name] is not None:
                    self.tensorboard.add_scalar(name, row[name], state.step)
            self.tensorboard.flush()
        self.last_time, self.last_tokens = now, state.tokens_seen

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a metrics.csv, as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _keep_rows_up_to(path: Path, step: int) -> float:
    """Drop the rows after `step` from `path` (atomically; a fresh run, step 0, drops all);
    returns the elapsed seconds of the last row kept."""
    if not path.is_file():
        return 0.0
    rows = [r for r in read_metrics(path) if r.get("step", "").isdigit() and int(r["step"]) <= step]
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: tmp.write_text(out.getvalue(), encoding="utf-8", newline=""))
    return float(rows[-1]["elapsed_s"] or 0) if rows else 0.0
