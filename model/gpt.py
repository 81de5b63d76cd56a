"""The GPT-2 model (the book's chapter 4), on our engine.

Parameter names are GPT-2's own (``wte``, ``wpe``, ``h.{i}.attn.c_attn``, …, ``ln_f``,
``lm_head``) so a Hugging Face checkpoint loads by a name map (see ``model/hf_gpt2.py``).
The code only uses engine ops, so it runs unchanged on the numpy and triton backends.

    ids (B, T) ─ wte + wpe ─ dropout ─ N × Block ─ ln_f ─ lm_head ─ logits (B, T, vocab)
    Block:  x = x + dropout(attn(ln_1(x)));  x = x + dropout(mlp(ln_2(x)))
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import engine
from engine import functional as F
from engine import nn
from model.config import GPTConfig


class KVCache:
    """Keys and values of the tokens seen so far, per layer, each (B, H, S, D).

    Pass one to `GPTModel.forward` and feed only the new tokens: their positions continue
    from `length`, and attention sees the cached keys plus the new ones. Entries are
    detached (no graph): the cache is for inference.
    """

    def __init__(self, n_layers: int):
        self.keys: list[engine.Tensor | None] = [None] * n_layers
        self.values: list[engine.Tensor | None] = [None] * n_layers

    @property
    def length(self) -> int:
        """Number of cached positions (S)."""
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def __len__(self) -> int:
        return self.length

    def update(self, layer: int, k: engine.Tensor, v: engine.Tensor) -> tuple[engine.Tensor, engine.Tensor]:
        """Append the new k, v (B, H, T, D) of ``layer``; return all keys and values (B, H, S + T, D)."""
        if self.keys[layer] is not None:
            k = engine.cat([self.keys[layer], k], axis=2)  # (B, H, S + T, D)
            v = engine.cat([self.values[layer], v], axis=2)  # (B, H, S + T, D)
        self.keys[layer], self.values[layer] = k.detach(), v.detach()
        return k, v

    def reset(self) -> None:
        self.keys = [None] * len(self.keys)
        self.values = [None] * len(self.values)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.drop_rate = config.drop_rate
        self.c_attn = nn.Linear(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.emb_dim, config.emb_dim)

    def forward(self, x: engine.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> engine.Tensor:
        B, T, E = x.shape
        qkv = self.c_attn(x).reshape(B, T, 3, self.n_heads, self.head_dim)  # (B, T, 3, H, D)
        q = qkv[:, :, 0].transpose(1, 2)  # (B, H, T, D)
        k = qkv[:, :, 1].transpose(1, 2)  # (B, H, T, D)
        v = qkv[:, :, 2].transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, H, S + T, D)
        dropout_p = self.drop_rate if self.training else 0.0
        # NOTE: the engine's causal mask is bottom-right aligned, so new queries at positions
        # S..S+T-1 see every cached key and the new keys up to their own position.
        y = F.causal_attention(q, k, v, dropout_p=dropout_p)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, E)  # (B, T, E)
        return self.c_proj(y)  # (B, T, E)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.emb_dim, 4 * config.emb_dim)
        self.c_proj = nn.Linear(4 * config.emb_dim, config.emb_dim)

    def forward(self, x: engine.Tensor) -> engine.Tensor:
        # c_fc's bias goes into the fused bias + GELU kernel instead of the matmul.
        h = F.linear(x, self.c_fc.weight)  # (B, T, 4E)
        bias = self.c_fc.bias
        if bias.dtype != h.dtype:  # under engine.autocast the matmul ran in lower precision
            bias = bias.astype(h.dtype)
        return self.c_proj(F.bias_gelu(h, bias))  # (B, T, E)


class Block(nn.Module):
    """Pre-LayerNorm transformer block with residual dropout."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.drop_rate)

    def forward(self, x: engine.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> engine.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), kv_cache, layer))  # (B, T, E)
        return x + self.drop(self.mlp(self.ln_2(x)))  # (B, T, E)


class GPTModel(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.emb_dim)
        self.wpe = nn.Embedding(config.context_length, config.emb_dim)
        self.drop = nn.Dropout(config.drop_rate)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight  # the same Parameter, updated once
        if config.init == "gpt2":  # "book": keep the layers' PyTorch-default init
            self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases; the projections into the residual
        stream (c_proj) scaled by 1/sqrt(2·n_layers), since 2·n_layers of them add up."""
        backend = engine.get_backend()
        proj_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            tied_head = module is self.lm_head and self.config.tie_weights  # wte's weight, set already
            if isinstance(module, (nn.Linear, nn.Embedding)) and not tied_head:
                std = proj_std if name.endswith("c_proj") else 0.02
                module.weight.data = backend.randn(module.weight.shape, "float32") * std
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data = backend.zeros(module.bias.shape, "float32")

    def forward(self, ids: Any, kv_cache: KVCache | None = None, targets: Any = None) -> engine.Tensor:
        """Logits (B, T, vocab_size) for integer token ids (B, T); with ``targets`` (B, T),
        the mean next-token cross-entropy instead (positions with target -100 skipped).

        The loss goes through ``F.linear_cross_entropy``, which never holds the (B, T, vocab)
        logits, unless ``lm_head`` was replaced (LoRA, a classifier head). With
        ``kv_cache``, ``ids`` are only the new tokens: they take positions
        ``kv_cache.length …`` and the cache grows by T."""
        ids = ids if isinstance(ids, engine.Tensor) else engine.tensor(np.asarray(ids))
        if ids.ndim != 2:
            raise ValueError(f"GPTModel: ids must be (batch, seq_len), got shape {ids.shape}")
        B, T = ids.shape
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.config.context_length:
            cached = f" plus {start} cached" if start else ""
            raise ValueError(
                f"GPTModel: {T} tokens{cached} exceed context_length {self.config.context_length}; "
                "crop the input to the last context_length tokens"
            )
        if kv_cache is not None and len(kv_cache.keys) != len(self.h):
            raise ValueError(f"GPTModel: the KVCache has {len(kv_cache.keys)} layers, the model {len(self.h)}")
        positions = np.arange(start, start + T)  # (T,)
        x = self.drop(self.wte(ids) + self.wpe(positions))  # (B, T, E)
        for i, block in enumerate(self.h):
            x = block(x, kv_cache, i)  # (B, T, E)
        return head_or_loss(self.lm_head, self.ln_f(x), targets)

    def new_kv_cache(self) -> KVCache:
        return KVCache(len(self.h))


def head_or_loss(lm_head: nn.Module, x: engine.Tensor, targets: Any = None) -> engine.Tensor:
    """Logits ``lm_head(x)`` (B, T, vocab) of the final hidden states x (B, T, E); with
    ``targets`` (B, T), their mean cross-entropy instead (targets -100 skipped), through
    ``F.linear_cross_entropy`` (no (B, T, vocab) logits held) while the head is a plain Linear."""
    if targets is None:
        return lm_head(x)  # (B, T, vocab)
    if type(lm_head) is nn.Linear:
        return F.linear_cross_entropy(x, lm_head.weight, targets, bias=lm_head.bias)
    return F.cross_entropy(lm_head(x), targets)


def model_from_state_dict(config: GPTConfig, state: dict[str, Any]) -> GPTModel:
    """A `GPTModel` for ``config`` holding ``state`` (name -> array, every name), in the
    arrays' float dtype. Raises the engine's KeyError when names or shapes do not fit.

    NOTE: building the model draws random init values; the engine's generator state is
    restored afterwards, so loading weights does not disturb a resumed run's RNG stream."""
    backend = engine.get_backend()
    rng_state = backend.rng_state()
    try:
        model = GPTModel(config)
    finally:
        backend.set_rng_state(rng_state)
    stored = state.get("wte.weight")
    if stored is not None and np.asarray(stored).dtype == np.float64:
        model.to("float64")
    model.load_state_dict(state, strict=True)
    return model


def count_parameters(model: GPTModel | GPTConfig, exclude_output_head: bool = False) -> int:
    """Number of parameters, each distinct one once (a tied head adds nothing).

    ``exclude_output_head`` leaves out an untied ``lm_head.weight``: the book's "124M"
    for gpt2-small, whose untied total is 163M. Given a `GPTConfig` instead of a model,
    the count is computed without allocating anything (handy before building gpt2-xl)."""
    if isinstance(model, GPTConfig):
        c = model
        E = c.emb_dim
        block = 2 * E + 3 * E * E + (3 * E if c.qkv_bias else 0) + E * E + E + 2 * E + 8 * E * E + 5 * E
        head = 0 if c.tie_weights or exclude_output_head else c.vocab_size * E
        return c.vocab_size * E + c.context_length * E + c.n_layers * block + 2 * E + head
    total = model.num_parameters()
    if exclude_output_head and model.lm_head.weight is not model.wte.weight:
        total -= model.lm_head.weight.size
    return total


def memory_report(model: GPTModel | GPTConfig, bytes_per_parameter: int = 4) -> str:
    """Parameter count and size in MB (default fp32, 4 bytes each), as the book prints them."""
    total = count_parameters(model)
    without_head = count_parameters(model, exclude_output_head=True)
    tied = model.tie_weights if isinstance(model, GPTConfig) else model.lm_head.weight is model.wte.weight

    def mb(n: int) -> str:
        return f"{n * bytes_per_parameter / 1024**2:,.2f} MB"

    lines = [
        f"parameters:          {total:>15,}  ({mb(total)} at {bytes_per_parameter} bytes each)",
        f"without output head: {without_head:>15,}  ({mb(without_head)})"
        + ("  [head tied to wte: counted once]" if tied else ""),
    ]
    return "\n".join(lines)
