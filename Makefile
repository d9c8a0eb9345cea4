# The two commands of the README: `make demo` and `make test`. Everything else supports them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
#: The older Debian release the core run checks (the whole suite runs on the newest: tests/bench).
CORE_DEBIAN ?= bookworm
#: After a failed pytest: say so loudly when it failed because it collected no test (exit 5).
NO_TESTS = { status=$$?; [ $$status -ne 5 ] || echo "pytest collected no tests (exit 5): nothing was verified" >&2; exit $$status; }

.PHONY: setup check test test-core test-fast demo demo-down clean-bench clean-bench-cache settings-table

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

## test: the checks above, then in three streams at once (tests/bench/streams.py): the fault suite, own-app and old-celery; scale-out, the all-in-one's tests, then the core run on Debian 12; every other test (the rest on Debian 13)
test: check setup
	PYTHONPATH=tests:. CORE_DEBIAN=$(CORE_DEBIAN) $(BIN)/python -m bench.streams $(PYTEST_ARGS)

## test-core: the core run (tests marked core, all-in-one and fault hosts) on Debian 12
test-core: check setup
	STACK_BENCH_DEBIAN=$(CORE_DEBIAN) $(BIN)/pytest -m core -k "not split" $(PYTEST_ARGS) || $(NO_TESTS)

## test-fast: the checks and the tests that need no container
test-fast: check
	$(BIN)/pytest -m "not bench" $(PYTEST_ARGS) || $(NO_TESTS)

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
