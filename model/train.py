"""Pretraining a GPT on a text file: ``python -m model.train`` (the book's chapter 5).

With no arguments it reproduces the book's run: GPT-2 small with a 256-token context on
the-verdict.txt (90/10 split, stride = context), AdamW(lr 4e-4, weight decay 0.1),
batch 2, 10 epochs, train/val loss every 5 steps over the first 5 batches of each
loader, and a greedy continuation of "Every effort moves you" after each epoch. It
writes the loss curve (``loss.png``), the history (``history.json``) and a checkpoint
(``checkpoint.safetensors`` + ``checkpoint.json``) to ``--out-dir``.

Ctrl-C saves a checkpoint that ``--resume`` continues with exactly the losses an
uninterrupted run would have had. The loop itself is `train`, reused by the
fine-tuning commands; `calc_loss_batch`, `calc_loss_loader` and `evaluate` are the
book's evaluation helpers.

Launched by torchrun (``torchrun --nproc_per_node=N -m model.train ...``) it trains
data-parallel (model.distributed): ``--batch-size`` is then per process, so the run equals
a one-process run with batch N x batch size; only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import engine
from engine import optim
from model.config import INIT_SCHEMES, PRESETS, get_config
from model.data.datadir import DataFileNotFoundError, add_data_dir_argument, data_file
from model.data.windows import create_dataloaders
from model.gpt import GPTModel, count_parameters
from model.tokenizers.gpt2 import gpt2_tokenizer
from model.training.distributed import Distributed, add_ddp_argument, run_maybe_distributed
from model.training.loop import (
    TrainConfig,
    TrainingInterrupted,
    TrainState,
    _quiet,
    bf16_loss_batch,
    calc_loss_batch,
    perplexity,
    train,
)
from model.training.plot import plot_losses
from model.weights.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

# --- the command ---
# Flags that a resumed run does not take from its checkpoint.
_NOT_RESUMED = ("resume", "max_steps", "data_dir", "ddp_timeout")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a default worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model.train",
        description="Pretrain a GPT on a text file. With no arguments: the book's chapter-5 run "
                    "(GPT-2 small, context 256, the-verdict.txt, 10 epochs).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--data-file", default="the-verdict.txt",
                   help="training text: a path to an existing file, or a name relative to the data dir")
    add_data_dir_argument(p)
    p.add_argument("--preset", default="gpt2-small", choices=sorted(PRESETS), help="model configuration preset")
    p.add_argument("--context-length", type=int, default=256,
                   help="context length of the model and of the training windows (stride = context length)")
    p.add_argument("--drop-rate", type=float, default=0.1, help="dropout rate of the model")
    p.add_argument("--init", choices=INIT_SCHEMES, default="book",
                   help="weight init: 'book' = PyTorch's layer defaults, as the book's model (reaches the book's "
                        "losses); 'gpt2' = N(0, 0.02) weights and zero biases, as GPT-2")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per batch")
    p.add_argument("--lr", type=float, default=4e-4, help="(peak) learning rate of AdamW")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="linear learning-rate warmup from 0 over this many steps (default: 0, none)")
    p.add_argument("--min-lr", type=float, default=None,
                   help="cosine-decay the learning rate to this after warmup (default: no decay)")
    p.add_argument("--grad-clip", type=float, default=None, help="clip the global gradient norm to this (default: off)")
    p.add_argument("--eval-interval", type=int, default=5,
                   help="evaluate train/val loss every this many steps (after steps 1, 1+k, ...)")
    p.add_argument("--eval-iters", type=int, default=5, help="batches per loader in each evaluation")
    p.add_argument("--seed", type=int, default=123, help="seed of weight init, dropout and data order")
    p.add_argument("--backend", choices=("numpy", "triton"), default=None,
                   help="engine backend (default: triton with a CUDA GPU, else numpy)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="compute precision; bf16 needs the triton backend")
    p.add_argument("--out-dir", default="runs/pretrain", help="where the checkpoint, loss plot and history go")
    p.add_argument("--resume", metavar="PATH", default=None,
                   help="continue the run saved in this checkpoint (path with or without extension); "
                        "its settings are the defaults, flags given here override them")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in all")
    p.add_argument("--sample-prompt", default="Every effort moves you",
                   help="prompt continued greedily (50 tokens) after each epoch")
    p.add_argument("--no-sample", action="store_true", help="do not generate a sample after each epoch")
    add_ddp_argument(p)
    return p


def _read_text(args: argparse.Namespace) -> tuple[str, Path]:
    path = Path(args.data_file).expanduser()
    if not (path.is_absolute() or path.is_file()):
        path = data_file(args.data_file, args.data_dir)
    return path.read_text(encoding="utf-8"), path


def _set_precision(parser: argparse.ArgumentParser, precision: str) -> None:
    """Check --precision against the backend; bf16 runs the loss under `engine.autocast`."""
    backend = engine.get_backend()
    if precision != "fp32" and backend.name != "triton":
        parser.error(f"--precision {precision} needs --backend triton: the {backend.name} backend computes "
                     "in float32 only")


def _parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, Any]:
    """The arguments, and the checkpoint of --resume (None without): its saved settings are the
    defaults, so flags on this command line override them."""
    args = parser.parse_args(argv)
    checkpoint = None
    if args.resume:
        try:
            checkpoint = load_checkpoint(args.resume)
        except CheckpointError as err:
            parser.error(f"--resume: {err}")
        saved = checkpoint.extra.get("train_args")
        if not saved or "train_state" not in checkpoint.extra:
            parser.error(f"--resume {args.resume}: the checkpoint holds no training state (not written by model.train)")
        parser.set_defaults(**{k: v for k, v in saved.items() if k not in _NOT_RESUMED})
        args = parser.parse_args(argv)
        if (args.preset, args.context_length) != (saved["preset"], checkpoint.config.context_length):
            parser.error("--preset and --context-length cannot change when resuming")
    for name in ("epochs", "batch_size", "eval_interval", "eval_iters", "context_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args, checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, checkpoint = _parse_args(parser, argv)
    if args.backend:
        engine.set_backend(args.backend)
    _set_precision(parser, args.precision)
    try:
        tokenizer = gpt2_tokenizer(args.data_dir)
        text, text_path = _read_text(args)
    except DataFileNotFoundError as err:
        parser.error(str(err))
    # NOTE: launched by torchrun, every process trains data-parallel; --batch-size is per process.
    return run_maybe_distributed(
        lambda distributed: _run(parser, args, checkpoint, tokenizer, text, text_path, distributed), args.ddp_timeout
    )


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, checkpoint: Any, tokenizer: Any, text: str,
         text_path: Path, distributed: Distributed | None) -> int:
    """`main` after the arguments, the backend and the data: build, train, save."""
    backend = engine.get_backend()
    world = 1 if distributed is None else distributed.world_size
    is_main = distributed is None or distributed.is_main
    say = print if is_main else _quiet
    if checkpoint is not None:  # the data position counts global batches: their size must stay
        saved_world = checkpoint.extra.get("world_size", 1)
        saved_batch = checkpoint.extra["train_args"]["batch_size"]
        if saved_world * saved_batch != world * args.batch_size:
            parser.error(f"--resume: the run was saved with a global batch of {saved_world * saved_batch} "
                         f"({saved_world} processes x {saved_batch}), this one has {world * args.batch_size} "
                         f"({world} x {args.batch_size}): choose --batch-size so that processes x batch size stays")
    engine.manual_seed(args.seed)
    if checkpoint is None:
        config = get_config(args.preset, context_length=args.context_length, drop_rate=args.drop_rate,
                            qkv_bias=False, init=args.init)
    else:
        config = checkpoint.config
    model = GPTModel(config)
    optimizer = optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    state = TrainState()
    if checkpoint is not None:
        model.load_state_dict(checkpoint.state_dict)
        optimizer.load_state_dict(checkpoint.optimizer_state)
        state = TrainState.from_dict(checkpoint.extra["train_state"])
    train_loader, val_loader = create_dataloaders(text, tokenizer, config.context_length, config.context_length,
                                                  args.batch_size * world, train_fraction=0.9, seed=args.seed)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint"
    train_args = {k: v for k, v in vars(args).items() if k != "resume"}
    if distributed is not None:
        distributed.check_same_config({k: v for k, v in train_args.items() if k not in ("data_dir", "ddp_timeout")}
                                      | {"world_size": world, "backend": backend.name})

    def save(st: TrainState) -> Path:
        return save_checkpoint(ckpt_path, model, config, optimizer, step=st.step,
                               extra={"train_state": st.to_dict(), "train_args": train_args, "world_size": world})

    say(f"{text_path.name}: {len(train_loader)} training and {len(val_loader)} validation batches of "
        f"{args.batch_size * world} x {config.context_length} tokens"
        + (f" ({world} processes x {args.batch_size})" if distributed is not None else ""))
    say(f"model {args.preset}: {count_parameters(model):,} parameters, backend {backend.name} ({args.precision})")
    if checkpoint is not None:
        say(f"resuming from {args.resume} at step {state.step} (epoch {state.epoch + 1}, batch {state.batch})")
    train_config = TrainConfig(
        epochs=args.epochs, lr=args.lr, warmup_steps=args.warmup_steps, min_lr=args.min_lr, grad_clip=args.grad_clip,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters, max_steps=args.max_steps,
        sample_prompt=None if args.no_sample else args.sample_prompt,
    )
    start = time.perf_counter()
    try:
        history = train(model, optimizer, train_loader, val_loader, train_config, tokenizer=tokenizer,
                        loss_fn=bf16_loss_batch if args.precision == "bf16" else calc_loss_batch,
                        state=state, save_fn=save, distributed=distributed)
    except TrainingInterrupted as stop:
        if not is_main:
            return 130
        _write_outputs(out_dir, stop.state.history)
        print(f"\ninterrupted after step {stop.state.step}; checkpoint saved to {stop.checkpoint}\n"
              f"resume with: python -m model.train --resume {ckpt_path}", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - start
    if not is_main:
        # NOTE: rank 0 alone writes. No barrier: torchrun ends the job when every process has
        # exited, and a barrier would put a multi-GB save under --ddp-timeout.
        return 0
    path = save(state)
    plot = _write_outputs(out_dir, history)
    if history["train_loss"]:
        tl, vl = history["train_loss"][-1], history["val_loss"][-1]
        print(f"final (step {history['step'][-1]}): train loss {tl:.3f} (ppl {perplexity(tl):.2f}), "
              f"val loss {vl:.3f} (ppl {perplexity(vl):.2f})")
    print(f"trained {state.step} steps in {elapsed:.1f} s; checkpoint {path}"
          + (f", loss plot {plot}" if plot else ""))
    return 0


def _write_outputs(out_dir: Path, history: dict[str, list]) -> Path | None:
    """history.json, and loss.png when there is at least one evaluation."""
    (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    if not history["step"]:
        return None
    return plot_losses(history, out_dir / "loss.png")


if __name__ == "__main__":
    sys.exit(main())
