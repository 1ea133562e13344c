# zoodip — run `make` (or `make help`) for the list of targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`, one torch thread each (tests/conftest.py); TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= 2

.DEFAULT_GOAL := help

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install zoodip with its dependencies (editable)

test: $(STAMP) ## Run the fast test suite (CPU, tiny models, no network)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15 $(PYTEST_ARGS)

test-slow: $(STAMP) ## Run only the slow checks (real SD architectures with random weights)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check and format check
	$(VENV)/bin/ruff check zoodip tests hydra_plugins
	$(VENV)/bin/ruff format --check zoodip tests hydra_plugins

format: $(STAMP) ## ruff format and autofix
	$(VENV)/bin/ruff format zoodip tests
	$(VENV)/bin/ruff check --fix zoodip tests

demo: $(STAMP) ## Personalize a toy-world subject with ZOODiP, evaluate it, draw demo.png (offline, CPU, about a minute after install)
	$(VENV)/bin/zoodip-demo

# An offline GPU node (a cluster's compute node, an air-gapped workstation) usually brings Python with torch,
# transformers, accelerate, huggingface-hub, safetensors, pandas, matplotlib, scipy and timm (a PyTorch container or
# module), but not zoodip's other dependencies, and cannot download them. `make gpu-wheels` fetches those, at the
# versions .venv tests with, into .whl/ (git-ignored) for the node's Python (GPU_PYTHON, default 3.12, x86-64); copy
# the repository with .whl/ to the node and install there with
#   pip install --no-index --no-deps .whl/*.whl && pip install --no-deps --no-build-isolation -e .
# (docs/gpu.md). wandb and the Hydra launchers are not included: use logger=none there.
GPU_PYTHON ?= 3.12
GPU_TAG := cp$(subst .,,$(GPU_PYTHON))
GPU_PACKAGES := diffusers hydra-core omegaconf antlr4-python3-runtime optimum-quanto cma open-clip-torch ftfy wcwidth importlib-metadata
GPU_PLATFORM := --python-version $(GPU_PYTHON) --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

gpu-wheels: $(STAMP) ## Download into .whl/ the wheels an offline GPU node lacks (GPU_PYTHON=3.12, x86-64), print their size
	@mkdir -p .git/info && (grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude)
	@rm -rf .whl && mkdir -p .whl
	@pins=$$($(PY) -c 'import importlib.metadata as m, sys; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(GPU_PACKAGES)) && \
	for pin in $$pins; do \
		$(PY) -m pip download --quiet --no-deps --only-binary=:all: $(GPU_PLATFORM) -d .whl $$pin 2>/dev/null || \
		$(PY) -m pip wheel --quiet --no-deps -w .whl $$pin || exit 1; \
	done
	@ls -1 .whl
	@! ls .whl | grep -v -E -e '-(py3-none-any|$(GPU_TAG)-$(GPU_TAG)-[a-z0-9_]*|cp3[0-9]*-abi3-[a-z0-9_.]*)\.whl$$' || (echo 'gpu-wheels: the wheels above do not install on CPython $(GPU_PYTHON) x86-64' >&2; exit 1)
	@echo "wheels: $$(du -sh .whl | cut -f1); the repository's tracked files: $$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | awk '{printf "%.1f MiB", $$1 / 1048576}')"

gpu-check: ## On a CUDA machine: smoke runs, toy-world eval, bench and the GPU verdicts into gpu-check.json/.md
	$(if $(wildcard $(PY)),$(PY),python3) -m zoodip.gpu_check mode=full

clean: ## Remove caches (keeps outputs/ and .venv)
	rm -rf .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

.PHONY: help install test test-slow lint format demo clean gpu-wheels gpu-check
