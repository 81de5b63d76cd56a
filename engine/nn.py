"""Modules with the names PyTorch users know: Module, Parameter, Linear, Embedding, ...

``Module`` registers Parameters and sub-Modules assigned as attributes, so
``parameters()``, ``state_dict()`` and ``train()/eval()`` reach the whole tree.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Any, Iterable, Iterator

import numpy as np

from engine import functional as F
from engine.backends import get_backend
from engine.tensor import Tensor


class Parameter(Tensor):
    """A leaf tensor that a Module owns and an optimizer updates (requires_grad=True)."""

    __slots__ = ()

    def __init__(self, data: Any, requires_grad: bool = True, dtype: Any = None):
        super().__init__(data, requires_grad=requires_grad, dtype=dtype)


class Module:
    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() before setting attributes")
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # --- traversal ---
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def children(self) -> Iterator[Module]:
        yield from self._modules.values()

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        """Each parameter once, under the first name it is reached by (shared weights appear once)."""
        seen: set[int] = set()
        for prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{prefix}.{name}" if prefix else name), p

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    # --- state ---
    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """Every parameter by its dotted name (tied weights under each of their names), as NumPy copies."""
        backend = get_backend()
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                out[f"{prefix}.{name}" if prefix else name] = np.array(backend.to_numpy(p.data), copy=True)
        return out

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Copy arrays into the parameters. Checks every key and shape first, so a failed
        load leaves the module unchanged."""
        own: dict[str, Parameter] = {}
        for prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                own[f"{prefix}.{name}" if prefix else name] = p
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        problems = []
        if strict and missing:
            problems.append(f"missing keys: {', '.join(missing)}")
        if strict and unexpected:
            problems.append(f"unexpected keys: {', '.join(unexpected)}")
        for key, p in own.items():
            if key in state and tuple(np.shape(state[key])) != p.shape:
                problems.append(
                    f"shape mismatch for {key}: checkpoint has {tuple(np.shape(state[key]))}, model has {p.shape}"
                )
        if problems:
            raise KeyError(f"load_state_dict into {type(self).__name__} failed: " + "; ".join(problems))
        backend = get_backend()
        for key, p in own.items():
            if key in state:
                value = state[key].numpy() if isinstance(state[key], Tensor) else state[key]
                # NOTE: copy, so in-place optimizer steps never write into the caller's arrays.
                p.data = backend.copy(backend.asarray(value, p.dtype))

    def to(self, dtype: Any) -> Module:
        """Cast every parameter to ``dtype`` in place (e.g. "float64" for exact comparisons)."""
        backend = get_backend()
        for p in self.parameters():
            p.data = backend.astype(p.data, dtype)
            p.grad = None
        return self

    # --- modes ---
    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[Module]:
        """``with model.evaluating():`` eval mode (no dropout) inside the block; the mode the
        model had is restored after, also when the block raises."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)

    def requires_grad_(self, flag: bool = True) -> Module:
        for p in self.parameters():
            p.requires_grad = flag
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            child_repr = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child_repr}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"


def _uniform(shape: tuple[int, ...], bound: float, dtype: Any) -> Any:
    backend = get_backend()
    return (backend.rand(shape, dtype) * 2 - 1) * bound


class Linear(Module):
    """y = x @ weight.T + bias; weight (out_features, in_features), initialised as torch does."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: Any = "float32"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features) if in_features else 0.0
        self.weight = Parameter(_uniform((out_features, in_features), bound, dtype))
        self.bias = Parameter(_uniform((out_features,), bound, dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: Any = "float32"):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(get_backend().randn((num_embeddings, embedding_dim), dtype))

    def forward(self, ids: Any) -> Tensor:
        return F.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    def __init__(self, normalized_shape: int, eps: float = 1e-5, dtype: Any = "float32"):
        super().__init__()
        backend = get_backend()
        self.eps = eps
        self.weight = Parameter(backend.ones((normalized_shape,), dtype))
        self.bias = Parameter(backend.zeros((normalized_shape,), dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GELU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x)


class Dropout(Module):
    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _Container(Module):
    """Sub-modules registered under their position, "0", "1", ..."""

    def append(self, module: Module) -> None:
        setattr(self, str(len(self._modules)), module)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())


class Sequential(_Container):
    def __init__(self, *modules: Module):
        super().__init__()
        for m in modules:
            self.append(m)

    def forward(self, x: Any) -> Any:
        for m in self:
            x = m(x)
        return x


class ModuleList(_Container):
    def __init__(self, modules: Iterable[Module] = ()):
        super().__init__()
        for m in modules:
            self.append(m)
