"""Tensor, Function and reverse-mode autodiff.

A ``Tensor`` holds a backend array (``.data``), an optional ``.grad`` and the
``Function`` node that produced it. Derivative code lives only in ``Function``
subclasses (``engine/ops.py``, ``engine/functional.py``); everything else is composed
from them. ``backward()`` walks the graph in reverse topological order without
recursion, so a 10,000-op chain is fine.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Callable, Sequence

from engine.backends import get_backend

_grad_enabled = True


class no_grad(contextlib.ContextDecorator):
    """Context manager / decorator: ops inside record no graph (inference, optimizer steps)."""

    def __enter__(self) -> None:
        global _grad_enabled
        self._prev = _grad_enabled
        _grad_enabled = False

    def __exit__(self, *exc: Any) -> None:
        global _grad_enabled
        _grad_enabled = self._prev


def is_grad_enabled() -> bool:
    return _grad_enabled


class Function:
    """One differentiable op. Subclasses implement ``forward(self, *arrays, **kw)`` and
    ``backward(self, grad) -> tuple of input gradients`` (None where an input needs none, a
    ``ScatteredGrad`` where most of one is zero). Unless the graph is retained, the arrays it
    returns may be summed into in place afterwards.

    Arrays that backward needs are kept with ``save_for_backward`` so they can be freed
    once backward has used them.
    """

    def __init__(self, *parents: Tensor) -> None:
        self.parents = parents
        self.needs_input_grad = tuple(p.requires_grad for p in parents)
        self.saved: tuple = ()
        self.freed = False

    def save_for_backward(self, *arrays: Any) -> None:
        self.saved = arrays

    def release(self) -> None:
        """Drop everything backward used: the saved arrays, any state a subclass kept, and the
        inputs, whose arrays a finished pass (or a loss kept until the next step) would
        otherwise hold on to. A second backward through it raises."""
        vars(self).clear()
        self.parents, self.saved, self.freed = (), (), True

    def forward(self, *arrays: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def backward(self, grad: Any) -> tuple:
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs: Any, **kwargs: Any) -> Tensor:
        parents = tuple(as_tensor(x) for x in inputs)
        fn = cls(*parents)
        out = fn.forward(*(p.data for p in parents), **kwargs)
        requires_grad = _grad_enabled and any(fn.needs_input_grad)
        return Tensor(out, requires_grad=requires_grad, _fn=fn if requires_grad else None)


def unbroadcast(grad: Any, shape: Sequence[int]) -> Any:
    """Sum ``grad`` down to ``shape``: over the leading dims broadcasting added, and over
    the dims where ``shape`` has size 1 but ``grad`` does not."""
    shape = tuple(shape)
    if tuple(grad.shape) == shape:
        return grad
    backend = get_backend()
    lead = grad.ndim - len(shape)
    if lead > 0:
        grad = backend.sum(grad, axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = backend.sum(grad, axis=axes, keepdims=True)
    return grad.reshape(shape)


class ScatteredGrad:
    """A gradient that is zero but at ``index``: ``values`` placed into an array of ``shape``
    (summed where an index repeats). Indexing and embedding backward return one, so the
    backward pass adds it into the gradient it meets instead of first building a mostly
    zero array (the (vocab, dim) embedding gradient, the q/k/v slices of one projection)."""

    __slots__ = ("shape", "index", "values")

    def __init__(self, shape: Sequence[int], index: Any, values: Any) -> None:
        self.shape, self.index, self.values = tuple(shape), index, values

    @property
    def dtype(self) -> Any:
        return self.values.dtype

    def dense(self) -> Any:
        backend = get_backend()
        out = backend.zeros(self.shape, self.values.dtype)
        backend.index_add_(out, self.index, self.values)
        return out


class _GradSlots:
    """The gradients flowing back during one backward pass, one slot per tensor, summed
    where a tensor feeds several ops.

    A sum goes in place into the slot's array when the pass alone can see that array
    (``owns``): not the caller's, not a view, not something a view or a ScatteredGrad was
    taken from, not held in another slot. Arrays are known by id, checked against a weak
    reference (or counted only while a slot holds them), so a freed array's id reused by a
    new array is not mistaken for the old one."""

    def __init__(self, backend: Any, root: int, grad: Any) -> None:
        self.backend = backend
        self.slots: dict[int, Any] = {root: grad}
        self.holders: dict[int, int] = {id(grad): 1}  # id(array) -> slots holding it
        self.seen_elsewhere: dict[int, weakref.ref] = {}  # the caller's array, bases of views, scattered values
        self._mark(grad)

    def _mark(self, a: Any) -> None:
        try:
            self.seen_elsewhere[id(a)] = weakref.ref(a)
        except TypeError:  # not an array (e.g. the bytes an array was read from): never in a slot
            pass

    def owns(self, a: Any) -> bool:
        seen = self.seen_elsewhere.get(id(a))
        return (self.holders.get(id(a), 0) == 0 and (seen is None or seen() is not a)
                and self.backend.view_base(a) is None)

    def _enter(self, a: Any) -> None:
        if isinstance(a, ScatteredGrad):
            a = a.values  # read later, so it must not change: as if seen elsewhere
            self._mark(a)
        else:
            self.holders[id(a)] = self.holders.get(id(a), 0) + 1
        base = self.backend.view_base(a)
        if base is not None:
            self._mark(base)

    def _leave(self, a: Any) -> None:
        if not isinstance(a, ScatteredGrad):
            left = self.holders[id(a)] - 1
            if left:
                self.holders[id(a)] = left
            else:
                del self.holders[id(a)]

    def pop(self, key: int) -> Any:
        """The slot's gradient (a full array), or None; the slot is emptied."""
        g = self.slots.pop(key, None)
        if g is None:
            return None
        self._leave(g)
        return g.dense() if isinstance(g, ScatteredGrad) else g

    def add(self, key: int, g: Any, kept_by_graph: bool = False) -> None:
        """Sum ``g`` into the slot ``key``. ``kept_by_graph``: g may be an array its Function
        keeps for a later backward through a retained graph, so it must never change."""
        self._enter(g)
        if kept_by_graph:
            self._mark(g.values if isinstance(g, ScatteredGrad) else g)
        acc = self.slots.get(key)
        if acc is None:
            self.slots[key] = g
            return
        self._leave(acc)
        if isinstance(acc, ScatteredGrad):
            acc = acc.dense()
        elif not self.owns(acc):
            acc = self.backend.copy(acc)
        if isinstance(g, ScatteredGrad):
            self.backend.index_add_(acc, g.index, g.values)
        else:
            self.backend.add_(acc, g)
        self._leave(g)
        self.slots[key] = acc
        self._enter(acc)


class Tensor:
    """An n-dimensional array on the active backend, with autograd."""

    __slots__ = ("data", "grad", "requires_grad", "_fn", "__weakref__")
    __array_priority__ = 1000  # numpy scalars/arrays on the left defer to our operators

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None, _fn: Function | None = None):
        backend = get_backend()
        if isinstance(data, Tensor):
            data = data.data
        self.data = backend.asarray(data, dtype)
        if requires_grad and not backend.is_float(self.data):
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {self.data.dtype}")
        self.requires_grad = requires_grad
        self.grad: Any = None
        self._fn = _fn

    # --- basic properties ---
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> Any:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def is_leaf(self) -> bool:
        return self._fn is None

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.numpy()!r}{grad})"

    def numpy(self) -> Any:
        """The values as a ``numpy.ndarray`` (a copy on a GPU backend)."""
        return get_backend().to_numpy(self.data)

    def item(self) -> float | int:
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.data.reshape(()).item() if hasattr(self.data, "item") else float(self.data)

    def detach(self) -> Tensor:
        return Tensor(self.data)

    def astype(self, dtype: Any) -> Tensor:
        """A copy in ``dtype``, differentiable for float-to-float casts."""
        return ops.Cast.apply(self, dtype=get_backend().dtype(dtype))

    def requires_grad_(self, flag: bool = True) -> Tensor:
        if flag and not get_backend().is_float(self.data):
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {self.dtype}")
        self.requires_grad = flag
        return self

    # --- autodiff ---
    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad.

        ``grad`` is the upstream gradient; it may be omitted only for a one-element tensor.
        Saved arrays are freed afterwards unless ``retain_graph=True``.
        """
        backend = get_backend()
        if not self.requires_grad:
            raise RuntimeError(
                "backward() on a tensor that does not require grad: no input of the computation "
                "had requires_grad=True (or it ran under no_grad())"
            )
        if grad is None:
            if self.size != 1:
                raise RuntimeError(
                    f"backward() without a gradient needs a one-element tensor, but this one has shape "
                    f"{self.shape}: pass grad= of the same shape, or reduce it first (e.g. .sum())"
                )
            grad = backend.ones(self.shape, self.dtype)
        else:
            grad = grad.data if isinstance(grad, Tensor) else backend.asarray(grad, self.dtype)
            if tuple(grad.shape) != self.shape:
                raise ValueError(f"backward(): grad has shape {tuple(grad.shape)}, expected {self.shape}")

        slots = _GradSlots(backend, id(self), grad)
        order = _topological_order(self)
        while order:
            # NOTE: popped, not iterated, and each op released once used: an intermediate
            # tensor is freed as soon as the pass is past it, not when the loss is dropped
            node = order.pop()  # last first: each node after every node that uses it
            g = slots.pop(id(node))
            fn = node._fn
            if fn is None:  # a leaf
                if g is not None and node.grad is None:
                    # NOTE: optimizers and clipping update .grad in place, so a leaf keeps g
                    # itself only if nothing else can see it (see _GradSlots.owns).
                    node.grad = g if slots.owns(g) else backend.copy(g)
                elif g is not None:
                    node.grad = node.grad + g
                continue
            if g is None:
                continue
            if fn.freed:
                raise RuntimeError(
                    f"backward() through a graph whose saved arrays were already freed ({type(fn).__name__}): "
                    "call backward(retain_graph=True) the first time to go through it twice"
                )
            input_grads = fn.backward(g)
            parents = fn.parents
            if not retain_graph:
                fn.release()
            for parent, pg in zip(parents, input_grads):
                if pg is None or not parent.requires_grad:
                    continue
                if tuple(pg.shape) != parent.shape:
                    raise RuntimeError(
                        f"internal error: {type(fn).__name__}.backward gave a gradient of shape "
                        f"{tuple(pg.shape)} for an input of shape {parent.shape}"
                    )
                if pg.dtype != parent.dtype:  # mixed precision: grads match their tensor's dtype
                    pg = backend.astype(pg.dense() if isinstance(pg, ScatteredGrad) else pg, parent.dtype)
                slots.add(id(parent), pg, kept_by_graph=retain_graph)

    def zero_grad(self) -> None:
        self.grad = None

    # --- operators ---
    def __add__(self, other: Any) -> Tensor:
        return ops.Add.apply(self, _like(other, self))

    def __radd__(self, other: Any) -> Tensor:
        return ops.Add.apply(_like(other, self), self)

    def __sub__(self, other: Any) -> Tensor:
        return ops.Sub.apply(self, _like(other, self))

    def __rsub__(self, other: Any) -> Tensor:
        return ops.Sub.apply(_like(other, self), self)

    def __mul__(self, other: Any) -> Tensor:
        return ops.Mul.apply(self, _like(other, self))

    def __rmul__(self, other: Any) -> Tensor:
        return ops.Mul.apply(_like(other, self), self)

    def __truediv__(self, other: Any) -> Tensor:
        return ops.Div.apply(self, _like(other, self))

    def __rtruediv__(self, other: Any) -> Tensor:
        return ops.Div.apply(_like(other, self), self)

    def __pow__(self, exponent: Any) -> Tensor:
        if isinstance(exponent, (int, float)):
            return ops.PowScalar.apply(self, exponent=float(exponent))
        return ops.Pow.apply(self, _like(exponent, self))

    def __rpow__(self, base: Any) -> Tensor:
        return ops.Pow.apply(_like(base, self), self)

    def __neg__(self) -> Tensor:
        return ops.Neg.apply(self)

    def __matmul__(self, other: Any) -> Tensor:
        return ops.MatMul.apply(self, _like(other, self))

    def __rmatmul__(self, other: Any) -> Tensor:
        return ops.MatMul.apply(_like(other, self), self)

    def __getitem__(self, index: Any) -> Tensor:
        return ops.GetItem.apply(self, index=_index(index))

    # comparisons give boolean tensors with no graph
    def _compare(self, other: Any, op: Callable[[Any, Any], Any]) -> Tensor:
        other = other.data if isinstance(other, Tensor) else other
        return Tensor(op(self.data, other))

    def __lt__(self, other: Any) -> Tensor:
        return self._compare(other, lambda a, b: a < b)

    def __le__(self, other: Any) -> Tensor:
        return self._compare(other, lambda a, b: a <= b)

    def __gt__(self, other: Any) -> Tensor:
        return self._compare(other, lambda a, b: a > b)

    def __ge__(self, other: Any) -> Tensor:
        return self._compare(other, lambda a, b: a >= b)

    def eq(self, other: Any) -> Tensor:
        return self._compare(other, lambda a, b: a == b)

    __hash__ = object.__hash__  # tensors are graph nodes: identity hash, no elementwise __eq__

    # --- methods mirroring the functional ops ---
    def sum(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return ops.Sum.apply(self, axis=_axes(axis, self.ndim), keepdims=keepdims)

    def mean(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        axes = _axes(axis, self.ndim)
        count = math.prod(self.shape[a] for a in axes)
        return self.sum(axes, keepdims) / count

    def max(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return ops.Max.apply(self, axis=_axes(axis, self.ndim), keepdims=keepdims)

    def var(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        """Population variance (ddof=0), as LayerNorm uses it."""
        centered = self - self.mean(axis, keepdims=True)
        return (centered * centered).mean(axis, keepdims)

    def exp(self) -> Tensor:
        return ops.Exp.apply(self)

    def log(self) -> Tensor:
        return ops.Log.apply(self)

    def sqrt(self) -> Tensor:
        return ops.Sqrt.apply(self)

    def tanh(self) -> Tensor:
        return ops.Tanh.apply(self)

    def relu(self) -> Tensor:
        return where(self > 0, self, 0.0)

    def softmax(self, axis: int = -1) -> Tensor:
        return ops.Softmax.apply(self, axis=axis % self.ndim)

    def log_softmax(self, axis: int = -1) -> Tensor:
        return ops.LogSoftmax.apply(self, axis=axis % self.ndim)

    def reshape(self, *shape: Any) -> Tensor:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return ops.Reshape.apply(self, shape=_resolve_shape(shape, self.size, self.shape))

    view = reshape

    def permute(self, *axes: Any) -> Tensor:
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        if sorted(a % self.ndim for a in axes) != list(range(self.ndim)):
            raise ValueError(f"permute: axes {axes} are not a permutation of the {self.ndim} dims of {self.shape}")
        return ops.Permute.apply(self, axes=tuple(a % self.ndim for a in axes))

    def transpose(self, dim0: int = -2, dim1: int = -1) -> Tensor:
        axes = list(range(self.ndim))
        axes[dim0], axes[dim1] = axes[dim1], axes[dim0]
        return self.permute(axes)

    @property
    def T(self) -> Tensor:
        return self.permute(tuple(reversed(range(self.ndim))))

    def masked_fill(self, mask: Any, value: float) -> Tensor:
        return where(mask, value, self)

    def unsqueeze(self, axis: int) -> Tensor:
        axis = axis % (self.ndim + 1)
        return self.reshape(self.shape[:axis] + (1,) + self.shape[axis:])

    def flatten(self, start: int = 0) -> Tensor:
        start = start % max(self.ndim, 1)
        return self.reshape(self.shape[:start] + (-1,))


def _topological_order(root: Tensor) -> list[Tensor]:
    """Nodes that need grad, each after all of its inputs (iterative post-order DFS)."""
    order: list[Tensor] = []
    visited: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        if node._fn is not None:
            for parent in node._fn.parents:
                if parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
    return order


def _axes(axis: Any, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    out = []
    for a in axis:
        if not -ndim <= a < max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dims")
        out.append(a % max(ndim, 1))
    return tuple(sorted(set(out)))


def _resolve_shape(shape: Sequence[int], size: int, old: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if shape.count(-1) > 1:
        raise ValueError(f"reshape: only one dimension may be -1, got {shape}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if known == 0 or size % known:
            raise ValueError(f"reshape: cannot reshape a tensor of shape {old} into {shape}")
        shape = tuple(size // known if s == -1 else s for s in shape)
    if math.prod(shape) != size:
        raise ValueError(f"reshape: cannot reshape a tensor of shape {old} ({size} elements) into {shape}")
    return shape


def _index(index: Any) -> Any:
    """Turn tensors inside an index into backend arrays."""
    backend = get_backend()
    if isinstance(index, tuple):
        return tuple(_index(i) for i in index)
    if isinstance(index, Tensor):
        return backend.index(index.data)
    if isinstance(index, list):
        return backend.index(backend.asarray(index))
    if hasattr(index, "dtype") and hasattr(index, "shape"):  # a raw array
        return backend.index(index)
    return index


def as_tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(x)


def _like(x: Any, ref: Tensor) -> Tensor:
    """Python scalars and raw arrays take ``ref``'s dtype, so float32 math stays float32."""
    if isinstance(x, Tensor):
        return x
    backend = get_backend()
    if isinstance(x, (int, float)) and backend.is_float(ref.data):
        return Tensor(x, dtype=ref.dtype)
    return Tensor(x)


# --- factories and free functions ---
def tensor(data: Any, requires_grad: bool = False, dtype: Any = None) -> Tensor:
    """A new leaf tensor. Python floats default to float32 (the engine's working dtype)."""
    if dtype is None and not isinstance(data, Tensor) and not hasattr(data, "dtype"):
        probe = get_backend().asarray(data)
        dtype = "float32" if get_backend().is_float(probe) else None
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


def zeros(*shape: Any, dtype: Any = "float32", requires_grad: bool = False) -> Tensor:
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return Tensor(get_backend().zeros(shape, dtype), requires_grad=requires_grad)


def ones(*shape: Any, dtype: Any = "float32", requires_grad: bool = False) -> Tensor:
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return Tensor(get_backend().ones(shape, dtype), requires_grad=requires_grad)


def randn(*shape: Any, dtype: Any = "float32", requires_grad: bool = False) -> Tensor:
    """Standard normal samples from the engine's generator (see ``manual_seed``)."""
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return Tensor(get_backend().randn(shape, dtype), requires_grad=requires_grad)


def arange(n: int, dtype: Any = "int64") -> Tensor:
    return Tensor(get_backend().arange(n, dtype))


def manual_seed(seed: int) -> None:
    """Seed the active backend's generator (parameter init, dropout masks)."""
    get_backend().manual_seed(seed)


def where(cond: Any, x: Any, y: Any) -> Tensor:
    """``x`` where ``cond`` is true, else ``y``; gradients flow to whichever was picked."""
    cond_data = cond.data if isinstance(cond, Tensor) else get_backend().asarray(cond)
    ref = x if isinstance(x, Tensor) else y if isinstance(y, Tensor) else tensor(x)
    return ops.Where.apply(_like(x, ref), _like(y, ref), cond=cond_data)


def concatenate(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    if not tensors:
        raise ValueError("concatenate: needs at least one tensor")
    ndim = tensors[0].ndim
    return ops.Concatenate.apply(*tensors, axis=axis % ndim)


cat = concatenate


def stack(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    if not tensors:
        raise ValueError("stack: needs at least one tensor")
    shapes = {t.shape for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"stack: all tensors need the same shape, got {sorted(shapes)}")
    axis = axis % (tensors[0].ndim + 1)
    return concatenate([as_tensor(t).unsqueeze(axis) for t in tensors], axis)


from engine import ops  # noqa: E402  (ops subclass Function, defined above)
