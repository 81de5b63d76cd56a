"""Fine-tuning a GPT as a spam classifier: ``python -m model.classify`` (the book's chapter 6).

The GPT's language-model head is swapped for a 2-class head (model.tasks.classification);
by default, as the book, only the last transformer block, the final LayerNorm and the new
head train (``--train-all``: everything; ``--lora-rank R``: LoRA adapters instead).
AdamW(lr 5e-5, weight decay 0.1), batch 8, 5 epochs, train/val loss every 50 steps over 5
batches, train/val accuracy over 5 batches after each epoch, then accuracy on the full
train/val/test loaders. The README gives the offline recipe and its measured accuracy.

Outputs in ``--out-dir``: ``checkpoint.safetensors`` (weights; in its header the config,
and under ``extra.classifier`` the head, max_length, pad id and class names; a LoRA run is
merged first and its adapters also go to ``lora.*``), ``loss.png``, ``accuracy.png``,
``history.json``. ``python -m model.classify predict "TEXT" --checkpoint PATH`` prints
``spam`` or ``not spam`` with its probability.

``--hf-dir`` also takes a Llama 3 / Qwen3 folder: the messages are its tokenizer's ids padded
with its eos_token, the head reads the final RMSNorm's last position, "last block" is the last
decoder layer, and the folder's tokenizer files go to the run directory for ``predict``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Any

import engine
from model.data.datadir import add_data_dir_argument
from model.data.spam import CLASS_NAMES, SpamDataError, TruncationWarning, create_spam_loaders
from model.lora import apply_lora, count_trainable
from model.tasks.classification import (
    GPTClassifier,
    calc_accuracy_loader,
    calc_loss_batch,
    classify_text,
    freeze_for_finetuning,
    load_classifier,
    plot_classifier_history,
    record_accuracy,
)
from model.training import run
from model.training.cli import (
    HelpFormatter,
    Recipe,
    add_backend_argument,
    add_training_command_arguments,
    command_parser,
)
from model.training.loop import TrainState
from model.weights.checkpoint import CheckpointError
from model.weights.start import load_start_tokenizer

RECIPE = Recipe(out_dir="runs/classify", epochs=5, batch_size=8, lr=5e-5, eval_interval=50, drop_rate=0.0,
                start="random initialisation of the tiny preset", preset="tiny")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("classify", "Fine-tune a GPT as an SMS spam classifier (the book's chapter 6). Classify a "
                                   'message with: python -m model.classify predict "TEXT" --checkpoint PATH',
                       epilog="Offline recipe (random init, about 95% test accuracy in 3 CPU-minutes): python -m "
                              "model.classify --preset tiny --train-all --lr 1e-3 --warmup-steps 20 --min-lr 1e-5 "
                              "--drop-rate 0.1")
    p.add_argument("--train-all", action="store_true",
                   help="train every parameter (default: only the last block, the final LayerNorm and the head)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per message: longer ones keep their first MAX_LENGTH tokens (default: the "
                        "longest training message, at most the context length)")
    add_training_command_arguments(p, RECIPE)
    return p


def predict_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m model.classify predict", formatter_class=HelpFormatter,
                                description="Classify one message as spam or not spam with a trained classifier.")
    p.add_argument("text", help="the message to classify")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="classifier checkpoint written by python -m model.classify (path with or without extension)")
    add_backend_argument(p)
    add_data_dir_argument(p)
    args = p.parse_args(argv)
    if not args.text.strip():
        p.error("the message is empty: give the text to classify, e.g. predict \"Call now to win\"")
    if args.backend:
        engine.set_backend(args.backend)
    try:
        model, info = load_classifier(args.checkpoint)
        tokenizer = load_start_tokenizer(model.config, checkpoint=args.checkpoint, data_dir=args.data_dir).tokenizer
    except CheckpointError as err:
        p.error(str(err))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncationWarning)
        label, prob = classify_text(model, tokenizer, args.text, int(info["max_length"]),
                                    int(info["pad_token_id"]), tuple(info["class_names"]))
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    print(f"{label} (probability {prob:.3f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["predict"]:
        return predict_main(argv[1:])
    parser = build_parser()
    args, checkpoint = run.parse_with_resume(parser, argv[1:] if argv[:1] == ["train"] else argv)
    if args.train_all and args.lora_rank:
        parser.error("--train-all and --lora-rank exclude each other: LoRA trains only its adapters")
    return run.run_command(parser, args, _train, user_errors=(SpamDataError,), resume=checkpoint)


def _train(ctx: run.RunContext) -> int:
    """Build, fine-tune, evaluate, save."""
    args = ctx.args
    start_time, start_cpu = time.perf_counter(), time.process_time()
    gpt, source = run.start_model(ctx, RECIPE)
    model = GPTClassifier(gpt, num_classes=len(CLASS_NAMES))
    if args.lora_rank:
        mode = f"LoRA rank {args.lora_rank}, alpha {args.lora_alpha:g}"
        ctx.print(apply_lora(model, args.lora_rank, args.lora_alpha))
    else:
        mode = "all parameters" if args.train_all else "last block + final LayerNorm + head"
        freeze_for_finetuning(model, "all" if args.train_all else "last-block")
    trainable, total = count_trainable(model)
    tokens = run.start_tokenizer(ctx, gpt)
    try:
        data = create_spam_loaders(tokens.tokenizer, gpt.config.context_length, args.max_length,
                                   args.batch_size * ctx.world_size, seed=args.seed, data_dir=args.data_dir,
                                   pad_token_id=tokens.eos_id)
    except (ValueError, FileNotFoundError) as err:  # a bad --max-length, a missing or malformed data file
        ctx.error(str(err))
    ctx.check_same_config()
    ctx.print(f"SMS spam: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test messages of "
              f"{data.max_length} tokens (padded with {tokens.eos_id}); {len(data.train_loader)} batches per epoch")
    if data.truncation_note():
        ctx.print(data.truncation_note())
    ctx.print(f"model: {source}; training {mode}: {trainable:,} of {total:,} parameters")
    info = {"num_classes": len(CLASS_NAMES), "class_names": list(CLASS_NAMES), "max_length": data.max_length,
            "pad_token_id": tokens.eos_id, "pooling": "last token", "source": source, "trained": mode}

    examples_per_step = args.batch_size * ctx.world_size * args.grad_accum

    def after_step(state: TrainState, loss: float) -> None:
        if state.batch != 0:  # only right after an epoch ends
            return
        train_acc, val_acc = record_accuracy(model, data.train_loader, data.val_loader, args.eval_iters, state.history,
                                             state.epoch, state.step * examples_per_step)
        ctx.log(f"epoch {state.epoch}: training accuracy {train_acc:.2%} | validation accuracy {val_acc:.2%}")

    optimizer = run.make_optimizer(model, args)
    state = run.resumed_state(ctx, model, optimizer)

    def save(state: TrainState, accuracy: Any = None, **kwargs: Any) -> Any:
        extra = {"classifier": info} | ({"accuracy": accuracy} if accuracy else {})
        return run.save_run(ctx, model, state, optimizer=optimizer, extra=extra, **kwargs)

    train_start = time.perf_counter()
    state = run.fit(ctx, model, optimizer, data.train_loader, data.val_loader, run.make_train_config(args),
                    loss_fn=calc_loss_batch, save=save, state=state, on_step=after_step,
                    resume_command="python -m model.classify")
    train_time = time.perf_counter() - train_start
    final = {name: calc_accuracy_loader(loader, model) for name, loader in
             (("train", data.train_loader), ("val", data.val_loader), ("test", data.test_loader))}
    seconds = {"train": train_time, "total": time.perf_counter() - start_time, "cpu": time.process_time() - start_cpu}
    state.history.update(final_accuracy=final, seconds=seconds)
    if not ctx.is_main:  # rank 0 alone writes (every rank holds the same weights)
        return 0
    path = save(state, accuracy=final)
    run.write_history(ctx, state.history, plot=False)
    plots = plot_classifier_history(state.history, examples_per_step, len(data.train_loader) // args.grad_accum,
                                    ctx.out_dir)
    print(f"training accuracy {final['train']:.2%} | validation accuracy {final['val']:.2%} | "
          f"test accuracy {final['test']:.2%}")
    print(f"trained {state.step} steps in {train_time / 60:.2f} min; {seconds['total'] / 60:.2f} min "
          f"in all (CPU time {seconds['cpu'] / 60:.2f} min); checkpoint {path}" + "".join(f", {p}" for p in plots))
    print(f'classify a message with: python -m model.classify predict "TEXT" --checkpoint {path}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
