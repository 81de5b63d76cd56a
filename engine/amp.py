"""Mixed precision: ``with engine.autocast("bfloat16"):`` runs matmuls (and so the fused
kernels downstream of them) in bf16 while parameters, optimizer state, LayerNorm
statistics and the loss stay in fp32 — the usual "fp32 master weights" recipe.

Only the triton backend has bf16 (NumPy has no bfloat16 dtype).
"""

from __future__ import annotations

import contextlib
from typing import Any

from engine.backends import get_backend

_dtype: Any = None


def autocast_dtype() -> Any:
    """The backend dtype matmuls run in now, or None outside autocast."""
    return _dtype


class autocast(contextlib.ContextDecorator):
    def __init__(self, dtype: str = "bfloat16", enabled: bool = True):
        self.dtype, self.enabled = dtype, enabled

    def __enter__(self) -> None:
        global _dtype
        self._prev = _dtype
        if not self.enabled:
            return
        backend = get_backend()
        if backend.name != "triton":
            raise ValueError(
                f"autocast({self.dtype!r}) needs the triton backend; the {backend.name} backend computes in "
                "float32/float64 only (use --backend triton, or --precision fp32)"
            )
        _dtype = backend.dtype(self.dtype)

    def __exit__(self, *exc: Any) -> None:
        global _dtype
        _dtype = self._prev
