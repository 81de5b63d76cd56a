"""The CPU backend: arrays are ``numpy.ndarray``; fused ops run the NumPy references in ``kernels/``
(``self.kernels``)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from engine.backends import numpy_attention, numpy_fused, numpy_memory, numpy_threads
from engine.backends.base import Array, Axis, Backend, kernel_namespace
from kernels import rope_ref

numpy_memory.tune_process_memory()  # see numpy_memory: fewer page faults per training step

_DTYPES = {
    "float32": np.float32,
    "float64": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "bool": np.bool_,
}
_SUPPORTED = {np.dtype(d) for d in _DTYPES.values()}


class NumpyBackend(Backend):
    name = "numpy"

    def __init__(self) -> None:
        # the fused ops' kernel pairs: the NumPy references of kernels/, run in cache-sized chunks
        # on the backend's threads (numpy_fused), attention in blocks with memory linear in T
        # (numpy_attention); each is tested against its reference
        super().__init__(
            kernel_namespace(
                numpy_fused,
                rope_ref,
                attention_forward=numpy_attention.attention_forward,
                attention_backward=numpy_attention.attention_backward,
            )
        )
        self._rng = np.random.default_rng(0)

    # --- dtypes and creation ---
    def dtype(self, name: Any) -> np.dtype:
        if isinstance(name, str):
            if name not in _DTYPES:
                raise TypeError(
                    f"dtype {name!r} is not supported by the numpy backend: use one of {', '.join(_DTYPES)}"
                )
            return np.dtype(_DTYPES[name])
        dt = np.dtype(name)
        if dt not in _SUPPORTED:
            raise TypeError(
                f"dtype {dt} is not supported by the numpy backend: use one of {', '.join(_DTYPES)}"
            )
        return dt

    def is_float(self, a: Array) -> bool:
        return a.dtype.kind == "f"

    def asarray(self, data: Any, dtype: Any = None) -> np.ndarray:
        if hasattr(data, "detach") and hasattr(data, "cpu"):  # a torch tensor
            data = data.detach().cpu().numpy()
        if dtype is not None:
            return np.asarray(data, dtype=self.dtype(dtype))
        arr = np.asarray(data)
        if arr.dtype.kind == "f" and arr.dtype not in _SUPPORTED:
            raise TypeError(f"dtype {arr.dtype} is not supported by the numpy backend: use float32 or float64")
        if arr.dtype.kind in "iu" and arr.dtype not in _SUPPORTED:
            arr = arr.astype(np.int64)
        if arr.dtype not in _SUPPORTED:
            raise TypeError(
                f"cannot make a tensor from data of dtype {arr.dtype}: "
                f"supported dtypes are {', '.join(_DTYPES)}"
            )
        return arr

    def to_numpy(self, a: Array) -> np.ndarray:
        return a

    def astype(self, a: Array, dtype: Any) -> np.ndarray:
        return a.astype(self.dtype(dtype), copy=False)

    def zeros(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        return np.zeros(shape, dtype=self.dtype(dtype))

    def ones(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        return np.ones(shape, dtype=self.dtype(dtype))

    def full(self, shape: Sequence[int], value: float, dtype: Any) -> np.ndarray:
        return np.full(shape, value, dtype=self.dtype(dtype))

    def arange(self, n: int, dtype: Any = None) -> np.ndarray:
        return np.arange(n, dtype=self.dtype(dtype or "int64"))

    def copy(self, a: Array) -> np.ndarray:
        return a.copy()

    def view_base(self, a: Array) -> Any:
        return a.base if a.base is not None or a.flags.writeable else a

    # --- randomness ---
    def manual_seed(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def rng_state(self) -> dict:
        return self._rng.bit_generator.state

    def set_rng_state(self, state: dict) -> None:
        self._rng.bit_generator.state = state

    def randn(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        return self._rng.standard_normal(shape, dtype=self.dtype(dtype))

    def rand(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        return self._rng.random(shape, dtype=self.dtype(dtype))

    def randint(self, high: int) -> int:
        return int(self._rng.integers(high))

    # --- math ---
    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    sqrt = staticmethod(np.sqrt)
    tanh = staticmethod(np.tanh)
    where = staticmethod(np.where)
    transpose = staticmethod(np.transpose)
    broadcast_to = staticmethod(np.broadcast_to)

    def sum(self, a: Array, axis: Axis = None, keepdims: bool = False) -> np.ndarray:
        return np.sum(a, axis=axis, keepdims=keepdims)

    def max(self, a: Array, axis: Axis = None, keepdims: bool = False) -> np.ndarray:
        return np.max(a, axis=axis, keepdims=keepdims)

    def concatenate(self, arrays: Sequence[Array], axis: int) -> np.ndarray:
        return np.concatenate(arrays, axis=axis)

    def matmul(self, a: Array, b: Array) -> np.ndarray:
        # NOTE: products are shared among our threads, one BLAS thread each (see numpy_threads)
        if a.ndim == 2 and b.ndim == 2:
            return numpy_threads.matmul(a, b)
        if a.ndim > 2 and a.shape[:-2] == b.shape[:-2]:
            return numpy_threads.batched_matmul(a, b)
        return a @ b

    def index(self, index: Any) -> Any:
        return index

    def index_add_(self, out: np.ndarray, index: Any, values: Array) -> None:
        if isinstance(index, np.ndarray) and index.dtype.kind in "iu" and index.ndim == 1 and out.ndim == 2:
            # rows picked by ids (embedding backward): sum the rows of each id with one
            # sort + reduceat instead of np.add.at's element-by-element loop
            order = np.argsort(index, kind="stable")
            ids = index[order]
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
            out[ids[starts]] += np.add.reduceat(values[order], starts, axis=0)  # each id once: no repeats
            return
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, (np.ndarray, list)) for i in parts):
            np.add.at(out, index, values)  # advanced indexing: repeated indices accumulate
        elif isinstance(view := out[index], np.ndarray):  # basic indexing: a view, each position once
            numpy_fused.add_(view, values)
        else:  # one element: a scalar, not a view
            out[index] += values

    def add_(self, out: np.ndarray, a: Array) -> None:
        numpy_fused.add_(out, a)

    def squared_norm(self, a: Array) -> float:
        return numpy_fused.squared_norm(a)

    # in place, in cache-sized chunks on the backend's threads (same bits as one pass)
    adamw_update = staticmethod(numpy_fused.adamw_update)
