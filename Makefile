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

.PHONY: install reference demo test test-fast bench bench-scan bench-volume clean

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

# mamba-ssm's and causal-conv1d's pure-PyTorch reference code, for the tests that compare against it.
# Their releases need CUDA to build, so on a CPU machine only their Python files are installed (see
# tests/mamba_ssm_reference.py); a machine that already has them (make install EXTRAS=test,cuda) keeps its own.
MAMBA_REF := mamba-ssm==2.3.2.post1
CONV1D_REF := causal-conv1d==1.7.0
reference: $(VENV)/.reference
$(VENV)/.reference: $(VENV)/.installed
	$(BIN)/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mamba_ssm') is None)" || \
	MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE $(BIN)/python -m pip install -q --no-deps --no-build-isolation $(MAMBA_REF) || \
	echo "mamba-ssm reference not installed: the tests comparing against it will be skipped"
	$(BIN)/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('causal_conv1d') is None)" || \
	CAUSAL_CONV1D_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE $(BIN)/python -m pip install -q --no-deps --no-build-isolation $(CONV1D_REF) || \
	echo "causal-conv1d reference not installed: the test of Mamba's mamba-ssm branch will be skipped"
	touch $@

test: install reference
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Skips the end-to-end tests marked slow.
test-fast: install reference
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The main job: synthetic data, training, evaluation and a real CT segmented, on this machine's CPU.
BUNDLE ?= synapse_bisegmamba
demo: install
	$(BIN)/python -m networks.demo.run --bundle $(BUNDLE) --output_dir demo_output

bench: install
	$(BIN)/python -m bench.bench_networks

bench-scan: install
	$(BIN)/python -m bench.bench_scan

# Whole volumes through the Synapse bundles' inference.json (bench/bench_volume.py): hours at full size on 2 cores.
# BENCH_VOLUME_ARGS="--volumes=real --networks=residualunet,dynunet,segmamba --precision=float32", or "--tiny".
BENCH_VOLUME_ARGS ?=
bench-volume: install
	$(BIN)/python -m bench.bench_volume $(BENCH_VOLUME_ARGS)

clean:
	rm -rf demo_output build dist *.egg-info .pytest_cache

# Regenerate the twelve MONAI bundles in bundles/ from networks/bundle_gen/ (templates, dataset specs, plans).
.PHONY: bundles
bundles: install
	$(BIN)/python -m networks.bundle_gen

# ------------------------------------------------------------------ release artifacts (networks/dist.py)
# dist/: the package's wheel, <bundle>_v<version>.zip per bundle (one top-level <bundle>/ folder, as
# `monai.bundle download` extracts), model_info.json (name, version, sha256, size) and SHA256SUMS.
# Weights: make dist DIST_ARGS="--weights synapse_bisegmamba=path/to/model.pt [--weights_base_url URL]"
DIST_ARGS ?=
.PHONY: dist
dist: install
	$(BIN)/python -m networks.dist build --out dist $(DIST_ARGS)

# ------------------------------------------------------------------ MONAI Label server (networks/label/)
# `make label BUNDLE=synapse_bisegmamba STUDIES=/path/to/studies [LABEL_ARGS="--weights model.pt"]`
# serves one bundle (or a comma-separated list) with MONAI Label's monaibundle app on LABEL_HOST:LABEL_PORT.
# MONAI Label lives in its own environment, .venv-label (monailabel --no-deps plus what its server imports,
# CPU torch, and a stand-in torchvision: see networks/label/standin/torchvision/__init__.py), ~2.3 GB.
LABEL_VENV ?= .venv-label
LABEL_BIN := $(LABEL_VENV)/bin
MONAILABEL_VERSION ?= 0.8.5
LABEL_MONAI_VERSION ?= 1.6.1
STUDIES ?=
LABEL_APP ?= label_app
LABEL_HOST ?= 127.0.0.1
LABEL_PORT ?= 8000
LABEL_ARGS ?=
.PHONY: label label-install

label-install: $(LABEL_VENV)/.installed

$(LABEL_VENV)/.installed: setup.cfg setup.py networks/label/requirements.txt
	test -x $(LABEL_BIN)/python || $(PYTHON) -m venv $(LABEL_VENV)
	$(LABEL_BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(LABEL_BIN)/python -m pip install -q --no-deps --no-index "torch==$(TORCH_VERSION)" 2>/dev/null || \
	$(LABEL_BIN)/python -m pip install -q --no-deps "torch==$(TORCH_VERSION)" --index-url $(TORCH_INDEX)
	$(LABEL_BIN)/python -m pip install -q -e . -r networks/label/requirements.txt \
		"torch==$(TORCH_VERSION)" "monai==$(LABEL_MONAI_VERSION)"
	$(LABEL_BIN)/python -m pip install -q --no-deps "monailabel==$(MONAILABEL_VERSION)"
	$(LABEL_BIN)/python -m networks.label install_standin
	$(LABEL_BIN)/python -c "import monailabel.main, monailabel.tasks.infer.bundle, monailabel.tasks.train.bundle, networks"
	touch $@

label: label-install
	$(if $(STUDIES),,$(error set STUDIES=/path/to/studies (a folder of NIfTI images; labels go to its labels/final/)))
	$(LABEL_BIN)/python -m networks.label serve $(BUNDLE) $(STUDIES) --app $(LABEL_APP) \
		--host $(LABEL_HOST) --port $(LABEL_PORT) $(LABEL_ARGS)
