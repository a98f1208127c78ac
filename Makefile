# Both main targets create .venv in the repo root when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.neoxq-installed

.PHONY: demo test test-fast venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build is what this project expects; unpinned pulls CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	# llama-cpp-python builds llama.cpp from source (minutes); set CMAKE_ARGS="-DGGML_CUDA=on" for CUDA.
	$(PY) -m pip install -q -e '.[convert,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/neoxq demo

test: $(STAMP)
	$(PY) -m pytest quant_tests

test-fast: $(STAMP)
	$(PY) -m pytest quant_tests -m "not slow"

clean:
	rm -rf build *.egg-info demo-out
