"""Instruction fine-tuning: ``python -m model.instruct`` (the book's chapter 7).

With no arguments it runs the book's recipe: GPT-2 medium from Hugging Face (dropout 0),
instruction-data.json split 85/10/5 (train/test/val), inputs padded per batch with the
end-of-text token and padding targets ignored, AdamW(lr 5e-5, weight decay 0.1),
batch 8, 2 epochs, train/val loss every 5 steps over 5 batches, then a greedy response
(up to 256 tokens, stopping at end-of-text, with the KV cache) for every test entry.

Written to ``--out-dir``: ``checkpoint.safetensors`` + ``checkpoint.json`` (a plain
GPTModel; LoRA weights are merged into it), ``loss.png``, ``history.json``,
``instruction-data-with-response.json`` (the test entries plus ``model_response``) and
``scores.json`` (exact match, token F1, ROUGE-L; ``--judge`` adds an Ollama LLM judge).
``--evaluate FILE`` only scores an existing responses file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import engine
from engine import optim
from model.config import PRESETS, get_config
from model.data.datadir import DataFileNotFoundError, add_data_dir_argument
from model.data.files import write_json_atomic
from model.data.instructions import (
    InstructionDataError,
    InstructionDataset,
    collate,
    format_input,
    load_instruction_data,
    split_data,
)
from model.data.windows import DataLoader
from model.gpt import GPTModel, count_parameters, model_from_state_dict
from model.lora import merge_lora, save_lora
from model.tasks.instruction import RESPONSES_FILE, add_lora, generate_responses
from model.tasks.scoring import JudgeError, add_judge_arguments, score_entries, score_file
from model.tokenizers.gpt2 import gpt2_tokenizer
from model.training.distributed import Distributed, add_ddp_argument, run_maybe_distributed
from model.training.loop import TrainConfig, TrainingInterrupted, TrainState, train
from model.training.plot import plot_losses
from model.weights.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.weights.hf import HF_MODELS, HFDownloadError, download_hf_gpt2, load_hf_gpt2


# --- the command ---
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model.instruct",
        description="Instruction fine-tuning (the book's chapter 7): train on instruction-data.json, answer the "
                    "test entries, score the answers. With no arguments: GPT-2 medium from Hugging Face.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--evaluate", metavar="FILE", default=None,
                   help="only score an existing responses JSON (entries with model_response) and exit")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="PATH", help="start from our checkpoint (PATH.safetensors + PATH.json)")
    source.add_argument("--hf-model", choices=HF_MODELS, default=None,
                        help="start from OpenAI's GPT-2 weights, downloaded from huggingface.co into --cache-dir "
                             "(the default when no source is given: gpt2-medium, as the book)")
    source.add_argument("--hf-dir", metavar="DIR",
                        help="start from a local Hugging Face GPT-2 directory (config.json + model.safetensors)")
    source.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="start from a randomly initialised model of this preset (pipeline checks only)")
    p.add_argument("--cache-dir", metavar="DIR", default=None, help="where --hf-model downloads are kept")
    p.add_argument("--data-file", metavar="PATH", default=None,
                   help="instruction JSON to use instead of instruction-data.json from the data dir")
    add_data_dir_argument(p)
    add_ddp_argument(p)
    p.add_argument("--drop-rate", type=float, default=0.0, help="dropout rate of the model (the book uses 0)")
    p.add_argument("--max-length", type=int, default=None,
                   help="cut training sequences to this many tokens (default: the model's context length)")
    p.add_argument("--mask-prompt", action="store_true",
                   help="ignore the prompt (instruction and input) tokens in the loss: learn only the response")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=8, help="entries per batch")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay")
    p.add_argument("--eval-interval", type=int, default=5, help="evaluate train/val loss every this many steps")
    p.add_argument("--eval-iters", type=int, default=5, help="batches per loader in each evaluation")
    p.add_argument("--max-steps", type=int, default=None, help="stop training after this many optimizer steps")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="train low-rank adapters of this rank instead of all weights (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scaling numerator (update = alpha/rank * BA)")
    p.add_argument("--no-sample", action="store_true",
                   help="do not generate a response to the first validation prompt after each epoch")
    p.add_argument("--max-test-entries", type=int, default=None, help="answer only the first N test entries")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens generated per response")
    add_judge_arguments(p)
    p.add_argument("--seed", type=int, default=123, help="seed of weight init and data order")
    p.add_argument("--backend", choices=("numpy", "triton"), default=None,
                   help="engine backend (default: triton with a CUDA GPU, else numpy)")
    p.add_argument("--out-dir", default="runs/instruct", help="where checkpoint, plot, responses and scores go")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def load_start_model(args: argparse.Namespace) -> tuple[GPTModel, str]:
    """The model to fine-tune, with the given dropout rate, and a description of it."""
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        config = dataclasses.replace(ckpt.config, drop_rate=args.drop_rate)
        try:
            return model_from_state_dict(config, ckpt.state_dict), f"checkpoint {ckpt.path}"
        except KeyError as err:
            raise CheckpointError(f"{ckpt.path}: weights do not fit its config: {err.args[0]}") from None
    if args.hf_dir:
        return load_hf_gpt2(args.hf_dir, drop_rate=args.drop_rate), f"Hugging Face GPT-2 from {args.hf_dir}"
    if args.preset:
        return GPTModel(get_config(args.preset, drop_rate=args.drop_rate)), f"untrained {args.preset!r} (random init)"
    name = args.hf_model or "gpt2-medium"
    return load_hf_gpt2(download_hf_gpt2(name, args.cache_dir), drop_rate=args.drop_rate), f"Hugging Face {name}"


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "eval_interval", "eval_iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "max_test_entries", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_new_tokens < 0 or args.lora_rank < 0:
        parser.error("--max-new-tokens and --lora-rank must be >= 0")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    judge = dict(judge=args.judge, judge_model=args.judge_model, ollama_url=args.ollama_url,
                 judge_timeout=args.judge_timeout, progress=not args.no_progress)
    try:
        if args.evaluate:
            score_file(args.evaluate, **judge)
            return 0
        _check_args(parser, args)
        if args.backend:
            engine.set_backend(args.backend)
        # NOTE: launched by torchrun, every process trains data-parallel; --batch-size is per process.
        return run_maybe_distributed(lambda distributed: _fine_tune(parser, args, judge, distributed),
                                     args.ddp_timeout)
    except (InstructionDataError, DataFileNotFoundError, CheckpointError, HFDownloadError, JudgeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _fine_tune(parser: argparse.ArgumentParser, args: argparse.Namespace, judge: dict[str, Any],
               distributed: Distributed | None = None) -> int:
    """Fine-tune, then answer and score the test entries (rank 0 alone after training).

    Under DDP each rank's loss is the token mean of its shard and the gradients are averaged
    over ranks, so the step equals the one-process step only when the shards hold equally
    many target tokens (close, not exact, with padding)."""
    world = 1 if distributed is None else distributed.world_size
    is_main = distributed is None or distributed.is_main
    print_ = print if is_main else (lambda *args, **kwargs: None)  # only rank 0 talks
    engine.manual_seed(args.seed)
    progress = not args.no_progress
    model, source = load_start_model(args)
    config = model.config
    max_length = args.max_length or config.context_length
    if max_length > config.context_length:
        parser.error(f"--max-length {max_length} exceeds the model's context length {config.context_length}")

    tokenizer = gpt2_tokenizer(args.data_dir)
    data = load_instruction_data(args.data_file, args.data_dir)
    train_data, test_data, val_data = split_data(data)
    if not train_data or not val_data:
        raise InstructionDataError(f"{len(data)} entries are too few: the 85/10/5 split leaves "
                                   f"{len(train_data)} for training and {len(val_data)} for validation")
    if args.max_test_entries is not None:
        test_data = test_data[:args.max_test_entries]
    train_set, val_set = InstructionDataset(train_data, tokenizer), InstructionDataset(val_data, tokenizer)
    batch_fn = functools.partial(collate, allowed_max_length=max_length, mask_prompt=args.mask_prompt)
    train_loader = DataLoader(train_set, args.batch_size * world, shuffle=True, drop_last=True, seed=args.seed,
                              collate_fn=batch_fn)
    val_loader = DataLoader(val_set, args.batch_size * world, shuffle=False, drop_last=False, collate_fn=batch_fn)
    cut = sum(len(ex.ids) > max_length for ex in train_set.examples)
    print_(f"{len(data)} entries: {len(train_data)} train / {len(test_data)} test / {len(val_data)} val; "
           f"{len(train_loader)} training batches of {args.batch_size * world}; {cut} training sequences cut to "
           f"{max_length} tokens")
    if args.mask_prompt:
        lost = sum(ex.prompt_length >= max_length for ex in train_set.examples)
        if lost:
            print_(f"warning: {lost} training entries have no response tokens within {max_length} tokens, so "
                   "--mask-prompt leaves them nothing to learn", file=sys.stderr)

    if args.lora_rank:
        print_(add_lora(model, args.lora_rank, args.lora_alpha))
    trainable = [p for p in model.parameters() if p.requires_grad]
    print_(f"model: {source}, {count_parameters(model):,} parameters ({sum(p.size for p in trainable):,} trainable), "
           f"backend {engine.get_backend().name}")
    optimizer = optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_args = dict(vars(args))
    if distributed is not None:
        distributed.check_same_config({k: v for k, v in run_args.items() if k not in ("data_dir", "ddp_timeout")}
                                      | {"world_size": world, "backend": engine.get_backend().name})

    def save(step: int, history: dict[str, list]) -> Path:
        if args.lora_rank:  # the adapters alone, then folded in: the checkpoint is a plain GPTModel
            save_lora(model, out_dir / "lora")
            merge_lora(model)
        return save_checkpoint(out_dir / "checkpoint", model, model.config, step=step,
                               extra={"instruct_args": run_args, "history": history})

    train_config = TrainConfig(
        epochs=args.epochs, lr=args.lr, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
        max_steps=args.max_steps, sample_prompt=None if args.no_sample else format_input(val_data[0]),
    )
    state = TrainState()
    start = time.perf_counter()
    try:
        history = train(model, optimizer, train_loader, val_loader, train_config, tokenizer=tokenizer, state=state,
                        save_fn=lambda st: save(st.step, st.history), progress=progress, distributed=distributed)
    except TrainingInterrupted as stop:
        if not is_main:
            return 130
        _write_history(out_dir, stop.state.history)
        print_(f"\ninterrupted after step {stop.state.step}; checkpoint saved to {stop.checkpoint}", file=sys.stderr)
        return 130
    train_seconds = time.perf_counter() - start
    steps = state.step
    if not is_main:  # rank 0 alone saves, answers the test entries and scores them
        return 0
    ckpt = save(steps, history)
    plot = _write_history(out_dir, history)
    if history["train_loss"]:
        print_(f"trained {steps} steps in {train_seconds:.1f} s: train loss {history['train_loss'][-1]:.3f}, "
               f"val loss {history['val_loss'][-1]:.3f}; checkpoint {ckpt}" + (f", loss plot {plot}" if plot else ""))

    start = time.perf_counter()
    responses = generate_responses(model, tokenizer, test_data, args.max_new_tokens, progress)
    responses_path = write_json_atomic(out_dir / RESPONSES_FILE, responses)
    print_(f"{len(responses)} test responses in {time.perf_counter() - start:.1f} s -> {responses_path}")
    scored = score_entries(responses, **judge)
    write_json_atomic(out_dir / "scores.json", scored)
    return 0


def _write_history(out_dir: Path, history: dict[str, list]) -> Path | None:
    """history.json, and loss.png when there is at least one evaluation."""
    write_json_atomic(out_dir / "history.json", history)
    return plot_losses(history, out_dir / "loss.png") if history["step"] else None


if __name__ == "__main__":
    sys.exit(main())
