# Install, test and docs targets; the README's quick start calls these.
PY ?= python
# Material for MkDocs prints a banner about its successor on every build: keep the builds quiet.
export NO_MKDOCS_2_WARNING = 1

.PHONY: install test test-fast docs bench shapes

install:
	$(PY) -m pip install --quiet -e ".[dev]"

# Lint, build the docs strictly (a broken link fails), then the full suite, slow tests
# included (CI runs exactly this).
test: install
	$(PY) -m ruff check src tests scripts
	$(PY) -m mkdocs build --strict --quiet
	$(PY) -m pytest -q -n 2 --dist worksteal

# Skip tests marked slow.
test-fast:
	$(PY) -m ruff check src tests scripts
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow"

# The docs site into site/ (git-ignored); `python -m mkdocs serve` previews it.
docs:
	$(PY) -m mkdocs build --strict

bench:
	$(PY) benchmarks/bench_oft.py

shapes:
	$(PY) -m orthodiff.data.shapes --out data/shapes --n 20000
