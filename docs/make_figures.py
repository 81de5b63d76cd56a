"""Make the figures of docs/book.md: ``python docs/make_figures.py`` (numpy backend, about
3 CPU-minutes; reads the-verdict.txt from the data dir).

- ``loss_curves.png``: train and validation loss of the ``tiny`` preset pretrained on
  the-verdict.txt (the book's chapter-5 figure, at CPU size).
- ``attention_weights.png``: the causal attention weights of that model's first head in its
  first block, on "Every effort moves you forward" (the book's chapter-3 heat map).
- ``lr_schedule.png``: ``engine.optim.warmup_cosine_lr`` (the book's appendix D).

The PNGs are committed with this script; rerun it after changing what they show.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import engine
from engine import functional as F
from engine import optim
from model.config import get_config
from model.data.datadir import data_file
from model.data.windows import create_dataloaders
from model.gpt import GPTModel
from model.tokenizers.gpt2 import encode_text, gpt2_tokenizer
from model.training.loop import TrainConfig, train
from model.training.plot import plot_curves, plot_losses

HERE = Path(__file__).resolve().parent
ATTENTION_PROMPT = "Every effort moves you forward"


def pretrain_tiny(tokenizer, epochs: int = 10) -> tuple[GPTModel, dict]:
    """The tiny preset on the-verdict.txt, as ``python -m model.train --preset tiny --lr 1e-3`` would."""
    engine.set_backend("numpy")
    engine.manual_seed(123)
    model = GPTModel(get_config("tiny", init="book"))
    text = data_file("the-verdict.txt").read_text(encoding="utf-8")
    context = model.config.context_length
    train_loader, val_loader = create_dataloaders(text, tokenizer, context, context, batch_size=2, seed=123)
    optimizer = optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    config = TrainConfig(epochs=epochs, eval_interval=10, eval_iters=4, sample_prompt=None)
    history = train(model, optimizer, train_loader, val_loader, config, progress=False)
    return model, history


def first_head_weights(model: GPTModel, ids: list[int]) -> np.ndarray:
    """Attention weights (T, T) of head 0 in block 0, recomputed op by op as the book does."""
    block, T = model.h[0], len(ids)
    with engine.no_grad(), model.evaluating():
        x = model.wte(np.asarray([ids])) + model.wpe(np.arange(T))  # (1, T, E)
        qkv = block.attn.c_attn(block.ln_1(x)).reshape(1, T, 3, block.attn.n_heads, block.attn.head_dim)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (1, H, T, D)
        scores = q @ k.transpose(2, 3) / block.attn.head_dim**0.5  # (1, H, T, T)
        future = engine.tensor(np.triu(np.ones((T, T), dtype=bool), k=1))
        return F.softmax(scores.masked_fill(future, float("-inf")), axis=-1).numpy()[0, 0]


def plot_attention(weights: np.ndarray, labels: list[str], path: Path) -> Path:
    import matplotlib.pyplot as plt  # model.training.plot has chosen the Agg backend

    fig, ax = plt.subplots(figsize=(5, 4.2))
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title("block 0, head 0")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    tokenizer = gpt2_tokenizer()
    model, history = pretrain_tiny(tokenizer)
    print(plot_losses(history, HERE / "loss_curves.png"))
    ids = encode_text(tokenizer, ATTENTION_PROMPT)
    labels = [tokenizer.decode([i]).strip() for i in ids]
    print(plot_attention(first_head_weights(model, ids), labels, HERE / "attention_weights.png"))
    steps = list(range(101))
    lrs = [optim.warmup_cosine_lr(s, peak_lr=1e-3, warmup_steps=10, total_steps=100, min_lr=1e-5) for s in steps]
    print(plot_curves(steps, {"learning rate": lrs}, HERE / "lr_schedule.png", xlabel="step", ylabel="learning rate",
                      title="warmup 10 steps, cosine decay to 1e-5"))


if __name__ == "__main__":
    main()
