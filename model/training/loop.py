"""The training loop every command shares: the book's train_model_simple, resumable and data-parallel.

`train` runs epochs of optimizer steps with warmup/cosine learning rates and gradient
clipping (`TrainConfig`), each step accumulating the gradients of `grad_accum` loader
batches (the update of one batch that many times larger), evaluates every `eval_interval`
steps, samples after each epoch, and keeps its position in a `TrainState` (step, epoch,
batch, RNG state, history) so a checkpoint of that state resumes with exactly the losses
of an uninterrupted run. Ctrl-C during forward/backward stops at once; during the update
it is deferred to the step's end
(`TrainingInterrupted` carries the last step boundary). `calc_loss_batch`,
`calc_loss_loader` and `evaluate` are the book's evaluation helpers.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

import engine
from engine import optim
from model.sampling import generate, ids_to_text, text_to_ids
from model.training.distributed import Distributed, counted_targets

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
        # loader that counts finished passes as epochs (model.data.windows.DataLoader) keeps its epoch.
        for input_batch, target_batch in itertools.islice(iter(data_loader), n):
            total += float(loss_fn(input_batch, target_batch, model).item())
    return total / n


def evaluate(model: Any, train_loader: Any, val_loader: Any, eval_iters: int,
             loss_fn: LossFn = calc_loss_batch) -> tuple[float, float]:
    """The book's evaluate_model: (train loss, val loss) over the first `eval_iters` batches
    of each loader, in eval mode (no dropout) and without a graph; restores the mode after."""
    with model.evaluating():
        return (calc_loss_loader(train_loader, model, eval_iters, loss_fn),
                calc_loss_loader(val_loader, model, eval_iters, loss_fn))


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
    per optimizer step ``step_loss``, ``lr`` and ``grad_norm`` (before clipping); per finished epoch ``samples``."""
    keys = ("step", "epoch", "tokens_seen", "train_loss", "val_loss", "step_loss", "lr", "grad_norm", "samples")
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
    grad_accum: int = 1  # loader batches (micro-batches) per optimizer step
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
    batch: int = 0  # index of the next optimizer step within that epoch
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

    `train_loader` must offer ``len()`` and ``set_epoch(epoch, batch)`` (model.data.windows.DataLoader);
    its batches are ``(inputs, targets)`` for ``loss_fn(inputs, targets, model) -> scalar Tensor``.
    `state` (updated in place at every step boundary) continues an earlier run: the engine
    generator is set to its `rng_state` and training goes on at its epoch and batch.
    A sample of `config.sample_prompt` is generated after each epoch when `tokenizer` is given.
    On KeyboardInterrupt the state of the last step boundary is handed to `save_fn` and
    `TrainingInterrupted` is raised. `on_step(state, loss)` runs after every step; `log` prints
    the evaluations and samples (default: above the progress bar).

    With `distributed` (model.training.distributed) the run is data-parallel: the loaders yield global
    batches, each rank computes the loss on its shard, gradients are averaged before clipping,
    step and evaluation losses are averaged over the ranks (so the history is that of the
    one-process run with the global batch), and only rank 0 logs, shows the bar and calls
    `save_fn` on Ctrl-C (every rank generates the greedy samples, so the ranks stay in step).
    """
    config = config or TrainConfig()
    state = state if state is not None else TrainState()
    log = log or log_line
    is_main = distributed is None or distributed.is_main
    step_loss_fn, eval_loss_fn = loss_fn, loss_fn
    accum = config.grad_accum
    if distributed is not None:
        distributed.broadcast_parameters(model)
        step_loss_fn = distributed.sharded_loss(loss_fn)
        eval_loss_fn = distributed.sharded_mean(loss_fn)
        log = log if is_main else _quiet
    history = state.history
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch == 0:
        raise ValueError(f"train: the training loader yields {len(train_loader)} batches, too few for one step of "
                         f"{accum} accumulated batches (too little data for the batch size)")
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
                train_loader.set_epoch(state.epoch, state.batch * accum)
                for micro_batches in _step_groups(train_loader, accum):
                    optimizer.lr = lr = config.lr_at(state.step, total_steps)
                    optimizer.zero_grad()
                    loss_value = _accumulate_gradients(model, micro_batches, step_loss_fn)
                    if distributed is not None:
                        distributed.all_reduce_gradients(params)  # once per optimizer step
                    with guard.deferred():
                        if config.grad_clip is not None:
                            norm = optim.clip_grad_norm_(params, config.grad_clip)
                        else:
                            norm = optim.grad_norm(params)
                        optimizer.step()
                        if distributed is not None:
                            loss_value = distributed.average(loss_value)
                        state.step, state.batch = state.step + 1, state.batch + 1
                        state.tokens_seen += sum(math.prod(inputs.shape) for inputs, _ in micro_batches)
                        history["step_loss"].append(loss_value)
                        history["lr"].append(lr)
                        history["grad_norm"].append(norm)
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


def _step_groups(loader: Any, accum: int) -> Iterator[list[tuple[Any, Any]]]:
    """The batches of one pass of `loader` in groups of `accum` (one optimizer step each); a
    last, incomplete group is dropped, as a last partial batch."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []


def _accumulate_gradients(model: Any, micro_batches: list[tuple[Any, Any]], loss_fn: LossFn) -> float:
    """Backward of each micro-batch's loss, weighted by its share of the counted targets, so the
    summed gradients and loss are those of one batch of all of them (the token mean); returns the loss."""
    if len(micro_batches) == 1:
        loss = loss_fn(*micro_batches[0], model)
        loss.backward()
        return float(loss.item())
    counts = [counted_targets(targets) for _, targets in micro_batches]
    total = max(sum(counts), 1)
    loss_value = 0.0
    for (inputs, targets), count in zip(micro_batches, counts):
        loss = loss_fn(inputs, targets, model) * (count / total)
        loss.backward()  # gradients add up in .grad until the optimizer step
        loss_value += float(loss.item())
    return loss_value


def log_line(message: str) -> None:
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


def under_autocast(loss_fn: LossFn, dtype: str = "bfloat16") -> LossFn:
    """`loss_fn` under `engine.autocast`: bf16 matmuls and kernels; fp32 master weights,
    optimizer state, LayerNorm statistics and loss."""

    def autocast_loss(input_batch: Any, target_batch: Any, model: Any) -> engine.Tensor:
        with engine.autocast(dtype):
            return loss_fn(input_batch, target_batch, model)

    return autocast_loss
