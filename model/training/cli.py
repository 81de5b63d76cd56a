"""The flags every training command shares: one name, default, help text and check each.

A command builds its parser with `command_parser`, adds the shared groups with
`add_training_command_arguments(parser, recipe)`, and adds only what is its own. The
`Recipe` holds the values a book chapter chose (learning rate, epochs, batch size, ...):
they are the only defaults that differ between commands. `check_args` is the one place
numeric flags are validated (a user mistake: one line, exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import math
from dataclasses import dataclass
from typing import Any

from engine.backends import triton_missing
from model.config import PRESETS
from model.data.datadir import add_data_dir_argument
from model.training.distributed import add_ddp_argument
from model.weights.hub import check_repo_id


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" once: not for None/False, nor where the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def backend_name(name: str) -> str:
    """``--backend``'s type: the triton backend needs the ``[gpu]`` extra (torch + triton)."""
    if name == "triton":
        try:
            for module in ("torch", "triton"):
                importlib.import_module(module)
        except ImportError:
            raise argparse.ArgumentTypeError(triton_missing(module, "--backend numpy")) from None
    return name


def add_backend_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--backend", type=backend_name, choices=("numpy", "triton"), default=None,
                        help="engine backend (default: triton with a CUDA GPU, else numpy)")


def hf_repo(value: str) -> str:
    """``--hf-model``'s type: a Hugging Face repo id."""
    try:
        return check_repo_id(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_hf_model_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--hf-model", type=hf_repo, metavar="REPO", default=None,
                        help="a Hugging Face repo, downloaded once into --cache-dir, then read as a local folder: "
                             "gpt2, gpt2-medium, gpt2-large, gpt2-xl, or Llama 3 / Qwen3 such as Qwen/Qwen3-0.6B "
                             "or meta-llama/Llama-3.2-1B (gated: accept its license and set HF_TOKEN)")


def command_parser(command: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``python -m model.<command>``: that usage line, the shared help formatter."""
    return argparse.ArgumentParser(prog=f"python -m model.{command}", description=description, epilog=epilog,
                                   formatter_class=HelpFormatter)


@dataclass(frozen=True)
class Recipe:
    """A command's own defaults: the values of the book chapter it reproduces."""

    out_dir: str
    epochs: int
    batch_size: int
    lr: float
    eval_interval: int
    drop_rate: float
    start: str  # the start model when no --checkpoint/--hf-model/--hf-dir/--preset is given, in words
    preset: str | None = None  # random initialisation of this preset by default ...
    hf_model: str | None = None  # ... or this Hugging Face repo
    context_length: int | None = None  # the default --preset's context length in this recipe (None: the preset's)
    eval_iters: int = 5


def add_run_arguments(parser: argparse.ArgumentParser, recipe: Recipe) -> None:
    """Where and how a run executes: backend, seed, output dir, progress bar, data dir, DDP."""
    g = parser.add_argument_group("run")
    add_backend_argument(g)
    g.add_argument("--seed", type=int, default=123, help="seed of weight init, dropout and data order")
    g.add_argument("--out-dir", default=recipe.out_dir, help="where the checkpoint, plots and history go")
    g.add_argument("--overwrite", action="store_true",
                   help="start a fresh run even if --out-dir holds the checkpoint of another run (replacing it)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write the per-step metrics as TensorBoard event files to OUT_DIR/tensorboard "
                        "(needs the tensorboard and torch packages)")
    add_data_dir_argument(g)
    add_ddp_argument(g)


def add_start_model_arguments(parser: argparse.ArgumentParser, recipe: Recipe) -> None:
    """The model to start from (model.weights.start.load_start_model reads these)."""
    g = parser.add_argument_group(f"start model (default: {recipe.start})")
    source = g.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="PATH",
                        help="our checkpoint to start from (PATH or PATH.safetensors, or a run directory: its latest), "
                             "e.g. from model.train")
    add_hf_model_argument(source)
    source.add_argument("--hf-dir", metavar="DIR",
                        help="a local Hugging Face folder: GPT-2 (config.json + model.safetensors), Llama 3 or Qwen3 "
                             "(its tokenizer files too)")
    source.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="random initialisation of this model configuration")
    g.add_argument("--context-length", type=int, default=None,
                   help="context length of a randomly initialised model (default: the preset's)")
    g.add_argument("--drop-rate", type=float, default=recipe.drop_rate, help="dropout rate of the model")
    g.add_argument("--cache-dir", metavar="DIR", default=None, help="where --hf-model downloads are kept")


def add_optimization_arguments(parser: argparse.ArgumentParser, recipe: Recipe) -> None:
    """The loop: how long, how big a batch, AdamW and its schedule, evaluation, precision."""
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=recipe.epochs, help="passes over the training split")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in all")
    g.add_argument("--batch-size", type=int, default=recipe.batch_size,
                   help="examples per batch (per process under torchrun)")
    g.add_argument("--grad-accum", type=int, default=1, metavar="N",
                   help="accumulate the gradients of N batches per optimizer step: the update of one batch N "
                        "times larger in the memory of one batch")
    g.add_argument("--lr", type=float, default=recipe.lr, help="(peak) learning rate of AdamW")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay")
    g.add_argument("--warmup-steps", type=int, default=0,
                   help="linear learning-rate warmup from 0 over this many steps (default: 0, none)")
    g.add_argument("--min-lr", type=float, default=None,
                   help="cosine-decay the learning rate to this after warmup (default: no decay)")
    g.add_argument("--grad-clip", type=float, default=None, help="clip the global gradient norm to this (default: off)")
    g.add_argument("--eval-interval", type=int, default=recipe.eval_interval,
                   help="evaluate train/val loss every this many steps (after steps 1, 1+k, ...)")
    g.add_argument("--eval-iters", type=int, default=recipe.eval_iters, help="batches per loader in each evaluation")
    g.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="also save the checkpoint every N steps, and the one of the best validation loss so far "
                        "as best.safetensors (default: only at the end, on Ctrl-C/SIGTERM)")
    g.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="compute precision; bf16 needs the triton backend")
    add_resume_argument(g)


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("LoRA (the book's appendix E)")
    g.add_argument("--lora-rank", type=int, default=0,
                   help="train low-rank adapters of this rank instead of the weights (0: off)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scaling numerator (update = alpha/rank * BA)")


def add_resume_argument(parser: argparse.ArgumentParser) -> None:
    """``--resume``, read by model.training.run.parse_with_resume."""
    parser.add_argument("--resume", metavar="PATH", default=None,
                        help="continue the run saved in this checkpoint (path with or without extension); "
                             "its settings are the defaults, flags given here override them")


def add_training_command_arguments(parser: argparse.ArgumentParser, recipe: Recipe) -> None:
    """Every shared group, in the order --help lists them."""
    add_start_model_arguments(parser, recipe)
    add_optimization_arguments(parser, recipe)
    add_lora_arguments(parser)
    add_run_arguments(parser, recipe)


# --- validation ---
# (flag, smallest allowed value, whether the bound is included); a flag a command lacks, or
# left at None ("not given"), is skipped. Every value must also be finite.
NUMERIC_LIMITS: tuple[tuple[str, float, bool], ...] = (
    ("epochs", 1, True), ("max_steps", 1, True), ("batch_size", 1, True), ("grad_accum", 1, True),
    ("eval_interval", 1, True),
    ("eval_iters", 1, True), ("context_length", 1, True), ("warmup_steps", 0, True), ("lora_rank", 0, True),
    ("lr", 0, False), ("weight_decay", 0, True), ("min_lr", 0, True), ("grad_clip", 0, False),
    ("lora_alpha", 0, False), ("drop_rate", 0, True), ("ddp_timeout", 0, False), ("save_every", 1, True),
    # command flags that only some commands have
    ("max_length", 1, True), ("max_test_entries", 1, True), ("max_new_tokens", 0, True), ("judge_timeout", 0, False),
    ("temperature", 0, True), ("top_k", 1, True), ("top_p", 0, False),
)
# (flag, the flag or number it may not exceed, whether equal is allowed)
UPPER_LIMITS: tuple[tuple[str, str | float, bool], ...] = (
    ("drop_rate", 1, False), ("top_p", 1, True), ("min_lr", "lr", True),
)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
               limits: tuple[tuple[str, float, bool], ...] = NUMERIC_LIMITS) -> None:
    """Every numeric flag against its limits, and the start model's flags against each other."""
    for name, low, inclusive in limits:
        value: Any = getattr(args, name, None)
        if value is None:
            continue
        relation = ">=" if inclusive else ">"
        if not math.isfinite(value) or value < low or (value == low and not inclusive):  # NaN fails too
            parser.error(f"{_flag(name)} must be a finite number {relation} {low:g}, got {value}")
    for name, high, inclusive in UPPER_LIMITS:
        value, bound = getattr(args, name, None), getattr(args, high, None) if isinstance(high, str) else high
        if value is None or bound is None or value < bound or (value == bound and inclusive):
            continue
        relation = "<=" if inclusive else "below"
        of = f" (the {_flag(high)} given)" if isinstance(high, str) else ""
        parser.error(f"{_flag(name)} must be {relation} {bound:g}{of}, got {value}")
    if getattr(args, "context_length", None) is not None and (args.checkpoint or args.hf_model or args.hf_dir):
        parser.error("--context-length only applies to random initialisation (--preset); a pretrained model "
                     "keeps its context length")


def _flag(dest: str) -> str:
    return f"--{dest.replace('_', '-')}"
