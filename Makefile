# Two commands do everything: `make demo` (the whole workflow on the embedded model) and `make test`.
PY ?= python3
PIP = $(PY) -m pip

.PHONY: setup setup-test demo test test-all lint

setup:
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e .

# llama.cpp (the gguf extra) compiles for AVX2 without AMX: its AMX kernels crash on some
# Intel CPUs that have them (docs/export.md)
LLAMA_CMAKE_ARGS = -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

setup-test: setup
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q --no-cache-dir "llama-cpp-python>=0.3.36,<0.4"
	$(PIP) install -q -e ".[test,bench]"
	bash scripts/install_browser.sh

demo: setup
	alignforge demo --output-dir runs/demo

test: setup-test
	$(PY) -m pytest -q -m "not slow"

# also runs tests marked slow (none at present)
test-all: setup-test
	$(PY) -m pytest -q
