"""Where kernel tests run their Triton kernels."""

import torch


def kernel_device() -> str:
    """The GPU when there is one, else the CPU (kernels then run in the Triton interpreter,
    which tests/conftest.py switches on before any kernel is defined)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
