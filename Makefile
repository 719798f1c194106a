# edgebill — `make help` lists every target.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help demo test test-unit test-integration check lint typecheck fmt bench lock clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml requirements.lock
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

install: $(STAMP) ## Create .venv/ and install the pinned, hash-checked dependencies

demo: $(STAMP) ## Run the main job on embedded defaults (broker, local Stripe, worker, simulated fleet)
	$(BIN)/edgebill demo

test: $(STAMP) ## Run the whole test suite (unit + integration); fails when no test ran
	$(BIN)/pytest tests

test-unit: $(STAMP) ## Run the unit tests only (no broker)
	$(BIN)/pytest tests/unit

test-integration: $(STAMP) ## Run the integration tests only (broker + local Stripe + DB)
	$(BIN)/pytest tests/integration

lint: $(STAMP) ## ruff check + format check + import contracts (layers, dev kit apart, no cycles)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP) ## mypy --strict on the four packages
	$(BIN)/mypy

fmt: $(STAMP) ## Format and auto-fix with ruff
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

check: lint typecheck test ## Everything CI runs: lint, typecheck, tests

bench: $(STAMP) ## Performance benchmark, three runs and their medians (JSON lines, ratios against the raw limit)
	$(BIN)/edgebill bench --runs 3

lock: ## Regenerate requirements.lock (hashes) from pyproject.toml
	$(BIN)/pip install --quiet pip-tools==7.6.2
	$(BIN)/pip-compile --quiet --extra=dev --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links -o requirements.lock pyproject.toml

clean: ## Remove ./var (local databases, logs) and caches
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
