"""Configuration of the Llama / Qwen3 decoder family: `DecoderConfig`, presets, sizes.

One dataclass covers both: Qwen3 is Llama plus an RMSNorm on each head's queries and keys
(``qk_norm``) and a ``head_dim`` that need not be ``emb_dim / n_heads``. Field names
follow our GPT config (``emb_dim``, ``n_layers``, ``context_length``); `model.decoder.hf`
maps them to and from a Hugging Face ``config.json``.

The presets hold the published config.json values of each model; their parameter counts
(tied head counted once) are Llama 3.2 1B 1,235,814,400, 3B 3,212,749,824, Qwen3 0.6B
596,049,920 and 1.7B 1,720,574,976.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

MODEL_TYPES = ("llama", "qwen3")


@dataclass
class RopeScaling:
    """Llama 3's frequency scaling: long wavelengths slowed by ``factor``, short ones kept,
    a smooth blend in between (``rope_type: "llama3"`` in config.json)."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: int = 8192


@dataclass
class DecoderConfig:
    model_type: str = "llama"  # "llama" or "qwen3": the Hugging Face architecture it loads from
    vocab_size: int = 128256
    context_length: int = 131072  # max_position_embeddings
    emb_dim: int = 2048  # hidden_size
    hidden_dim: int = 8192  # intermediate_size of the SwiGLU MLP
    n_layers: int = 16
    n_heads: int = 32
    n_kv_heads: int = 8  # grouped-query attention: each K/V head serves n_heads / n_kv_heads queries
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's queries and keys before RoPE
    tie_weights: bool = True  # lm_head.weight is embed_tokens.weight

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict (rope_scaling nested)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderConfig:
        """Inverse of `to_dict`. Unknown keys are an error (they would be silently lost)."""
        if not isinstance(data, dict):
            raise ValueError(f"DecoderConfig.from_dict needs a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"DecoderConfig.from_dict: unknown fields {', '.join(unknown)}")
        scaling = data.get("rope_scaling")
        return cls(**{**data, "rope_scaling": None if scaling is None else RopeScaling(**scaling)})

    def validate(self) -> None:
        """Raise ValueError naming every field that cannot build a model."""
        problems = []
        if self.model_type not in MODEL_TYPES:
            problems.append(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}")
        for name in ("vocab_size", "context_length", "emb_dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if not problems and self.head_dim % 2:
            problems.append(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                problems.append(f"{name} must be > 0, got {value!r}")
        for name in ("qk_norm", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        s = self.rope_scaling
        if s is not None and not (s.factor > 0 and 0 < s.low_freq_factor < s.high_freq_factor
                                  and s.original_context_length > 0):
            problems.append(f"rope_scaling needs factor > 0 and 0 < low_freq_factor < high_freq_factor, got {s}")
        if problems:
            raise ValueError("invalid DecoderConfig: " + "; ".join(problems))


_LLAMA32 = dict(model_type="llama", vocab_size=128256, context_length=131072, rms_norm_eps=1e-5,
                rope_theta=500000.0, rope_scaling=RopeScaling(), tie_weights=True)
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, context_length=40960, rms_norm_eps=1e-6,
              rope_theta=1000000.0, qk_norm=True, tie_weights=True, n_layers=28, n_heads=16, n_kv_heads=8,
              head_dim=128)

PRESETS: dict[str, DecoderConfig] = {
    "llama-3.2-1b": DecoderConfig(**_LLAMA32, emb_dim=2048, hidden_dim=8192, n_layers=16, n_heads=32,
                                  n_kv_heads=8, head_dim=64),
    "llama-3.2-3b": DecoderConfig(**_LLAMA32, emb_dim=3072, hidden_dim=8192, n_layers=28, n_heads=24,
                                  n_kv_heads=8, head_dim=128),
    "qwen3-0.6b": DecoderConfig(**_QWEN3, emb_dim=1024, hidden_dim=3072),
    "qwen3-1.7b": DecoderConfig(**_QWEN3, emb_dim=2048, hidden_dim=6144),
}


def get_decoder_config(preset: str, **overrides: Any) -> DecoderConfig:
    """A fresh copy of ``preset`` with ``overrides`` applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown decoder preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def parameter_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, the head only when untied (our names = HF's without ``model.``)."""
    E, D = config.emb_dim, config.head_dim
    shapes = {"embed_tokens.weight": (config.vocab_size, E)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes |= {p + "input_layernorm.weight": (E,),
                   p + "self_attn.q_proj.weight": (config.n_heads * D, E),
                   p + "self_attn.k_proj.weight": (config.n_kv_heads * D, E),
                   p + "self_attn.v_proj.weight": (config.n_kv_heads * D, E),
                   p + "self_attn.o_proj.weight": (E, config.n_heads * D)}
        if config.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)}
        shapes |= {p + "post_attention_layernorm.weight": (E,),
                   p + "mlp.gate_proj.weight": (config.hidden_dim, E),
                   p + "mlp.up_proj.weight": (config.hidden_dim, E),
                   p + "mlp.down_proj.weight": (E, config.hidden_dim)}
    shapes["norm.weight"] = (E,)
    if not config.tie_weights:
        shapes["lm_head.weight"] = (config.vocab_size, E)
    return shapes


def count_parameters(config: DecoderConfig) -> int:
    """Number of parameters (a tied head counted once), computed without allocating."""
    return sum(math.prod(shape) for shape in parameter_shapes(config).values())


@dataclass
class MemoryEstimate:
    parameters: int
    bytes_per_value: int
    batch: int
    tokens: int
    weight_bytes: int  # the parameters at bytes_per_value
    kv_cache_bytes: int  # keys and values of every layer for batch × tokens

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes

    def __str__(self) -> str:
        gib = 1024**3
        return (f"{self.parameters:,} parameters: {self.weight_bytes / gib:.2f} GiB of weights at "
                f"{self.bytes_per_value} bytes each + {self.kv_cache_bytes / gib:.2f} GiB KV cache for "
                f"{self.batch} × {self.tokens} tokens = {self.total_bytes / gib:.2f} GiB")


def estimate_memory(config: DecoderConfig, bytes_per_value: int = 4, batch: int = 1,
                    tokens: int | None = None) -> MemoryEstimate:
    """Memory the weights and a full KV cache need (fp32: 4 bytes, bf16: 2), before allocating anything.
    ``tokens`` defaults to the whole context. Activations and gradients come on top when training."""
    tokens = config.context_length if tokens is None else tokens
    n = count_parameters(config)
    kv = 2 * config.n_layers * batch * config.n_kv_heads * tokens * config.head_dim * bytes_per_value
    return MemoryEstimate(n, bytes_per_value, batch, tokens, n * bytes_per_value, kv)
