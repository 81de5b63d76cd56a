"""Text generation (the book's chapters 4 and 5): greedy, temperature, top-k and top-p
sampling, with a KV cache.

`generate` decodes a batch of equal-length prompts in lock step. Prompts of different
lengths (a list of lists) are decoded one at a time, since the model has no padding
mask. With the cache, each step feeds only the new token; once the sequence outgrows
``context_length`` every step recomputes over the last ``context_length`` tokens
(absolute positions shift, so cached keys would be wrong), exactly as the uncached path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tiktoken

import engine
from model.gpt import GPTModel, KVCache
from model.tokenizers.gpt2 import encode_text


def generate(
    model: GPTModel,
    ids: Any,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    seed: int | None = None,
) -> np.ndarray | list[np.ndarray]:
    """Extend token ids (B, T) by up to ``max_new_tokens`` tokens; returns (B, T + n) int64.

    temperature: 0 is greedy (argmax; top_k / top_p then change nothing); > 0 samples from
        softmax(logits / temperature), restricted to the ``top_k`` most likely tokens and
        then to the smallest set whose probability reaches ``top_p``.
    eos_id: a sequence that emits it is finished and padded with ``eos_id`` from then on;
        when every sequence is finished, generation stops early (n < max_new_tokens).
    seed: seeds the numpy Generator that draws the samples (reproducible runs).
    ids may also be one flat prompt (T,), giving (T + n,), or a list of prompts of
    different lengths, giving a list of 1-D arrays (decoded one after the other).

    Runs under ``engine.no_grad()`` in eval mode; the model's mode is restored afterwards.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    rng = np.random.default_rng(seed)

    def run(batch: np.ndarray) -> np.ndarray:
        return _generate_batch(model, batch, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, rng)

    if isinstance(ids, engine.Tensor):
        ids = ids.numpy()
    with model.evaluating(), engine.no_grad():
        if _is_ragged(ids):
            return [run(np.asarray(p, dtype=np.int64)[None])[0] for p in ids]
        batch = np.asarray(ids, dtype=np.int64)
        if batch.ndim == 1:
            return run(batch[None])[0]
        if batch.ndim != 2:
            raise ValueError(f"generate: ids must be (batch, seq_len), got shape {batch.shape}")
        return run(batch)


def _is_ragged(ids: Any) -> bool:
    if isinstance(ids, np.ndarray) or not isinstance(ids, Sequence) or not ids:
        return False
    lengths = {len(p) if isinstance(p, (Sequence, np.ndarray)) else -1 for p in ids}
    return len(lengths) > 1


def _generate_batch(
    model: GPTModel, ids: np.ndarray, max_new_tokens: int, temperature: float, top_k: int | None,
    top_p: float | None, eos_id: int | None, use_cache: bool, rng: np.random.Generator,
) -> np.ndarray:
    if ids.shape[1] == 0:
        raise ValueError("generate: prompts must hold at least one token")
    context = model.config.context_length
    cache: KVCache | None = model.new_kv_cache() if use_cache else None
    seq = ids  # (B, T)
    done = np.zeros(len(ids), dtype=bool)  # (B,)
    for _ in range(max_new_tokens):
        if cache is not None and cache.length == 0:
            logits = model(seq[:, -context:], kv_cache=cache)  # (B, T, vocab): the prompt
        elif cache is not None and cache.length < context:
            logits = model(seq[:, -1:], kv_cache=cache)  # (B, 1, vocab): the newest token
        else:
            # NOTE: the window slides from here on, shifting every position: recompute.
            cache = None
            logits = model(seq[:, -context:])  # (B, T', vocab)
        next_ids = sample_next(logits[:, -1].numpy(), temperature, top_k, top_p, rng)  # (B,)
        if eos_id is not None:
            next_ids = np.where(done, eos_id, next_ids)
            done |= next_ids == eos_id
        seq = np.concatenate([seq, next_ids[:, None]], axis=1)  # (B, T + 1)
        if done.all():
            break
    return seq


def sample_next(
    logits: np.ndarray,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Next token ids (B,) from last-position logits (B, vocab): argmax when temperature
    is 0, else a draw from the temperature-scaled softmax after top-k and top-p filtering."""
    logits = np.asarray(logits, dtype=np.float64)  # (B, V)
    if temperature == 0.0:
        return logits.argmax(axis=-1)
    rng = np.random.default_rng() if rng is None else rng
    B, V = logits.shape
    if top_k is not None and top_k < V:
        kth = np.partition(logits, V - top_k, axis=-1)[:, V - top_k, None]  # (B, 1)
        logits = np.where(logits < kth, -np.inf, logits)  # ties with the k-th value stay in
    scaled = logits / temperature
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))  # (B, V)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")  # (B, V), most likely first
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # keep a token while the mass before it is below top_p: the top token always stays
        keep_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs < top_p
        keep = np.empty_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
    cdf = np.cumsum(probs, axis=-1)  # (B, V), unnormalised
    u = rng.random(B)[:, None] * cdf[:, -1:]  # (B, 1)
    # NOTE: the first index whose cdf exceeds u; "<=" skips zero-probability tokens even at u = 0.
    return np.minimum((cdf <= u).sum(axis=-1), V - 1)


def text_to_ids(text: str, tokenizer: tiktoken.Encoding) -> np.ndarray:
    """Token ids (1, T) of ``text``; special tokens such as <|endoftext|> are allowed."""
    return np.asarray([encode_text(tokenizer, text)], dtype=np.int64)


def ids_to_text(ids: Any, tokenizer: tiktoken.Encoding) -> str:
    """Text of one sequence of ids, (T,) or (1, T)."""
    ids = np.asarray(ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise ValueError(f"ids_to_text decodes one sequence, (T,) or (1, T); got shape {ids.shape}")
    return tokenizer.decode(ids.tolist())
