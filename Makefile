# One entry point for users and CI. `make test` and `make demo` build the environment from nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# CPU wheels by default, so that a CPU machine never downloads a CUDA build of torch.
# For a GPU: make install TORCH_INDEX=https://download.pytorch.org/whl/cu126 EXTRAS=test,cuda
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS ?= test
PYTEST_ARGS ?=

.PHONY: install test test-fast bench bench-scan clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_INDEX)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]" "torch==$(TORCH_VERSION)"
	touch $@

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Skips the end-to-end tests marked slow.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench-scan: install
	$(BIN)/python -m bench.bench_scan

clean:
	rm -rf demo_output build dist *.egg-info .pytest_cache
