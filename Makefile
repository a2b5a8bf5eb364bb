# Two commands set everything up: `make experiment NAME=amortization_gap` and `make test`.
# Each creates .venv from pyproject.toml when it is missing or older than pyproject.toml.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
NAME ?= amortization_gap
PRESET ?= quick
ARGS ?=
# Test processes (pytest-xdist); 2 suits the 2-core CI machine.
TEST_WORKERS ?= 2

.PHONY: setup test test-slow lint format experiment bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

lint: setup
	$(VENV)/bin/ruff check amortjax experiments tests bench notebooks
	$(VENV)/bin/ruff format --check amortjax experiments tests bench notebooks

format: setup
	$(VENV)/bin/ruff check --fix amortjax experiments tests bench notebooks
	$(VENV)/bin/ruff format amortjax experiments tests bench notebooks

test: lint
	$(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist worksteal --durations=15

test-slow: setup
	$(PY) -m pytest -m slow -n $(TEST_WORKERS) --dist worksteal

experiment: setup
	$(PY) -m experiments $(NAME) --preset $(PRESET) $(ARGS)

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache
