# Both main targets create .venv in the repo root when it is missing.
#   make venv CUDA=1   builds llama-cpp-python with CUDA (nvcc and the GPU architecture detected).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.neoxq-installed
EXTRAS ?= convert,dev,sweep,eval
CUDA   ?=
NVCC   ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
# e.g. "9.0" → "90"; several GPUs: the first one's.
CUDA_ARCH ?= $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.')

.PHONY: demo test test-fast lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build is what this project expects; unpinned pulls CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	@echo "neoxq: installing llama-cpp-python; the first time it compiles llama.cpp from source, which takes" >&2
	@echo "       about 5 minutes on 2 cores (20 with CUDA) and prints nothing meanwhile. Later installs reuse pip's cache." >&2
ifeq ($(CUDA),1)
	@test -n "$(NVCC)" || { echo "make venv CUDA=1: nvcc not found; install the CUDA toolkit or pass NVCC=/path/to/nvcc" >&2; exit 1; }
	CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_COMPILER=$(NVCC) $(if $(CUDA_ARCH),-DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCH)) -DLLAVA_BUILD=OFF" \
		$(PY) -m pip install -q --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36
endif
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/neoxq demo

# Two workers, each test file on one of them (its module fixtures built once), the files with the most
# slow tests first in the order conftest.py gives; the trained model is built once and shared
# (quant_tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest quant_tests -n 2 --dist loadfile --no-loadscope-reorder --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check neoxq convert runtime quant_tests scripts
	$(VENV)/bin/ruff format --check neoxq convert runtime quant_tests scripts

test-fast: $(STAMP)
	$(PY) -m pytest quant_tests -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

clean:
	rm -rf build *.egg-info demo-out
