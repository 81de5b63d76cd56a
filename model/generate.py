"""Continue a prompt with a GPT: ``python -m model.generate --prompt "Every effort moves you" --hf-model gpt2``.

Greedy by default; ``--temperature``, ``--top-k`` and ``--top-p`` sample (model.sampling).
``--checkpoint`` takes a checkpoint or a run directory (``--best``: its best checkpoint);
an instruction-tuned one gets its prompt template and only the response is printed.
``--hf-dir`` takes a GPT-2 folder (with its own tokenizer files when present) or a Llama 3 /
Qwen3 folder; ``--hf-model REPO`` downloads one (model.weights.hub) and takes it the same
way. Tokens/s go to stderr after each sample.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import engine
from model.config import PRESETS
from model.data.datadir import DataFileNotFoundError, add_data_dir_argument
from model.sampling import generate
from model.tokenizers.gpt2 import gpt2_tokenizer
from model.training.cli import add_backend_argument, add_hf_model_argument, check_args, command_parser
from model.weights.checkpoint import CheckpointError
from model.weights.hub import HFDownloadError, download_hf_model
from model.weights.inference import InferenceModel, load_for_inference, load_hf_for_inference, prompt_inference
from model.weights.start import gpt2_start_tokenizer, load_start_model


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("generate", "Continue a prompt with a GPT: a trained checkpoint, OpenAI's GPT-2 "
                                        "weights, or an untrained preset.")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="Every effort moves you", help="text to continue")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from this text file")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="PATH",
                        help="checkpoint (PATH or PATH.safetensors) or run directory (its latest checkpoint)")
    add_hf_model_argument(source)
    source.add_argument("--hf-dir", metavar="DIR",
                        help="local Hugging Face folder: GPT-2 (config.json, model.safetensors, and vocab.json + "
                             "merges.txt if present), Llama 3 or Qwen3")
    parser.add_argument("--best", action="store_true", help="with a run directory: its best checkpoint, not its latest")
    parser.add_argument("--num-samples", type=int, default=1, help="continuations to write (seeds SEED, SEED+1, ...)")
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny",
                        help="untrained model to build when no weights are given")
    parser.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 = greedy decoding")
    parser.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample only among the most likely tokens whose probabilities add up to p (nucleus)")
    parser.add_argument("--seed", type=int, default=123,
                        help="seed for sampling and for an untrained model's init")
    parser.add_argument("--stop-at-eos", action="store_true", help="stop when the model emits <|endoftext|>")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole context at every step")
    add_backend_argument(parser)
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="where --hf-model downloads are kept (default: the user cache dir)")
    add_data_dir_argument(parser)
    return parser


def load_inference_model(args: argparse.Namespace) -> InferenceModel:
    """The model, tokenizer and prompt format the arguments name."""
    if args.checkpoint:
        return load_for_inference(args.checkpoint, args.best, args.data_dir)
    if args.hf_dir or args.hf_model:
        folder = args.hf_dir or download_hf_model(args.hf_model, args.cache_dir)
        return load_hf_for_inference(Path(folder), args.data_dir)
    print(f"note: no --checkpoint/--hf-model/--hf-dir given: an untrained {args.preset!r} model writes gibberish",
          file=sys.stderr)
    engine.manual_seed(args.seed)
    model = load_start_model(preset=args.preset)[0]
    return prompt_inference(model, gpt2_start_tokenizer(gpt2_tokenizer(args.data_dir)), None, f"random {args.preset}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.best and not args.checkpoint:
        parser.error("--best needs --checkpoint RUN_DIR")
    if args.num_samples < 1:
        parser.error(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.backend:
        engine.set_backend(args.backend)
    try:
        loaded = load_inference_model(args)
        model = loaded.model
        prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else args.prompt
        templated = loaded.chat.is_template
        ids = np.asarray(loaded.chat.encode([{"role": "user", "content": prompt}]) if templated
                         else loaded.encode(prompt), dtype=np.int64)  # (T,)
        if ids.size == 0:
            raise ValueError("the prompt is empty: give at least one token of text")
        if ids.max() >= model.config.vocab_size:
            raise ValueError(f"the prompt has token id {ids.max()}, beyond this model's vocab_size "
                             f"{model.config.vocab_size}: it was not trained with this tokenizer")
        stops = loaded.chat.stop_ids if templated or args.stop_at_eos else ()
        if templated:
            print(f"(prompt template {loaded.chat.name} applied; printing the response)", file=sys.stderr)
        for i in range(args.num_samples):
            start = time.perf_counter()
            out = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, eos_id=stops[0] if stops else None, use_cache=not args.no_cache,
                           seed=args.seed + i)  # (T + n,)
            seconds = time.perf_counter() - start
            new = [int(t) for t in out[len(ids):]]
            if args.num_samples > 1:
                print(f"--- sample {i + 1} of {args.num_samples} ---")
            if templated:
                new = new[:next((j for j, t in enumerate(new) if t in stops), len(new))]
                print(loaded.decode(new))
            else:
                print(loaded.decode([int(t) for t in out]))
            print(f"[{len(new)} tokens in {seconds:.2f} s: {len(new) / seconds:.1f} tokens/s]", file=sys.stderr)
    except (CheckpointError, HFDownloadError, DataFileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
