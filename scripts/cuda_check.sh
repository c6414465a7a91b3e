#!/usr/bin/env bash
# The CUDA compile check (make cuda-check); needs no GPU.
#
#   scripts/cuda_check.sh
#
# 1. a venv with the CUDA build of torch (.venv-cuda: torch==2.14.1, CUDA 13.0,
#    numpy, pytest, ninja, setuptools, scikit-learn);
# 2. a copy of the source tree in build/cuda-check/src, so that the CPU build
#    in the project root (.venv, torch_bn_manual/_C*.so) is never touched;
# 3. the extension built there with nvcc (TORCH_BN_MANUAL_CUDA=1), compiler
#    warnings from our own sources listed;
# 4. every op of the torch_bn_manual namespace must have a CUDA and a CPU kernel;
# 5. the test suite against that build (the CUDA tests skip without a GPU).
#
# Environment: CUDA_HOME (default /usr/local/cuda), CUDA_VENV (default
# .venv-cuda), CUDA_CHECK_DIR (default build/cuda-check), MAX_JOBS (default 2),
# TORCH_CUDA_ARCH_LIST (default: setup.py's), CUDA_CHECK_PYTEST_ARGS (default -q).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${CUDA_VENV:-$ROOT/.venv-cuda}
SCRATCH=${CUDA_CHECK_DIR:-$ROOT/build/cuda-check}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=torch==2.14.1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}
START=$(date +%s)
step() { echo "== $* [$(($(date +%s) - START))s]"; }
fail() { echo "== FAILED: $*" >&2; exit 1; }

step "venv $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
missing=()
"$VENV/bin/python" -c "import torch" 2>/dev/null || missing+=("$TORCH_SPEC")
for pkg in numpy pytest ninja setuptools; do
    "$VENV/bin/python" -c "import $pkg" 2>/dev/null || missing+=("$pkg")
done
# the demo's test trains on scikit-learn's digits, as in scripts/setup_venv.sh
"$VENV/bin/python" -c "import sklearn" 2>/dev/null || missing+=("scikit-learn")
if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]}"
    "$VENV/bin/python" -m pip install -q "${missing[@]}"
fi
"$VENV/bin/python" -c "import sys, torch
print('   torch', torch.__version__, 'CUDA', torch.version.cuda)
sys.exit(torch.version.cuda is None)" || fail "the torch in $VENV is not a CUDA build"
[ -x "$CUDA_HOME/bin/nvcc" ] || fail "no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"
echo "   $("$CUDA_HOME/bin/nvcc" --version | tail -n 2 | head -n 1)"

step "copy of the source tree in $SCRATCH/src"
mkdir -p "$SCRATCH/src"
# Files are copied only when changed (so the build is incremental) and files
# gone from the tree are removed; virtual envs, build outputs and .so stay out.
"$VENV/bin/python" - "$ROOT" "$SCRATCH/src" <<'EOF' || fail "copy"
import filecmp, os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
skip_dirs = {".git", "build", "dist", "__pycache__", ".pytest_cache"}
def skipped_dir(name):
    return name in skip_dirs or name.startswith(".venv") or name.endswith(".egg-info")
wanted = set()
for dirpath, dirnames, filenames in os.walk(src):
    dirnames[:] = [d for d in dirnames if not skipped_dir(d)]
    for f in filenames:
        if f.endswith(".so") or f.endswith(".pyc"):
            continue
        rel = os.path.relpath(os.path.join(dirpath, f), src)
        wanted.add(rel)
        target = os.path.join(dst, rel)
        if not os.path.exists(target) or not filecmp.cmp(os.path.join(src, rel), target, shallow=False):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(os.path.join(src, rel), target)
for dirpath, dirnames, filenames in os.walk(dst):
    dirnames[:] = [d for d in dirnames if not skipped_dir(d)]
    for f in filenames:
        rel = os.path.relpath(os.path.join(dirpath, f), dst)
        if rel not in wanted and not f.endswith(".so"):
            os.remove(os.path.join(dst, rel))
print(f"   {len(wanted)} files")
EOF

step "build with nvcc (MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-setup.py default})"
cd "$SCRATCH/src"
LOG="$SCRATCH/build.log"
if ! TORCH_BN_MANUAL_CUDA=1 "$VENV/bin/python" setup.py build_ext --inplace >"$LOG" 2>&1; then
    tail -n 60 "$LOG"
    fail "build (full log: $LOG)"
fi
ls torch_bn_manual/_C*.so >/dev/null 2>&1 || fail "no torch_bn_manual/_C*.so after the build"
# Warnings that point into our sources (torch's own headers are not ours to fix).
warnings=$(grep -E "csrc/.*(warning|remark)" "$LOG" | sort -u || true)
if [ -n "$warnings" ]; then
    echo "   compiler warnings in csrc/:"
    echo "$warnings" | sed 's/^/   /'
else
    echo "   no compiler warnings in csrc/"
fi

step "every torch_bn_manual op has a CPU kernel and a CUDA kernel"
# One check shared with make gpu-check (scripts/gpu_check.py ops).
PYTHONPATH="$SCRATCH/src" "$VENV/bin/python" scripts/gpu_check.py ops | sed 's/^/   /' || fail "kernel registration"

step "test suite against the CUDA build (${CUDA_CHECK_PYTEST_ARGS:--q} tests)"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pytest ${CUDA_CHECK_PYTEST_ARGS:--q} -p no:cacheprovider tests || fail "test suite"

step "cuda-check passed"
