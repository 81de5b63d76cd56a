"""Optimizers, gradient clipping and learning-rate schedules (torch.optim's names and update rules).

Updates run in place on the backend arrays under no_grad: no graph, no needless copies.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

from engine.backends import get_backend
from engine.tensor import Tensor


class Optimizer:
    def __init__(self, params: Iterable[Tensor], lr: float):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got no parameters that require grad")
        if not (_is_finite_number(lr) and lr >= 0):  # NaN would pass a plain `lr < 0`
            raise ValueError(f"{type(self).__name__}: lr must be a finite number >= 0, got {lr}")
        self.lr = lr
        self.step_count = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Step count, lr and per-parameter buffers as NumPy arrays, in parameter order."""
        backend = get_backend()
        buffers = {
            name: [None if b is None else backend.to_numpy(b).copy() for b in bufs]
            for name, bufs in self._buffers().items()
        }
        return {"step_count": self.step_count, "lr": self.lr, "buffers": buffers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        backend = get_backend()
        own = self._buffers()
        for name, bufs in state["buffers"].items():
            if name not in own or len(bufs) != len(self.params):
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: buffer {name!r} for {len(bufs)} parameters does not "
                    f"match this optimizer ({len(self.params)} parameters)"
                )
            for i, (b, p) in enumerate(zip(bufs, self.params)):
                if b is not None and tuple(b.shape) != p.shape:
                    raise ValueError(
                        f"{type(self).__name__}.load_state_dict: {name}[{i}] has shape {b.shape}, "
                        f"parameter has {p.shape}"
                    )
                own[name][i] = None if b is None else backend.copy(backend.asarray(b, p.dtype))
        self.step_count = int(state["step_count"])
        self.lr = float(state["lr"])

    def _buffers(self) -> dict[str, list]:
        return {}


class SGD(Optimizer):
    """p -= lr * buf, with buf = momentum * buf + (1 - dampening) * g (torch.optim.SGD)."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-2,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ):
        super().__init__(params, lr)
        self.momentum, self.dampening, self.weight_decay, self.nesterov = momentum, dampening, weight_decay, nesterov
        self.momentum_buffers: list[Any] = [None] * len(self.params)

    def _buffers(self) -> dict[str, list]:
        return {"momentum_buffers": self.momentum_buffers}

    def step(self) -> None:
        backend = get_backend()
        self.step_count += 1
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if self.weight_decay:
                g = g + self.weight_decay * p.data
            if self.momentum:
                buf = self.momentum_buffers[i]
                if buf is None:
                    buf = self.momentum_buffers[i] = backend.copy(g)
                else:
                    buf *= self.momentum
                    buf += (1 - self.dampening) * g
                g = g + self.momentum * buf if self.nesterov else buf
            p.data -= self.lr * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay, the same update as torch.optim.AdamW."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        super().__init__(params, lr)
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"AdamW: betas must be in [0, 1), got {betas}")
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        backend = get_backend()
        self.exp_avg = [backend.zeros(p.shape, p.dtype) for p in self.params]
        self.exp_avg_sq = [backend.zeros(p.shape, p.dtype) for p in self.params]

    def _buffers(self) -> dict[str, list]:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def step(self) -> None:
        backend = get_backend()
        self.step_count += 1
        beta1, beta2 = self.betas
        bias1 = 1 - beta1**self.step_count
        bias2_sqrt = math.sqrt(1 - beta2**self.step_count)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            # p ← p·(1 − lr·wd);  m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²
            # p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)
            backend.adamw_update(
                p.data, p.grad, m, v, self.lr, beta1, beta2, self.eps, self.weight_decay, bias1, bias2_sqrt
            )


def grad_norm(params: Iterable[Tensor]) -> float:
    """The global L2 norm of the gradients of `params` (0.0 when none has one; inf or NaN when one
    holds such values)."""
    backend = get_backend()
    return math.sqrt(sum(backend.squared_norm(p.grad) for p in params if p.grad is not None))


def clip_grad_norm_(params: Iterable[Tensor], max_norm: float) -> float:
    """Scale all gradients in place so their global L2 norm is at most ``max_norm``;
    returns the norm before clipping. ``max_norm`` must be finite and > 0 (0 would zero
    the gradients, a negative one flip them into gradient ascent)."""
    if not _is_finite_number(max_norm) or max_norm <= 0:
        raise ValueError(f"clip_grad_norm_: max_norm must be a finite number > 0, got {max_norm!r}")
    params = list(params)
    total = grad_norm(params)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in (p.grad for p in params if p.grad is not None):
            g *= coef
    return total


def _is_finite_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def warmup_cosine_lr(
    step: int, peak_lr: float, warmup_steps: int, total_steps: int, initial_lr: float = 0.0, min_lr: float = 0.0
) -> float:
    """Linear warmup from ``initial_lr`` to ``peak_lr`` over ``warmup_steps``, then cosine decay
    to ``min_lr`` at ``total_steps`` (the book's appendix D schedule). Invalid settings
    (``peak_lr`` not finite > 0, learning rates outside ``0 <= initial_lr, min_lr <= peak_lr``,
    ``warmup_steps < 0``, ``total_steps < 1``, ``step < 0``) raise ValueError."""
    problems = []
    if not _is_finite_number(peak_lr) or peak_lr <= 0:
        problems.append(f"peak_lr must be a finite number > 0, got {peak_lr!r}")
    for name, lr in (("initial_lr", initial_lr), ("min_lr", min_lr)):
        if not _is_finite_number(lr) or lr < 0 or (not problems and lr > peak_lr):
            problems.append(f"{name} must be a finite number in [0, peak_lr={peak_lr!r}], got {lr!r}")
    for name, count, least in (("step", step, 0), ("warmup_steps", warmup_steps, 0), ("total_steps", total_steps, 1)):
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < least:
            problems.append(f"{name} must be an integer >= {least}, got {count!r}")
    if problems:
        raise ValueError("warmup_cosine_lr: " + "; ".join(problems))
    if step < warmup_steps:
        return initial_lr + (peak_lr - initial_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Sets ``optimizer.lr`` from ``warmup_cosine_lr`` each time ``step()`` is called."""

    def __init__(
        self,
        optimizer: Optimizer,
        peak_lr: float,
        warmup_steps: int,
        total_steps: int,
        initial_lr: float = 0.0,
        min_lr: float = 0.0,
    ):
        self.optimizer = optimizer
        self.kwargs = dict(
            peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps, initial_lr=initial_lr, min_lr=min_lr
        )
        self.last_step = 0
        optimizer.lr = warmup_cosine_lr(0, **self.kwargs)

    def step(self) -> float:
        self.last_step += 1
        self.optimizer.lr = warmup_cosine_lr(self.last_step, **self.kwargs)
        return self.optimizer.lr
