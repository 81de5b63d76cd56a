"""Generation speed of our engine against transformers: ``python -m bench.generate``.

For each model (GPT-2, Llama 3, Qwen3) both sides hold the same weights (ours, exported to a
Hugging Face folder that transformers loads; or a real folder with ``--hf-dir``) and decode
the same random prompt greedily: a prefill (the whole prompt in one forward, giving the
first token) then single-token decode steps on a KV cache (ours: `KVCache`; transformers:
``use_cache=True``). The greedy tokens must be equal, else the bench fails. One warmup
generation, then the median of ``--repeats`` timed ones per phase, in tokens/s.

Sizes without downloads (random weights): ``--size small`` (default) is GPT-2 small (124M)
and the Qwen3 0.6B / Llama 3.2 1B shapes with 2 layers (the vocabulary-sized embedding and
head, most of a small model's decode time, stay whole); ``--size tiny`` is a smoke run in seconds. Our side runs on
the active backend (``--backend``); transformers runs fp32 on the CPU, or on the GPU with
the triton backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import engine
from bench.common import bench_main, print_table
from model.config import get_config
from model.decoder import PRESETS as DECODER_PRESETS
from model.decoder import DecoderModel, export_hf_folder, load_hf_model
from model.gpt import GPTModel
from model.weights.hf import export_hf, load_hf_gpt2
from model.weights.start import hf_model_type

MODELS = ("gpt2", "llama", "qwen3")
HEADERS = ("model", "phase", "tokens", "ours tok/s", "transformers tok/s", "ours/theirs")
TINY_DECODER = dict(vocab_size=512, context_length=16384, emb_dim=64, hidden_dim=128, n_layers=2, n_heads=4,
                    n_kv_heads=2, head_dim=16)


def random_model(kind: str, size: str) -> Any:
    """Our model of ``kind`` at ``size``, seeded random weights (fp32, no dropout)."""
    engine.manual_seed(0)
    if kind == "gpt2":
        preset = "gpt2-small" if size == "small" else "tiny"
        return GPTModel(get_config(preset, drop_rate=0.0, qkv_bias=True, tie_weights=True))
    preset = DECODER_PRESETS["qwen3-0.6b" if kind == "qwen3" else "llama-3.2-1b"]
    overrides = {"n_layers": 2} if size == "small" else TINY_DECODER
    return DecoderModel(dataclasses.replace(preset, **overrides))


def export_folder(model: Any, directory: Path) -> Path:
    """``model`` as a Hugging Face folder transformers loads."""
    if isinstance(model, GPTModel):
        return export_hf(model, directory)
    return export_hf_folder(model, directory)


def load_ours(directory: Path) -> Any:
    if hf_model_type(directory) == "gpt2":
        return load_hf_gpt2(directory, drop_rate=0.0)
    return load_hf_model(directory)


def greedy_ours(model: Any, prompt: np.ndarray, new_tokens: int) -> tuple[list[int], float, float]:
    """(tokens, prefill seconds, decode seconds) of greedy decoding on our KV cache."""
    with model.evaluating(), engine.no_grad():
        cache = model.new_kv_cache()
        start = time.perf_counter()
        logits = model(prompt[None], kv_cache=cache)  # (1, T, vocab)
        tokens = [int(logits[:, -1].numpy().argmax())]
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits = model(np.asarray([[tokens[-1]]]), kv_cache=cache)  # (1, 1, vocab)
            tokens.append(int(logits[:, -1].numpy().argmax()))
        return tokens, prefill, time.perf_counter() - start


def greedy_theirs(model: Any, prompt: np.ndarray, new_tokens: int) -> tuple[list[int], float, float]:
    """The same with transformers and its cache (``past_key_values``)."""
    device = next(model.parameters()).device
    # NOTE: newer transformers name the cache argument and output `cache`, older ones `past_key_values`
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        start = time.perf_counter()
        out = model(torch.as_tensor(prompt[None], device=device), use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]  # int() waits for the GPU
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(torch.tensor([[tokens[-1]]], device=device), use_cache=True, **{cache: getattr(out, cache)})
            tokens.append(int(out.logits[0, -1].argmax()))
        return tokens, prefill, time.perf_counter() - start


def timed(run: Callable[[], tuple[list[int], float, float]], repeats: int) -> tuple[list[int], float, float]:
    """A warmup run, then (tokens, median prefill s, median decode s) of ``repeats`` runs; every run's
    tokens must be the same."""
    tokens, _, _ = run()
    prefills, decodes = [], []
    for _ in range(repeats):
        again, prefill, decode = run()
        assert again == tokens, "greedy decoding is not deterministic from run to run"
        prefills.append(prefill)
        decodes.append(decode)
    return tokens, statistics.median(prefills), statistics.median(decodes)


def bench_folder(label: str, directory: Path, ours: Any, args: argparse.Namespace) -> list[tuple]:
    """Rows for one model: prefill and decode, ours vs transformers, same greedy tokens asserted."""
    import transformers

    device = "cuda" if engine.get_backend().name == "triton" else "cpu"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device).eval()
    vocab = min(ours.config.vocab_size, theirs.config.vocab_size)
    prompt = np.random.default_rng(0).integers(0, vocab, args.prompt_tokens)  # (T,)
    our_tokens, our_prefill, our_decode = timed(lambda: greedy_ours(ours, prompt, args.new_tokens), args.repeats)
    their_tokens, their_prefill, their_decode = timed(lambda: greedy_theirs(theirs, prompt, args.new_tokens),
                                                      args.repeats)
    assert our_tokens == their_tokens, f"{label}: greedy tokens differ: ours {our_tokens}, theirs {their_tokens}"
    print(f"{label}: the same {len(our_tokens)} greedy tokens from ours and transformers")
    steps = args.new_tokens - 1
    return [(label, "prefill", args.prompt_tokens, args.prompt_tokens / our_prefill,
             args.prompt_tokens / their_prefill, their_prefill / our_prefill),
            (label, "decode", steps, steps / our_decode, steps / their_decode, their_decode / our_decode)]


def run(args: argparse.Namespace) -> None:
    if args.backend:
        engine.set_backend(args.backend)
    if args.quick:
        args.repeats = 1
    print(f"backend {engine.get_backend().name}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new; "
          f"median of {args.repeats} after a warmup (wall time, so a busy machine slows both sides)")
    rows = []
    if args.hf_dir:
        directory = Path(args.hf_dir)
        rows += bench_folder(f"{hf_model_type(directory)} ({directory.name})", directory, load_ours(directory), args)
    else:
        for kind in args.models:
            with tempfile.TemporaryDirectory() as tmp:
                ours = random_model(kind, args.size)
                rows += bench_folder(f"{kind} ({args.size}, random)", export_folder(ours, Path(tmp)), ours, args)
    print_table(HEADERS, rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("numpy", "triton"), default=None,
                        help="our engine's backend (default: triton with a CUDA GPU, else numpy)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="which families to build with random weights")
    parser.add_argument("--size", choices=("tiny", "small"), default="small", help="random-weight model size")
    parser.add_argument("--hf-dir", metavar="DIR", default=None,
                        help="bench this Hugging Face folder (GPT-2, Llama 3, Qwen3) instead of random models")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (prefill)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens to generate (decode: all but the first)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per side (--quick: 1)")


def main(argv: list[str] | None = None) -> None:
    bench_main("generate", __doc__, "Greedy generation", run, run, add_arguments, argv)


if __name__ == "__main__":
    main()
