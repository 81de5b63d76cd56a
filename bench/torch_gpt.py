"""The same GPT-2 in plain PyTorch: the reference our model is tested and benchmarked against.

Same config (`model.config.GPTConfig`), same parameter names and layouts as
`model.gpt.GPTModel` (Linear weights (out, in), fused c_attn), so a state dict moves
across 1:1 (`from_state_dict`). Attention is ``F.scaled_dot_product_attention``, GELU
the tanh approximation, LayerNorm eps from the config (1e-5): HF's GPT-2 architecture.
No KV cache: torch's ``is_causal`` mask is top-left aligned, which is only right for
``T == S``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from model.config import GPTConfig


class TorchCausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads, self.drop_rate = config.n_heads, config.drop_rate
        self.c_attn = nn.Linear(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.emb_dim, config.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, E = x.shape
        q, k, v = self.c_attn(x).split(E, dim=2)  # 3 × (B, T, E)
        q, k, v = (t.view(B, T, self.n_heads, E // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        dropout_p = self.drop_rate if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, E))  # (B, T, E)


class TorchMLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.emb_dim, 4 * config.emb_dim)
        self.c_proj = nn.Linear(4 * config.emb_dim, config.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # (B, T, E)


class TorchBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)
        self.attn = TorchCausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)
        self.mlp = TorchMLP(config)
        self.drop = nn.Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))  # (B, T, E)
        return x + self.drop(self.mlp(self.ln_2(x)))  # (B, T, E)


class TorchGPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.emb_dim)
        self.wpe = nn.Embedding(config.context_length, config.emb_dim)
        self.drop = nn.Dropout(config.drop_rate)
        self.h = nn.ModuleList(TorchBlock(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
        self.apply(self._init_module)
        proj_std = 0.02 / math.sqrt(2 * config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=proj_std)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init_module(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        if T > self.config.context_length:
            raise ValueError(f"TorchGPT: {T} tokens exceed context_length {self.config.context_length}")
        positions = torch.arange(T, device=ids.device)  # (T,)
        x = self.drop(self.wte(ids) + self.wpe(positions))  # (B, T, E)
        for block in self.h:
            x = block(x)  # (B, T, E)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


def from_state_dict(config: GPTConfig, state: Mapping[str, Any], device: str | torch.device = "cpu") -> TorchGPT:
    """A TorchGPT holding ``state`` (our ``GPTModel.state_dict()``: name -> array), in the
    arrays' float dtype. With tied weights ``lm_head.weight`` may be left out."""
    tensors = {name: torch.as_tensor(np.asarray(value)) for name, value in state.items()}
    if config.tie_weights and "lm_head.weight" not in tensors and "wte.weight" in tensors:
        tensors["lm_head.weight"] = tensors["wte.weight"]
    dtype = tensors["wte.weight"].dtype if "wte.weight" in tensors else torch.float32
    model = TorchGPT(config).to(device=device, dtype=dtype)
    model.load_state_dict(tensors, strict=True)
    return model
