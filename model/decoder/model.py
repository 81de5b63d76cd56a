"""The Llama / Qwen3 decoder on our engine, from engine.nn modules and engine ops.

    ids (B, T) ─ embed_tokens ─ N × Block ─ norm ─ lm_head ─ logits (B, T, vocab)
    Block:  x = x + o_proj(attention(rope(q), rope(k), v));  x = x + down(silu(gate(x)) · up(x))
            (each branch reads RMSNorm(x): input_layernorm, post_attention_layernorm)

Parameter names are Hugging Face's without the ``model.`` prefix (``layers.0.self_attn.q_proj``,
``mlp.gate_proj``, ``norm``), so loading is a prefix strip and LoRA targets read as in peft.
Every layer is an ``nn.Linear`` or composed from engine ops, so autograd, LoRA and the
optimizers work unchanged. RMSNorm, RoPE, SwiGLU and the K/V head repeat are composed from
primitive ops here; fused kernels for them are a later step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import engine
from engine import functional as F
from engine import nn
from model.decoder.config import DecoderConfig, RopeScaling
from model.gpt import KVCache


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight over the last dim (no centring, no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(engine.ones(dim))

    def forward(self, x: engine.Tensor) -> engine.Tensor:
        rstd = ((x * x).mean(-1, keepdims=True) + self.eps) ** -0.5  # (..., 1)
        return x * rstd * self.weight

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


def rotate(x: engine.Tensor, cos: engine.Tensor, sin: engine.Tensor) -> engine.Tensor:
    """Rotary embedding on (B, H, T, D) with cos/sin (T, D/2): the pairs (x_i, x_{i+D/2})
    turn by position × inv_freq_i (the "rotate half" layout of Hugging Face's Llama)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (B, H, T, D/2) each
    return engine.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # (B, H, T, D)


def silu(x: engine.Tensor) -> engine.Tensor:
    """x · sigmoid(x), with sigmoid(x) = (1 + tanh(x / 2)) / 2.

    NOTE: the tanh form cannot overflow; 1 / (1 + exp(-x)) overflows exp for x < -88 in
    fp32 and its backward then multiplies 0 by inf."""
    return x * ((x * 0.5).tanh() + 1.0) * 0.5


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

    def forward(self, x: engine.Tensor, cos: engine.Tensor, sin: engine.Tensor, kv_cache: KVCache | None = None,
                layer: int = 0) -> engine.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(B, T, H, D)  # (B, T, H, D)
        k = self.k_proj(x).reshape(B, T, Hkv, D)  # (B, T, Hkv, D)
        v = self.v_proj(x).reshape(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rotate(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = rotate(k.transpose(1, 2), cos, sin)  # (B, Hkv, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, Hkv, S + T, D): the cache holds the Hkv heads only
        if H != Hkv:
            k, v = repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv)  # (B, H, S + T, D)
        # NOTE: bottom-right aligned causal mask: new queries see every cached key.
        y = F.causal_attention(q, k, v)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, E)


def repeat_kv(x: engine.Tensor, group: int) -> engine.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv · group, S, D): query head h reads K/V head h // group.
    Its backward sums each group's gradients back onto its K/V head."""
    B, Hkv, S, D = x.shape
    return engine.cat([x.unsqueeze(2)] * group, axis=2).reshape(B, Hkv * group, S, D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.emb_dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.emb_dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.emb_dim, bias=False)

    def forward(self, x: engine.Tensor) -> engine.Tensor:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, E)


class Block(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.emb_dim, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.emb_dim, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: engine.Tensor, cos: engine.Tensor, sin: engine.Tensor, kv_cache: KVCache | None = None,
                layer: int = 0) -> engine.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, layer)  # (B, T, E)
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

    def _init_weights(self) -> None:
        """N(0, 0.02) for every matrix (Hugging Face's initializer_range), ones for the norms."""
        backend = engine.get_backend()
        for p in self.parameters():
            if p.ndim == 2:
                p.data = backend.randn(p.shape, "float32") * 0.02

    def forward(self, ids: Any, kv_cache: KVCache | None = None,
                hidden_states: list[engine.Tensor] | None = None) -> engine.Tensor:
        """Logits (B, T, vocab_size) for token ids (B, T).

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
        angles = np.arange(start, start + T, dtype=np.float64)[:, None] * self.inv_freq[None]  # (T, D/2)
        cos = engine.tensor(np.cos(angles), dtype=x.dtype)  # (T, D/2)
        sin = engine.tensor(np.sin(angles), dtype=x.dtype)  # (T, D/2)
        if hidden_states is not None:
            hidden_states.append(x)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, kv_cache, i)  # (B, T, E)
            if hidden_states is not None:
                hidden_states.append(x)
        return self.lm_head(self.norm(x))  # (B, T, vocab)

    def new_kv_cache(self) -> KVCache:
        return KVCache(len(self.layers))
