#!/usr/bin/env bash
# Creates the project's virtual environment and builds the extension.
#
#   scripts/setup_venv.sh VENV [TORCH_SPEC]
#
# Where the system python already has torch (a GPU machine with its own CUDA
# build and no package registry), the venv sees the system packages and uses
# that torch; otherwise it installs TORCH_SPEC (default torch==2.13.0, the
# CPU build that this project's machines keep on local disk).
set -euo pipefail
VENV=${1:-.venv}
TORCH_SPEC=${2:-torch==2.13.0}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    if [ "$TORCH_SPEC" = "torch==2.13.0" ] && "$PYTHON" -c "import torch" 2>/dev/null; then
        echo "== using the system torch: $("$PYTHON" -c 'import torch; print(torch.__version__)')"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
PIP="$VENV/bin/python -m pip"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "== installing $TORCH_SPEC"
    $PIP install -q "$TORCH_SPEC"
fi
# Only what is missing: on a machine without a registry everything is already there.
missing=()
for pkg in numpy pytest xdist setuptools ninja; do
    "$VENV/bin/python" -c "import $pkg" 2>/dev/null || missing+=("$([ "$pkg" = xdist ] && echo pytest-xdist || echo "$pkg")")
done
"$VENV/bin/python" -c "import sklearn" 2>/dev/null || missing+=("scikit-learn")
for pkg in onnx onnxruntime onnxscript; do "$VENV/bin/python" -c "import $pkg" 2>/dev/null || missing+=("$pkg"); done  # test-only: tests/test_onnx.py
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]}"
    $PIP install -q "${missing[@]}"
fi
echo "== building torch_bn_manual (pip install --no-build-isolation -e .)"
$PIP install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import torch_bn_manual as b; print('== backends:', b.available_backends())"
