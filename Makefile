# The README's commands. Each sets up what it needs on a fresh machine:
# a .venv (reusing a system torch where one is installed), numpy, pytest,
# scikit-learn, and an editable build of the extension.
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := setup.py pyproject.toml scripts/setup_venv.sh scripts/venv_parent_site.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)
BUILT := $(VENV)/.torch_bn_manual-built
# The extension builds with one compiler job per core.
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

# $(call timed,NAME,COMMAND): runs COMMAND as one stage, printing its name
# and then its wall time (COMMAND must not contain a comma).
timed = @start=$$(date +%s); echo "== $(1) ..."; $(2); rc=$$?; \
	echo "== $(1): $$(( $$(date +%s) - start )) s"; exit $$rc

.PHONY: demo test bench bench-fused bench-cuda cuda-check gpu-check clean

$(BUILT): $(SOURCES)
	bash scripts/setup_venv.sh $(VENV)
	touch $@

demo: $(BUILT)
	$(call timed,demo,$(PY) -m torch_bn_manual.demo)

test: $(BUILT)
	$(call timed,tests (pytest -n 2),$(PY) -m pytest -q -n 2 tests)

bench: $(BUILT)
	$(PY) benchmarks/bench.py

bench-fused: $(BUILT)
	$(PY) benchmarks/bench_fused.py

bench-cuda: $(BUILT)
	$(PY) benchmarks/bench.py --device cuda

# Builds the CUDA kernels against torch 2.14.1 (CUDA 13.0) with nvcc and runs
# the CPU suite on that build; needs no GPU.
cuda-check:
	bash scripts/cuda_check.sh

# The GPU machine's one run (scripts/gpu_check.sh): in-place build for the
# local GPU, tests/test_cuda.py, compute-sanitizer, benchmarks; summary.md
# and the logs in OUT. Uses PYTHON (default python3) as it is.
gpu-check: PYTHON ?= python3
gpu-check:
	PYTHON="$(PYTHON)" bash scripts/gpu_check.sh "$(OUT)"

clean:
	rm -rf build *.egg-info torch_bn_manual/_C*.so torch_bn_manual/_cpu_requirements.py
