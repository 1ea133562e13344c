# zoodip — run `make` (or `make help`) for the list of targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

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
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP) ## Run only the slow checks (real SD architectures with random weights)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check and format check
	$(VENV)/bin/ruff check zoodip tests hydra_plugins
	$(VENV)/bin/ruff format --check zoodip tests hydra_plugins

format: $(STAMP) ## ruff format and autofix
	$(VENV)/bin/ruff format zoodip tests
	$(VENV)/bin/ruff check --fix zoodip tests

demo: $(STAMP) ## Personalize a toy-world subject with ZOODiP, evaluate it, draw demo.png (offline, CPU, ~3 minutes)
	$(VENV)/bin/zoodip-demo

clean: ## Remove caches (keeps outputs/ and .venv)
	rm -rf .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

.PHONY: help install test test-slow lint format demo clean
