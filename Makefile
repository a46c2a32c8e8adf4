# Every target bootstraps .venv itself: torch first from the pinned constraints (a local CPU
# wheel on the project's machines), then the package with its dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test lint sweep bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check effattn kernels tests benchmarks
	$(PY) -m ruff format --check effattn kernels tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
