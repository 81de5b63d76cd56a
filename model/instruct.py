"""Instruction fine-tuning: ``python -m model.instruct`` (the book's chapter 7).

With no arguments it runs the book's recipe: GPT-2 medium from Hugging Face (dropout 0),
instruction-data.json split 85/10/5 (train/test/val), inputs padded per batch with the
end-of-text token and padding targets ignored, AdamW(lr 5e-5, weight decay 0.1),
batch 8, 2 epochs, train/val loss every 5 steps over 5 batches, then a greedy response
(up to 256 tokens, stopping at end-of-text, with the KV cache) for every test entry.

Written to ``--out-dir``: ``checkpoint.safetensors`` (metadata in its header, with the prompt
template that chat and generate apply; a plain GPTModel; LoRA weights are merged into it),
``loss.png``, ``history.json``,
``instruction-data-with-response.json`` (the test entries plus ``model_response``) and
``scores.json`` (exact match, token F1, ROUGE-L; ``--judge`` adds an Ollama LLM judge).
``--evaluate FILE`` only scores an existing responses file.

``--hf-dir`` also takes a Llama 3 / Qwen3 folder: its tokenizer encodes the data, its
eos_token ends and pads each example, ``--lora-rank`` adapts every Linear of the blocks
(q/k/v/o_proj, gate/up/down_proj), and the run directory gets the folder's tokenizer files,
so chat, generate and ``export --to hf`` take it as they take a GPT-2 run.

Under DDP a step equals the one-process step with the global batch: each shard's token
mean is weighted by its share of the batch's target tokens (`Distributed.sharded_loss`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.data.files import write_json_atomic
from model.data.instructions import InstructionDataError, format_input
from model.gpt import count_parameters
from model.lora import apply_block_lora
from model.tasks.instruction import RESPONSES_FILE, generate_responses, load_instruction_run
from model.tasks.scoring import JudgeError, add_judge_arguments, require_judge, score_entries, score_file
from model.training import run
from model.training.cli import Recipe, add_training_command_arguments, check_args, command_parser
from model.training.loop import calc_loss_batch

# The prompt format the model learns (model.tasks.chat), stored with it so chat and generate apply it.
TEMPLATE = {"prompt_template": "alpaca"}
RECIPE = Recipe(out_dir="runs/instruct", epochs=2, batch_size=8, lr=5e-5, eval_interval=5, drop_rate=0.0,
                start="OpenAI's gpt2-medium from Hugging Face, as the book", hf_model="gpt2-medium")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("instruct", "Instruction fine-tuning (the book's chapter 7): train on instruction-data.json, "
                                   "answer the test entries, score the answers. With no arguments: GPT-2 medium "
                                   "from Hugging Face.")
    p.add_argument("--evaluate", metavar="FILE", default=None,
                   help="only score an existing responses JSON (entries with model_response) and exit")
    p.add_argument("--data-file", metavar="PATH", default=None,
                   help="instruction JSON to use instead of instruction-data.json from the data dir")
    p.add_argument("--max-length", type=int, default=None,
                   help="cut training sequences to this many tokens (default: the model's context length)")
    p.add_argument("--mask-prompt", action="store_true",
                   help="ignore the prompt (instruction and input) tokens in the loss: learn only the response")
    p.add_argument("--no-sample", action="store_true",
                   help="do not generate a response to the first validation prompt after each epoch")
    p.add_argument("--max-test-entries", type=int, default=None, help="answer only the first N test entries")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens generated per response")
    add_judge_arguments(p)
    add_training_command_arguments(p, RECIPE)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, checkpoint = run.parse_with_resume(parser, argv)
    if args.evaluate:
        check_args(parser, args)
        try:
            score_file(args.evaluate, **_judge(args))
        except (InstructionDataError, JudgeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    return run.run_command(parser, args, _fine_tune, user_errors=(InstructionDataError, JudgeError), resume=checkpoint)


def _judge(args: argparse.Namespace) -> dict:
    return dict(judge=args.judge, judge_model=args.judge_model, ollama_url=args.ollama_url,
                judge_timeout=args.judge_timeout, progress=not args.no_progress)


def _fine_tune(ctx: run.RunContext) -> int:
    """Fine-tune, then answer and score the test entries (rank 0 alone after training)."""
    args = ctx.args
    model, source = run.start_model(ctx, RECIPE)
    max_length = args.max_length or model.config.context_length
    if max_length > model.config.context_length:
        ctx.error(f"--max-length {max_length} exceeds the model's context length {model.config.context_length}")
    tokens = run.start_tokenizer(ctx, model)
    tokenizer = tokens.tokenizer
    data = load_instruction_run(tokenizer, args.batch_size * ctx.world_size, max_length, mask_prompt=args.mask_prompt,
                                seed=args.seed, data_file=args.data_file, data_dir=args.data_dir,
                                max_test_entries=args.max_test_entries, pad_token_id=tokens.eos_id)
    for line in data.summary(max_length, args.mask_prompt):
        ctx.print(line, file=sys.stderr if line.startswith("warning") else sys.stdout)
    if args.lora_rank:
        ctx.print(apply_block_lora(model, args.lora_rank, args.lora_alpha))
    optimizer = run.make_optimizer(model, args)
    state = run.resumed_state(ctx, model, optimizer)
    trainable = sum(p.size for p in model.parameters() if p.requires_grad)
    ctx.print(f"model: {source}, {count_parameters(model):,} parameters ({trainable:,} trainable)")
    ctx.check_same_config()

    start = time.perf_counter()
    config = run.make_train_config(args, None if args.no_sample else format_input(data.val_data[0]))

    def save(st: Any, **kwargs: Any) -> Path:
        return run.save_run(ctx, model, st, optimizer=optimizer, extra=TEMPLATE, **kwargs)

    state = run.fit(ctx, model, optimizer, data.train_loader, data.val_loader, config, loss_fn=calc_loss_batch,
                    save=save, state=state, tokenizer=tokenizer, resume_command="python -m model.instruct")
    train_seconds = time.perf_counter() - start
    if not ctx.is_main:  # rank 0 alone saves, answers the test entries and scores them
        return 0
    ckpt = run.save_run(ctx, model, state, optimizer=optimizer, extra=TEMPLATE)
    plot = run.write_history(ctx, state.history)
    history = state.history
    if history["train_loss"]:
        print(f"trained {state.step} steps in {train_seconds:.1f} s: train loss {history['train_loss'][-1]:.3f}, "
              f"val loss {history['val_loss'][-1]:.3f}; checkpoint {ckpt}" + (f", loss plot {plot}" if plot else ""))

    start = time.perf_counter()
    responses = generate_responses(model, tokenizer, data.test_data, args.max_new_tokens, ctx.progress, tokens.eos_id)
    responses_path = write_json_atomic(ctx.out_dir / RESPONSES_FILE, responses)
    print(f"{len(responses)} test responses in {time.perf_counter() - start:.1f} s -> {responses_path}")
    scored = score_entries(responses, **_judge(args))
    write_json_atomic(ctx.out_dir / "scores.json", scored)
    if args.judge:
        require_judge(scored)
    return 0


if __name__ == "__main__":
    sys.exit(main())
