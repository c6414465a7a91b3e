#!/usr/bin/env bash
# The GPU machine's one run (make gpu-check OUT=dir): build, CUDA tests,
# compute-sanitizer, benchmarks, and a one-screen summary.
#
#   scripts/gpu_check.sh OUT
#
# Made for a machine whose python3 already holds a CUDA build of torch,
# pytest, pytest-xdist, pytest-timeout, ninja and numpy, with nvcc and
# compute-sanitizer installed and no package registry: it uses that python3
# as it is (no venv, nothing installed) and builds the extension in place
# (setup.py build_ext --inplace: nothing is written into the interpreter's
# site-packages; every step runs with PYTHONPATH set to this tree).
#
# Steps, each under its own timeout; a failing step does not stop the next:
#   env        GPU, torch, CUDA, nvcc, compute-sanitizer
#   build      for the local GPU's architecture only, MAX_JOBS = cores
#   ops        every op has a CPU and a CUDA kernel
#   (without a GPU the run stops here, and the summary says so)
#   tests      tests/test_cuda.py with xdist, a per-test timeout, -rfE, --durations
#   sanitizer  a probe, then one memcheck run of tests/cuda_memcheck_script.py
#   bench-quick  benchmarks/bench.py --device cuda --quick
#   bench      the full CUDA benchmark, with the time that is left
# The whole run stays within GPU_CHECK_BUDGET seconds (default 450, under the
# 8 minutes it may take). OUT receives at most 8 files, none over 16 MiB:
#   summary.md gpu_check.log env.log build.log tests.log sanitizer.log bench-quick.md bench.md
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET (seconds),
# GPU_CHECK_SKIP_BUILD=1 (use the extension as built: a rehearsal of the
# rest), GPU_CHECK_BUILD_TIMEOUT (default 300 s; more for a rehearsal on a
# slower machine), TORCH_CUDA_ARCH_LIST (only used without a GPU; default 9.0),
# MAX_JOBS (default: the cores), CUDA_HOME (default /usr/local/cuda, else the
# toolkit of the nvcc on PATH).
# Exit status: 0 when every step that ran passed (also when there is no GPU:
# the summary then says so), 1 when a step failed or timed out, 2 on misuse.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-}
if [ -z "$OUT" ]; then
    echo "usage: make gpu-check OUT=dir   (or scripts/gpu_check.sh dir)" >&2
    exit 2
fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
RESERVE=20  # seconds kept for the summary
# The toolkit: CUDA_HOME, else /usr/local/cuda, else where the nvcc on PATH lives.
if [ -z "${CUDA_HOME:-}" ]; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then
        CUDA_HOME=/usr/local/cuda
    elif command -v nvcc >/dev/null; then
        CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    fi
fi
if [ -n "${CUDA_HOME:-}" ]; then
    export CUDA_HOME
    export PATH="$PATH:$CUDA_HOME/bin:$CUDA_HOME/compute-sanitizer"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
HELPER="$ROOT/scripts/gpu_check.py"
START=$(date +%s)
FAILED=0
cd "$ROOT" || exit 2
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

elapsed() { echo $(($(date +%s) - START)); }
# The timeout for a step: its cap, or what is left of the budget.
time_for() {
    local cap=$1 left=$((BUDGET - RESERVE - $(elapsed)))
    [ "$left" -lt "$cap" ] && cap=$left
    echo "$cap"
}
record() {  # name status seconds note
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$SCRATCH/steps.tsv"
    echo "== $1: $2 in $3 s${4:+ ($4)} [$(elapsed) s of $BUDGET]"
    case $2 in failed|timeout) FAILED=1 ;; esac
}
skip() { record "$1" skipped 0 "$2"; }
# run_step NAME CAP LOG NOTE CMD...: CMD under `timeout`, output appended to LOG.
run_step() {
    local name=$1 cap=$2 log=$3 note=$4
    shift 4
    local t
    t=$(time_for "$cap")
    if [ "$t" -lt 10 ]; then
        skip "$name" "no time left in the ${BUDGET} s budget"
        return 1
    fi
    echo "== $name (timeout ${t} s) [$(elapsed) s]: $*"
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$t" "$@" >>"$log" 2>&1
    rc=$?
    local secs=$(($(date +%s) - t0))
    if [ $rc -eq 0 ]; then
        record "$name" ok "$secs" "$note"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        record "$name" timeout "$secs" "${note:+$note; }killed after ${t} s"
    else
        record "$name" failed "$secs" "${note:+$note; }exit $rc"
    fi
    return $rc
}
finish() {
    echo "== summary [$(elapsed) s]"
    "$PYTHON" "$HELPER" summary "$OUT" "$SCRATCH" >/dev/null || echo "gpu-check: the summary could not be written"
    cat "$OUT/summary.md" 2>/dev/null
    "$PYTHON" "$HELPER" fit "$OUT" || FAILED=1
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null  # gpu_check.log complete before the files are collected
    exit $FAILED
}

# ---------------------------------------------------------------- env
run_step env 60 "$OUT/env.log" "" "$PYTHON" "$HELPER" env "$SCRATCH"
{
    echo "--- nproc: $(nproc)"
    echo "--- nvcc: $(command -v nvcc || echo missing)"; timeout 20 nvcc --version 2>&1 | tail -n 2
    echo "--- compute-sanitizer: $(command -v compute-sanitizer || echo missing)"
    echo "--- nvidia-smi"; timeout 20 nvidia-smi 2>&1 | head -n 20
} >>"$OUT/env.log" 2>&1
cat "$OUT/env.log"
envq() {  # a field of env.json
    "$PYTHON" -c "import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); print('' if v in (None, False) else v)" \
        "$SCRATCH/env.json" "$1" 2>/dev/null
}
GPU_COUNT=$(envq gpu_count)
GPU_COUNT=${GPU_COUNT:-0}

# ---------------------------------------------------------------- build
if [ "$GPU_COUNT" -gt 0 ]; then
    export TORCH_CUDA_ARCH_LIST=$(envq arch)  # the local GPU only
else
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
    skip build "GPU_CHECK_SKIP_BUILD=1: the extension as already built"
elif [ -z "$(envq cuda)" ]; then
    record build failed 0 "the torch of $PYTHON is not a CUDA build: $(envq torch)"
else
    rm -f torch_bn_manual/_C*.so  # no stale build can pass for this one
    run_step build "${GPU_CHECK_BUILD_TIMEOUT:-300}" "$OUT/build.log" "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS" \
        env TORCH_BN_MANUAL_CUDA=1 "$PYTHON" setup.py build_ext --inplace
    grep -E "csrc/.*(warning|error)" "$OUT/build.log" | sort -u | head -n 20
fi

# ---------------------------------------------------------------- ops
run_step ops 60 "$OUT/build.log" "" "$PYTHON" "$HELPER" ops
grep -E "^(PROBLEM|ops:)" "$OUT/build.log" | tail -n 12

if [ "$GPU_COUNT" -eq 0 ]; then
    echo "== no GPU visible to torch: stopping after the build and the op check"
    for s in tests sanitizer bench-quick bench; do skip "$s" "no GPU"; done
    finish
fi

# ---------------------------------------------------------------- tests
# test_compute_sanitizer is left to the sanitizer step below (one memcheck run).
pytest_args=(-p no:cacheprovider -rfE --durations=15 --junitxml="$SCRATCH/tests.xml"
             -k "not test_compute_sanitizer" tests/test_cuda.py)
[ "$(envq has_xdist)" = True ] && pytest_args=(-n 4 "${pytest_args[@]}")
[ "$(envq has_pytest_timeout)" = True ] && pytest_args=(--timeout=150 "${pytest_args[@]}")
run_step tests 240 "$OUT/tests.log" "" "$PYTHON" -m pytest "${pytest_args[@]}"
tail -n 25 "$OUT/tests.log"

# ---------------------------------------------------------------- sanitizer
if ! command -v compute-sanitizer >/dev/null; then
    skip sanitizer "compute-sanitizer is not installed"
else
    # A quick probe: on some machines the sanitizer refuses the device
    # ("Device not supported", then error 999 at the first allocation).
    echo "--- probe" >>"$OUT/sanitizer.log"
    probe_t=$(time_for 90)
    [ "$probe_t" -lt 15 ] && probe_t=15
    if timeout -k 5 "$probe_t" compute-sanitizer --tool memcheck "$PYTHON" -c \
        "import torch; torch.ones(4, device='cuda').sum().item(); print('sanitizer probe ok')" \
        >>"$OUT/sanitizer.log" 2>&1 && grep -q "sanitizer probe ok" "$OUT/sanitizer.log"; then
        echo "--- memcheck of tests/cuda_memcheck_script.py" >>"$OUT/sanitizer.log"
        run_step sanitizer 180 "$OUT/sanitizer.log" "memcheck" \
            env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --print-limit 50 \
            --error-exitcode 86 "$PYTHON" tests/cuda_memcheck_script.py
    else
        why=$(grep -m1 -iE "not supported|error" "$OUT/sanitizer.log" | cut -c1-120)
        skip sanitizer "the probe failed (compute-sanitizer refused the device?): ${why:-no output, see sanitizer.log}"
    fi
    tail -n 5 "$OUT/sanitizer.log"
fi

# ---------------------------------------------------------------- benchmarks
run_step bench-quick 120 "$OUT/bench-quick.md" "" "$PYTHON" benchmarks/bench.py --device cuda --quick --out -
# The full run: 5 shapes x 2 layouts x 3 dtypes x 3 modes = 90 cases of 4
# columns. min-run-time from the time left, assuming about 1.5 s per case of
# module building, profiling and the copy measurement on top of the timing.
left=$((BUDGET - RESERVE - $(elapsed) - 10))
mrt=$("$PYTHON" -c "import sys; left=int(sys.argv[1]); t=(left - 90 * 1.5) / (90 * 4); print(f'{min(t, 0.6):.2f}' if t >= 0.1 else '')" "$left")
if [ -z "$mrt" ]; then
    skip bench "${left} s left: too little for the 90 cases of the full run"
else
    rounds=$("$PYTHON" -c "import sys; print(max(1, min(8, int(float(sys.argv[1]) / 0.05))))" "$mrt")
    run_step bench "$left" "$OUT/bench.md" "--min-run-time $mrt --rounds $rounds" \
        "$PYTHON" benchmarks/bench.py --device cuda --min-run-time "$mrt" --rounds "$rounds" --out -
fi
finish
