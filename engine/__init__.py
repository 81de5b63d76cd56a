"""Our own autograd: Tensor, differentiable ops, nn layers, optimizers.

    import engine
    from engine import nn, optim, functional as F
"""

from engine import functional, nn, optim
from engine.amp import autocast
from engine.backends import get_backend, set_backend
from engine.gradcheck import GradcheckError, gradcheck
from engine.tensor import (
    Function,
    Tensor,
    arange,
    as_tensor,
    cat,
    concatenate,
    is_grad_enabled,
    manual_seed,
    no_grad,
    ones,
    randn,
    stack,
    tensor,
    where,
    zeros,
)

__all__ = [
    "Function", "GradcheckError", "autocast", "Tensor", "arange", "as_tensor", "cat", "concatenate", "functional",
    "get_backend", "gradcheck", "is_grad_enabled", "manual_seed", "nn", "no_grad", "ones", "optim",
    "randn", "set_backend", "stack", "tensor", "where", "zeros",
]
