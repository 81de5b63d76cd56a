"""The Llama / Qwen3 decoder on our engine, from engine.nn modules and engine ops.

    ids (B, T) ─ embed_tokens ─ N × Block ─ norm ─ lm_head ─ logits (B, T, vocab)
    Block:  x = x + o_proj(attention(rope(q), rope(k), v));  x = x + down(swiglu(gate(x), up(x)))
            (each branch reads RMSNorm(x): input_layernorm, post_attention_layernorm)

Parameter names are Hugging Face's without the ``model.`` prefix (``layers.0.self_attn.q_proj``,
``mlp.gate_proj``, ``norm``), so loading is a prefix strip and LoRA targets read as in peft.
Every layer is an ``nn.Linear`` or an engine op, so autograd, LoRA and the optimizers work
unchanged. RMSNorm, RoPE, SwiGLU and grouped-query attention are the engine's fused ops
(``F.rms_norm``, ``F.rope``, ``F.swiglu``, ``F.causal_attention`` with fewer K/V heads): Triton
kernels on the triton backend, their NumPy twins on numpy; K/V heads are never repeated.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import engine
from engine import functional as F
from engine import nn
from model.decoder.config import DecoderConfig, RopeScaling
from model.gpt import KVCache, head_or_loss


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight over the last dim (no centring, no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(engine.ones(dim))

    def forward(self, x: engine.Tensor) -> engine.Tensor:
        return F.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """The head_dim / 2 rotation speeds (radians per position), float64.

    Plain RoPE: theta^(-2i / head_dim). Llama 3 scaling divides the speeds whose wavelength
    exceeds original_context_length / low_freq_factor by ``factor``, keeps those shorter than
    original_context_length / high_freq_factor, and blends linearly (in context / wavelength)
    in between."""
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (D/2,)
    if scaling is None:
        return inv_freq
    wavelength = 2 * math.pi / inv_freq
    ctx, low, high = scaling.original_context_length, scaling.low_freq_factor, scaling.high_freq_factor
    blend = np.clip((ctx / wavelength - low) / (high - low), 0.0, 1.0)  # 0: slow it down fully, 1: keep it
    return inv_freq * (blend + (1 - blend) / scaling.factor)


class Attention(nn.Module):
    """Grouped-query causal self-attention with rotary positions (and Qwen3's q/k RMSNorm)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        E, D = config.emb_dim, config.head_dim
        self.q_proj = nn.Linear(E, config.n_heads * D, bias=False)
        self.k_proj = nn.Linear(E, config.n_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(E, config.n_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(config.n_heads * D, E, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(D, config.rms_norm_eps)
            self.k_norm = RMSNorm(D, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x: engine.Tensor, cos: engine.Tensor, sin: engine.Tensor, start: int = 0,
                kv_cache: KVCache | None = None, layer: int = 0) -> engine.Tensor:
        """cos, sin: (P, D/2) tables of positions 0 … P-1; x's T tokens sit at positions start …"""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(B, T, H, D)  # (B, T, H, D)
        k = self.k_proj(x).reshape(B, T, Hkv, D)  # (B, T, Hkv, D)
        v = self.v_proj(x).reshape(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = F.rope(q.transpose(1, 2), cos, sin, start)  # (B, H, T, D); the kernel reads the view in place
        k = F.rope(k.transpose(1, 2), cos, sin, start)  # (B, Hkv, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, Hkv, S + T, D): the cache holds the Hkv heads only
        # NOTE: grouped-query attention reads K/V head h // (H / Hkv) for query head h; the
        # causal mask is bottom-right aligned, so new queries see every cached key.
        y = F.causal_attention(q, k, v)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, E)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.emb_dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.emb_dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.emb_dim, bias=False)

    def forward(self, x: engine.Tensor) -> engine.Tensor:
        return self.down_proj(F.swiglu(self.gate_proj(x), self.up_proj(x)))  # (B, T, E)


class Block(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.emb_dim, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.emb_dim, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: engine.Tensor, cos: engine.Tensor, sin: engine.Tensor, start: int = 0,
                kv_cache: KVCache | None = None, layer: int = 0) -> engine.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start, kv_cache, layer)  # (B, T, E)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, E)


class DecoderModel(nn.Module):
    """Llama 3 / Qwen3 causal language model; the same call interface as `GPTModel`
    (``model(ids, kv_cache=...)``, ``new_kv_cache()``, ``config.context_length``), so the
    shared ``generate`` and training code drive it unchanged."""

    def __init__(self, config: DecoderConfig, init_weights: bool = True):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.emb_dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.emb_dim, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.embed_tokens.weight  # the same Parameter, updated once
        if init_weights:  # a loader about to overwrite every weight skips the second draw
            self._init_weights()
        self.inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self._rope_tables: tuple[str, engine.Tensor, engine.Tensor] | None = None  # (backend, cos, sin)

    def _init_weights(self) -> None:
        """N(0, 0.02) for every matrix (Hugging Face's initializer_range), ones for the norms."""
        backend = engine.get_backend()
        for p in self.parameters():
            if p.ndim == 2:
                p.data = backend.randn(p.shape, "float32") * 0.02

    def forward(self, ids: Any, kv_cache: KVCache | None = None, targets: Any = None,
                hidden_states: list[engine.Tensor] | None = None) -> engine.Tensor:
        """Logits (B, T, vocab_size) for token ids (B, T); with ``targets`` (B, T), the mean
        next-token cross-entropy instead (targets -100 skipped), fused with the head as in
        `GPTModel` so the (B, T, vocab) logits are never held.

        With ``kv_cache``, ``ids`` are only the new tokens, at positions ``kv_cache.length …``.
        A ``hidden_states`` list receives the residual stream after the embedding and after
        each block (what transformers' ``output_hidden_states`` gives before its final norm)."""
        ids = ids if isinstance(ids, engine.Tensor) else engine.tensor(np.asarray(ids))
        if ids.ndim != 2:
            raise ValueError(f"DecoderModel: ids must be (batch, seq_len), got shape {ids.shape}")
        T = ids.shape[1]
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.config.context_length:
            raise ValueError(f"DecoderModel: {T} tokens plus {start} cached exceed context_length "
                             f"{self.config.context_length}; crop the input")
        if kv_cache is not None and len(kv_cache.keys) != len(self.layers):
            raise ValueError(f"DecoderModel: the KVCache has {len(kv_cache.keys)} layers, the model {len(self.layers)}")
        x = self.embed_tokens(ids)  # (B, T, E)
        cos, sin = self.rope_tables()  # (context_length, D/2) each
        if hidden_states is not None:
            hidden_states.append(x)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, start, kv_cache, i)  # (B, T, E)
            if hidden_states is not None:
                hidden_states.append(x)
        return head_or_loss(self.lm_head, self.norm(x), targets)  # (B, T, vocab) logits, or the loss

    def rope_tables(self) -> tuple[engine.Tensor, engine.Tensor]:
        """cos, sin (context_length, head_dim / 2) float32 on the active backend, made once per backend:
        a KV-cache step reads its rows by position offset, with no trigonometry or host copy per step."""
        backend = engine.get_backend().name
        if self._rope_tables is None or self._rope_tables[0] != backend:
            positions = np.arange(self.config.context_length, dtype=np.float64)
            angles = positions[:, None] * self.inv_freq[None]  # (context_length, D/2)
            cos = engine.tensor(np.cos(angles), dtype="float32")
            self._rope_tables = (backend, cos, engine.tensor(np.sin(angles), dtype="float32"))
        return self._rope_tables[1], self._rope_tables[2]

    def new_kv_cache(self) -> KVCache:
        return KVCache(len(self.layers))
