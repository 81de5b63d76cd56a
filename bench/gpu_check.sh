#!/usr/bin/env bash
# The one script a GPU session runs on a lent H100: kernel tests natively on CUDA, then
# the quick benches. Each step has its own timeout and its own log in $OUT; a failing
# step does not stop the next one, but the script exits non-zero if any step failed.
# The whole run stays within 8 minutes (steps are cut to the time left).
#
#   bash bench/gpu_check.sh            # logs in ./gpu_out unless OUT is set
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
PYTHON="${PYTHON:-python}"
DEADLINE=470 # seconds since start; leaves a margin under 8 minutes
mkdir -p "$OUT"
unset TRITON_INTERPRET # kernels must run natively on the GPU
FAILED=()

run_step() { # name timeout_s command...
    local name=$1 budget=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    if ((left < 15)); then
        echo "=== $name: SKIPPED, out of time" | tee "$OUT/$name.log"
        FAILED+=("$name (not run: out of time)")
        return 0
    fi
    ((budget > left)) && budget=$left
    echo "=== $name (timeout ${budget}s): $*"
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$budget" "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
    if ((rc == 0)); then
        echo "=== $name: ok in $((SECONDS - start)) s"
    else
        local why="exit $rc"
        ((rc == 124 || rc == 137)) && why="timed out after ${budget}s"
        echo "=== $name: FAILED ($why) in $((SECONDS - start)) s"
        FAILED+=("$name ($why)")
    fi
}

if ! timeout 120 "$PYTHON" -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
    echo "pip install -e . failed (see $OUT/install.log); using PYTHONPATH=$PWD"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    nvidia-smi || echo "nvidia-smi failed"
    "$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0]); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); \
print('triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.log" || true

run_step pytest_kernels 220 "$PYTHON" -m pytest tests -x -q -k "kernel or attention or layernorm or gelu or backend or cross_entropy"
run_step bench_attention 90 "$PYTHON" -m bench.attention --quick
run_step bench_layernorm 45 "$PYTHON" -m bench.layernorm --quick
run_step bench_gelu 45 "$PYTHON" -m bench.gelu --quick
run_step bench_cross_entropy 60 "$PYTHON" -m bench.cross_entropy --tokens 512,8192 --repeats 5
if [[ -f bench/train.py ]]; then
    run_step bench_train 60 "$PYTHON" -m bench.train --quick
fi

echo
if ((${#FAILED[@]} > 0)); then
    printf 'FAILED: %s\n' "${FAILED[@]}" | tee "$OUT/summary.txt"
    exit 1
fi
echo "all steps passed in $SECONDS s" | tee "$OUT/summary.txt"
