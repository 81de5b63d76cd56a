"""What the sm_90 compile check needs to know about one kernel configuration.

Each Triton kernel module exposes ``sm90_compile_specs() -> list[CompileSpec]`` listing
every (kernel, block configuration) its launchers can pick; the compile check in
``tests/`` compiles each one for the H100 without a GPU.
"""

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CompileSpec:
    name: str  # human-readable, e.g. "attention_fwd[D=64,BM=64,BN=64]"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]  # argument name -> triton type string ("*fp32", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any] = field(default_factory=dict)  # constexpr argument name -> value
    num_warps: int = 4
    num_stages: int = 3
