"""Test setup shared by every test.

NOTE: TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, so it is
set here, at import time of the first conftest, when no CUDA device is present.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# NOTE: on 2 cores, torch's intra-op threads fight OpenBLAS's spinning threads after NumPy
# calls: a small torch reference ran 30x slower interleaved with our engine. Tests compare
# numbers, not speed, so torch gets one thread.
torch.set_num_threads(1)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def numpy_backend_by_default():
    """Every test starts on the numpy backend; backend tests switch explicitly and are restored."""
    import engine

    engine.set_backend("numpy")
    engine.manual_seed(0)
    yield
    engine.set_backend("numpy")
