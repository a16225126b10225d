# Two commands set up everything: `make demo` runs the main job, `make test` the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "loopbridge needs Python 3.11 or newer: set PYTHON=python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: 2.13.0's CPU build lies on this disk; an unpinned torch pulled in
	# by a framework would be a multi-GB CUDA build. The framework tests need it.
	$(BIN)/python -m pip install --quiet 'torch==2.13.0'
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/loopbridge demo $(DEMO_ARGS)

test: check pytest

check: lint typecheck

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/loopbridge bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-mlflow .mypy_cache .ruff_cache .pytest_cache

# The heavy dispatch baselines (torch, transformers, Lightning) live in their own venv, so the
# dev venv stays small. torch goes in first, pinned: 2.13.0's CPU build lies on this disk, and
# an unpinned torch pulled in by transformers or Lightning would be a multi-GB CUDA build.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

.PHONY: bench-full

$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet 'torch==2.13.0'
	$(BENCH_VENV)/bin/python -m pip install --quiet -e '.[bench]'
	$(BENCH_VENV)/bin/python -c 'import sys, torch; sys.exit(not torch.__version__.startswith("2.13.0"))' || \
		{ echo "$(BENCH_VENV): torch is not 2.13.0; remove the venv and retry"; exit 1; }
	touch $(BENCH_STAMP)

bench-full: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/loopbridge bench --full $(BENCH_ARGS)
