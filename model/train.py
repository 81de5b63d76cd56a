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
import contextlib
import itertools
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

import engine
from engine import optim
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.config import INIT_SCHEMES, PRESETS, get_config
from model.data import create_dataloaders
from model.datadir import DataFileNotFoundError, add_data_dir_argument, data_file
from model.distributed import Distributed, add_ddp_argument, run_maybe_distributed
from model.generate import generate, ids_to_text, text_to_ids
from model.gpt import GPTModel, count_parameters
from model.gpt2_tokenizer import gpt2_tokenizer
from model.plot import plot_losses

LossFn = Callable[[Any, Any, Any], "engine.Tensor"]


# --- the book's evaluation helpers ---
def calc_loss_batch(input_batch: Any, target_batch: Any, model: Any) -> engine.Tensor:
    """Mean next-token cross-entropy of one batch: ids (B, T) against targets (B, T)."""
    return model(engine.tensor(input_batch), targets=engine.tensor(target_batch))  # fused LM head + loss


def calc_loss_loader(data_loader: Any, model: Any, num_batches: int | None = None,
                     loss_fn: LossFn = calc_loss_batch) -> float:
    """Mean batch loss over the first `num_batches` batches (all when None); NaN if the loader is empty.

    Runs under no_grad; the caller chooses train/eval mode (`evaluate` uses eval).
    """
    if len(data_loader) == 0:
        return float("nan")
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total = 0.0
    with engine.no_grad():
        # NOTE: islice never asks for batch n+1, so the pass is not run to its end and a
        # loader that counts finished passes as epochs (model.data.DataLoader) keeps its epoch.
        for input_batch, target_batch in itertools.islice(iter(data_loader), n):
            total += float(loss_fn(input_batch, target_batch, model).item())
    return total / n


def evaluate(model: Any, train_loader: Any, val_loader: Any, eval_iters: int,
             loss_fn: LossFn = calc_loss_batch) -> tuple[float, float]:
    """The book's evaluate_model: (train loss, val loss) over the first `eval_iters` batches
    of each loader, in eval mode (no dropout) and without a graph; restores the mode after."""
    was_training = model.training
    model.eval()
    try:
        train_loss = calc_loss_loader(train_loader, model, eval_iters, loss_fn)
        val_loss = calc_loss_loader(val_loader, model, eval_iters, loss_fn)
    finally:
        model.train(was_training)
    return train_loss, val_loss


def perplexity(loss: float) -> float:
    """exp(loss), inf instead of an overflow for a hopeless loss."""
    return math.inf if loss > 700 else math.exp(loss)


def generate_sample(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 50) -> str:
    """Greedy continuation of `prompt` on one line (the book's generate_and_print_sample, returned).

    `generate` runs in eval mode under no_grad and restores the mode; it draws nothing from
    the engine's generator, so sampling never changes the training losses."""
    out = generate(model, text_to_ids(prompt, tokenizer), max_new_tokens, temperature=0.0)  # (1, T + n)
    return ids_to_text(out, tokenizer).replace("\n", " ")


# --- training state and configuration ---
def new_history() -> dict[str, list]:
    """Empty history: per evaluation ``step``, ``epoch``, ``tokens_seen``, ``train_loss``, ``val_loss``;
    per optimizer step ``step_loss`` and ``lr``; per finished epoch ``samples``."""
    keys = ("step", "epoch", "tokens_seen", "train_loss", "val_loss", "step_loss", "lr", "samples")
    return {k: [] for k in keys}


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 4e-4  # peak learning rate
    warmup_steps: int = 0  # linear warmup from 0 (the book's appendix D)
    min_lr: float | None = None  # cosine decay to this after warmup; None keeps lr constant
    grad_clip: float | None = None  # max global gradient norm
    eval_interval: int = 5  # evaluate after steps 1, 1 + k, 1 + 2k, ... (the book's eval_freq)
    eval_iters: int = 5  # batches per loader in each evaluation (the book's eval_iter)
    max_steps: int | None = None  # stop after this many optimizer steps in all
    sample_prompt: str | None = "Every effort moves you"  # continued after each epoch; None: no sample
    sample_tokens: int = 50

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of the step with 0-based index `step` out of `total_steps`."""
        if self.min_lr is not None:
            return optim.warmup_cosine_lr(step, self.lr, self.warmup_steps, total_steps, min_lr=self.min_lr)
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        return self.lr


@dataclass
class TrainState:
    """Where a run stands at a step boundary: everything `train` needs to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next batch (0-based)
    batch: int = 0  # index of the next batch within that epoch
    tokens_seen: int = 0
    # The engine generator's state here (backend.rng_state(): a dict of ints on numpy, a list of
    # ints on triton, so it goes into JSON as it is); None: leave the generator as it is.
    rng_state: Any = None
    history: dict[str, list] = field(default_factory=new_history)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for a checkpoint's ``extra``)."""
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "tokens_seen": self.tokens_seen,
                "rng_state": self.rng_state, "history": self.history}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        history = new_history()
        history.update(data.get("history") or {})
        return cls(step=int(data["step"]), epoch=int(data["epoch"]), batch=int(data["batch"]),
                   tokens_seen=int(data["tokens_seen"]), rng_state=data.get("rng_state"),
                   history=history)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a KeyboardInterrupt from a callback) stopped `train`; `state` is the last step
    boundary, which the model and optimizer match, and `checkpoint` what `save_fn` returned."""

    def __init__(self, state: TrainState, checkpoint: Any = None):
        super().__init__(f"training interrupted after step {state.step}")
        self.state, self.checkpoint = state, checkpoint


class _InterruptGuard:
    """SIGINT handling for the training loop.

    During the forward and backward pass Ctrl-C raises at once: the model and optimizer are
    still those of the last step boundary, so that step is simply redone on resume. During
    the update, evaluation and sampling it is deferred to the end of the step, so a
    checkpoint never holds a half-applied optimizer step.
    """

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.critical = False
        self.pending = False
        self._previous: Any = None

    def __enter__(self) -> _InterruptGuard:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.critical:
            raise KeyboardInterrupt
        if not self.pending:
            self.log("Ctrl-C: stopping after this step")
        self.pending = True

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.critical = True
        try:
            yield
        finally:
            self.critical = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


# --- the training loop ---
def train(
    model: Any,
    optimizer: Any,
    train_loader: Any,
    val_loader: Any,
    config: TrainConfig | None = None,
    *,
    tokenizer: Any = None,
    loss_fn: LossFn = calc_loss_batch,
    state: TrainState | None = None,
    save_fn: Callable[[TrainState], Any] | None = None,
    on_step: Callable[[TrainState, float], None] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    distributed: Distributed | None = None,
) -> dict[str, list]:
    """The book's train_model_simple, resumable. Returns the history (`new_history`).

    `train_loader` must offer ``len()`` and ``set_epoch(epoch, batch)`` (model.data.DataLoader);
    its batches are ``(inputs, targets)`` for ``loss_fn(inputs, targets, model) -> scalar Tensor``.
    `state` (updated in place at every step boundary) continues an earlier run: the engine
    generator is set to its `rng_state` and training goes on at its epoch and batch.
    A sample of `config.sample_prompt` is generated after each epoch when `tokenizer` is given.
    On KeyboardInterrupt the state of the last step boundary is handed to `save_fn` and
    `TrainingInterrupted` is raised. `on_step(state, loss)` runs after every step; `log` prints
    the evaluations and samples (default: above the progress bar).

    With `distributed` (model.distributed) the run is data-parallel: the loaders yield global
    batches, each rank computes the loss on its shard, gradients are averaged before clipping,
    step and evaluation losses are averaged over the ranks (so the history is that of the
    one-process run with the global batch), and only rank 0 logs, shows the bar and calls
    `save_fn` on Ctrl-C (every rank generates the greedy samples, so the ranks stay in step).
    """
    config = config or TrainConfig()
    state = state if state is not None else TrainState()
    log = log or _log
    is_main = distributed is None or distributed.is_main
    step_loss_fn, eval_loss_fn = loss_fn, loss_fn
    if distributed is not None:
        distributed.broadcast_parameters(model)

        def step_loss_fn(inputs: Any, targets: Any, model: Any) -> engine.Tensor:
            return loss_fn(distributed.shard(inputs), distributed.shard(targets), model)

        eval_loss_fn = distributed.sharded_mean(loss_fn)
        log = log if is_main else _quiet
    history = state.history
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("train: the training loader yields no batches (too little data for the batch size)")
    if config.eval_interval < 1 or config.eval_iters < 1:
        raise ValueError(f"train: eval_interval and eval_iters must be >= 1, got {config.eval_interval}, "
                         f"{config.eval_iters}")
    total_steps = config.epochs * steps_per_epoch
    last_step = total_steps if config.max_steps is None else min(total_steps, config.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    backend = engine.get_backend()
    if state.rng_state is not None:
        backend.set_rng_state(state.rng_state)
    state.rng_state = backend.rng_state()

    model.train()
    bar = tqdm(total=last_step, initial=min(state.step, last_step), unit="step", disable=not (progress and is_main),
               dynamic_ncols=True)
    try:
        with _InterruptGuard(log) as guard:
            while state.epoch < config.epochs and state.step < last_step:
                train_loader.set_epoch(state.epoch, state.batch)
                for input_batch, target_batch in train_loader:
                    optimizer.lr = lr = config.lr_at(state.step, total_steps)
                    optimizer.zero_grad()
                    loss = step_loss_fn(input_batch, target_batch, model)
                    loss.backward()
                    if distributed is not None:
                        distributed.all_reduce_gradients(params)
                    with guard.deferred():
                        if config.grad_clip is not None:
                            optim.clip_grad_norm_(params, config.grad_clip)
                        optimizer.step()
                        loss_value = float(loss.item())
                        if distributed is not None:
                            loss_value = distributed.average(loss_value)
                        state.step, state.batch = state.step + 1, state.batch + 1
                        state.tokens_seen += math.prod(input_batch.shape)
                        history["step_loss"].append(loss_value)
                        history["lr"].append(lr)
                        if (state.step - 1) % config.eval_interval == 0:
                            _evaluate_and_log(model, train_loader, val_loader, config, state, eval_loss_fn,
                                              steps_per_epoch, log)
                        if state.batch == steps_per_epoch:
                            # NOTE: under DDP every rank generates (greedy: the same text) so none
                            # waits in a collective, with its timeout running, while rank 0 samples.
                            if tokenizer is not None and config.sample_prompt:
                                text = generate_sample(model, tokenizer, config.sample_prompt, config.sample_tokens)
                                history["samples"].append({"epoch": state.epoch + 1, "step": state.step, "text": text})
                                log(f"sample after epoch {state.epoch + 1}: {text}")
                            state.epoch, state.batch = state.epoch + 1, 0
                        state.rng_state = backend.rng_state()
                    bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
                    bar.update(1)
                    if on_step is not None:
                        on_step(state, loss_value)
                    if state.step >= last_step:
                        break
    except KeyboardInterrupt as err:
        checkpoint = save_fn(state) if save_fn is not None and is_main else None
        raise TrainingInterrupted(state, checkpoint) from err
    finally:
        bar.close()
    return history


def _log(message: str) -> None:
    """Print above the progress bar, flushed so a redirected log shows each line as it comes."""
    tqdm.write(message)
    sys.stdout.flush()


def _quiet(*args: Any, **kwargs: Any) -> None:
    """The log and `print` of ranks other than 0."""


def _evaluate_and_log(model: Any, train_loader: Any, val_loader: Any, config: TrainConfig, state: TrainState,
                      loss_fn: LossFn, steps_per_epoch: int, log: Callable[[str], None]) -> None:
    train_loss, val_loss = evaluate(model, train_loader, val_loader, config.eval_iters, loss_fn)
    h = state.history
    h["step"].append(state.step)
    h["epoch"].append(state.epoch + state.batch / steps_per_epoch)
    h["tokens_seen"].append(state.tokens_seen)
    h["train_loss"].append(train_loss)
    h["val_loss"].append(val_loss)
    log(f"ep {state.epoch + 1} step {state.step:5d} | train loss {train_loss:.3f} (ppl {perplexity(train_loss):9.2f})"
        f" | val loss {val_loss:.3f} (ppl {perplexity(val_loss):9.2f}) | tokens {state.tokens_seen}")


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


def bf16_loss_batch(input_batch: Any, target_batch: Any, model: Any) -> engine.Tensor:
    """`calc_loss_batch` under bf16 autocast: bf16 matmuls and kernels; fp32 master weights,
    optimizer state, LayerNorm statistics and loss."""
    with engine.autocast("bfloat16"):
        return calc_loss_batch(input_batch, target_batch, model)


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
