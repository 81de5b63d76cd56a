"""GPT model configurations: the `GPTConfig` dataclass and named presets.

The GPT-2 presets are the four OpenAI sizes (the book's 124M … 1558M). With the book's
defaults (``qkv_bias=False``, ``tie_weights=False``) gpt2-small has 163,009,536
parameters, 124,412,160 without the output head; the Hugging Face ``gpt2`` checkpoint
(qkv bias, tied head) has 124,439,808. The CPU presets train in minutes on a laptop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

INIT_SCHEMES = ("gpt2", "book")


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024  # the most positions the model can see (size of wpe)
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1  # embedding, attention and residual dropout
    qkv_bias: bool = False  # bias on the fused query/key/value projection (GPT-2 has one)
    tie_weights: bool = False  # lm_head.weight is wte.weight (GPT-2 ties them)
    layer_norm_eps: float = 1e-5
    # "gpt2": N(0, 0.02) weights, zero biases (GPT-2's recipe); "book": PyTorch's layer
    # defaults, as the book's GPTModel (N(0, 1) embeddings, U(±1/√in) linears), which is
    # what reaches the book's chapter-5 losses on the-verdict.txt.
    init: str = "gpt2"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming every field that cannot build a model."""
        problems = []
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.emb_dim % self.n_heads:
            problems.append(f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if not isinstance(self.drop_rate, (int, float)) or not 0.0 <= self.drop_rate < 1.0:
            problems.append(f"drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            problems.append(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        for name in ("qkv_bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.init not in INIT_SCHEMES:
            problems.append(f"init must be one of {', '.join(INIT_SCHEMES)}, got {self.init!r}")
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Inverse of `to_dict`. Unknown keys are an error (they would be silently lost)."""
        if not isinstance(data, dict):
            raise ValueError(f"GPTConfig.from_dict needs a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"GPTConfig.from_dict: unknown fields {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**data)


PRESETS: dict[str, GPTConfig] = {
    # OpenAI's GPT-2 sizes (the book's chapter 4 and 5 configurations).
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),  # 124M
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
    # CPU presets. NOTE: the 50257-token embedding and head dominate their size.
    "tiny": GPTConfig(context_length=64, emb_dim=64, n_layers=2, n_heads=2),  # ~6.5M
    "mini": GPTConfig(context_length=128, emb_dim=128, n_layers=4, n_heads=4),  # ~13.7M
    "small-cpu": GPTConfig(context_length=256, emb_dim=256, n_layers=4, n_heads=4),  # ~29M
}


def get_config(preset: str, **overrides: Any) -> GPTConfig:
    """A fresh copy of preset ``preset`` with ``overrides`` applied, e.g.
    ``get_config("gpt2-small", qkv_bias=True, tie_weights=True)``.

    Raises ValueError for an unknown preset or field, or a combination that cannot
    build a model (e.g. emb_dim not divisible by n_heads)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown GPTConfig fields {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return dataclasses.replace(PRESETS[preset], **overrides)


def parameter_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name of ``GPTModel(config)`` (``lm_head.weight`` too when tied) and its
    shape, computed without allocating: loaders check stored weights against it before
    building a model, so a config that does not fit its weights fails before any allocation."""
    V, C, E = config.vocab_size, config.context_length, config.emb_dim
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (V, E), "wpe.weight": (C, E)}
    for i in range(config.n_layers):
        block = {
            "ln_1.weight": (E,), "ln_1.bias": (E,),
            "attn.c_attn.weight": (3 * E, E), "attn.c_proj.weight": (E, E), "attn.c_proj.bias": (E,),
            "ln_2.weight": (E,), "ln_2.bias": (E,),
            "mlp.c_fc.weight": (4 * E, E), "mlp.c_fc.bias": (4 * E,),
            "mlp.c_proj.weight": (E, 4 * E), "mlp.c_proj.bias": (E,),
        }
        if config.qkv_bias:
            block["attn.c_attn.bias"] = (3 * E,)
        shapes.update({f"h.{i}.{name}": shape for name, shape in block.items()})
    shapes.update({"ln_f.weight": (E,), "ln_f.bias": (E,), "lm_head.weight": (V, E)})
    return shapes
