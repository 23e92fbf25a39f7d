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

.PHONY: install reference test test-fast bench bench-scan clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# torch alone first: a wheel already on this machine (pip's find-links) or the CPU index; its
	# dependencies then come from PyPI with the package's own.
	$(BIN)/python -m pip install -q --no-deps --no-index "torch==$(TORCH_VERSION)" 2>/dev/null || \
	$(BIN)/python -m pip install -q --no-deps "torch==$(TORCH_VERSION)" --index-url $(TORCH_INDEX)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]" "torch==$(TORCH_VERSION)"
	touch $@

# mamba-ssm's pure-PyTorch reference code, for the tests that compare against it. Its release needs
# CUDA to build, so on a CPU machine only its Python files are installed (see tests/mamba_ssm_reference.py);
# a machine that already has mamba-ssm (make install EXTRAS=test,cuda) keeps its own.
MAMBA_REF := mamba-ssm==2.3.2.post1
reference: $(VENV)/.reference
$(VENV)/.reference: $(VENV)/.installed
	$(BIN)/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mamba_ssm') is None)" || \
	MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE $(BIN)/python -m pip install -q --no-deps --no-build-isolation $(MAMBA_REF) || \
	echo "mamba-ssm reference not installed: the tests comparing against it will be skipped"
	touch $@

test: install reference
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Skips the end-to-end tests marked slow.
test-fast: install reference
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m bench.bench_networks

bench-scan: install
	$(BIN)/python -m bench.bench_scan

clean:
	rm -rf demo_output build dist *.egg-info .pytest_cache

# Regenerate the twelve MONAI bundles in bundles/ from networks/bundle_gen/ (templates, dataset specs, plans).
.PHONY: bundles
bundles: install
	$(BIN)/python -m networks.bundle_gen
