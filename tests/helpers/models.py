"""Small models shared by tests: a one-layer transformer in our engine (its torch twin is in test_nn_optim)."""

import numpy as np

from engine import functional as F
from engine import nn

V, T, D, H = 11, 6, 8, 2


class OurBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D)
        self.ln1 = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ln2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, ids):
        B, t = ids.shape
        x = self.tok(ids) + self.pos(np.arange(t))  # (B, T, D)
        q, k, v = (
            self.qkv(self.ln1(x)).reshape(B, t, 3, H, D // H).permute(2, 0, 3, 1, 4)[i] for i in range(3)
        )  # each (B, H, T, hd)
        a = F.causal_attention(q, k, v).permute(0, 2, 1, 3).reshape(B, t, D)
        x = x + self.proj(a)
        x = x + self.mlp(self.ln2(x))
        return self.head(x)
