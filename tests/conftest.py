"""Test setup shared by every test.

NOTE: TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, so it is
set here, at import time of the first conftest, when no CUDA device is present.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_dot_reads_bf16_as_values() -> None:
    """NOTE: the Triton interpreter stores bf16 as uint16 and its ``tl.dot`` multiplies those
    bit patterns (triton-lang/triton#11584: results ~1e10; upstream "not supported yet"). A GPU
    dot multiplies the bf16 values exactly into an fp32 accumulator, so widening bf16 operands to
    fp32 first is what the hardware computes. Only ``tl.dot`` is wrong for our kernels: they do
    all other bf16 arithmetic after a cast to fp32 (the bf16 GELU/LayerNorm cases check that)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(h: interpreter.TensorHandle) -> interpreter.TensorHandle:
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def dot(self, a, b, *rest):
        return create_dot(self, widen(a), widen(b), *rest)

    interpreter.InterpreterBuilder.create_dot = dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_dot_reads_bf16_as_values()

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


@pytest.fixture(scope="session")
def decoder_folders(tmp_path_factory):
    """Tiny random Llama 3 (tied head) and Qwen3 (untied) Hugging Face folders, written once per
    session by transformers (tests that use them skip without it), and the first 40 entries of
    instruction-data.json as a small instruction file ("instructions")."""
    pytest.importorskip("transformers", reason="transformers writes the tiny folders (pip install -e .[test])")
    import json

    from model.data.datadir import data_file
    from tests.fixtures.make_tiny_llama_qwen import make_tiny_folder

    root = tmp_path_factory.mktemp("decoders")
    folders = {kind: make_tiny_folder(kind, root / kind) for kind in ("llama", "qwen3")}
    entries = json.loads(data_file("instruction-data.json").read_text())[:40]
    (root / "instructions.json").write_text(json.dumps(entries))
    return folders | {"instructions": root / "instructions.json"}
