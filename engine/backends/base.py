"""The interface every backend implements.

Arrays are the backend's native type (``numpy.ndarray`` or ``torch.Tensor``). Methods
cover exactly what the engine's primitive Functions need where NumPy and torch differ.
Arithmetic operators (+ - * / @ ** and comparisons), ``.shape``, ``.ndim``, ``.reshape``
and basic indexing are used directly, since both array types share them.

The fused ops' kernel pairs are not methods: each backend hands ``Backend.__init__`` one
namespace, ``backend.kernels``, holding every name in ``KERNEL_OPS`` with the same
signature on every backend (the NumPy references on numpy, the Triton launchers on
triton; a test checks the signatures). ``Backend`` is abstract: a backend that lacks a
method or a kernel fails when it is constructed, not when the op first runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import ModuleType, SimpleNamespace
from typing import Any, Callable, Sequence

Array = Any
Axis = int | tuple[int, ...] | None

KERNEL_OPS = (
    "gelu_forward",
    "gelu_backward",
    "bias_gelu_forward",
    "bias_gelu_backward",
    "layer_norm_forward",
    "layer_norm_backward",
    "rms_norm_forward",
    "rms_norm_backward",
    "swiglu_forward",
    "swiglu_backward",
    "rope_forward",
    "rope_backward",
    "attention_forward",
    "attention_backward",
    "cross_entropy_forward",
    "cross_entropy_backward",
    "cross_entropy_loss_and_grad",
)


def kernel_namespace(*modules: ModuleType, **chosen: Callable) -> SimpleNamespace:
    """Every op of ``KERNEL_OPS``: from ``chosen`` when named there, else from the first of
    ``modules`` that defines it (so a backend can swap in a faster implementation of one op).

    Raises TypeError naming the ops that none of them provides."""
    unknown = sorted(set(chosen) - set(KERNEL_OPS))
    if unknown:
        raise TypeError(f"kernel_namespace: {unknown} are not kernel ops; the ops are {', '.join(KERNEL_OPS)}")
    ops = {}
    for op in KERNEL_OPS:
        ops[op] = chosen.get(op) or next((getattr(m, op) for m in modules if hasattr(m, op)), None)
    missing = [op for op, fn in ops.items() if fn is None]
    if missing:
        raise TypeError(f"kernel_namespace: no implementation of {', '.join(missing)}")
    return SimpleNamespace(**ops)


class Backend(ABC):
    name: str
    kernels: SimpleNamespace  # the fused ops' kernel pairs, one attribute per name in KERNEL_OPS

    def __init__(self, kernels: SimpleNamespace) -> None:
        self.kernels = kernels

    # --- dtypes and creation ---
    @abstractmethod
    def dtype(self, name: Any) -> Any: ...
    @abstractmethod
    def is_float(self, a: Array) -> bool: ...
    @abstractmethod
    def asarray(self, data: Any, dtype: Any = None) -> Array: ...
    @abstractmethod
    def to_numpy(self, a: Array) -> Any: ...
    @abstractmethod
    def astype(self, a: Array, dtype: Any) -> Array: ...
    @abstractmethod
    def zeros(self, shape: Sequence[int], dtype: Any) -> Array: ...
    @abstractmethod
    def ones(self, shape: Sequence[int], dtype: Any) -> Array: ...
    @abstractmethod
    def full(self, shape: Sequence[int], value: float, dtype: Any) -> Array: ...
    @abstractmethod
    def arange(self, n: int, dtype: Any = None) -> Array: ...
    @abstractmethod
    def copy(self, a: Array) -> Array: ...
    @abstractmethod
    def view_base(self, a: Array) -> Any:
        """The array whose memory ``a`` is a view of (or that ``a`` was broadcast from), ``a`` itself
        when it is read-only; None when ``a`` owns writable memory, so that an in-place update of
        it changes no other array."""

    # --- randomness (one generator per backend, seeded by engine.manual_seed) ---
    @abstractmethod
    def manual_seed(self, seed: int) -> None: ...
    @abstractmethod
    def rng_state(self) -> Any: ...
    @abstractmethod
    def set_rng_state(self, state: Any) -> None: ...
    @abstractmethod
    def randn(self, shape: Sequence[int], dtype: Any) -> Array: ...
    @abstractmethod
    def rand(self, shape: Sequence[int], dtype: Any) -> Array: ...
    @abstractmethod
    def randint(self, high: int) -> int: ...

    # --- math ---
    @abstractmethod
    def exp(self, a: Array) -> Array: ...
    @abstractmethod
    def log(self, a: Array) -> Array: ...
    @abstractmethod
    def sqrt(self, a: Array) -> Array: ...
    @abstractmethod
    def tanh(self, a: Array) -> Array: ...
    @abstractmethod
    def where(self, cond: Array, a: Array, b: Array) -> Array: ...
    @abstractmethod
    def sum(self, a: Array, axis: Axis = None, keepdims: bool = False) -> Array: ...
    @abstractmethod
    def max(self, a: Array, axis: Axis = None, keepdims: bool = False) -> Array: ...
    @abstractmethod
    def transpose(self, a: Array, axes: Sequence[int]) -> Array: ...
    @abstractmethod
    def broadcast_to(self, a: Array, shape: Sequence[int]) -> Array: ...
    @abstractmethod
    def concatenate(self, arrays: Sequence[Array], axis: int) -> Array: ...
    @abstractmethod
    def matmul(self, a: Array, b: Array) -> Array: ...
    @abstractmethod
    def index(self, index: Any) -> Any: ...
    @abstractmethod
    def index_add_(self, out: Array, index: Any, values: Array) -> None:
        """``out[index] += values`` in place, summing values whose index repeats."""
    @abstractmethod
    def add_(self, out: Array, a: Array) -> None:
        """``out += a`` in place (same shape)."""
    @abstractmethod
    def squared_norm(self, a: Array) -> float:
        """The sum of the squares of ``a``'s elements, without a temporary of ``a``'s size."""

    # --- fused optimizer update, in place on p, m, v ---
    @abstractmethod
    def adamw_update(
        self, p: Array, g: Array, m: Array, v: Array, lr: float, beta1: float, beta2: float,
        eps: float, weight_decay: float, bias1: float, bias2_sqrt: float,
    ) -> None: ...
