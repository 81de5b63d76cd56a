"""Spam classification with a GPT (the book's chapter 6): the model, its loss, accuracy and prediction.

`GPTClassifier` is a GPT body (GPT-2, or a Llama 3 / Qwen3 `DecoderModel`) with its
language-model head swapped for a 2-class head; the
class comes from the logits of the LAST token, the only position that has seen the whole
(right-padded) message. A message with more tokens than the classifier's ``max_length`` is
cut to its first ``max_length`` tokens, as in the book (`classify_text` warns with a
`TruncationWarning`).

Checkpoint parameter names: ``gpt.<body name>`` for the body (``gpt.wte.weight``,
``gpt.h.0.attn.c_attn.weight``, ... or ``gpt.embed_tokens.weight``, ``gpt.layers.0.self_attn.q_proj.weight``,
...; its ``lm_head`` is an `Identity`) and
``classifier.weight`` (2, emb_dim), ``classifier.bias`` (2,) for the head.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

import engine
from engine import functional as F
from engine import nn
from model.data.spam import CLASS_NAMES, PAD_TOKEN_ID, encode_message
from model.decoder.model import DecoderModel
from model.gpt import GPTModel
from model.training.plot import plot_curves
from model.weights.checkpoint import CheckpointError, ModelConfig, build_model, load_checkpoint


class Identity(nn.Module):
    """Passes its input through: stands in for the GPT's language-model head."""

    def forward(self, x: Any) -> Any:
        return x


class GPTClassifier(nn.Module):
    """GPT body (``gpt``, ending at its final norm) plus a ``classifier`` head (emb_dim -> num_classes).

    ``forward(ids (B, T))`` returns logits (B, T, num_classes) at every position, as the
    book's model does; classification uses the last one, ``[:, -1, :]``."""

    def __init__(self, gpt: GPTModel | DecoderModel, num_classes: int = 2):
        super().__init__()
        gpt.lm_head = Identity()  # (B, T, E) hidden states out of the final norm; frees the vocab-sized head
        self.gpt = gpt
        self.config: ModelConfig = gpt.config
        self.num_classes = num_classes
        self.classifier = nn.Linear(gpt.config.emb_dim, num_classes)

    def forward(self, ids: Any) -> engine.Tensor:
        return self.classifier(self.gpt(ids))  # (B, T, num_classes)


# --- loss, accuracy, prediction (the book's calc_loss_batch / calc_accuracy_loader / classify_review) ---
def calc_loss_batch(input_batch: Any, target_batch: Any, model: GPTClassifier) -> engine.Tensor:
    """Mean cross-entropy of the last token's logits against the labels (B,)."""
    logits = model(input_batch)[:, -1, :]  # (B, C)
    return F.cross_entropy(logits, engine.tensor(np.asarray(target_batch)))


def calc_accuracy_loader(data_loader: Any, model: GPTClassifier, num_batches: int | None = None) -> float:
    """Share of correct last-token predictions over the first ``num_batches`` batches
    (all when None), in eval mode and without a graph (the mode is restored after)."""
    correct = seen = 0
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    with model.evaluating(), engine.no_grad():
        # NOTE: islice never asks for batch n+1, so a pass over the training loader
        # does not count as a finished epoch (see model.training.loop.calc_loss_loader).
        for input_batch, target_batch in itertools.islice(iter(data_loader), n):
            predicted = model(input_batch)[:, -1, :].numpy().argmax(axis=-1)  # (B,)
            correct += int((predicted == np.asarray(target_batch)).sum())
            seen += len(predicted)
    return correct / seen if seen else float("nan")


def record_accuracy(model: GPTClassifier, train_loader: Any, val_loader: Any, num_batches: int,
                    history: dict[str, Any], epoch: int, examples_seen: int) -> tuple[float, float]:
    """Train accuracy over `num_batches` batches and val accuracy over the whole validation set,
    appended to ``history["accuracy"]`` (per epoch: ``epoch``, ``examples_seen``, ``train_acc``,
    ``val_acc``, as the book plots them)."""
    train_acc = calc_accuracy_loader(train_loader, model, num_batches)
    val_acc = calc_accuracy_loader(val_loader, model)
    accuracy = history.setdefault("accuracy", {"epoch": [], "examples_seen": [], "train_acc": [], "val_acc": []})
    for key, value in zip(("epoch", "examples_seen", "train_acc", "val_acc"), (epoch, examples_seen, train_acc,
                                                                                val_acc)):
        accuracy[key].append(value)
    return train_acc, val_acc


def classify_text(model: GPTClassifier, tokenizer: Any, text: str, max_length: int,
                  pad_token_id: int = PAD_TOKEN_ID, class_names: tuple[str, ...] = CLASS_NAMES) -> tuple[str, float]:
    """(class name, its probability) for one message, e.g. ``("spam", 0.98)``.

    The text is encoded, cut to its first ``max_length`` tokens (with a `TruncationWarning`)
    and right-padded with ``pad_token_id`` to ``max_length``, as the training data was."""
    if max_length > model.config.context_length:
        raise ValueError(f"max_length {max_length} exceeds the model's context length {model.config.context_length}")
    if not text.strip():  # the pooled last token would be padding: the answer would mean nothing
        raise ValueError("the message is empty: give the text to classify")
    ids, _ = encode_message(tokenizer, text, max_length, pad_token_id, warn=True)
    with model.evaluating(), engine.no_grad():
        probs = model(ids[None, :])[:, -1, :].softmax(-1).numpy()[0]  # (C,)
    label = int(probs.argmax())
    return class_names[label], float(probs[label])


# --- building and loading models ---
def freeze_for_finetuning(model: GPTClassifier, mode: str) -> None:
    """``"last-block"``: only the last transformer block, the final norm and the head train
    (the book); ``"all"``: everything trains."""
    if mode == "all":
        model.requires_grad_(True)
        return
    if mode != "last-block":
        raise ValueError(f"unknown fine-tuning mode {mode!r}: 'last-block' or 'all'")
    model.requires_grad_(False)
    body = model.gpt
    last, norm = (body.layers[-1], body.norm) if isinstance(body, DecoderModel) else (body.h[-1], body.ln_f)
    for module in (last, norm, model.classifier):
        module.requires_grad_(True)


def load_classifier(path: str | Path) -> tuple[GPTClassifier, dict[str, Any]]:
    """A `GPTClassifier` from a checkpoint written by this command, and its
    ``extra["classifier"]`` settings (max_length, pad_token_id, class_names, …).
    The engine's RNG state is left as it was."""
    ckpt = load_checkpoint(path)
    info = (ckpt.extra or {}).get("classifier")
    if not isinstance(info, dict):
        raise CheckpointError(f"{ckpt.path}: not a classifier checkpoint (no extra.classifier); it was not "
                              "written by python -m model.classify")
    backend = engine.get_backend()
    rng_state = backend.rng_state()
    try:
        model = GPTClassifier(build_model(ckpt.config), int(info["num_classes"]))
    finally:
        backend.set_rng_state(rng_state)
    if ckpt.state_dict["classifier.weight"].dtype == np.float64:
        model.to("float64")
    try:
        model.load_state_dict(ckpt.state_dict)
    except KeyError as err:
        raise CheckpointError(f"{ckpt.path}: weights do not fit a classifier of its config: {err.args[0]}") from None
    return model.eval(), info


def plot_classifier_history(history: dict[str, Any], batch_size: int, steps_per_epoch: int,
                            out_dir: Path) -> list[Path]:
    """loss.png (train/val loss per evaluation) and accuracy.png (per epoch), against epochs
    with examples seen on the top axis, as the book's plot_values."""
    plots = []
    if history["step"]:
        examples = [s * batch_size for s in history["step"]]
        epochs = [s / steps_per_epoch for s in history["step"]]
        plots.append(plot_curves(epochs, {"training loss": history["train_loss"],
                                          "validation loss": history["val_loss"]},
                                 out_dir / "loss.png", xlabel="epochs", ylabel="loss", x2=examples,
                                 x2label="examples seen"))
    accuracy = history.get("accuracy")
    if accuracy and accuracy["epoch"]:
        plots.append(plot_curves(accuracy["epoch"], {"training accuracy": accuracy["train_acc"],
                                                     "validation accuracy": accuracy["val_acc"]},
                                 out_dir / "accuracy.png", xlabel="epochs", ylabel="accuracy",
                                 x2=accuracy["examples_seen"], x2label="examples seen"))
    return plots
