"""The backend seam: where tensors live and which kernels the fused ops call.

A backend is chosen once per process (``set_backend("numpy" | "triton")``, or the
``SCRATCHGPT_BACKEND`` environment variable). The default is ``triton`` when a CUDA GPU
is present and ``numpy`` otherwise. Every op in ``engine`` talks to arrays only through
the active backend, so model code is identical on both.
"""

from __future__ import annotations

import os

from engine.backends.base import Backend

_BACKEND_NAMES = ("numpy", "triton")
_active: Backend | None = None


def triton_missing(module: str, instead: str) -> str:
    """The one error line for the triton backend asked for where ``module`` is not installed."""
    return f'the triton backend needs {module}, which is not installed: pip install -e ".[gpu]" (or use {instead})'


def _make(name: str) -> Backend:
    if name == "numpy":
        from engine.backends.numpy_backend import NumpyBackend

        return NumpyBackend()
    if name == "triton":
        try:
            from engine.backends.triton_backend import TritonBackend
        except ImportError as err:  # e.g. SCRATCHGPT_BACKEND=triton on an install without the [gpu] extra
            raise ValueError(triton_missing(err.name or "torch and triton",
                                            "the numpy backend: SCRATCHGPT_BACKEND=numpy")) from err

        return TritonBackend()
    raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(_BACKEND_NAMES)}")


def default_backend_name() -> str:
    env = os.environ.get("SCRATCHGPT_BACKEND")
    if env:
        return env
    try:
        import torch

        return "triton" if torch.cuda.is_available() else "numpy"
    except ImportError:
        return "numpy"


def set_backend(name: str) -> Backend:
    """Make ``name`` the active backend. Tensors made before the switch stay on the old one."""
    global _active
    if _active is None or _active.name != name:
        _active = _make(name)
    return _active


def get_backend() -> Backend:
    if _active is None:
        set_backend(default_backend_name())
    return _active


__all__ = ["Backend", "default_backend_name", "get_backend", "set_backend", "triton_missing"]
