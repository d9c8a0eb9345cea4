# The two commands of the README: `make demo` and `make test`. Everything else supports them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup check test test-fast demo demo-down clean-bench clean-bench-cache settings-table

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

## setup: the venv with pinned requirements, debootstrap and a Docker engine that answers
setup: $(BIN)/.installed
	sh tests/bench/ensure-host.sh

## check: lint, format and types of the code (seconds, no container)
check: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## test: the whole suite: the checks above, then every topology deployed into containers
test: check setup
	$(BIN)/pytest $(PYTEST_ARGS)

## test-fast: the checks and the tests that need no container
test-fast: check
	$(BIN)/pytest -m "not bench" $(PYTEST_ARGS)

## demo: the split topology in local containers, deployed with `pyinfra inventory.py deploy.py`
demo: setup
	$(BIN)/python -m tests.bench.sandbox up

## demo-down: remove the demo's containers, network and files
demo-down: $(BIN)/.installed
	$(BIN)/python -m tests.bench.sandbox down

## clean-bench: remove every container and network any bench run left on this machine
clean-bench: $(BIN)/.installed
	$(BIN)/python -c "from tests.bench import remove_all_bench_resources as clean; clean()"

## clean-bench-cache: stop the bench's apt-cacher-ng and empty its apt and pip caches (tests/bench/caches.py)
clean-bench-cache: $(BIN)/.installed
	$(BIN)/python -c "from tests.bench import caches; caches.clear()"

## settings-table: rewrite the settings table of docs/settings.md from settings/declarations.py
settings-table: $(BIN)/.installed
	$(BIN)/python -m settings --write
