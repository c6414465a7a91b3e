# The README's commands. Each sets up what it needs on a fresh machine:
# a .venv (reusing a system torch where one is installed), numpy, pytest,
# scikit-learn, and an editable build of the extension.
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := setup.py scripts/setup_venv.sh $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)
BUILT := $(VENV)/.torch_bn_manual-built

.PHONY: demo test bench bench-fused bench-cuda cuda-check clean

$(BUILT): $(SOURCES)
	bash scripts/setup_venv.sh $(VENV)
	touch $@

demo: $(BUILT)
	$(PY) -m torch_bn_manual.demo

test: $(BUILT)
	$(PY) -m pytest -q -n 2 tests

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

clean:
	rm -rf build *.egg-info torch_bn_manual/_C*.so
