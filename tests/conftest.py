"""Test setup shared by every test.

NOTE: TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, so it is
set here, at import time of the first conftest, when no CUDA device is present.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def kernel_device() -> str:
    """Where Triton kernels run in tests: the GPU when there is one, else the CPU interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
