"""What the sm_90 compile check needs to know about one kernel configuration.

Each Triton kernel module exposes ``sm90_compile_specs() -> list[CompileSpec]`` listing
every (kernel, block configuration) its launchers can pick; the compile check in
``tests/`` compiles each one for the H100 without a GPU. ``kernel_signature`` derives a
spec's signature from the kernel's own argument list, so a spec names only the types
that cannot be read from it (pointers and non-i32 scalars).
"""

import inspect
from dataclasses import dataclass, field
from typing import Any

import triton.language as tl


@dataclass(frozen=True)
class CompileSpec:
    name: str  # human-readable, e.g. "attention_fwd[D=64,BM=64,BN=64]"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]  # argument name -> triton type string ("*fp32", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any] = field(default_factory=dict)  # constexpr argument name -> value
    num_warps: int = 4
    num_stages: int = 3


def kernel_signature(fn: Any, types: dict[str, str]) -> dict[str, str]:
    """The triton signature of the @triton.jit ``fn``, in its argument order.

    Arguments annotated ``tl.constexpr`` are "constexpr", those named in ``types`` get
    that type ("*bf16", "fp32", ...), every other one is "i32". A name in ``types`` that
    is not an argument of ``fn`` raises, so a renamed argument cannot go stale silently.
    """
    params = inspect.signature(fn.fn).parameters
    unknown = sorted(set(types) - set(params))
    if unknown:
        raise ValueError(f"kernel_signature: {fn.fn.__name__} has no argument(s) {unknown}; it takes {list(params)}")
    return {
        name: "constexpr" if p.annotation in (tl.constexpr, "tl.constexpr") else types.get(name, "i32")
        for name, p in params.items()
    }
