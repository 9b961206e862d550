# Install and test targets; the README's quick start calls these.
PY ?= python

.PHONY: install test test-fast bench shapes

install:
	$(PY) -m pip install --quiet -e ".[dev]"

# Lint, then the full suite, slow tests included (CI runs exactly this).
test: install
	$(PY) -m ruff check src tests scripts
	$(PY) -m pytest -q

# Skip tests marked slow.
test-fast:
	$(PY) -m ruff check src tests scripts
	$(PY) -m pytest -q -m "not slow"

bench:
	$(PY) benchmarks/bench_oft.py

shapes:
	$(PY) -m orthodiff.data.shapes --out data/shapes --n 20000
