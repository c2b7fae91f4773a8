#!/usr/bin/env bash
# The GPU checks of the Triton backend, in one go, on a machine with an NVIDIA GPU (H100/H200 with
# torch 2.11 and triton 3.6 installed; no network needed). Run from the repository root:
#
#     bash benchmarks/gpu_check.sh         # results under $OUT (default: gpu_check_out/), 8 files
#
# Stages, most important first, each under its own time limit (seconds, overridable):
#   1. the Triton tests on CUDA tensors: tests/test_triton.py (compiled kernel; graph capture; parity
#      with torch fused) and test_low_bit_kernels.py (the low-bit kernel bit for bit against the
#      for-loop reference; test_low_bit_reproducible.py's Triton run is the interpreter's, so it waits
#      for stage 3)
#   2. benchmarks/gpu_check.py: capture/replay equality, the acceptance speeds, each storage format
#      against its own memory floor, the float and low-bit kernels' launch-shape sweeps
#   3. the rest of the test suite
#   4. python -m adamw bench --device cuda
# Worst case 9 min (fits one 10-minute device command); STAGES="test_triton gpu_check" runs a
# subset. Exit status: nonzero if any stage failed; every chosen stage runs regardless.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}  # the GPU machines' python3 holds torch
mkdir -p "$OUT"
: >"$OUT/summary.txt"  # this run's stages only
unset TRITON_INTERPRET  # the compiled kernel, not the interpreter
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # works without `pip install -e .`
STAGES=${STAGES:-test_triton gpu_check test_suite bench}
status=0
# pytest-xdist (on the GPU machines' image) spreads the tests over the cores: most of their time is
# compiling Triton kernels and building the C kernels, one process each.
WORKERS=()
"$PYTHON" -c "import xdist" 2>/dev/null && WORKERS=(-n "${PYTEST_WORKERS:-15}")

stage() {  # stage NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.txt"
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

{
    nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    echo "C compiler: $(command -v cc || command -v gcc || echo none); pytest workers: ${WORKERS[*]:-none}"
} 2>&1 | tee "$OUT/environment.txt"

stage test_triton "${LIMIT_TEST_TRITON:-100}" "$PYTHON" -m pytest -vv -rs --tb=short --durations=10 -p no:cacheprovider "${WORKERS[@]}" \
    tests/test_triton.py tests/test_low_bit_kernels.py
stage gpu_check "${LIMIT_GPU_CHECK:-120}" "$PYTHON" benchmarks/gpu_check.py --out "$OUT"
stage test_suite "${LIMIT_TEST_SUITE:-250}" "$PYTHON" -m pytest -vv -rs --tb=short --durations=10 -p no:cacheprovider "${WORKERS[@]}" tests/ \
    --ignore=tests/test_triton.py --ignore=tests/test_low_bit_kernels.py
stage bench "${LIMIT_BENCH:-60}" "$PYTHON" -m adamw bench --device cuda --steps 20 --warmup 3 --no-progress \
    --json "$OUT/bench.json"

cat "$OUT/summary.txt"
exit "$status"
