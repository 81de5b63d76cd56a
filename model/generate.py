"""Continue a prompt with a GPT: ``python -m model.generate --prompt "Every effort moves you" --hf-model gpt2``.

Greedy by default; ``--temperature``, ``--top-k`` and ``--top-p`` sample (model.sampling).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import engine
from model.config import PRESETS
from model.data.datadir import DataFileNotFoundError, add_data_dir_argument
from model.gpt import GPTModel
from model.sampling import generate, ids_to_text, text_to_ids
from model.tokenizers.gpt2 import gpt2_tokenizer
from model.training.cli import command_parser
from model.weights.checkpoint import CheckpointError
from model.weights.hf import HF_MODELS, HFDownloadError
from model.weights.start import load_start_model


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("generate", "Continue a prompt with a GPT: a trained checkpoint, OpenAI's GPT-2 "
                                        "weights, or an untrained preset.")
    parser.add_argument("--prompt", default="Every effort moves you", help="text to continue")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="PATH",
                        help="checkpoint written by save_checkpoint (PATH.safetensors + PATH.json)")
    source.add_argument("--hf-model", choices=HF_MODELS,
                        help="OpenAI GPT-2 weights from huggingface.co (downloaded once into --cache-dir)")
    source.add_argument("--hf-dir", metavar="DIR",
                        help="local Hugging Face GPT-2 directory holding config.json and model.safetensors")
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
    parser.add_argument("--backend", choices=["numpy", "triton"], default=None,
                        help="engine backend (default: triton with a CUDA GPU, else numpy)")
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="where --hf-model downloads are kept (default: the user cache dir)")
    add_data_dir_argument(parser)
    return parser


def load_model(args: argparse.Namespace) -> GPTModel:
    """The model the command-line arguments name."""
    if not (args.checkpoint or args.hf_dir or args.hf_model):
        print(f"note: no --checkpoint/--hf-model/--hf-dir given: an untrained {args.preset!r} model "
              "writes gibberish", file=sys.stderr)
        engine.manual_seed(args.seed)
    return load_start_model(checkpoint=args.checkpoint, hf_model=args.hf_model, hf_dir=args.hf_dir,
                            preset=args.preset, cache_dir=args.cache_dir)[0]


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.backend:
        engine.set_backend(args.backend)
    try:
        tokenizer = gpt2_tokenizer(args.data_dir)
        model = load_model(args)
        ids = text_to_ids(args.prompt, tokenizer)
        if ids.size == 0:
            raise ValueError("the prompt is empty: give at least one token of text")
        if ids.max() >= model.config.vocab_size:
            raise ValueError(f"the prompt has token id {ids.max()}, beyond this model's vocab_size "
                             f"{model.config.vocab_size}: it was not trained with the GPT-2 tokenizer")
        eos_id = tokenizer.eot_token if args.stop_at_eos else None
        out = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, eos_id=eos_id, use_cache=not args.no_cache, seed=args.seed)
    except (CheckpointError, HFDownloadError, DataFileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(ids_to_text(out, tokenizer))


if __name__ == "__main__":
    main()
