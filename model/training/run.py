"""The run layer every training command shares: setup, the run context, one loop call, one save path.

    parser = command_parser("classify", ...); add_training_command_arguments(parser, RECIPE)
    args, resume = parse_with_resume(parser, argv)
    return run_command(parser, args, body, resume=resume)      # body(ctx: RunContext) -> exit code

`parse_with_resume` makes a --resume checkpoint's saved flags the defaults. `run_command`
checks the flags (`check_args`), sets the backend, checks --precision, runs `body` once per
process (data-parallel under torchrun) with the engine seeded, and turns a user mistake
(missing file, bad checkpoint, ...) into one ``error:`` line and exit 2. Inside the body,
`start_model` loads the start model of the shared flags (the checkpoint's config when
resuming), `make_optimizer` / `make_train_config` build AdamW and the loop's config,
`resumed_state` loads a resumed run's weights, optimizer and loop state, `fit` runs
`model.training.loop.train` with the per-step log (``metrics.csv``, model.training.metrics;
on Ctrl-C it saves through the command's save function, writes the history and returns
None: exit 130), `save_run` is the one path to disk (LoRA adapters,
merge, checkpoint with the run's state and flags) and `write_history` writes history.json
atomically with its loss plot.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import engine
from engine import optim
from model.data.datadir import DataFileNotFoundError
from model.data.files import write_json_atomic
from model.gpt import GPTModel
from model.lora import lora_layers, merge_lora, save_lora
from model.training.cli import Recipe, check_args
from model.training.distributed import Distributed, run_maybe_distributed
from model.training.loop import LossFn, TrainConfig, TrainingInterrupted, TrainState, log_line, train, under_autocast
from model.training.metrics import TENSORBOARD_MISSING, MetricsLog, tensorboard_available, tensorboard_writer
from model.training.plot import plot_losses
from model.weights.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from model.weights.hf import HFDownloadError
from model.weights.start import load_start_model

# Errors that are the user's to fix (a path, a download, a file's content): one line, exit 2.
USER_ERRORS: tuple[type[Exception], ...] = (CheckpointError, HFDownloadError, DataFileNotFoundError)
# Flags that describe where a run reads and waits, not what it computes: they may differ
# between the ranks of one run and are not restored on --resume.
LOCAL_FLAGS = ("resume", "data_dir", "ddp_timeout", "no_progress")
NOT_RESUMED = LOCAL_FLAGS + ("max_steps",)  # a resumed run may stop elsewhere
START_FLAGS = ("checkpoint", "hf_model", "hf_dir", "preset", "context_length")  # fixed once a run started


@dataclass
class RunContext:
    """One process's view of a run: its flags, rank, output dir, and rank-0 printing."""

    parser: argparse.ArgumentParser
    args: argparse.Namespace
    distributed: Distributed | None = None
    resume: Checkpoint | None = None  # the checkpoint of --resume
    out_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.args.out_dir)

    @property
    def world_size(self) -> int:
        return 1 if self.distributed is None else self.distributed.world_size

    @property
    def rank(self) -> int:
        return 0 if self.distributed is None else self.distributed.rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def progress(self) -> bool:
        return not self.args.no_progress

    @property
    def run_args(self) -> dict[str, Any]:
        """The flags that define the run (saved with the checkpoint, compared between ranks)."""
        return {k: v for k, v in vars(self.args).items() if k not in LOCAL_FLAGS}

    def print(self, *args: Any, **kwargs: Any) -> None:
        """`print` on rank 0; the other ranks stay quiet."""
        if self.is_main:
            print(*args, **kwargs)

    def log(self, message: str) -> None:
        """A line above the progress bar, on rank 0."""
        if self.is_main:
            log_line(message)

    def error(self, message: str) -> NoReturn:
        """A user mistake found after parsing: ``usage``, one line, exit 2."""
        self.parser.error(message)

    def check_same_config(self) -> None:
        """Under torchrun: stop unless every rank got the same flags and backend."""
        if self.distributed is not None:
            self.distributed.check_same_config(self.run_args | {"world_size": self.world_size,
                                                                "backend": engine.get_backend().name})


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace, body: Callable[[RunContext], int],
                user_errors: tuple[type[Exception], ...] = (), resume: Checkpoint | None = None) -> int:
    """Check the flags, set the backend, and run ``body(ctx)`` in every process; its exit code.
    `resume`: the checkpoint `parse_with_resume` read."""
    check_args(parser, args)
    if getattr(args, "tensorboard", False) and not tensorboard_available():
        parser.error(TENSORBOARD_MISSING)
    if args.backend:
        engine.set_backend(args.backend)
    backend = engine.get_backend()
    if args.precision != "fp32" and backend.name != "triton":
        parser.error(f"--precision {args.precision} needs --backend triton: the {backend.name} backend computes "
                     "in float32 only")

    def in_process(distributed: Distributed | None) -> int:
        engine.manual_seed(args.seed)
        return body(RunContext(parser, args, distributed, resume))

    try:
        # NOTE: launched by torchrun, every process trains data-parallel; --batch-size is per process.
        return run_maybe_distributed(in_process, args.ddp_timeout)
    except USER_ERRORS + user_errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def parse_with_resume(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace,
                                                                                     Checkpoint | None]:
    """The arguments, and the checkpoint of --resume (None without): its saved flags are the
    defaults, so flags on this command line override them (except the start model's)."""
    args = parser.parse_args(argv)
    if not args.resume:
        return args, None
    try:
        checkpoint = load_checkpoint(args.resume)
    except CheckpointError as err:
        parser.error(f"--resume: {err}")
    saved = checkpoint.extra.get("train_args")
    if not saved or "train_state" not in checkpoint.extra:
        parser.error(f"--resume {args.resume}: the checkpoint holds no training state (not written by "
                     f"{parser.prog})")
    if saved.get("lora_rank"):
        parser.error(f"--resume {args.resume}: a LoRA run is saved merged, so it cannot be resumed exactly")
    parser.set_defaults(**{k: v for k, v in saved.items() if k not in NOT_RESUMED})
    args = parser.parse_args(argv)
    changed = [f"--{f.replace('_', '-')}" for f in START_FLAGS if getattr(args, f, None) != saved.get(f)]
    if changed:
        parser.error(f"{', '.join(changed)} cannot change when resuming")
    return args, checkpoint


def resumed_state(ctx: RunContext, model: Any, optimizer: Any) -> TrainState | None:
    """With --resume: load the checkpoint's weights and optimizer into `model` / `optimizer` and
    return the loop state to continue from (None without --resume). The data position counts
    global batches, so their size and the number accumulated per step must stay."""
    checkpoint = ctx.resume
    if checkpoint is None:
        return None
    saved_world = checkpoint.extra.get("world_size", 1)
    saved_batch = checkpoint.extra["train_args"]["batch_size"]
    if saved_world * saved_batch != ctx.world_size * ctx.args.batch_size:
        ctx.error(f"--resume: the run was saved with a global batch of {saved_world * saved_batch} ({saved_world} "
                  f"processes x {saved_batch}), this one has {ctx.world_size * ctx.args.batch_size} ({ctx.world_size}"
                  f" x {ctx.args.batch_size}): choose --batch-size so that processes x batch size stays")
    saved_accum = checkpoint.extra["train_args"].get("grad_accum", 1)
    if saved_accum != ctx.args.grad_accum:
        ctx.error(f"--resume: the run was saved with --grad-accum {saved_accum}, this one has {ctx.args.grad_accum}: "
                  "the data position counts accumulated batches, so keep it")
    model.load_state_dict(checkpoint.state_dict)
    optimizer.load_state_dict(checkpoint.optimizer_state)
    state = TrainState.from_dict(checkpoint.extra["train_state"])
    ctx.print(f"resuming at step {state.step} (epoch {state.epoch + 1}, batch {state.batch})")
    return state


def start_model(ctx: RunContext, recipe: Recipe, **config: Any) -> tuple[GPTModel, str]:
    """The start model of the shared flags; the recipe's when none is named. `config`: GPTConfig
    fields of a randomly initialised model. With --resume: a model of the checkpoint's config,
    which `resumed_state` fills."""
    if ctx.resume is not None:
        return GPTModel(ctx.resume.config), f"run {ctx.args.resume}"
    a = ctx.args
    preset, hf_model, context_length = a.preset, a.hf_model, a.context_length
    if not (a.checkpoint or a.hf_model or a.hf_dir or a.preset):
        preset, hf_model = recipe.preset, recipe.hf_model
        context_length = recipe.context_length if context_length is None else context_length
    return load_start_model(checkpoint=a.checkpoint, hf_model=hf_model, hf_dir=a.hf_dir, preset=preset,
                            cache_dir=a.cache_dir, drop_rate=a.drop_rate, context_length=context_length, **config)


def make_optimizer(model: Any, args: argparse.Namespace) -> optim.AdamW:
    """AdamW over the trainable parameters, with --lr and --weight-decay."""
    return optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay)


def make_train_config(args: argparse.Namespace, sample_prompt: str | None = None) -> TrainConfig:
    """The loop's settings from the shared flags; `sample_prompt` is continued after each epoch."""
    return TrainConfig(epochs=args.epochs, lr=args.lr, warmup_steps=args.warmup_steps, min_lr=args.min_lr,
                       grad_clip=args.grad_clip, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
                       max_steps=args.max_steps, grad_accum=args.grad_accum, sample_prompt=sample_prompt)


def fit(ctx: RunContext, model: Any, optimizer: Any, train_loader: Any, val_loader: Any, config: TrainConfig, *,
        loss_fn: LossFn, save: Callable[[TrainState], Path], state: TrainState | None = None, tokenizer: Any = None,
        on_step: Callable[[TrainState, float], None] | None = None,
        resume_command: str | None = None) -> TrainState | None:
    """`train` with the run's precision, progress bar and ranks. Returns the final state, or None
    after Ctrl-C, once `save` has written the last step boundary and the history is on disk."""
    state = state if state is not None else TrainState()
    if ctx.args.precision == "bf16":
        loss_fn = under_autocast(loss_fn)
    metrics = open_metrics(ctx, state) if ctx.is_main else None
    hooks = [hook for hook in (metrics, on_step) if hook is not None]

    def after_step(st: TrainState, loss: float) -> None:
        for hook in hooks:
            hook(st, loss)

    try:
        train(model, optimizer, train_loader, val_loader, config, tokenizer=tokenizer, loss_fn=loss_fn, state=state,
              save_fn=save, on_step=after_step, progress=ctx.progress, distributed=ctx.distributed)
    except TrainingInterrupted as stop:
        if ctx.is_main:
            write_history(ctx, stop.state.history)
            hint = f"\nresume with: {resume_command} --resume {stop.checkpoint}" if resume_command else ""
            print(f"\ninterrupted after step {stop.state.step}; checkpoint saved to {stop.checkpoint}{hint}",
                  file=sys.stderr)
        return None
    finally:
        if metrics is not None:
            metrics.close()
    return state


def open_metrics(ctx: RunContext, state: TrainState) -> MetricsLog:
    """The run's metrics.csv log (continued from `state`), with TensorBoard event files in
    ``<out-dir>/tensorboard`` under --tensorboard."""
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    writer = tensorboard_writer(ctx.out_dir / "tensorboard") if getattr(ctx.args, "tensorboard", False) else None
    return MetricsLog(ctx.out_dir / "metrics.csv", state, tensorboard=writer)


def save_run(ctx: RunContext, model: Any, state: TrainState, *, optimizer: Any = None, name: str = "checkpoint",
             extra: dict[str, Any] | None = None) -> Path:
    """The one save path: a LoRA model's adapters go to ``lora.*`` and are merged in, then the
    checkpoint ``<out-dir>/<name>`` holds the weights, the optimizer (if given), the loop's
    state and the run's flags. Rank 0 calls it."""
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    if lora_layers(model):
        save_lora(model, ctx.out_dir / "lora")
        merge_lora(model)
        optimizer = None  # its state is the adapters', which merging folded away (no --resume of LoRA runs)
    run = {"train_state": state.to_dict(), "train_args": ctx.run_args, "world_size": ctx.world_size}
    return save_checkpoint(ctx.out_dir / name, model, model.config, optimizer, step=state.step,
                           extra=run | (extra or {}))


def write_history(ctx: RunContext, history: dict[str, Any], plot: bool = True) -> Path | None:
    """history.json (atomically), and loss.png when `plot` and there is an evaluation."""
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(ctx.out_dir / "history.json", history)
    return plot_losses(history, ctx.out_dir / "loss.png") if plot and history["step"] else None
