# Quick start: `make serve` (engine on embedded defaults) and `make test` (the whole test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The engine alone (what `make serve` needs), and the test and dev tools on top of it (what `make test` needs),
# with the Python client (clients/python), which the tests use against a real engine.
SERVE_STAMP := $(VENV)/.installed-engine
STAMP := $(VENV)/.installed

.PHONY: serve test lint typecheck check bench tools

$(SERVE_STAMP): pyproject.toml
	@echo "make: installing the engine into $(VENV) (first run only; about a minute)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar off --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -e .
	touch $(SERVE_STAMP)

$(STAMP): $(SERVE_STAMP) pyproject.toml clients/python/pyproject.toml
	@echo "make: installing the test and development tools into $(VENV) (first run only)"
	$(BIN)/python -m pip install --progress-bar off -e '.[test,dev]'
	$(BIN)/python -m pip install --progress-bar off -e ./clients/python
	touch $(STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/pricer serve

# Two processes, whole files each (pytest-xdist): most tests wait on servers they started, so two files at
# once take about half the time of one after the other. TEST_WORKERS=0 runs them in this one process.
TEST_WORKERS ?= 2
test: $(STAMP) tools
	$(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# promtool (Debian package `prometheus`) checks the alert rules; the ops tests need it.
tools:
	@command -v promtool >/dev/null 2>&1 || { \
		echo "installing promtool (Debian package prometheus)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	}

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks clients noxfile.py

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck

bench: $(STAMP)
	$(BIN)/nox -s bench
