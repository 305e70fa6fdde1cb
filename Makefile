# Two commands do everything: `make demo` (the whole workflow on the embedded model) and `make test`.
PY ?= python3
PIP = $(PY) -m pip

.PHONY: setup setup-test demo test test-all lint

setup:
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e .

setup-test: setup
	$(PIP) install -q -e ".[test,bench]"
	bash scripts/install_browser.sh

demo: setup
	alignforge demo --output-dir runs/demo

test: setup-test
	$(PY) -m pytest -q -m "not slow"

# also runs tests marked slow (none at present)
test-all: setup-test
	$(PY) -m pytest -q
