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
# A test process that hangs (a rare deadlock in JAX's CPU runtime: batched LAPACK kernels that
# block every thread of XLA's pool, see amortjax/__init__.py) is stopped after 15 minutes, its
# stacks printed, and its test run once more in a fresh process. Only such crashed processes are
# rerun: the --only-rerun pattern (?!) matches no error, so a failing test fails once.
# (The segfaults inside XLA's compiler of earlier runs were a test process running out of memory
# mappings, vm.max_map_count: tests/conftest.py now frees executables after each module.)
HANG_GUARD ?= --timeout 900 --timeout-method thread --reruns 1 --only-rerun "(?!)"
# The second environment: the newest Python (3.12 or 3.13) the machine has, with the newest
# releases pyproject.toml admits (today's JAX needs Python >= 3.12). `make test-newest`.
NEWEST_PYTHON ?= $(shell tools/newest-python)
NEWEST_VENV ?= .venv-newest

.PHONY: setup setup-newest test test-newest test-slow lint format experiment bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Only the dev extra, not baselines: the torch file on these machines is for Python 3.11.
setup-newest: $(NEWEST_VENV)/.installed

$(NEWEST_VENV)/.installed: pyproject.toml
	@test -n "$(NEWEST_PYTHON)" || { echo "no Python >= 3.12 found (tools/newest-python)"; exit 1; }
	test -x $(NEWEST_VENV)/bin/python || $(NEWEST_PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	$(NEWEST_VENV)/bin/python -c "import sys, jax, numpyro, flax; print('newest environment:', \
	  sys.version.split()[0], 'jax', jax.__version__, 'numpyro', numpyro.__version__, 'flax', \
	  flax.__version__)"
	touch $@

lint: setup
	$(VENV)/bin/ruff check amortjax experiments tests bench notebooks tools
	$(VENV)/bin/ruff format --check amortjax experiments tests bench notebooks tools

format: setup
	$(VENV)/bin/ruff check --fix amortjax experiments tests bench notebooks tools
	$(VENV)/bin/ruff format amortjax experiments tests bench notebooks tools

# `make test` compiles at LLVM's optimization level 0 (XLA's own graph optimizations still run):
# a cold run spends about two thirds of its time compiling (14:48 cold against 4:54 with every
# executable cached), and level 0 took 18-21% off a cold run of the end-to-end experiment tests
# and of test_gaps + test_ais_exact, with every test passing. `make test-newest` keeps the
# default level, so the optimized code that users run is tested too. `TEST_XLA_FLAGS=` (empty)
# runs the default level (echo drops the spaces: XLA reads a blank XLA_FLAGS as a file name).
TEST_XLA_FLAGS ?= --xla_backend_optimization_level=0

test: lint
	XLA_FLAGS="$$(echo $(TEST_XLA_FLAGS) $$XLA_FLAGS)" \
	  $(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist worksteal --durations=15 $(HANG_GUARD)

# The fast tests again in the second environment; skipped, saying why, without Python >= 3.12.
test-newest:
	@if [ -z "$(NEWEST_PYTHON)" ]; then \
	  echo "test-newest: SKIPPED: no Python >= 3.12 on this machine (today's JAX needs one)"; \
	else \
	  $(MAKE) setup-newest && \
	  $(NEWEST_VENV)/bin/python -m pytest -m "not slow" -n $(TEST_WORKERS) --dist worksteal \
	    --durations=5 $(HANG_GUARD); \
	fi

test-slow: setup
	$(PY) -m pytest -m slow -n $(TEST_WORKERS) --dist worksteal

experiment: setup
	$(PY) -m experiments $(NAME) --preset $(PRESET) $(ARGS)

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(NEWEST_VENV) .pytest_cache
