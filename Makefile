# Quick start: `make serve` (engine on embedded defaults) and `make test` (the whole test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint typecheck check bench tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/pricer serve

test: $(STAMP) tools
	$(BIN)/python -m pytest

# promtool (Debian package `prometheus`) checks the alert rules; the ops tests need it.
tools:
	@command -v promtool >/dev/null 2>&1 || { \
		echo "installing promtool (Debian package prometheus)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	}

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks noxfile.py

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck

bench: $(STAMP)
	$(BIN)/nox -s bench
