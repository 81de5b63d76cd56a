"""Every kernel configuration compiles for the H100 (sm_90), under the installed triton and triton 3.6.

Runs ``tests/helpers/compile_sm90.py`` in a subprocess whose environment has no
``TRITON_INTERPRET`` (the interpreter cannot compile). Triton 3.6 is what the lent GPU
machines have; it comes from the folder named by ``SCRATCHGPT_TRITON36_DIR`` (made with
``pip install --no-deps --target DIR triton==3.6.0``) or is installed once into
``<repo>/.cache/triton36``; without network that test skips.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "helpers" / "compile_sm90.py"
TRITON36_CACHE = REPO / ".cache" / "triton36"
TIMEOUT_S = 1200  # attention alone lists ~200 configurations


def _clean_env(first_on_path: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if first_on_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(first_on_path), str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _run_check(env: dict[str, str], expect_version: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--expect-version", expect_version],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    print(proc.stdout)  # the table, shown with -s or on failure
    tail = f"{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"compile check failed (exit {proc.returncode}):\n{tail}"


def _has_triton36(folder: Path) -> bool:
    return (folder / "triton" / "__init__.py").exists() and any(folder.glob("triton-3.6.*.dist-info"))


@pytest.fixture(scope="module")
def triton36_dir() -> Path:
    if os.environ.get("SCRATCHGPT_TRITON36_DIR"):
        folder = Path(os.environ["SCRATCHGPT_TRITON36_DIR"])
        if not _has_triton36(folder):
            pytest.fail(f"SCRATCHGPT_TRITON36_DIR={folder} holds no triton 3.6 (pip install --target it)")
        return folder
    if not _has_triton36(TRITON36_CACHE):
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(TRITON36_CACHE), "triton==3.6.0"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not _has_triton36(TRITON36_CACHE):
            pytest.skip(f"could not install triton 3.6 (no network?): {' '.join(cmd)}\n{proc.stderr[-1000:]}")
    return TRITON36_CACHE


def test_compiles_for_sm90_with_installed_triton():
    _run_check(_clean_env(), triton.__version__)


@pytest.mark.skipif(triton.__version__.startswith("3.6"), reason="the installed triton is already 3.6")
def test_compiles_for_sm90_with_triton_36(triton36_dir):
    _run_check(_clean_env(first_on_path=triton36_dir), "3.6")


def test_spec_signatures_come_from_the_kernels_own_arguments():
    from kernels.common import _sum_partials_kernel
    from kernels.compile_spec import kernel_signature

    assert kernel_signature(_sum_partials_kernel, {"P": "*fp32", "OUT": "*bf16"}) == {
        "P": "*fp32", "OUT": "*bf16", "n_partials": "i32", "n_cols": "i32", "BLOCK_P": "constexpr",
        "BLOCK_C": "constexpr",
    }
    with pytest.raises(ValueError, match=r"has no argument\(s\) \['Q'\]"):
        kernel_signature(_sum_partials_kernel, {"Q": "*fp32"})
