"""Pretraining a GPT on a text file or a prepared corpus: ``python -m model.train`` (the book's chapter 5).

With no arguments it reproduces the book's run: GPT-2 small with a 256-token context on
the-verdict.txt (90/10 split, stride = context), AdamW(lr 4e-4, weight decay 0.1),
batch 2, 10 epochs, train/val loss every 5 steps over the first 5 batches of each
loader, and a greedy continuation of "Every effort moves you" after each epoch. It
writes the loss curve (``loss.png``), the history (``history.json``) and a checkpoint
(``checkpoint.safetensors``, metadata in its header) to ``--out-dir``.

``--init-from gpt2|...|DIR|CHECKPOINT`` continues pretraining from those weights (weights only: a
fresh optimizer and step count; the model's config is the source's).
``--data DIR`` trains on a corpus tokenized once by ``python -m model.prepare_data`` instead,
read through a memory map (random windows, or ``--sequential``), so it may be larger than memory.

Ctrl-C or SIGTERM saves a checkpoint (``--save-every N``: every N steps too) that
``--resume`` continues with exactly the losses an uninterrupted run would have had; a
NaN/inf loss stops the run with exit code 3 and saves nothing (README: when things go
wrong). Launched by torchrun (``torchrun --nproc_per_node=N -m model.train ...``) it
trains data-parallel: ``--batch-size`` is then per process, so the run equals a
one-process run with batch N x batch size; only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import engine
from model.config import INIT_SCHEMES
from model.data.datadir import data_file
from model.data.token_files import TokenFileError, token_file_loaders
from model.data.windows import create_dataloaders
from model.gpt import count_parameters
from model.lora import apply_block_lora
from model.tokenizers.gpt2 import gpt2_tokenizer
from model.training import run
from model.training.cli import Recipe, add_training_command_arguments, command_parser
from model.training.loop import TrainState, calc_loss_batch, perplexity
from model.weights.hf import HF_MODELS

RECIPE = Recipe(out_dir="runs/pretrain", epochs=10, batch_size=2, lr=4e-4, eval_interval=5, drop_rate=0.1,
                start="random initialisation of gpt2-small at context length 256, as the book",
                preset="gpt2-small", context_length=256)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("train", "Pretrain a GPT on a text file. With no arguments: the book's chapter-5 run "
                                "(GPT-2 small, context 256, the-verdict.txt, 10 epochs).")
    p.add_argument("--data-file", default="the-verdict.txt",
                   help="training text: a path to an existing file, or a name relative to the data dir")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="train on a corpus prepared by python -m model.prepare_data (train.bin / val.bin, read "
                        "through a memory map) instead of --data-file")
    p.add_argument("--sequential", action="store_true",
                   help="with --data: consecutive windows in file order instead of random windows")
    p.add_argument("--init-from", metavar="SOURCE", default=None,
                   help="continued pretraining from these weights, with their config and a fresh optimizer: "
                        f"{', '.join(HF_MODELS)} (downloaded from huggingface.co), a Hugging Face GPT-2 directory, "
                        "or our checkpoint (a path, or a run's out-dir holding checkpoint.safetensors)")
    p.add_argument("--init", choices=INIT_SCHEMES, default="book",
                   help="weight init of a random model: 'book' = PyTorch's layer defaults, as the book's model "
                        "(reaches the book's losses); 'gpt2' = N(0, 0.02) weights and zero biases, as GPT-2")
    p.add_argument("--sample-prompt", default="Every effort moves you",
                   help="prompt continued greedily (50 tokens) after each epoch")
    p.add_argument("--no-sample", action="store_true", help="do not generate a sample after each epoch")
    add_training_command_arguments(p, RECIPE)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, checkpoint = run.parse_with_resume(parser, argv)
    if args.init_from:
        _resolve_init_from(parser, args)
    if args.sequential and not args.data:
        parser.error("--sequential applies to --data DIR only; --data-file batches are shuffled windows")
    return run.run_command(parser, args, _run, user_errors=(TokenFileError,), resume=checkpoint)


def _resolve_init_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Turn --init-from into the start-model flag it means (--hf-model, --hf-dir or --checkpoint)."""
    source = args.init_from
    path = Path(source).expanduser()
    if source in HF_MODELS:
        flag, value = "hf_model", source
    elif (path / "config.json").is_file():
        flag, value = "hf_dir", str(path)
    elif path.is_dir() and (path / "checkpoint.safetensors").is_file():
        flag, value = "checkpoint", str(path / "checkpoint")
    elif path.with_suffix(".safetensors").is_file() or path.is_file():
        flag, value = "checkpoint", str(path)
    else:
        parser.error(f"--init-from {source}: not one of {', '.join(HF_MODELS)}, a Hugging Face GPT-2 directory "
                     "(with config.json) or our checkpoint (PATH.safetensors, or a directory holding "
                     "checkpoint.safetensors)")
    others = [f"--{f.replace('_', '-')}" for f in ("checkpoint", "hf_model", "hf_dir", "preset")
              if getattr(args, f) and (f, getattr(args, f)) != (flag, value)]
    if others:
        parser.error(f"--init-from names the start model; leave out {', '.join(others)}")
    setattr(args, flag, value)


def _read_text(ctx: run.RunContext) -> tuple[str, Path]:
    """The text of --data-file: a path, or a name in the data dir."""
    path = Path(ctx.args.data_file).expanduser()
    if not (path.is_absolute() or path.exists()):
        path = data_file(ctx.args.data_file, ctx.args.data_dir)
    if not path.is_file():
        ctx.error(f"--data-file {path}: {'a directory' if path.is_dir() else 'no such file'}, expected a text file")
    try:
        return path.read_text(encoding="utf-8"), path
    except UnicodeDecodeError as err:
        ctx.error(f"--data-file {path}: not UTF-8 text (byte {err.start}: {err.reason}): convert it to UTF-8")


def _loaders(ctx: run.RunContext, context_length: int, tokenizer: Any) -> tuple[Any, Any, str]:
    """(train, val) loaders of global batches, and the data's name: --data DIR, else --data-file."""
    args = ctx.args
    batch_size = args.batch_size * ctx.world_size
    if args.data:
        train_loader, val_loader = token_file_loaders(args.data, context_length, batch_size,
                                                      sequential=args.sequential, seed=args.seed)
        return train_loader, val_loader, str(args.data)
    text, text_path = _read_text(ctx)
    try:
        train_loader, val_loader = create_dataloaders(text, tokenizer, context_length, context_length, batch_size,
                                                      train_fraction=0.9, seed=args.seed)
    except ValueError as err:  # a text too short for the context length
        ctx.error(f"--data-file {text_path}: {err}: use a longer text or a smaller --context-length")
    return train_loader, val_loader, text_path.name


def _run(ctx: run.RunContext) -> int:
    args = ctx.args
    tokenizer = gpt2_tokenizer(args.data_dir)
    model, source = run.start_model(ctx, RECIPE, allow_decoder=False, qkv_bias=False, init=args.init)
    if args.lora_rank:
        ctx.print(apply_block_lora(model, args.lora_rank, args.lora_alpha))
    optimizer = run.make_optimizer(model, args)
    state = run.resumed_state(ctx, model, optimizer)
    config = model.config
    train_loader, val_loader, data_name = _loaders(ctx, config.context_length, tokenizer)
    ctx.check_same_config()
    ctx.print(f"{data_name}: {len(train_loader)} training and {len(val_loader)} validation batches of "
              f"{args.batch_size * ctx.world_size} x {config.context_length} tokens"
              + (f" ({ctx.world_size} processes x {args.batch_size})" if ctx.distributed is not None else ""))
    ctx.print(f"model: {source}, {count_parameters(model):,} parameters, backend {engine.get_backend().name} "
              f"({args.precision})")

    def save(st: TrainState, **kwargs: Any) -> Path:
        return run.save_run(ctx, model, st, optimizer=optimizer, **kwargs)

    start = time.perf_counter()
    loop_config = run.make_train_config(args, None if args.no_sample else args.sample_prompt)
    state = run.fit(ctx, model, optimizer, train_loader, val_loader, loop_config, loss_fn=calc_loss_batch, save=save,
                    state=state, tokenizer=tokenizer, resume_command="python -m model.train")
    elapsed = time.perf_counter() - start
    if not ctx.is_main:
        # NOTE: rank 0 alone writes. No barrier: torchrun ends the job when every process has
        # exited, and a barrier would put a multi-GB save under --ddp-timeout.
        return 0
    path = save(state)
    plot = run.write_history(ctx, state.history)
    history = state.history
    if history["train_loss"]:
        tl, vl = history["train_loss"][-1], history["val_loss"][-1]
        print(f"final (step {history['step'][-1]}): train loss {tl:.3f} (ppl {perplexity(tl):.2f}), "
              f"val loss {vl:.3f} (ppl {perplexity(vl):.2f})")
    print(f"trained {state.step} steps in {elapsed:.1f} s; checkpoint {path}" + (f", loss plot {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
