"""The primitive differentiable ops. All derivative code of the engine's basic math is here.

Every Function gets backend arrays in ``forward`` and the upstream gradient in
``backward``; broadcasting follows NumPy, and ``unbroadcast`` sums gradients back to
each input's shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.backends import get_backend
from engine.tensor import Function, ScatteredGrad, unbroadcast


def _broadcast_shape(op: str, a: Any, b: Any) -> tuple[int, ...]:
    try:
        return np.broadcast_shapes(tuple(a.shape), tuple(b.shape))
    except ValueError:
        raise ValueError(f"{op}: shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be broadcast together") from None


class _Binary(Function):
    op_name = ""

    def forward(self, a: Any, b: Any) -> Any:
        _broadcast_shape(self.op_name, a, b)
        self.shapes = (a.shape, b.shape)
        return self.compute(a, b)

    def compute(self, a: Any, b: Any) -> Any:
        raise NotImplementedError


class Add(_Binary):
    op_name = "add"

    def compute(self, a, b):
        return a + b

    def backward(self, g):
        return unbroadcast(g, self.shapes[0]), unbroadcast(g, self.shapes[1])


class Sub(_Binary):
    op_name = "sub"

    def compute(self, a, b):
        return a - b

    def backward(self, g):
        return unbroadcast(g, self.shapes[0]), unbroadcast(-g, self.shapes[1])


class Mul(_Binary):
    op_name = "mul"

    def compute(self, a, b):
        self.save_for_backward(a, b)
        return a * b

    def backward(self, g):
        a, b = self.saved
        ga = unbroadcast(g * b, self.shapes[0]) if self.needs_input_grad[0] else None
        gb = unbroadcast(g * a, self.shapes[1]) if self.needs_input_grad[1] else None
        return ga, gb


class Div(_Binary):
    op_name = "div"

    def compute(self, a, b):
        self.save_for_backward(a, b)
        return a / b

    def backward(self, g):
        a, b = self.saved
        ga = unbroadcast(g / b, self.shapes[0]) if self.needs_input_grad[0] else None
        gb = unbroadcast(-g * a / (b * b), self.shapes[1]) if self.needs_input_grad[1] else None
        return ga, gb


class Pow(_Binary):
    """a ** b with both tensors: d/da = b·a^(b-1), d/db = a^b·log(a)."""

    op_name = "pow"

    def compute(self, a, b):
        out = a**b
        self.save_for_backward(a, b, out)
        return out

    def backward(self, g):
        a, b, out = self.saved
        backend = get_backend()
        ga = unbroadcast(g * b * a ** (b - 1), self.shapes[0]) if self.needs_input_grad[0] else None
        gb = unbroadcast(g * out * backend.log(a), self.shapes[1]) if self.needs_input_grad[1] else None
        return ga, gb


class PowScalar(Function):
    def forward(self, a, exponent: float):
        self.exponent = exponent
        self.save_for_backward(a)
        return a**exponent

    def backward(self, g):
        (a,) = self.saved
        return (g * self.exponent * a ** (self.exponent - 1),)


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, g):
        return (-g,)


class MatMul(Function):
    """Batched matmul with NumPy semantics (1-D operands promoted, batch dims broadcast)."""

    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(
                f"matmul: operands must have at least 1 dim, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
            raise ValueError(
                f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not match: "
                f"{a.shape[-1]} (last dim of the first) != {b.shape[-2 if b.ndim > 1 else 0]} "
                "(second-to-last dim of the second)"
            )
        try:
            np.broadcast_shapes(tuple(a.shape[:-2]), tuple(b.shape[:-2]))
        except ValueError:
            raise ValueError(
                f"matmul: batch dims of shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be broadcast together"
            ) from None
        self.shapes = (a.shape, b.shape)
        a2 = a.reshape((1,) + tuple(a.shape)) if a.ndim == 1 else a  # (1, K)
        b2 = b.reshape(tuple(b.shape) + (1,)) if b.ndim == 1 else b  # (K, 1)
        self.save_for_backward(a2, b2)
        out = get_backend().matmul(a2, b2)
        if a.ndim == 1:
            out = out.reshape(tuple(out.shape[:-2]) + tuple(out.shape[-1:]))
        if b.ndim == 1:
            out = out.reshape(tuple(out.shape[:-1]))
        return out

    def backward(self, g):
        a2, b2 = self.saved
        backend = get_backend()
        # restore the promoted dims so g is (..., M, N)
        if len(self.shapes[1]) == 1:
            g = g.reshape(tuple(g.shape) + (1,))
        if len(self.shapes[0]) == 1:
            g = g.reshape(tuple(g.shape[:-1]) + (1,) + tuple(g.shape[-1:]))
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = backend.matmul(g, _swap_last(backend, b2))  # (..., M, K)
            ga = unbroadcast(ga, a2.shape).reshape(self.shapes[0])
        if self.needs_input_grad[1]:
            gb = backend.matmul(_swap_last(backend, a2), g)  # (..., K, N)
            gb = unbroadcast(gb, b2.shape).reshape(self.shapes[1])
        return ga, gb


def _swap_last(backend: Any, a: Any) -> Any:
    axes = list(range(a.ndim))
    axes[-1], axes[-2] = axes[-2], axes[-1]
    return backend.transpose(a, axes)


class Sum(Function):
    def forward(self, a, axis: tuple[int, ...], keepdims: bool):
        self.in_shape, self.axis, self.keepdims = a.shape, axis, keepdims
        return get_backend().sum(a, axis=axis, keepdims=keepdims)

    def backward(self, g):
        if not self.keepdims:
            g = g.reshape(tuple(1 if i in self.axis else n for i, n in enumerate(self.in_shape)))
        backend = get_backend()
        return (backend.copy(backend.broadcast_to(g, self.in_shape)),)


class Max(Function):
    """Max over axes; the gradient is shared equally among tied maxima."""

    def forward(self, a, axis: tuple[int, ...], keepdims: bool):
        backend = get_backend()
        if any(a.shape[i] == 0 for i in axis):
            raise ValueError(f"max: cannot reduce over an empty axis of shape {tuple(a.shape)}")
        out = backend.max(a, axis=axis, keepdims=True)
        self.save_for_backward(a, out)
        self.axis, self.keepdims = axis, keepdims
        return out if keepdims else out.reshape(tuple(n for i, n in enumerate(a.shape) if i not in axis))

    def backward(self, g):
        a, out = self.saved
        backend = get_backend()
        hit = backend.astype(a == out, a.dtype)
        count = backend.sum(hit, axis=self.axis, keepdims=True)
        g = g.reshape(out.shape)
        return (hit * (g / count),)


class Exp(Function):
    def forward(self, a):
        out = get_backend().exp(a)
        self.save_for_backward(out)
        return out

    def backward(self, g):
        (out,) = self.saved
        return (g * out,)


class Log(Function):
    def forward(self, a):
        self.save_for_backward(a)
        return get_backend().log(a)

    def backward(self, g):
        (a,) = self.saved
        return (g / a,)


class Sqrt(Function):
    def forward(self, a):
        out = get_backend().sqrt(a)
        self.save_for_backward(out)
        return out

    def backward(self, g):
        (out,) = self.saved
        return (g / (2 * out),)


class Tanh(Function):
    def forward(self, a):
        out = get_backend().tanh(a)
        self.save_for_backward(out)
        return out

    def backward(self, g):
        (out,) = self.saved
        return (g * (1 - out * out),)


class Cast(Function):
    def forward(self, a, dtype: Any):
        self.in_dtype = a.dtype
        return get_backend().astype(a, dtype)

    def backward(self, g):
        return (get_backend().astype(g, self.in_dtype),)


class Reshape(Function):
    def forward(self, a, shape: tuple[int, ...]):
        self.in_shape = a.shape
        return a.reshape(shape)

    def backward(self, g):
        return (g.reshape(self.in_shape),)


class Permute(Function):
    def forward(self, a, axes: tuple[int, ...]):
        self.inverse = tuple(int(i) for i in np.argsort(axes))
        return get_backend().transpose(a, axes)

    def backward(self, g):
        return (get_backend().transpose(g, self.inverse),)


class GetItem(Function):
    """Basic slicing and integer-array indexing; repeated indices accumulate gradient."""

    def forward(self, a, index: Any):
        self.in_shape, self.index = a.shape, index
        try:
            return a[index]
        except IndexError as e:
            raise IndexError(f"getitem: index {index!r} is invalid for shape {tuple(a.shape)}: {e}") from None

    def backward(self, g):
        return (ScatteredGrad(self.in_shape, self.index, g),)


class Concatenate(Function):
    def forward(self, *arrays, axis: int):
        first = arrays[0]
        for other in arrays[1:]:
            if other.ndim != first.ndim or any(
                n != m for i, (n, m) in enumerate(zip(first.shape, other.shape)) if i != axis
            ):
                raise ValueError(
                    f"concatenate: shapes {tuple(first.shape)} and {tuple(other.shape)} differ outside axis {axis}"
                )
        self.axis = axis
        self.sizes = [a.shape[axis] for a in arrays]
        return get_backend().concatenate(arrays, axis)

    def backward(self, g):
        grads, start = [], 0
        for size in self.sizes:
            index = (slice(None),) * self.axis + (slice(start, start + size),)
            grads.append(g[index])
            start += size
        return tuple(grads)


class Where(Function):
    def forward(self, x, y, cond: Any):
        shape = _broadcast_shape("where", x, y)
        shape = _broadcast_shape("where", cond, np.empty(shape, dtype=np.bool_))
        self.shapes, self.cond = (x.shape, y.shape), cond
        return get_backend().where(cond, x, y)

    def backward(self, g):
        backend = get_backend()
        zero = backend.zeros((), g.dtype)
        gx = unbroadcast(backend.where(self.cond, g, zero), self.shapes[0]) if self.needs_input_grad[0] else None
        gy = unbroadcast(backend.where(self.cond, zero, g), self.shapes[1]) if self.needs_input_grad[1] else None
        return gx, gy


class Softmax(Function):
    def forward(self, a, axis: int):
        backend = get_backend()
        # NOTE: subtracting the max keeps exp() finite for large inputs.
        e = backend.exp(a - backend.max(a, axis=axis, keepdims=True))
        out = e / backend.sum(e, axis=axis, keepdims=True)
        self.axis = axis
        self.save_for_backward(out)
        return out

    def backward(self, g):
        (y,) = self.saved
        # dx = y * (g - sum(g * y))
        return (y * (g - get_backend().sum(g * y, axis=self.axis, keepdims=True)),)


class LogSoftmax(Function):
    def forward(self, a, axis: int):
        backend = get_backend()
        shifted = a - backend.max(a, axis=axis, keepdims=True)
        out = shifted - backend.log(backend.sum(backend.exp(shifted), axis=axis, keepdims=True))
        self.axis = axis
        self.save_for_backward(out)
        return out

    def backward(self, g):
        (out,) = self.saved
        backend = get_backend()
        # dx = g - softmax * sum(g)
        return (g - backend.exp(out) * backend.sum(g, axis=self.axis, keepdims=True),)
