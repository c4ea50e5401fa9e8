# selfsup: `make demo` trains and evaluates the default SimCLR recipe; `make test` runs the test suite.
# Both set up a virtual environment in $(VENV). torch==2.13.0 (CPU) is installed only when the venv has no torch:
# GPU users install their own CUDA build of torch into $(VENV) first (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: setup setup-dev data demo test lint docs readme clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e .
	@$(MAKE) --no-print-directory data

setup-dev: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev]"
	@$(MAKE) --no-print-directory data

# Fashion-MNIST from Debian's dataset-fashion-mnist when apt and root are available; otherwise selfsup downloads it
# (with checksums) on first use, or reads it from data.root / $SELFSUP_DATA.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
		|| echo "apt-get could not install dataset-fashion-mnist; selfsup will try to download Fashion-MNIST"; \
	else echo "no root/apt: selfsup will download Fashion-MNIST on first use (or set SELFSUP_DATA)"; fi

demo: setup
	$(BIN)/selfsup train simclr

# Two pytest-xdist workers of 1 torch thread each (tests/conftest.py). Measured on a 2-core AMD EPYC like CI's, one
# session: the suite in 6.9-8.7 minutes this way; a subset (test_methods_metric, test_methods_canonical, test_train)
# in 92 s against 137 s serially. `pytest tests/X.py` alone still runs serially on 2 threads.
test: setup-dev
	$(BIN)/python -m pytest -n 2

# The documentation site (docs/ -> site/); `mkdocs serve` previews it. tests/test_docs.py builds it too.
docs: setup-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The method tables of README.md and docs/index.md, from the registry (a test fails when they are stale).
readme: setup-dev
	$(BIN)/python -m selfsup.catalog_table --write README.md docs/index.md

lint: setup-dev
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .ruff_cache
