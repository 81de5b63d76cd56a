"""The GPU backend: arrays are ``torch.Tensor``; fused ops run our Triton kernels.

torch is only the memory, the elementwise math and the cuBLAS matmul here; torch.autograd
is never used: every tensor this backend makes has requires_grad=False, so torch records
no graph, and gradients come from the engine's own Functions.

Without a CUDA GPU the same kernels run in Triton's CPU interpreter on CPU tensors:
slow, but exactly the code that runs on the GPU, which is how CI tests it.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from engine.backends.base import Array, Axis, Backend, kernel_namespace

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


def _enable_interpreter_if_needed() -> str:
    """The device to use; on a machine without CUDA, switch Triton to its CPU interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        # the modules holding @triton.jit kernels (the NumPy references and the spec type hold none)
        loaded = [m for m in sys.modules if m.startswith("kernels.") and not m.endswith(("_ref", ".compile_spec"))]
        if loaded:
            raise RuntimeError(
                "the triton backend found no CUDA GPU, and the Triton kernels were already imported without "
                "TRITON_INTERPRET=1; set TRITON_INTERPRET=1 before starting Python to run them on the CPU"
            )
        # NOTE: must happen before the first @triton.jit decorator runs.
        os.environ["TRITON_INTERPRET"] = "1"
        warnings.warn(
            "no CUDA GPU: the triton backend runs its kernels in Triton's CPU interpreter (slow)", stacklevel=3
        )
    return "cpu"


class TritonBackend(Backend):
    name = "triton"

    def __init__(self) -> None:
        self.device = torch.device(_enable_interpreter_if_needed())
        # NOTE: imported here, after the interpreter switch above, never at module import.
        from kernels import attention, cross_entropy, gelu, layernorm, rmsnorm, rope, swiglu

        # the Triton launchers
        super().__init__(kernel_namespace(gelu, layernorm, rmsnorm, swiglu, rope, attention, cross_entropy))
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(0)

    # --- dtypes and creation ---
    def dtype(self, name: Any) -> torch.dtype:
        if isinstance(name, torch.dtype):
            if name not in _DTYPES.values():
                raise TypeError(f"dtype {name} is not supported by the triton backend: use one of {', '.join(_DTYPES)}")
            return name
        key = name if isinstance(name, str) else np.dtype(name).name
        if key not in _DTYPES:
            raise TypeError(f"dtype {key!r} is not supported by the triton backend: use one of {', '.join(_DTYPES)}")
        return _DTYPES[key]

    def is_float(self, a: Array) -> bool:
        return a.is_floating_point()

    def asarray(self, data: Any, dtype: Any = None) -> torch.Tensor:
        target = None if dtype is None else self.dtype(dtype)
        if isinstance(data, torch.Tensor):
            if target is None and data.dtype not in _DTYPES.values():
                raise TypeError(f"dtype {data.dtype} is not supported by the triton backend")
            return data.detach().to(device=self.device, dtype=target)
        arr = np.asarray(data)
        if arr.dtype.kind in "iu":
            arr = arr.astype(np.int64)
        elif arr.dtype.name not in _DTYPES:
            raise TypeError(
                f"cannot make a tensor from data of dtype {arr.dtype}: supported dtypes are {', '.join(_DTYPES)}"
            )
        if not arr.flags.c_contiguous or not arr.flags.writeable:
            arr = arr.copy()  # torch.from_numpy needs a writable array with positive strides
        return torch.from_numpy(arr).to(device=self.device, dtype=target)

    def to_numpy(self, a: Array) -> np.ndarray:
        a = a.detach()
        if a.dtype in (torch.bfloat16, torch.float16):
            a = a.float()  # NumPy has no bfloat16
        return a.cpu().numpy()

    def astype(self, a: Array, dtype: Any) -> torch.Tensor:
        return a.to(self.dtype(dtype))

    def zeros(self, shape: Sequence[int], dtype: Any) -> torch.Tensor:
        return torch.zeros(tuple(shape), dtype=self.dtype(dtype), device=self.device)

    def ones(self, shape: Sequence[int], dtype: Any) -> torch.Tensor:
        return torch.ones(tuple(shape), dtype=self.dtype(dtype), device=self.device)

    def full(self, shape: Sequence[int], value: float, dtype: Any) -> torch.Tensor:
        return torch.full(tuple(shape), value, dtype=self.dtype(dtype), device=self.device)

    def arange(self, n: int, dtype: Any = None) -> torch.Tensor:
        return torch.arange(n, dtype=self.dtype(dtype or "int64"), device=self.device)

    def copy(self, a: Array) -> torch.Tensor:
        return a.clone(memory_format=torch.contiguous_format)

    def view_base(self, a: Array) -> Any:
        return a._base

    # --- randomness ---
    def manual_seed(self, seed: int) -> None:
        self._gen.manual_seed(seed)

    def rng_state(self) -> list[int]:
        return self._gen.get_state().tolist()

    def set_rng_state(self, state: list[int]) -> None:
        self._gen.set_state(torch.tensor(state, dtype=torch.uint8))

    def randn(self, shape: Sequence[int], dtype: Any) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self._gen, device=self.device, dtype=self.dtype(dtype))

    def rand(self, shape: Sequence[int], dtype: Any) -> torch.Tensor:
        return torch.rand(tuple(shape), generator=self._gen, device=self.device, dtype=self.dtype(dtype))

    def randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self._gen, device=self.device).item())

    # --- math ---
    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)
    sqrt = staticmethod(torch.sqrt)
    tanh = staticmethod(torch.tanh)

    def where(self, cond: Array, a: Any, b: Any) -> torch.Tensor:
        return torch.where(self.asarray(cond) if not isinstance(cond, torch.Tensor) else cond, a, b)

    def sum(self, a: Array, axis: Axis = None, keepdims: bool = False) -> torch.Tensor:
        axis = tuple(range(a.ndim)) if axis is None else axis
        return a.clone() if a.ndim == 0 else torch.sum(a, dim=axis, keepdim=keepdims)

    def max(self, a: Array, axis: Axis = None, keepdims: bool = False) -> torch.Tensor:
        axis = tuple(range(a.ndim)) if axis is None else axis
        return a.clone() if a.ndim == 0 else torch.amax(a, dim=axis, keepdim=keepdims)

    def transpose(self, a: Array, axes: Sequence[int]) -> torch.Tensor:
        return a.permute(tuple(axes))

    def broadcast_to(self, a: Array, shape: Sequence[int]) -> torch.Tensor:
        return torch.broadcast_to(a, tuple(shape))

    def concatenate(self, arrays: Sequence[Array], axis: int) -> torch.Tensor:
        return torch.cat(tuple(arrays), dim=axis)

    def matmul(self, a: Array, b: Array) -> torch.Tensor:
        return a @ b

    def adamw_update(self, p, g, m, v, lr, beta1, beta2, eps, weight_decay, bias1, bias2_sqrt) -> None:
        p.mul_(1 - lr * weight_decay)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bias2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bias1)

    def index(self, index: Any) -> Any:
        if isinstance(index, (np.ndarray, list)):
            return self.asarray(index)
        if isinstance(index, torch.Tensor):
            return index.to(self.device)
        return index

    def index_add_(self, out: torch.Tensor, index: Any, values: Array) -> None:
        parts = index if isinstance(index, tuple) else (index,)
        if not any(isinstance(i, torch.Tensor) for i in parts):
            out[index] += values  # basic indexing: every position at most once
        elif isinstance(index, torch.Tensor) and index.dtype != torch.bool:
            # rows picked by one integer tensor (embedding backward): accumulate rows
            out.index_add_(0, index.reshape(-1), values.reshape((-1,) + tuple(out.shape[1:])))
        else:
            # general advanced indexing: map every picked element to its flat position
            positions = torch.arange(out.numel(), device=self.device).reshape(out.shape)[index]
            out.view(-1).index_add_(0, positions.reshape(-1), values.reshape(-1))

    def add_(self, out: torch.Tensor, a: Array) -> None:
        out.add_(a)

    def squared_norm(self, a: Array) -> float:
        wide = a if a.dtype == torch.float64 else a.float()  # bf16/fp16 squares would overflow or round
        return float(torch.linalg.vector_norm(wide)) ** 2
