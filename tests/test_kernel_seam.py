"""The backend seam: one kernel namespace per backend with identical signatures, an abstract
Backend, and the README's table of what runs where on the triton backend."""

import inspect
import re
from pathlib import Path

import pytest

from engine.backends.base import KERNEL_OPS, Backend, kernel_namespace
from engine.backends.numpy_backend import NumpyBackend
from engine.backends.triton_backend import TritonBackend

README = Path(__file__).resolve().parent.parent / "README.md"
TABLE_HEADING = "## What runs where on the triton backend"


def _parameters(fn):
    """What callers rely on: names, kinds and defaults (annotations name each backend's array type)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("op", KERNEL_OPS)
def test_every_kernel_op_has_one_signature_on_both_backends(op):
    numpy_fn, triton_fn = getattr(NumpyBackend().kernels, op), getattr(TritonBackend().kernels, op)
    assert _parameters(numpy_fn) == _parameters(triton_fn), f"{op}: {inspect.signature(numpy_fn)} (numpy) vs " \
        f"{inspect.signature(triton_fn)} (triton)"


def test_a_backend_missing_a_method_or_kernel_fails_at_construction():
    no_matmul = type("NoMatmul", (Backend,), {k: v for k, v in vars(NumpyBackend).items() if k != "matmul"})
    with pytest.raises(TypeError, match="matmul"):
        no_matmul()
    with pytest.raises(TypeError, match="no implementation of cross_entropy_forward, cross_entropy_backward"):
        from kernels import attention_ref, gelu_ref, layernorm_ref, rmsnorm_ref, rope_ref, swiglu_ref

        kernel_namespace(gelu_ref, layernorm_ref, rmsnorm_ref, rope_ref, swiglu_ref,
                         attention_forward=attention_ref.seeded_attention_forward,
                         attention_backward=attention_ref.seeded_attention_backward)


def test_a_backend_can_swap_in_its_own_implementation_of_one_op():
    def faster_gelu_forward(x):
        return x

    from kernels import attention_ref, cross_entropy_ref, gelu_ref, layernorm_ref, rmsnorm_ref, rope_ref, swiglu_ref

    ns = kernel_namespace(gelu_ref, layernorm_ref, rmsnorm_ref, rope_ref, swiglu_ref, cross_entropy_ref,
                          gelu_forward=faster_gelu_forward,
                          attention_forward=attention_ref.seeded_attention_forward,
                          attention_backward=attention_ref.seeded_attention_backward)
    assert ns.gelu_forward is faster_gelu_forward and ns.gelu_backward is gelu_ref.gelu_backward


def _readme_table() -> list[tuple[list[str], str]]:
    """Rows of the README's table: ([op names], what runs them)."""
    text = README.read_text()
    assert TABLE_HEADING in text, f"README.md lost its section {TABLE_HEADING!r}"
    section = text.split(TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| `")]
    return [(re.findall(r"`(\w+)`", ops), where.strip()) for ops, where in rows]


def test_readme_table_says_which_ops_are_triton_kernels_and_which_fall_back_to_torch():
    kernels = TritonBackend().kernels
    abstract = Backend.__abstractmethods__
    listed = set()
    for ops, where in _readme_table():
        for op in ops:
            listed.add(op)
            if where.startswith("Triton kernel"):
                path = re.search(r"`(kernels/\w+\.py)`", where).group(1)
                module = getattr(kernels, op).__module__
                assert module == path.removesuffix(".py").replace("/", "."), f"README: {op} runs {module}, not {path}"
            else:
                assert where.startswith("torch fallback"), f"README: {op}: {where!r}"
                assert op in abstract and op not in KERNEL_OPS, f"README: {op} is not a torch-backed Backend method"
    assert listed == set(KERNEL_OPS) | set(abstract) - {"dtype", "is_float", "asarray", "to_numpy", "astype",
                                                        "zeros", "ones", "full", "arange", "copy", "view_base",
                                                        "manual_seed", "rng_state", "set_rng_state", "randn",
                                                        "rand", "randint", "index"}, "README table rows vs the code"
