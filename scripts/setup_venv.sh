#!/usr/bin/env bash
# Creates the project's virtual environment and builds the extension,
# printing each stage with its time and the compiler's progress.
#
#   scripts/setup_venv.sh VENV [TORCH_SPEC]
#
# Where the running python3 (or $PYTHON) already has torch, the venv uses that
# torch: a GPU machine with its own CUDA build and no package registry. That
# python may itself be a venv, whose packages a venv made from it does not see
# (--system-site-packages reaches the *base* interpreter's): the new venv then
# gets a .pth file listing the parent's site-packages. Otherwise it installs
# TORCH_SPEC (default torch==2.13.0, the CPU build that this project's
# machines keep on local disk).
#
# SETUP_VENV_ONLY=1 stops after creating the venv (tests/test_setup_venv.py).
# MAX_JOBS (default: all cores) sets the compiler jobs.
set -euo pipefail
VENV=${1:-.venv}
TORCH_SPEC=${2:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

SETUP_START=$SECONDS
STAGE_START=$SECONDS
stage() {  # stage NAME: starts a stage
    STAGE_START=$SECONDS
    echo "== $* ..."
}
stage_done() {  # stage_done NAME: its time and the time so far
    echo "== $1: $((SECONDS - STAGE_START)) s (setup so far $((SECONDS - SETUP_START)) s)"
}

if [ ! -x "$VENV/bin/python" ]; then
    stage "venv $VENV"
    if [ "$TORCH_SPEC" = "torch==2.13.0" ] && "$PYTHON" -c "import torch" 2>/dev/null; then
        echo "   using the torch of $PYTHON: $("$PYTHON" -c 'import torch; print(torch.__version__)')"
        "$PYTHON" -m venv --system-site-packages "$VENV"
        # Where $PYTHON is itself a venv, the line above reaches the base
        # interpreter's packages only: add the parent venv's own.
        "$VENV/bin/python" "$HERE/venv_parent_site.py" "$PYTHON"
    else
        "$PYTHON" -m venv "$VENV"
    fi
    stage_done venv
fi
[ "${SETUP_VENV_ONLY:-0}" = 1 ] && exit 0

PIP="$VENV/bin/python -m pip"
# pip -q still warns about every index location it skips (machines with a
# local mirror list many): keep its real messages only.
quiet_pip() { $PIP install -q "$@" 2>&1 | sed -u "/^WARNING: Location '.*' is ignored/d"; }
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    stage "installing $TORCH_SPEC"
    quiet_pip "$TORCH_SPEC"
    stage_done "installing torch"
fi

# Only what is missing: on a machine without a registry everything needed is
# already there. Test-only extras (plots, ONNX) are skipped when they can't be
# installed: their tests skip too.
# One interpreter start for all of them (find_spec: no imports): prints the
# pip names of the MODULE:PIP_NAME pairs whose module is missing.
missing() {
    "$VENV/bin/python" - "$@" <<'PY'
import importlib.util, sys
print(" ".join(pair.split(":")[1] for pair in sys.argv[1:] if importlib.util.find_spec(pair.split(":")[0]) is None))
PY
}
read -r -a needed <<< "$(missing numpy:numpy pytest:pytest xdist:pytest-xdist setuptools:setuptools ninja:ninja)"
read -r -a optional <<< "$(missing sklearn:scikit-learn matplotlib:matplotlib onnx:onnx onnxruntime:onnxruntime \
    onnxscript:onnxscript)"
if [ ${#needed[@]} -gt 0 ]; then
    stage "installing ${needed[*]}"
    quiet_pip "${needed[@]}"
    stage_done "installing"
fi
if [ ${#optional[@]} -gt 0 ]; then
    stage "installing ${optional[*]} (optional: plots, ONNX tests)"
    quiet_pip --retries 1 --timeout 20 "${optional[@]}" \
        || echo "   could not install them: the demo's picture and the ONNX tests will be skipped"
    stage_done "installing optional packages"
fi

# The extension is built in place (setup.py build_ext --inplace), where ninja
# keeps its objects between builds: a change recompiles only what it touches.
# (pip install -e compiles everything in a temporary folder every time, and
# pip -q hides it.) We show ninja's [k/n] lines, shortened to the source file,
# and the link step; the full log stays in $VENV/build.log.
stage "building torch_bn_manual (setup.py build_ext --inplace, $MAX_JOBS jobs)"
echo "   ninja lists each file as it finishes (the first one takes the longest)"
LOG="$VENV/build.log"
if ! "$VENV/bin/python" setup.py build_ext --inplace 2>&1 | tee "$LOG" | sed -u -n \
        -e 's|^ *\(\[[0-9]*/[0-9]*\]\) .* -c [^ ]*/\(csrc/[^ ]*\) .*|   \1 \2|p' \
        -e 's|^.* -shared .*|   linking torch_bn_manual/_C|p'; then
    echo "== build failed; the end of $LOG:"
    tail -n 40 "$LOG"
    exit 1
fi
stage_done build
# The editable install (the package only: the library is already in place),
# once per venv, or again where the venv's import points elsewhere.
VENV_PYTHON="$(cd "$VENV" && pwd)/bin/python"
PACKAGE_DIR="$PWD/torch_bn_manual/"
if ! (cd / && "$VENV_PYTHON" -c "import sys, torch_bn_manual as b; sys.exit(not b.__file__.startswith(sys.argv[1]))" \
        "$PACKAGE_DIR") 2>/dev/null; then
    stage "editable install (pip install --no-build-isolation --no-deps -e .)"
    TORCH_BN_MANUAL_NO_EXTENSION=1 quiet_pip --no-build-isolation --no-deps -e .
    stage_done "editable install"
fi
"$VENV/bin/python" -c "import torch_bn_manual as b, torch_bn_manual._C as c; print('== backends:', b.available_backends(), '| CPU kernels:', c.cpu_capability())"
echo "== setup: $((SECONDS - SETUP_START)) s"
