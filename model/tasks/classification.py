"""Fine-tuning a GPT as a spam classifier: ``python -m model.classify`` (the book's chapter 6).

The model is a GPT body with its language-model head swapped for a 2-class head
(`GPTClassifier`); the class comes from the logits of the LAST token, the only position
that has seen the whole (right-padded) message. By default, as the book, only the last
transformer block, the final LayerNorm and the new head are trained (``--train-all``
trains everything, ``--lora-rank R`` trains LoRA adapters instead, see model/lora.py).
Loss and accuracy use the last-token logits; AdamW(lr 5e-5, weight decay 0.1), batch 8,
5 epochs, train/val loss every 50 steps over 5 batches, train/val accuracy over 5
batches after each epoch, then accuracy on the full train/val/test loaders.

Starting points: our own GPT checkpoint (``--checkpoint``), Hugging Face GPT-2
(``--hf-model gpt2`` downloads it, ``--hf-dir DIR`` reads a local copy), or random
initialisation (``--preset``). The book's GPT-2 small run reaches 97.21 / 97.32 / 95.67 %
train / val / test accuracy.

Offline recipe (no pretrained weights): random initialisation of the ``tiny`` preset
(2 blocks, 64-dim, context 64, so messages keep their first 64 tokens), every parameter
trained with a higher learning rate, warmup, cosine decay and dropout::

    python -m model.classify --preset tiny --train-all --lr 1e-3 --warmup-steps 20 --min-lr 1e-5 --drop-rate 0.1

On the 2-core CPU with the numpy backend (seed 123, the default): 100.00 % train,
96.64 % val, 94.33 % test accuracy, 650 steps in 2.6 min (2.5 CPU-minutes; under heavy
load from other jobs the same run took 9.3 min). Seeds 1-5 gave 95.0-96.3 % test
accuracy (six seeds: mean 95.5 %). The book's GPT-2 small from random weights: 93.7 %.

Outputs in ``--out-dir``: ``classifier.safetensors`` + ``classifier.json`` (weights,
GPT config, and under ``extra.classifier`` the head, max_length, pad id and class
names; a LoRA run is merged first and its adapters also go to ``lora.*``),
``loss.png``, ``accuracy.png`` and ``history.json``.

``python -m model.classify predict "text" --checkpoint PATH`` prints ``spam`` or
``not spam`` with its probability. A message with more tokens than the classifier's
``max_length`` is cut to its first ``max_length`` tokens, as in the book, and a note
says so (`classify_text` warns with a `TruncationWarning`).

Checkpoint parameter names: ``gpt.<GPT-2 name>`` for the body (``gpt.wte.weight``,
``gpt.h.0.attn.c_attn.weight``, …; its ``lm_head`` is an `Identity`) and
``classifier.weight`` (2, emb_dim), ``classifier.bias`` (2,) for the head.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np

import engine
from engine import functional as F
from engine import nn
from model.config import GPTConfig, get_config
from model.data.spam import CLASS_NAMES, PAD_TOKEN_ID, encode_message
from model.gpt import GPTModel, model_from_state_dict
from model.weights.checkpoint import CheckpointError, load_checkpoint
from model.weights.hf import download_hf_gpt2, load_hf_gpt2

CHECKPOINT_NAME = "classifier"


class Identity(nn.Module):
    """Passes its input through: stands in for the GPT's language-model head."""

    def forward(self, x: Any) -> Any:
        return x


class GPTClassifier(nn.Module):
    """GPT body (``gpt``, ending at ``ln_f``) plus a ``classifier`` head (emb_dim -> num_classes).

    ``forward(ids (B, T))`` returns logits (B, T, num_classes) at every position, as the
    book's model does; classification uses the last one, ``[:, -1, :]``."""

    def __init__(self, gpt: GPTModel, num_classes: int = 2):
        super().__init__()
        gpt.lm_head = Identity()  # (B, T, E) hidden states out of ln_f; frees the vocab-sized head
        self.gpt = gpt
        self.config: GPTConfig = gpt.config
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
    was_training = model.training
    model.eval()
    correct = seen = 0
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    try:
        with engine.no_grad():
            # NOTE: islice never asks for batch n+1, so a pass over the training loader
            # does not count as a finished epoch (see model.train.calc_loss_loader).
            for input_batch, target_batch in itertools.islice(iter(data_loader), n):
                predicted = model(input_batch)[:, -1, :].numpy().argmax(axis=-1)  # (B,)
                correct += int((predicted == np.asarray(target_batch)).sum())
                seen += len(predicted)
    finally:
        model.train(was_training)
    return correct / seen if seen else float("nan")


def classify_text(model: GPTClassifier, tokenizer: Any, text: str, max_length: int,
                  pad_token_id: int = PAD_TOKEN_ID, class_names: tuple[str, ...] = CLASS_NAMES) -> tuple[str, float]:
    """(class name, its probability) for one message, e.g. ``("spam", 0.98)``.

    The text is encoded, cut to its first ``max_length`` tokens (with a `TruncationWarning`)
    and right-padded with ``pad_token_id`` to ``max_length``, as the training data was."""
    if max_length > model.config.context_length:
        raise ValueError(f"max_length {max_length} exceeds the model's context length {model.config.context_length}")
    ids, _ = encode_message(tokenizer, text, max_length, pad_token_id, warn=True)
    was_training = model.training
    model.eval()
    try:
        with engine.no_grad():
            probs = model(ids[None, :])[:, -1, :].softmax(-1).numpy()[0]  # (C,)
    finally:
        model.train(was_training)
    label = int(probs.argmax())
    return class_names[label], float(probs[label])


# --- building and loading models ---
def freeze_for_finetuning(model: GPTClassifier, mode: str) -> None:
    """``"last-block"``: only the last transformer block, ``ln_f`` and the head train (the
    book); ``"all"``: everything trains."""
    if mode == "all":
        model.requires_grad_(True)
        return
    if mode != "last-block":
        raise ValueError(f"unknown fine-tuning mode {mode!r}: 'last-block' or 'all'")
    model.requires_grad_(False)
    for module in (model.gpt.h[-1], model.gpt.ln_f, model.classifier):
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
        model = GPTClassifier(GPTModel(ckpt.config), int(info["num_classes"]))
    finally:
        backend.set_rng_state(rng_state)
    if ckpt.state_dict["classifier.weight"].dtype == np.float64:
        model.to("float64")
    try:
        model.load_state_dict(ckpt.state_dict)
    except KeyError as err:
        raise CheckpointError(f"{ckpt.path}: weights do not fit a classifier of its config: {err.args[0]}") from None
    return model.eval(), info


def _load_base(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[GPTModel, str]:
    """The GPT to start from and a description of it."""
    drop = {} if args.drop_rate is None else {"drop_rate": args.drop_rate}
    if args.context_length is not None and (args.checkpoint or args.hf_model or args.hf_dir):
        parser.error("--context-length only applies to random initialisation (--preset); a pretrained model "
                     "keeps its context length (use --max-length to shorten the inputs)")
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        if "classifier" in (ckpt.extra or {}):
            parser.error(f"--checkpoint {args.checkpoint} is already a classifier; give a GPT (language model) "
                         "checkpoint, e.g. from python -m model.train")
        config = dataclasses.replace(ckpt.config, **drop)
        try:
            return model_from_state_dict(config, ckpt.state_dict), f"checkpoint {ckpt.path}"
        except KeyError as err:
            raise CheckpointError(f"{ckpt.path}: weights do not fit its config: {err.args[0]}") from None
    if args.hf_model or args.hf_dir:
        hf_dir = args.hf_dir or download_hf_gpt2(args.hf_model)
        return load_hf_gpt2(hf_dir, **drop), f"Hugging Face GPT-2 {args.hf_model or hf_dir}"
    overrides = dict(drop)
    if args.context_length is not None:
        overrides["context_length"] = args.context_length
    return GPTModel(get_config(args.preset, **overrides)), f"random initialisation ({args.preset})"
