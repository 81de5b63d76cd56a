"""Compile every Triton kernel configuration for the H100 (sm_90) without a GPU.

    python tests/helpers/compile_sm90.py [--jobs 2] [--expect-version 3.6] [--fresh-cache] [--only NAME]

Finds every module in ``kernels/`` that defines ``sm90_compile_specs()``, compiles each
``CompileSpec`` with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (the wheel ships
ptxas, so no GPU is needed), checks the shared memory fits the H100's 227 KiB, and prints
one table row per spec. Exits non-zero if a module fails to import, a spec fails to
compile or uses too much shared memory, or no spec is found.

This catches what the interpreter lets through (``break``, non-jit helper calls,
non-constexpr globals, small ``tl.dot`` shapes, shared-memory overflow, API skew between
triton versions). It must run in its own process without ``TRITON_INTERPRET``;
``tests/test_compile_sm90.py`` runs it under the installed triton and under triton 3.6.
"""

import os

# NOTE: must happen before triton is imported: interpreted kernels cannot be compiled.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9's default, stated to silence its warning

import argparse  # noqa: E402
import atexit  # noqa: E402
import importlib  # noqa: E402
import multiprocessing  # noqa: E402
import pkgutil  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

H100_SHARED_LIMIT = 232448  # bytes of shared memory one H100 block may use (227 KiB)
TARGET = GPUTarget("cuda", 90, 32)


def discover() -> tuple[list[tuple[str, int, str]], list[tuple[str, str]]]:
    """([(module, spec index, spec name)], [(module, import error)]) over kernels/*.py."""
    import kernels

    specs, errors = [], []
    for info in sorted(pkgutil.iter_modules(kernels.__path__), key=lambda i: i.name):
        module_name = f"kernels.{info.name}"
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # a broken kernel module must fail the check, not vanish from it
            errors.append((module_name, f"{type(e).__name__}: {e}"))
            continue
        make_specs = getattr(module, "sm90_compile_specs", None)
        if callable(make_specs):
            try:
                specs += [(module_name, i, s.name) for i, s in enumerate(make_specs())]
            except Exception as e:
                errors.append((module_name, f"sm90_compile_specs() raised {type(e).__name__}: {e}"))
    return specs, errors


def _cuobjdump() -> str | None:
    import triton.backends.nvidia as nvidia

    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, local-memory spill bytes) read from the cubin, or Nones."""
    tool = _cuobjdump()
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    reg, local = re.search(r"REG:(\d+)", out), re.search(r"LOCAL:(\d+)", out)
    return (int(reg.group(1)) if reg else None), (int(local.group(1)) if local else None)


def compile_one(module_name: str, index: int) -> dict:
    """Compile one spec; returns a table row. Runs in a worker process."""
    spec = importlib.import_module(module_name).sm90_compile_specs()[index]
    row = {
        "module": module_name.removeprefix("kernels."),
        "name": spec.name,
        "warps": spec.num_warps,
        "stages": spec.num_stages,
        "shared": None,
        "regs": None,
        "spill": None,
        "error": None,
    }
    # Both 3.6 and 3.9 want every constexpr in the signature too; add any the spec left out.
    signature = dict(spec.signature)
    for key in spec.constexprs:
        signature.setdefault(key, "constexpr")
    start = time.perf_counter()
    try:
        src = triton.compiler.ASTSource(fn=spec.fn, signature=signature, constexprs=spec.constexprs)
        compiled = triton.compile(
            src, target=TARGET, options={"num_warps": spec.num_warps, "num_stages": spec.num_stages}
        )
        row["shared"] = compiled.metadata.shared
        row["regs"], row["spill"] = _resource_usage(compiled.asm["cubin"])
        if row["shared"] > H100_SHARED_LIMIT:
            row["error"] = f"shared memory {row['shared']} B > H100 limit {H100_SHARED_LIMIT} B"
    except Exception as e:
        first_lines = " | ".join(str(e).strip().splitlines()[:3])
        row["error"] = f"{type(e).__name__}: {first_lines}"[:300]
    row["seconds"] = time.perf_counter() - start
    return row


def print_table(rows: list[dict]) -> None:
    def fmt(v):
        return "-" if v is None else str(v)

    header = ("module", "kernel[config]", "warps", "shared B", "regs", "spill B", "seconds", "status")
    lines = [
        (
            r["module"],
            r["name"],
            fmt(r["warps"]),
            fmt(r["shared"]),
            fmt(r["regs"]),
            fmt(r["spill"]),
            f"{r['seconds']:.2f}",
            "ok" if r["error"] is None else "FAIL",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compile processes")
    parser.add_argument("--expect-version", default=None, help="fail unless triton.__version__ starts with this")
    parser.add_argument(
        "--fresh-cache",
        action="store_true",
        help="compile into an empty temporary cache instead of triton's own (slower, times every compile)",
    )
    parser.add_argument("--only", default="", help="only specs whose 'module:kernel[config]' contains this")
    args = parser.parse_args()

    print(f"triton {triton.__version__} from {os.path.dirname(triton.__file__)}; target sm_90")
    if args.expect_version and not triton.__version__.startswith(args.expect_version):
        print(f"FAIL: expected triton {args.expect_version}.*, got {triton.__version__}")
        return 2
    # NOTE: triton's cache key covers the kernel source (and the jit functions it calls),
    # constexprs, options, target and triton version, so a cache hit is as good an answer
    # as a compile; only the seconds column then shows the lookup.
    if args.fresh_cache:
        # Set in this process before any compile so the forked workers inherit it.
        cache = tempfile.mkdtemp(prefix="scratchgpt-sm90-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        os.environ["TRITON_CACHE_DIR"] = cache

    specs, import_errors = discover()
    specs = [s for s in specs if args.only in f"{s[0].removeprefix('kernels.')}:{s[2]}"]
    modules = sorted({m for m, _, _ in specs})
    print(f"{len(specs)} specs from {', '.join(modules) or 'no module'}; {args.jobs} job(s)\n")

    start = time.perf_counter()
    if args.jobs > 1 and len(specs) > 1:
        # fork: workers inherit the imported modules instead of importing torch again.
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            rows = list(pool.map(compile_one, [m for m, _, _ in specs], [i for _, i, _ in specs]))
    else:
        rows = [compile_one(m, i) for m, i, _ in specs]
    print_table(rows)

    failures = [(f"{r['module']}:{r['name']}", r["error"]) for r in rows if r["error"]] + import_errors
    print(
        f"\n{len(rows) - sum(1 for r in rows if r['error'])}/{len(rows)} compiled in "
        f"{time.perf_counter() - start:.1f} s with triton {triton.__version__}"
    )
    for what, error in failures:
        print(f"FAIL {what}: {error}")
    if not specs:
        print("FAIL: no sm90_compile_specs() found in kernels/")
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
