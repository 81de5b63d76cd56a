"""The run layer every training command shares: setup, the run context, one loop call, one save path.

    parser = command_parser("classify", ...); add_training_command_arguments(parser, RECIPE)
    args, resume = parse_with_resume(parser, argv)
    return run_command(parser, args, body, resume=resume)      # body(ctx: RunContext) -> exit code

`parse_with_resume` makes a --resume checkpoint's saved flags the defaults. `run_command`
checks the flags (`check_args`), sets the backend, checks --precision, runs `body` once per
process (data-parallel under torchrun) with the engine seeded, and turns a user mistake
(missing file, bad checkpoint, ...) into one ``error:`` line and exit 2. Inside the body,
`start_model` loads the start model of the shared flags (the checkpoint's config when
resuming: GPT-2, or Llama 3 / Qwen3 from a folder), `start_tokenizer` the tokenizer its ids
belong to (a Llama / Qwen3 folder's files are copied into the run directory),
`make_optimizer` / `make_train_config` build AdamW and the loop's config,
`resumed_state` loads a resumed run's weights, optimizer and loop state, `fit` runs
`model.training.loop.train` with the per-step log (``metrics.csv``, model.training.metrics)
and is the one place for what keeps a run safe: the periodic and
best saves of --save-every, and the stops (`RunStopped`, which `run_command` turns into the
exit code): Ctrl-C / SIGTERM / a lost torchrun peer save the last step and print the
command that resumes (exit 130 / 143 / 1), a NaN/inf loss or gradient stops before the
update and saves nothing (exit 3). `save_run` is the one path to disk (LoRA adapters,
merge, checkpoint with the run's state and flags) and `write_history` writes history.json
atomically with its loss plot.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import engine
from engine import optim
from model.config import PRESETS
from model.data.datadir import DataFileNotFoundError
from model.data.files import write_json_atomic
from model.decoder.config import DecoderConfig
from model.decoder.hf import copy_tokenizer_files
from model.lora import lora_layers, merge_lora, save_lora
from model.training.cli import Recipe, check_args
from model.training.distributed import Distributed, run_maybe_distributed
from model.training.loop import (
    LossFn,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    TrainingPeerLost,
    TrainState,
    log_line,
    train,
    under_autocast,
)
from model.training.metrics import TENSORBOARD_MISSING, MetricsLog, tensorboard_available, tensorboard_writer
from model.training.plot import plot_losses
from model.weights.checkpoint import (
    Checkpoint,
    CheckpointError,
    build_model,
    checkpoint_paths,
    load_checkpoint,
    save_checkpoint,
)
from model.weights.hf import HFDownloadError
from model.weights.hub import download_hf_model
from model.weights.start import StartTokenizer, load_start_model, load_start_tokenizer


class RunError(Exception):
    """A user mistake found while the run sets up (bad data, a checkpoint that does not fit):
    `run_command` prints it as one ``error:`` line and returns 2."""


# Errors that are the user's to fix (a path, a download, a file's content): one line, exit 2.
USER_ERRORS: tuple[type[Exception], ...] = (CheckpointError, HFDownloadError, DataFileNotFoundError, RunError)
# Flags that describe where a run reads and waits, not what it computes: they may differ
# between the ranks of one run and are not restored on --resume.
LOCAL_FLAGS = ("resume", "data_dir", "ddp_timeout", "no_progress", "overwrite")
NOT_RESUMED = LOCAL_FLAGS + ("max_steps",)  # a resumed run may stop elsewhere
START_FLAGS = ("checkpoint", "hf_model", "hf_dir", "preset", "context_length")  # fixed once a run started


class RunStopped(Exception):
    """The run stopped early (interrupted, diverged, a peer lost); `run_command` returns `exit_code`."""

    def __init__(self, exit_code: int):
        super().__init__(f"run stopped (exit code {exit_code})")
        self.exit_code = exit_code


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
        """A user mistake found after parsing: one ``error:`` line, exit 2 (`RunError`)."""
        raise RunError(message)

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
    try:
        backend = engine.set_backend(args.backend) if args.backend else engine.get_backend()
    except ValueError as err:  # SCRATCHGPT_BACKEND names a backend this install cannot run
        parser.error(str(err))
    if args.precision != "fp32" and backend.name != "triton":
        parser.error(f"--precision {args.precision} needs --backend triton: the {backend.name} backend computes "
                     "in float32 only")

    _check_out_dir(parser, args, resume)

    def in_process(distributed: Distributed | None) -> int:
        engine.manual_seed(args.seed)
        try:
            return body(RunContext(parser, args, distributed, resume))
        except RunStopped as stop:
            return stop.exit_code

    try:
        # NOTE: launched by torchrun, every process trains data-parallel; --batch-size is per process.
        return run_maybe_distributed(in_process, args.ddp_timeout)
    except USER_ERRORS + user_errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _check_out_dir(parser: argparse.ArgumentParser, args: argparse.Namespace, resume: Checkpoint | None) -> None:
    """No silent overwrite: a fresh run into an out-dir holding another run's checkpoint stops."""
    base = Path(args.out_dir) / "checkpoint"
    existing = checkpoint_paths(base)[0]
    if args.overwrite or not existing.exists():
        return
    if resume is not None and resume.path is not None and resume.path.resolve() == base.resolve():
        return  # continuing the run saved there
    parser.error(f"--out-dir {args.out_dir} already holds a checkpoint ({existing}): continue that run with "
                 f"--resume {base}, start over with --overwrite, or choose another --out-dir")


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
    command = checkpoint.extra.get("command", parser.prog)
    if command != parser.prog:
        parser.error(f"--resume {args.resume}: that run was written by {command}: resume it with that command")
    try:
        if not isinstance(saved, dict):
            raise TypeError(f"train_args is {type(saved).__name__}, not an object")
        TrainState.from_dict(checkpoint.extra["train_state"])
        int(checkpoint.extra.get("world_size", 1)) * int(saved["batch_size"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        parser.error(f"--resume {args.resume}: malformed run state in the checkpoint's metadata ({err!r}): "
                     "resume from another checkpoint")
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
    try:
        model.load_state_dict(checkpoint.state_dict)
        optimizer.load_state_dict(checkpoint.optimizer_state)
    except (KeyError, ValueError, TypeError) as err:
        problem = str(err) if len(str(err)) < 200 else str(err)[:200] + " ..."
        ctx.error(f"--resume {ctx.args.resume}: the checkpoint does not fit this command's model and optimizer "
                  f"({problem}): resume it with the command that wrote it")
    state = TrainState.from_dict(checkpoint.extra["train_state"])
    ctx.print(f"resuming at step {state.step} (epoch {state.epoch + 1}, batch {state.batch})")
    return state


def start_model(ctx: RunContext, recipe: Recipe, allow_decoder: bool = True, **config: Any) -> tuple[Any, str]:
    """The start model of the shared flags (a GPTModel, or a DecoderModel from a Llama 3 /
    Qwen3 folder or run unless not `allow_decoder`); the recipe's when none is named. `config`:
    GPTConfig fields of a randomly initialised model. With --resume: a model of the
    checkpoint's config, which `resumed_state` fills."""
    if ctx.resume is not None:
        return build_model(ctx.resume.config), f"run {ctx.args.resume}"
    a = ctx.args
    preset, hf_model, context_length = a.preset, a.hf_model, a.context_length
    if not (a.checkpoint or a.hf_model or a.hf_dir or a.preset):
        preset, hf_model = recipe.preset, recipe.hf_model
        context_length = recipe.context_length if context_length is None else context_length
    if preset is not None and context_length is not None and context_length > PRESETS[preset].context_length:
        ctx.error(f"--context-length {context_length} is beyond the {preset} preset's {PRESETS[preset].context_length}"
                  f" tokens: choose at most {PRESETS[preset].context_length}")
    model, source = load_start_model(checkpoint=a.checkpoint, hf_model=hf_model, hf_dir=a.hf_dir, preset=preset,
                                     cache_dir=a.cache_dir, drop_rate=a.drop_rate, context_length=context_length,
                                     **config)
    if not allow_decoder and isinstance(model.config, DecoderConfig):
        ctx.error(f"{source}: {ctx.parser.prog} trains GPT-2 models only; fine-tune a {model.config.model_type} model "
                  "with scratchgpt instruct or scratchgpt classify")
    return model, source


def start_tokenizer(ctx: RunContext, model: Any) -> StartTokenizer:
    """The tokenizer the start model's ids belong to. A Llama 3 / Qwen3 tokenizer's files are
    copied into --out-dir (by rank 0), so the run directory loads on its own: generate, chat,
    export and classify predict read them there."""
    a = ctx.args
    hf_dir = a.hf_dir
    if hf_dir is None and a.hf_model and isinstance(model.config, DecoderConfig):
        hf_dir = download_hf_model(a.hf_model, a.cache_dir)  # already there: start_model downloaded it
    tokenizer = load_start_tokenizer(model.config, checkpoint=a.checkpoint, hf_dir=hf_dir, data_dir=a.data_dir)
    if tokenizer.folder is not None and ctx.is_main:
        copy_tokenizer_files(tokenizer.folder, ctx.out_dir)
    return tokenizer


def make_optimizer(model: Any, args: argparse.Namespace) -> optim.AdamW:
    """AdamW over the trainable parameters, with --lr and --weight-decay."""
    return optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay)


def make_train_config(args: argparse.Namespace, sample_prompt: str | None = None) -> TrainConfig:
    """The loop's settings from the shared flags; `sample_prompt` is continued after each epoch."""
    return TrainConfig(epochs=args.epochs, lr=args.lr, warmup_steps=args.warmup_steps, min_lr=args.min_lr,
                       grad_clip=args.grad_clip, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
                       max_steps=args.max_steps, grad_accum=args.grad_accum, sample_prompt=sample_prompt)


def fit(ctx: RunContext, model: Any, optimizer: Any, train_loader: Any, val_loader: Any, config: TrainConfig, *,
        loss_fn: LossFn, save: Callable[..., Path], state: TrainState | None = None, tokenizer: Any = None,
        on_step: Callable[[TrainState, float], None] | None = None,
        resume_command: str | None = None) -> TrainState:
    """`train` with the run's precision, progress bar, ranks and safety. Returns the final state.

    `save(state, name=..., final=...)` writes a checkpoint (`save_run`'s keywords). With
    --save-every N it is called every N steps and, as ``best``, after each evaluation that
    improves the validation loss. A stop raises `RunStopped`: after Ctrl-C / SIGTERM / a lost
    peer, once the last step is saved, the history written and `resume_command` printed with
    the flags that continue the run; after a NaN/inf loss or gradient with nothing saved."""
    if len(train_loader) == 0:
        ctx.error(f"too little training data for one batch of {ctx.args.batch_size * ctx.world_size}: use more data "
                  "or a smaller --batch-size")
    state = state if state is not None else TrainState()
    if ctx.args.precision == "bf16":
        loss_fn = under_autocast(loss_fn)
    metrics = open_metrics(ctx, state) if ctx.is_main else None
    every = getattr(ctx.args, "save_every", None)
    steps = len(train_loader) // config.grad_accum * config.epochs
    last_step = min(steps, config.max_steps or steps)
    best = min((v for v in state.history["val_loss"] if math.isfinite(v)), default=math.inf)

    def after_step(st: TrainState, loss: float) -> None:
        nonlocal best
        for hook in (metrics, on_step):
            if hook is not None:
                hook(st, loss)
        if not every or not ctx.is_main:
            return
        h = st.history
        if h["step"] and h["step"][-1] == st.step and h["val_loss"][-1] < best:
            best = h["val_loss"][-1]
            save(st, name="best", final=False)
        if st.step % every == 0 and st.step < last_step:  # the last step is saved by the command
            save(st, final=False)

    try:
        train(model, optimizer, train_loader, val_loader, config, tokenizer=tokenizer, loss_fn=loss_fn, state=state,
              save_fn=save, on_step=after_step, progress=ctx.progress, distributed=ctx.distributed)
    except (TrainingInterrupted, TrainingPeerLost) as stop:
        if ctx.is_main:
            write_history(ctx, stop.state.history)
            cause = stop.cause if isinstance(stop, TrainingInterrupted) else "a torchrun peer was lost"
            print(f"\ninterrupted ({cause}) after step {stop.state.step}; checkpoint saved to {stop.checkpoint}"
                  + (f"\nresume with: {_resume_line(ctx, resume_command, stop.checkpoint)}" if resume_command else ""),
                  file=sys.stderr)
        if isinstance(stop, TrainingPeerLost):
            raise  # run_maybe_distributed prints the failed collective and exits 1
        raise RunStopped(stop.exit_code) from None
    except TrainingDiverged as err:
        if ctx.is_main:
            print(f"error: {err}. Nothing was saved: the last checkpoint in {ctx.out_dir} (if any) is unchanged",
                  file=sys.stderr)
        raise RunStopped(3) from None
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


def _resume_line(ctx: RunContext, command: str, checkpoint: Path | None) -> str:
    """The command that continues the run: its launcher, --resume, and the flags not restored."""
    if ctx.distributed is not None:
        command = command.replace("python", f"torchrun --nproc_per_node={ctx.world_size}", 1)
    flags = [f"--resume {checkpoint}"]
    if ctx.args.max_steps is not None:
        flags.append(f"--max-steps {ctx.args.max_steps}")
    if getattr(ctx.args, "data_dir", None):
        flags.append(f"--data-dir {ctx.args.data_dir}")
    return " ".join([command, *flags])


def save_run(ctx: RunContext, model: Any, state: TrainState, *, optimizer: Any = None, name: str = "checkpoint",
             extra: dict[str, Any] | None = None, final: bool = True) -> Path:
    """The one save path: a LoRA model's adapters go to ``lora.*`` and are merged in (into the
    model itself when `final`, into a copy mid-run so training goes on), then the checkpoint
    ``<out-dir>/<name>`` holds the weights, the optimizer (if given), the loop's state and the
    run's flags. Rank 0 calls it."""
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    if lora_layers(model):
        save_lora(model, ctx.out_dir / "lora")
        model = model if final else copy.deepcopy(model)
        merge_lora(model)
        optimizer = None  # its state is the adapters', which merging folded away (no --resume of LoRA runs)
    run = {"train_state": state.to_dict(), "train_args": ctx.run_args, "world_size": ctx.world_size,
           "command": ctx.parser.prog}
    return save_checkpoint(ctx.out_dir / name, model, model.config, optimizer, step=state.step,
                           extra=run | (extra or {}))


def write_history(ctx: RunContext, history: dict[str, Any], plot: bool = True) -> Path | None:
    """history.json (atomically), and loss.png when `plot` and there is an evaluation."""
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(ctx.out_dir / "history.json", history)
    return plot_losses(history, ctx.out_dir / "loss.png") if plot and history["step"] else None
